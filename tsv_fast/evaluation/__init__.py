"""Real-data accuracy benchmarks (vision-mini)."""

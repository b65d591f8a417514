"""Figures of an STI report (:class:`tsv_fast.Interference`), as PNG files.

matplotlib is optional (not an install requirement): every function returns the path
it wrote, or None with a warning when matplotlib is missing.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

from .interference import Interference, block_of
from .writer import atomic_write_file


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot (pip install matplotlib)", stacklevel=3)
        return None
    return plt


def natural_key(name: str) -> list:
    """Sort ``resblocks.2`` before ``resblocks.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def block_depth(key: str) -> tuple[int, str] | None:
    """(block index, key within the block) for keys inside a transformer block, else None."""
    block = block_of(key)
    if block is None:
        return None
    return int(block.rsplit(".", 1)[1]), key[len(block) + 1:]


def _pairs(report: Interference) -> list[tuple[int, int]]:
    T = len(report.tasks)
    return [(i, j) for i in range(T) for j in range(i + 1, T)]


def plot_sti_heatmap(report: Interference, path: Path) -> Path | None:
    """STI per layer (rows: matrix keys, in depth order) and task pair (columns)."""
    plt = pyplot()
    if plt is None or not report.per_pair:
        return None
    import numpy as np

    keys = sorted(report.per_pair, key=natural_key)
    pairs = _pairs(report)
    grid = np.array([[report.per_pair[k][i, j].item() for i, j in pairs] for k in keys])
    prefix = _common_prefix(keys)
    fig, ax = plt.subplots(figsize=(max(7.0, 4 + 0.35 * len(pairs)), 2 + 0.2 * len(keys)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(pairs)), [f"{report.tasks[i]} / {report.tasks[j]}" for i, j in pairs], rotation=90)
    ax.set_yticks(range(len(keys)), [k[len(prefix):] or k for k in keys], fontsize=7)
    ax.set(title="STI per layer and task pair", xlabel="task pair", ylabel=f"{prefix}…" if prefix else "layer")
    fig.colorbar(im, ax=ax, label="STI")
    return save_png(plt, fig, path)


def plot_sti_by_depth(report: Interference, path: Path) -> Path | None:
    """STI against block depth, one line per kind of matrix (attn.in_proj, mlp.c_fc, ...)
    and one for their sum: the paper's observation is that interference grows with depth."""
    plt = pyplot()
    if plt is None:
        return None
    lines: dict[str, dict[int, float]] = {}
    for key, value in report.per_key.items():
        found = block_depth(key)
        if found is not None:
            depth, kind = found
            lines.setdefault(kind, {})[depth] = value
            lines.setdefault("all (sum)", {})
            lines["all (sum)"][depth] = lines["all (sum)"].get(depth, 0.0) + value
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, values in sorted(lines.items(), key=lambda kv: (kv[0] == "all (sum)", kv[0])):
        depths = sorted(values)
        ax.plot(depths, [values[d] for d in depths], marker="o", label=kind,
                linewidth=2.5 if kind == "all (sum)" else 1.2, color="black" if kind == "all (sum)" else None)
    ax.set(title="STI by depth", xlabel="block", ylabel="STI (all task pairs)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    return save_png(plt, fig, path)


def plot_sti_summary(report: Interference, path: Path) -> Path | None:
    """The demo's figure: STI per block (bars) and per task pair summed over keys (heatmap)."""
    plt = pyplot()
    if plt is None or not report.per_pair:
        return None
    blocks = report.by_block()
    pairs = sum(report.per_pair.values())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(range(len(blocks)), list(blocks.values()))
    ax1.set_xticks(range(len(blocks)), [b.split(".")[-1] if b[-1].isdigit() else b.split(".")[-1][:6]
                                        for b in blocks], rotation=90)
    ax1.set(title="STI per block", xlabel="block", ylabel="STI (sum over matrix keys)")
    im = ax2.imshow(pairs.numpy(), cmap="viridis")
    ax2.set_xticks(range(len(report.tasks)), report.tasks, rotation=90)
    ax2.set_yticks(range(len(report.tasks)), report.tasks)
    ax2.set_title("STI per task pair (sum over keys)")
    fig.colorbar(im, ax=ax2)
    return save_png(plt, fig, path)


def _common_prefix(keys: list[str]) -> str:
    """The dotted prefix shared by all keys (``visual.transformer.resblocks.``), if any."""
    if len(keys) < 2:
        return ""
    parts = [k.split(".") for k in keys]
    shared = []
    for column in zip(*parts):
        if len(set(column)) > 1:
            break
        shared.append(column[0])
    return ".".join(shared) + "." if shared and len(shared) < min(map(len, parts)) else ""


def save_png(plt, fig, path: Path, dpi: int = 110) -> Path:
    """Write the PNG atomically: an interrupted run leaves the previous figure, not half a file."""
    path = Path(path)
    try:
        fig.tight_layout()
        atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return path

"""Compare merging methods on real fine-tunes: accuracy table, results JSON, plots.

Benchmark-agnostic: :func:`compare_methods` needs the pretrained state dict, the
fine-tuned ones and an ``evaluate(state_dict, tasks, split) -> {task: accuracy}``
function (``split`` is ``"val"`` for λ/α selection, ``"test"`` for the reported numbers),
so vision-mini and a text benchmark share it.

Methods (names as in ``demo.json``): ``pretrained``, ``finetuned`` (each task's own
model), ``weight_averaging``, ``task_arithmetic`` (λ picked on validation),
``ties`` (λ picked on validation, density 0.2), ``tsv_m`` (α = 1), ``tsv_m_val_alpha``
(α picked on validation), ``tsv_c`` (each task rebuilt from its TSV-C factors at the
default rank floor(r/T), evaluated on its own task).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor

import tsv_fast
from tsv_fast.interference import Interference
from tsv_fast.plots import plot_sti_by_depth, plot_sti_heatmap, pyplot, save_png
from tsv_fast.writer import atomic_write_file

StateDict = Mapping[str, Tensor]
Evaluate = Callable[[StateDict, Sequence[str], str], dict[str, float]]

METHOD_ORDER = ["pretrained", "finetuned", "weight_averaging", "task_arithmetic", "ties", "tsv_m",
                "tsv_m_val_alpha", "tsv_c"]
LABELS = {"pretrained": "Pretrained", "finetuned": "Fine-tuned", "weight_averaging": "Weight avg.",
          "task_arithmetic": "Task Arithmetic", "ties": "TIES", "tsv_m": "TSV-M (α=1)",
          "tsv_m_val_alpha": "TSV-M (α val.)", "tsv_c": "TSV-C"}
TA_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
TIES_GRID = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
TSV_GRID = (0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
RANK_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "tsv_fast": tsv_fast.__version__,
            "backend": str(tsv_fast.backend()), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def summarize(per_task: dict[str, float], finetuned: dict[str, float]) -> dict:
    normalized = {t: per_task[t] / finetuned[t] if finetuned[t] > 0 else float("nan") for t in per_task}
    return {"per_task": per_task, "per_task_normalized": normalized,
            "avg_absolute": statistics.fmean(per_task.values()),
            "avg_normalized": statistics.fmean(normalized.values())}


class _Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable):
        start = time.perf_counter()
        out = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return out


def compare_methods(
    base: StateDict,
    finetuned: Mapping[str, StateDict],
    evaluate: Evaluate,
    *,
    ta_grid: Sequence[float] = TA_GRID,
    ties_grid: Sequence[float] = TIES_GRID,
    tsv_grid: Sequence[float] = TSV_GRID,
    ties_density: float = 0.2,
    rank_fractions: Sequence[float] = RANK_FRACTIONS,
    log: Callable[[str], None] = print,
) -> dict:
    """Every method on the test split, with λ/α picked on the validation split (by the
    average absolute validation accuracy), TSV-C at the default rank and at
    ``rank_fractions`` of r, and the STI of the fine-tunes. Returns the results dict
    (``methods``, ``selection``, ``tsv_c_rank``, ``sti``, ``timings_s``)."""
    tasks = list(finetuned)
    T = len(tasks)
    timer = _Timer()
    ft_list = [finetuned[t] for t in tasks]
    evaluate_all = lambda state, split: timer("evaluation", lambda: evaluate(state, tasks, split))  # noqa: E731

    def merge(method, alpha=None, **options):
        return timer(f"merge_{method}", lambda: tsv_fast.merge_layers(base, ft_list, method=method, alpha=alpha,
                                                                      names=tasks, **options))

    results: dict[str, dict] = {}
    log("evaluating: fine-tuned models")
    ft_acc = {}
    for t in tasks:
        ft_acc.update(timer("evaluation", lambda: evaluate(finetuned[t], [t], "test")))
    results["finetuned"] = summarize(ft_acc, ft_acc)
    log("evaluating: pretrained")
    results["pretrained"] = summarize(evaluate_all(base, "test"), ft_acc)

    log("merging: weight averaging")
    results["weight_averaging"] = summarize(evaluate_all(merge("mean"), "test"), ft_acc)

    selection = {}

    def swept(method, grid, label, **options):
        """Merge once at α=1, then rescale the delta for each grid value (θ0 + α·Δ)."""
        unit = merge(method, 1.0, **options)
        delta = {k: unit[k].float() - base[k].float() for k in base if base[k].is_floating_point()}
        scaled = lambda a: {k: (base[k].float() + a * delta[k]).to(base[k].dtype) if k in delta else base[k]  # noqa: E731
                            for k in base}
        sweep = {}
        for a in grid:
            val = evaluate_all(scaled(a), "val")
            sweep[a] = statistics.fmean(val.values())
            log(f"  {label} {a:g}: val avg {sweep[a]:.4f}")
        best = max(grid, key=lambda a: (sweep[a], -abs(a - 1)))
        return best, sweep, scaled

    # Task Arithmetic: θ0 + λ Σ τ = θ0 + (λT)·mean τ; merge("task_arithmetic", α=1) gives Σ τ.
    log("merging: task arithmetic (λ on validation)")
    lam, sweep, scaled = swept("task_arithmetic", ta_grid, "λ")
    selection["task_arithmetic"] = {"lambda": lam, "val_avg_absolute": sweep}
    results["task_arithmetic"] = {**summarize(evaluate_all(scaled(lam), "test"), ft_acc), "lambda": lam}

    log(f"merging: TIES (density {ties_density}, λ on validation)")
    lam, sweep, scaled = swept("ties", ties_grid, "λ", density=ties_density)
    selection["ties"] = {"lambda": lam, "density": ties_density, "val_avg_absolute": sweep}
    results["ties"] = {**summarize(evaluate_all(scaled(lam), "test"), ft_acc), "lambda": lam}

    log("merging: TSV-M (α = 1, and α on validation)")
    alpha, sweep, scaled = swept("tsv", tsv_grid, "α")
    selection["tsv_m"] = {"alpha": alpha, "val_avg_absolute": sweep}
    results["tsv_m"] = {**summarize(evaluate_all(scaled(1.0), "test"), ft_acc), "alpha": 1.0}
    results["tsv_m_val_alpha"] = {**summarize(evaluate_all(scaled(alpha), "test"), ft_acc), "alpha": alpha}
    # the timing of a plain TSV-M merge (the sweep's merge is the same call at α = 1)
    timer.timings["merge_tsv_m"] = timer.timings.pop("merge_tsv")
    log("merging: TSV-M (α = 1) with the opt-in randomized solver, to compare with exact")
    randomized = summarize(evaluate_all(merge("tsv", 1.0, solver="randomized"), "test"), ft_acc)
    timer.timings["merge_tsv_m_randomized"] = timer.timings.pop("merge_tsv")
    solver_check = {"tsv_m_exact": results["tsv_m"]["avg_absolute"],
                    "tsv_m_randomized": randomized["avg_absolute"],
                    "difference_points": 100 * (randomized["avg_absolute"] - results["tsv_m"]["avg_absolute"]),
                    "randomized_per_task": randomized["per_task"]}
    timer.timings["merge_weight_averaging"] = timer.timings.pop("merge_mean")

    log("compressing: TSV-C at floor(r/T), then each task rebuilt and evaluated on itself")
    compressed = timer("compress_tsv_c", lambda: tsv_fast.compress(base, ft_list, names=tasks))
    tsv_c_acc = {}
    for t, c in zip(tasks, compressed):
        rebuilt = timer("apply_tsv_c", lambda: c.apply(base))
        tsv_c_acc.update(timer("evaluation", lambda: evaluate(rebuilt, [t], "test")))
    full_bytes = sum(v.numel() * v.element_size() for v in base.values() if v.is_floating_point())
    results["tsv_c"] = {**summarize(tsv_c_acc, ft_acc),
                        "storage_fraction": statistics.fmean(c.nbytes() for c in compressed) / full_bytes}

    log("TSV-C accuracy vs kept rank")
    rank_sweep = []
    for f in rank_fractions:
        comp = tsv_fast.compress(base, ft_list, rank=float(f), names=tasks)
        acc = {}
        for t, c in zip(tasks, comp):
            acc.update(timer("evaluation", lambda: evaluate(c.apply(base), [t], "test")))
        s = summarize(acc, ft_acc)
        rank_sweep.append({"rank_fraction": f, "per_task": acc, "per_task_normalized": s["per_task_normalized"],
                           "avg_absolute": s["avg_absolute"], "avg_normalized": s["avg_normalized"],
                           "storage_fraction": statistics.fmean(c.nbytes() for c in comp) / full_bytes})
        log(f"  rank {f:.4g}·r: avg {s['avg_absolute']:.4f} ({s['avg_normalized']:.4f} of fine-tuned)")
    rank_sweep.append({"rank_fraction": "floor(r/T)", "per_task": tsv_c_acc,
                       "per_task_normalized": results["tsv_c"]["per_task_normalized"],
                       "avg_absolute": results["tsv_c"]["avg_absolute"],
                       "avg_normalized": results["tsv_c"]["avg_normalized"],
                       "storage_fraction": results["tsv_c"]["storage_fraction"], "default": True,
                       "tasks": T})

    log("singular task interference")
    report = timer("interference", lambda: tsv_fast.interference(base, ft_list, names=tasks))
    sti = {"tasks": tasks, "per_key": report.per_key, "by_block": report.by_block(),
           "per_pair": {k: v.tolist() for k, v in report.per_pair.items()}}

    methods = {m: results[m] for m in METHOD_ORDER if m in results}
    return {"tasks": tasks, "methods": methods, "selection": selection, "tsv_c_rank": rank_sweep,
            "sti": sti, "claims": check_claims(methods), "solver_check": solver_check,
            "timings_s": {k: round(v, 4) for k, v in timer.timings.items()}}


def check_claims(methods: Mapping[str, dict]) -> dict:
    """The paper's claims on this benchmark, true or false, with the numbers."""
    avg = {m: r["avg_absolute"] for m, r in methods.items()}
    out = {}
    for variant in ("tsv_m", "tsv_m_val_alpha"):
        for other in ("task_arithmetic", "ties"):
            if variant in avg and other in avg:
                out[f"{variant}_above_{other}"] = {"holds": avg[variant] > avg[other], variant: avg[variant],
                                                   other: avg[other]}
    if "tsv_c" in methods:
        norm = methods["tsv_c"]["avg_normalized"]
        out["tsv_c_at_least_99pct_of_finetuned"] = {"holds": norm >= 0.99, "avg_normalized": norm}
    if "pretrained" in avg and "finetuned" in avg:
        gap = avg["finetuned"] - avg["pretrained"]
        out["finetuned_beats_pretrained_by_10_points"] = {"holds": gap >= 0.10, "gap": gap}
    return out


def aggregate_seeds(runs: Sequence[dict]) -> dict:
    """Mean over seeds of every accuracy (the methods' and the TSV-C rank sweep's), with
    ``*_std`` spreads (sample std, 0 for one run); ``selection`` becomes each method's value per
    seed. ``sti`` stays the first seed's (labelled with its ``seed``): each run's is in ``per_seed``."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    methods = {}
    for m, r in first["methods"].items():
        entry = {k: v for k, v in r.items() if not isinstance(v, (dict, float))}
        for field in ("per_task", "per_task_normalized"):
            entry[field] = {t: statistics.fmean(run["methods"][m][field][t] for run in runs) for t in r[field]}
            entry[field + "_std"] = {t: std([run["methods"][m][field][t] for run in runs]) for t in r[field]}
        for field in ("avg_absolute", "avg_normalized"):
            values = [run["methods"][m][field] for run in runs]
            entry[field], entry[field + "_std"] = statistics.fmean(values), std(values)
        for field in ("lambda", "alpha", "storage_fraction"):
            if field in r:
                entry[field + "_per_seed"] = [run["methods"][m][field] for run in runs]
        methods[m] = entry
    rank_sweep = []
    for j, point in enumerate(first.get("tsv_c_rank", [])):  # the same fractions in every run
        points = [run["tsv_c_rank"][j] for run in runs]
        entry = dict(point)
        for field in ("per_task", "per_task_normalized"):
            entry[field] = {t: statistics.fmean(p[field][t] for p in points) for t in point[field]}
        for field in ("avg_absolute", "avg_normalized", "storage_fraction"):
            values = [p[field] for p in points]
            entry[field], entry[field + "_std"] = statistics.fmean(values), std(values)
        rank_sweep.append(entry)
    extra = {"tsv_c_rank": rank_sweep} if "tsv_c_rank" in first else {}
    if "selection" in first:
        extra["selection"] = {m: [run["selection"][m] for run in runs] for m in first["selection"]}
    if "sti" in first:
        extra["sti"] = {**first["sti"], "seed": first.get("seed")}
    timings = {}
    for k, v in first["timings_s"].items():  # per seed: the mean; flags: all seeds
        values = [run["timings_s"].get(k) for run in runs]
        if isinstance(v, bool):
            timings[k] = all(values)
        elif isinstance(v, dict):
            timings[k] = {t: statistics.fmean(x[t] for x in values) for t in v}
        else:
            timings[k] = statistics.fmean(values)
    return {**first, **extra, "methods": methods, "claims": check_claims(methods), "timings_s": timings,
            "per_seed": runs}


# --------------------------------------------------------------------------- printing


def format_table(result: dict) -> str:
    tasks, methods = result["tasks"], result["methods"]
    width = max(8, *(len(t) for t in tasks))
    seeds = any("avg_absolute_std" in r for r in methods.values())
    avg_w = 12 if seeds else 8
    head = f"{'method':<17}" + "".join(f"{t[:width]:>{width + 1}}" for t in tasks) + f"{'avg':>{avg_w}}{'norm.':>{avg_w}}"
    lines = [head, "-" * len(head)]
    for m, r in methods.items():
        cells = "".join(f"{100 * r['per_task'][t]:>{width + 1}.1f}" for t in tasks)
        extra = ""
        for field, sym in (("lambda", "λ"), ("alpha", "α")):
            if field in r:
                extra = f"  {sym}={r[field]:g}"
            elif field + "_per_seed" in r:
                extra = f"  {sym}=" + "/".join(f"{v:g}" for v in r[field + "_per_seed"])
        avg, norm = (f"{100 * r[f]:.1f}" + (f"±{100 * r[f + '_std']:.1f}" if seeds else "")
                     for f in ("avg_absolute", "avg_normalized"))
        lines.append(f"{LABELS.get(m, m):<17}{cells}{avg:>{avg_w}}{norm:>{avg_w}}{extra}")
    return "\n".join(lines)


def format_claims(claims: dict) -> str:
    lines = []
    for name, c in claims.items():
        numbers = ", ".join(f"{k} {v:.4f}" for k, v in c.items() if k != "holds")
        lines.append(f"  [{'yes' if c['holds'] else 'NO '}] {name}: {numbers}")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    tasks, methods = result["tasks"], result["methods"]
    out = ["| method | " + " | ".join(tasks) + " | avg | normalized |",
           "|---|" + "---:|" * (len(tasks) + 2)]
    for m, r in methods.items():
        sd = lambda f: f" ± {100 * r[f + '_std']:.1f}" if f + "_std" in r else ""  # noqa: E731
        name = LABELS.get(m, m) + (f" (λ={r['lambda']:g})" if "lambda" in r else
                                    f" (α={r['alpha']:g})" if "alpha" in r and m == "tsv_m_val_alpha" else "")
        out.append(f"| {name} | " + " | ".join(f"{100 * r['per_task'][t]:.1f}" for t in tasks)
                   + f" | {100 * r['avg_absolute']:.1f}{sd('avg_absolute')} | "
                     f"{100 * r['avg_normalized']:.1f}{sd('avg_normalized')} |")
    return "\n".join(out)


def write_json(result: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, default=float) + "\n"
    atomic_write_file(path, lambda tmp: Path(tmp).write_text(text))
    return path


# --------------------------------------------------------------------------- plots


def plot_accuracy(result: dict, path: Path, title: str = "") -> Path | None:
    """Grouped bars: accuracy per task (and the average) per method."""
    plt = pyplot()
    if plt is None:
        return None
    tasks, methods = result["tasks"], result["methods"]
    groups = tasks + ["average"]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups)) + 1.5, 4.5))
    n = len(methods)
    w = 0.8 / n
    cmap = plt.get_cmap("tab10")
    for i, (m, r) in enumerate(methods.items()):
        ys = [100 * r["per_task"][t] for t in tasks] + [100 * r["avg_absolute"]]
        xs = [g + (i - (n - 1) / 2) * w for g in range(len(groups))]
        ax.bar(xs, ys, w, label=LABELS.get(m, m), color=cmap(i % 10))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title or "accuracy per task and method")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return save_png(plt, fig, path, dpi=120)


def plot_tsv_c_rank(result: dict, path: Path, title: str = "") -> Path | None:
    """TSV-C accuracy (normalised to fine-tuned, per task and average) vs kept rank fraction."""
    plt = pyplot()
    if plt is None:
        return None
    points = [p for p in result["tsv_c_rank"] if not p.get("default")]
    default = [p for p in result["tsv_c_rank"] if p.get("default")]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [p["rank_fraction"] for p in points]
    for t in result["tasks"]:  # each point's own normalisation, like its average's (per seed, then the mean)
        ax.plot(xs, [100 * p["per_task_normalized"][t] for p in points], "-", alpha=0.35, lw=1)
    ax.plot(xs, [100 * p["avg_normalized"] for p in points], "k-o", lw=2, label="average")
    if default:
        T = default[0]["tasks"]
        ax.plot([1 / T], [100 * default[0]["avg_normalized"]], "r*", ms=12, label=f"default floor(r/T), T={T}")
    ax.axhline(99, color="grey", ls=":", label="99% of fine-tuned")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("kept rank / r (per matrix)")
    ax.set_ylabel("accuracy / fine-tuned accuracy (%)")
    ax.set_title(title or "TSV-C accuracy vs kept rank")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_png(plt, fig, path, dpi=120)


def write_plots(result: dict, out: Path, prefix: str) -> list[Path]:
    raw = result["sti"]  # the STI figures are the CLI's (tsv_fast.plots), from the JSON form
    sti = Interference(raw["tasks"], raw["per_key"], {k: torch.tensor(v) for k, v in raw["per_pair"].items()})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = [plot_accuracy(result, out / f"{prefix}_accuracy.png", f"{prefix}: accuracy per task"),
            plot_sti_heatmap(sti, out / f"{prefix}_sti_heatmap.png"),
            plot_sti_by_depth(sti, out / f"{prefix}_sti_depth.png"),
            plot_tsv_c_rank(result, out / f"{prefix}_tsv_c_rank.png", f"{prefix}: TSV-C accuracy vs kept rank")]
    return [p for p in made if p is not None]

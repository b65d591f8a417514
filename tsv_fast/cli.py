"""``tsv-fast``: merge, compress, measure interference and inspect checkpoints from a shell.

    tsv-fast merge BASE TASK... -o OUT [--method tsv] [--alpha A] [--rank K] ...
                     (a TASK may be a task store folder written by `compress`: all its tasks)
    tsv-fast merge CONFIG.yaml                      (the same fields in one YAML file)
    tsv-fast compress BASE TASK... -o STORE
    tsv-fast interference BASE TASK... -o REPORT
    tsv-fast inspect FILE... [--base BASE]

Inputs are read lazily (safetensors) and outputs streamed to disk, so a merge holds
about one key of every task in memory. Outputs appear only when complete.

Exit codes: 0 success; 2 bad input or output, with one line on stderr naming the file
and key; 1 an unexpected failure (``-v`` prints the traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import re
import signal
import sys
import textwrap
import threading
import time
import traceback
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .backend import backend
from .checkpoints import FINGERPRINT_METHOD, Checkpoint, checkpoint_files, fingerprint, open_checkpoint, tensor_nbytes
from .compress import check_energy, compress
from .errors import TSVInputError
from .interference import interference
from .keys import is_matrix_key, resolve_rank, select_keys
from .merge import BATCH_MODES, iter_merge, plan_shape_batches
from .methods import METHODS, get_method
from .plots import plot_sti_by_depth, plot_sti_heatmap
from .solvers import SOLVERS, get_solver
from .store import FORMAT as STORE_FORMAT
from .store import MANIFEST, TaskStore
from .tasks import CompressedTask, as_sources, nonfinite, select_floating_keys, tensor_meta
from .writer import (Entry, OutputError, OwnRecord, check_output, human_size, parse_size, plan_shards,
                     record_beside, staged_output, write_safetensors, writing)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
DEFAULT_SHARD_SIZE = "5GB"
MERGE_RECORD = "tsv_fast_merge.json"
STI_RECORD = "sti.json"
# What marks an output as one tsv-fast wrote, per command (fields every version wrote), so that
# --overwrite replaces only an output of ours and of the same kind.
OWN = {"merge": OwnRecord(MERGE_RECORD, "a merged model", {"tool": "tsv-fast", "command": "merge"}),
       "compress": OwnRecord(MANIFEST, "a task store", {"tool": "tsv-fast", "format": STORE_FORMAT}),
       "interference": OwnRecord(STI_RECORD, "an STI report", {"tool": "tsv-fast", "command": "interference"})}


class UsageError(TSVInputError):
    """A command line or config file the CLI refuses (the message names the file and field)."""


# ---------------------------------------------------------------------------------------------
# Method options from the registry: a new method's options get flags and YAML fields for free.

# Options whose one value is better given through several typed flags.
_OPTION_FLAGS = {"rank": [("rank", int, "per-task rank k (an int; default floor(r/T))"),
                          ("rank_fraction", float, "per-task rank as a fraction f of r: k = floor(f·r)")],
                 "polar": [("polar", str, "polar factor of the whitening: auto (default: newton-schulz on a GPU, "
                                          "eigh on a CPU), eigh (exact) or newton-schulz (GEMM-only, kept only "
                                          "where its check passes, else eigh)")],
                 "density": [("density", float, "fraction of each task's delta kept by magnitude (default 0.2)")],
                 "trim": [("trim", str, "where that fraction is taken: key (default: per key, as mergekit) or "
                                        "model (over all merged keys at once, as the TIES paper's code; reads "
                                        "every task once more)")]}


@dataclass(frozen=True)
class OptionFlag:
    field: str      # flag / YAML field name (underscores)
    option: str     # the method option it sets
    type: type
    help: str


def option_flags() -> list[OptionFlag]:
    """One flag per option of any registered method (typed from its default)."""
    flags = []
    owners: dict[str, list[str]] = {}
    for method in METHODS.values():
        for name in method.options:
            owners.setdefault(name, []).append(method.name)
    for name, methods in owners.items():
        default = METHODS[methods[0]].options[name]
        used_by = f" [{', '.join(methods)}]"
        for field, typ, text in _OPTION_FLAGS.get(name, [(name, type(default) if default is not None else float,
                                                          f"method option (default {default})")]):
            flags.append(OptionFlag(field, name, typ, text + used_by))
    return flags


# ---------------------------------------------------------------------------------------------
# Merge settings: one validation path for command-line flags and YAML config files.

_KINDS = {int: "int", float: "number", bool: "bool", str: "str"}  # option type -> field kind
_MERGE_FIELDS = {
    "base": "path", "tasks": "paths", "output": "path", "method": "str", "alpha": "number", "solver": "str",
    "batch": "str", "batch_bytes": "size or auto",
    "device": "str", "dtype": "str", "include": "patterns", "exclude": "patterns", "prefix": "str",
    "max_shard_size": "size", "overwrite": "bool", "unsafe_pickle": "bool", "dry_run": "bool",
}


def _check_field(name: str, value, kind: str, source: str):
    def bad(expected: str):
        return UsageError(f"{source}: field {name!r}: expected {expected}, got {value!r}")

    if kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
    elif kind == "paths":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad("a list of paths")
    elif kind == "patterns":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a glob pattern or a list of them")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind in ("size", "size or auto"):
        if kind == "size or auto" and value == "auto":
            return None
        try:
            value = parse_size(value)
        except ValueError as exc:
            raise bad("a size like 5GB or 500MiB" + (", or auto" if kind == "size or auto" else "")) from exc
    return value


@dataclass
class MergeJob:
    base: Path
    tasks: list[Path]
    output: Path | None
    method: str = "tsv"
    alpha: float | None = None
    options: dict | None = None
    solver: str = "exact"
    batch: str = "auto"
    batch_bytes: int | None = None  # auto: resolve_batch_bytes
    device: str = "auto"
    dtype: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    prefix: str | None = None
    max_shard_size: int | None = None  # None: DEFAULT_SHARD_SIZE for a folder, no limit for one file
    overwrite: bool = False
    unsafe_pickle: bool = False
    dry_run: bool = False


def merge_job(fields: dict, source: str, root: Path = Path(".")) -> MergeJob:
    """Validate merge settings (from flags or YAML) into a :class:`MergeJob`; ``root`` anchors
    relative paths (the config file's folder)."""
    flags = {f.field: f for f in option_flags()}
    known = {**_MERGE_FIELDS, **{f: _KINDS.get(flags[f].type, "str") for f in flags}}
    values: dict = {}
    for raw_name, value in fields.items():
        name = str(raw_name).replace("-", "_")
        if name not in known:
            raise UsageError(f"{source}: unknown field {raw_name!r}; known fields: {', '.join(sorted(known))}")
        if value is not None:
            values[name] = _check_field(name, value, known[name], source)
    for required in ("base", "tasks"):
        if required not in values:
            raise UsageError(f"{source}: field {required!r} is missing")
    if "output" not in values and not values.get("dry_run"):
        raise UsageError(f"{source}: field 'output' is missing (-o OUT)")
    options = {}
    for name, flag in flags.items():
        if name in values:
            if flag.option in options:
                raise UsageError(f"{source}: give only one of {[f for f in flags if flags[f].option == flag.option]}")
            options[flag.option] = values.pop(name)
    def path(value: str) -> Path:  # "~/ft/a.safetensors" in a YAML file means what a shell makes of it
        return root / Path(value).expanduser()

    paths = {k: path(values[k]) for k in ("base", "output") if k in values}
    job = MergeJob(**{**values, **paths, "tasks": [path(t) for t in values["tasks"]], "options": options,
                      "output": paths.get("output")})
    largest = torch.finfo(torch.float32).max  # the merge scales float32 deltas by alpha
    if job.alpha is not None and not (math.isfinite(job.alpha) and abs(job.alpha) <= largest):
        raise UsageError(f"{source}: field 'alpha': expected a finite number within float32 range "
                         f"(|alpha| <= {largest:.3g}), got {job.alpha!r}")
    get_method(job.method)  # unknown method / option / solver: the library's own errors
    get_solver(job.solver)
    if job.batch not in BATCH_MODES:
        raise UsageError(f"{source}: field 'batch': expected one of {BATCH_MODES}, got {job.batch!r}")
    if job.dtype is not None and job.dtype not in DTYPES:
        raise UsageError(f"{source}: field 'dtype': unknown dtype {job.dtype!r}; choose one of {sorted(DTYPES)}")
    return job


def _without_overridden(config: dict, given: dict) -> dict:
    """``config`` less the fields a flag overrides: a flag for a method option replaces every
    field of that option (``--rank 3`` over a file with ``rank_fraction: 0.1``)."""
    option_of = {f.field: f.option for f in option_flags()}
    options = {option_of[k] for k in given if k in option_of}
    return {k: v for k, v in config.items()
            if str(k).replace("-", "_") not in given and option_of.get(str(k).replace("-", "_")) not in options}


def load_config(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of fields (base:, tasks:, output:, ...)")
    return data


# ---------------------------------------------------------------------------------------------
# Shared steps


def _device(name: str) -> torch.device | None:
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else None
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device: unknown device {name!r} (auto, cpu or cuda)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible (use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: no such GPU ({torch.cuda.device_count()} visible: cuda:0 to "
                             f"cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu" and not (device.type == "mps" and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: not supported here (auto, cpu or cuda)")
    return device


def _open_inputs(base: Path, tasks: Sequence[Path], *, prefix, unsafe_pickle, min_tasks: int, command: str
                 ) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open the base and tasks lazily (a task's keys named as the base's: see ``open_checkpoint``),
    refusing too few tasks, task stores and repeated files."""
    if len(tasks) < min_tasks:
        raise UsageError(f"{command} needs at least {min_tasks} task checkpoints after the base, got {len(tasks)}"
                         + (" (merging a single task is almost surely a mistake)" if command == "merge" else ""))
    _refuse_store(base, "the base must be the pretrained checkpoint")
    for t in tasks:
        _refuse_store(t, f"{command} reads fine-tuned checkpoints (`tsv-fast merge` takes a store's tasks)")
    seen: dict[tuple[int, int | str], str] = {}
    for p, shown in [(base, f"{base} (the base)"), *((t, str(t)) for t in tasks)]:
        files = {_file_id(f) for f in checkpoint_files(p)}  # a folder, its index, a link or a hard link
        if twice := next((seen[f] for f in files if f in seen), None):
            raise UsageError(f"{p}: given twice (also as {twice})")
        seen.update(dict.fromkeys(files, shown))
    opened = open_checkpoint(base, prefix=prefix, unsafe_pickle=unsafe_pickle)
    return opened, [open_checkpoint(p, prefix=prefix, unsafe_pickle=unsafe_pickle, base=opened) for p in tasks]


def _file_id(path: Path) -> tuple[int, int | str]:
    """(device, inode): one file whatever path, symbolic or hard link, leads to it. A file system
    without inode numbers (st_ino 0: some FUSE, network or Windows ones) has only the real path."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return (st.st_dev, st.st_ino) if st.st_ino else (st.st_dev, str(Path(path).resolve()))


def _is_task_store(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def _refuse_store(path: Path, what: str) -> None:
    """A task store read as a checkpoint would be 'a folder of several .safetensors' or, holding
    one task, its factors read as weights: say what it is instead."""
    if _is_task_store(path):
        raise UsageError(f"{path}: is a task store (a folder with {MANIFEST}), not a checkpoint: {what}")


def _files_of(path: Path) -> list[Path]:
    """The files an input consists of: a checkpoint's shards and index, a task store's manifest and tasks."""
    if _is_task_store(path):
        return [path / MANIFEST, *sorted(path.glob("*.safetensors"))]
    return checkpoint_files(path)


def _input_record(paths: Sequence[Path]) -> list[dict]:
    return [{"path": str(p), "files": [fingerprint(f) for f in _files_of(p)]} for p in paths]


def _input_files(paths: Sequence[Path]) -> list[Path]:
    return [f for p in paths for f in (p, *_files_of(p))]


def _open_merge_inputs(base_path: Path, paths: Sequence[Path], *, prefix, unsafe_pickle
                       ) -> tuple[Checkpoint, list, list[str]]:
    """The base, and the tasks in the order given: checkpoints opened lazily, task stores
    (folders written by ``tsv-fast compress``) expanded into their compressed tasks, named
    ``STORE:task``. A store built from another base is refused (its fingerprint)."""
    stores = [p for p in paths if _is_task_store(p)]
    if len({_file_id(p / MANIFEST) for p in stores}) < len(stores):
        raise UsageError(f"a task store is given twice: {[str(p) for p in stores]}")
    base, opened = _open_inputs(base_path, [p for p in paths if p not in stores], prefix=prefix,
                                unsafe_pickle=unsafe_pickle, min_tasks=0, command="merge")
    checkpoints = iter(opened)
    tasks, names = [], []
    sources: dict[frozenset, list[tuple[str, CompressedTask]]] = {}  # source identity -> store tasks
    for p in paths:
        if p not in stores:
            tasks.append(next(checkpoints))
            names.append(str(p))
            continue
        store = TaskStore(p, base=base)
        if not store.names():
            raise UsageError(f"{p}: the task store holds no tasks")
        loaded = {name: store.load(name) for name in store.names()}
        tasks += loaded.values()
        names += [f"{p}:{name}" for name in loaded]
        for name, source in _store_sources(store).items():
            task = loaded[name]
            if twice := next((s for s, t in sources.get(source, []) if _same_deltas(t, task, base)), None):
                raise UsageError(f"{p}: task {name!r} was compressed from the same checkpoint as {twice}: "
                                 f"that task would count twice")
            sources.setdefault(source, []).append((f"{p}:{name}", task))
    if sources:  # a checkpoint given beside the store holding it, compressed: the same task twice
        for p, task in zip((p for p in paths if p not in stores), opened):
            held = sources.get(_identity(fingerprint(f) for f in checkpoint_files(p)), [])
            if twice := next((s for s, t in held if _same_deltas(t, task, base)), None):
                raise UsageError(f"{p}: given twice (also as {twice}, compressed from it): that task would "
                                 f"count twice")
    if len(tasks) < 2:
        raise UsageError(f"merge needs at least 2 tasks after the base (checkpoints or task-store tasks), got "
                         f"{len(tasks)} (merging a single task is almost surely a mistake)")
    return base, tasks, names


def _identity(fingerprints: Iterable[dict]) -> frozenset:
    """A checkpoint's files as their fingerprints' (size, hash), wherever they lie."""
    return frozenset((f["size"], f["sha256_head_tail"]) for f in fingerprints)


def _same_deltas(stored: CompressedTask, other: CompressedTask | Checkpoint, base: Checkpoint) -> bool:
    """Whether a store's task and another task (stored, or a checkpoint) whose sources have one
    fingerprint hold the same deltas: the leading singular values of their common matrix keys
    agree (a checkpoint's from one SVD, of its smallest such key). The fingerprint reads a file's
    first and last MiB only, which different fine-tunes share when those bytes are weights they
    both left frozen (embeddings, the last blocks, an adapter merged elsewhere)."""
    def spectrum(task, key: str) -> torch.Tensor:
        if isinstance(task, CompressedTask):
            return task.factors[key][1].double().cpu()
        return torch.linalg.svdvals(task[key].double() - base[key].double())

    keys = sorted((k for k in stored.factors if k in (other.factors if isinstance(other, CompressedTask) else other)),
                  key=lambda k: math.prod(tensor_meta(base, k, "base")[0]))
    if not isinstance(other, CompressedTask):
        keys = keys[:1]
    for key in keys:
        a, b = spectrum(stored, key), spectrum(other, key)
        n = min(4, len(a), len(b))  # ranks may differ; a float16 store or a randomized solver: 1e-2
        if n == 0 or not torch.allclose(a[:n], b[:n], rtol=1e-2, atol=0):
            return False
    return bool(keys)


def _store_sources(store: TaskStore) -> dict[str, frozenset]:
    """Task name -> identity of the checkpoint it was compressed from, as `tsv-fast compress`
    recorded it (tasks added otherwise, or hand-edited entries, have none)."""
    found = {}
    for entry in store.manifest["tasks"]:
        try:
            if source := _identity(entry["info"]["source"]["files"]):
                found[entry["name"]] = source
        except (KeyError, TypeError):
            pass
    return found


def _meta_tensor(state, key: str, owner: str = "base") -> torch.Tensor:
    shape, dtype = tensor_meta(state, key, owner)
    return torch.empty(shape, dtype=dtype, device="meta")


def _record(command: str, **fields) -> dict:
    return {"tool": "tsv-fast", "version": __version__, "command": command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **fields, "fingerprint_method": FINGERPRINT_METHOD}


def _rss_mib() -> float:
    """This process's resident memory now (the Python/torch runtime a dry run adds to)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _working_set(base, keys, method: str, T: int) -> tuple[int, str]:
    """Estimated bytes alive while the largest key is merged, and that key: all tasks'
    deltas of the key plus solver / trimming temporaries, in the compute dtype."""
    factor = {"tsv": 3 * T + 3, "ties": 4 * T + 2}.get(method, 5)
    best, best_key = 0, ""
    for key in keys:
        t = _meta_tensor(base, key)
        if not t.is_floating_point():
            continue
        compute = 8 if t.dtype == torch.float64 else 4
        per_key = (factor if is_matrix_key(key, t) or method == "ties" else 5) * t.numel() * compute
        if per_key > best:
            best, best_key = per_key, key
    return best, best_key


# ---------------------------------------------------------------------------------------------
# merge


def cmd_merge(args: argparse.Namespace) -> int:
    fields = {name: getattr(args, name, None) for name in (*_MERGE_FIELDS, *(f.field for f in option_flags()))}
    inputs = [Path(p) for p in args.inputs]
    configs = [p for p in inputs if p.suffix in (".yaml", ".yml")]
    if configs and len(inputs) > 1:
        raise UsageError(f"{configs[0]}: a CONFIG.yaml must be the only input (give tasks in its 'tasks' field)")
    if configs:
        config = load_config(inputs[0])
        given = {k: v for k, v in fields.items() if v is not None and k not in ("base", "tasks")}
        if "output" in given:  # relative to the working directory, not to the config file
            given["output"] = str(Path(given["output"]).resolve())
        job = merge_job({**_without_overridden(config, given), **given}, str(inputs[0]), root=inputs[0].parent)
    else:
        fields.update(base=str(inputs[0]), tasks=[str(p) for p in inputs[1:]])
        job = merge_job(fields, "command line")
    base, tasks, names = _open_merge_inputs(job.base, job.tasks, prefix=job.prefix, unsafe_pickle=job.unsafe_pickle)
    T = len(tasks)
    out_dtype = DTYPES[job.dtype] if job.dtype else None
    device = _device(job.device)
    # iter_merge checks keys, shapes, dtypes, method, options and solver now, from the headers
    merged = iter_merge(base, tasks, job.method, job.alpha, names=names, include=job.include, exclude=job.exclude,
                        solver=job.solver, out_dtype=out_dtype, device=device, progress=_progress(args),
                        batch=job.batch, batch_bytes=job.batch_bytes, **job.options)
    if job.output is not None:
        record_file = [record_beside(job.output)] if job.output.suffix == ".safetensors" else []
        check_output(job.output, _input_files([job.base, *job.tasks]), overwrite=job.overwrite or job.dry_run,
                     also=record_file, record=OWN["merge"], others=list(OWN.values()), folder=not record_file)
    spec = get_method(job.method)
    alpha = spec.default_alpha if job.alpha is None else job.alpha
    selected = select_keys(base, job.include, job.exclude)
    entries = [Entry(k, *_out_meta(base, k, out_dtype)) for k in base]
    ranks = _merge_ranks(base, selected, job, T) if job.method == "tsv" else {}
    record = _record("merge", method=job.method, alpha=alpha, options={**spec.options, **job.options},
                     ranks_per_task=ranks, solver=job.solver, dtype=job.dtype, include=job.include,
                     exclude=job.exclude, prefix=job.prefix,
                     inputs={"base": _input_record([job.base])[0], "tasks": _input_record(job.tasks)})
    single = job.output is not None and job.output.suffix == ".safetensors"
    if job.max_shard_size is None and not single:  # the default limit shards folders, never refuses one file
        job.max_shard_size = parse_size(DEFAULT_SHARD_SIZE)
    if job.dry_run:
        _merge_plan(args, job, base, tasks, entries, selected, ranks, alpha)
        return 0
    start = time.perf_counter()
    written = write_safetensors(job.output, entries, merged, metadata={"format": "pt", "tsv_fast": json.dumps(record)},
                                record=record, record_name=MERGE_RECORD, max_shard_bytes=job.max_shard_size,
                                overwrite=job.overwrite, own=OWN["merge"], others=list(OWN.values()))
    shards = [p for p in written if p.suffix == ".safetensors"]
    _say(args, f"merged {T} tasks ({job.method}, alpha {alpha:g}) into {job.output}: "
               f"{human_size(sum(e.nbytes for e in entries))} in {len(shards)} safetensors file(s), "
               f"{time.perf_counter() - start:.1f} s")
    return 0


def _exists_note(out: Path | None, overwrite: bool) -> str:
    """A dry run reports an existing output rather than refusing it."""
    if out is None or not out.exists():
        return ""
    return " (exists: will be replaced)" if overwrite else " (exists: a real run needs --overwrite)"


def _out_meta(base, key: str, out_dtype):
    shape, dtype = tensor_meta(base, key, "base")
    return shape, (out_dtype if out_dtype is not None and dtype.is_floating_point else dtype)


def _merge_ranks(base, selected, job: MergeJob, T: int) -> dict[str, int]:
    """Per-task rank TSV-M keeps, per matrix shape (``"3072x768": 96``)."""
    ranks = {}
    for key in base:
        t = _meta_tensor(base, key)
        if key in selected and is_matrix_key(key, t):
            ranks["x".join(map(str, t.shape))] = resolve_rank(t.shape, job.options.get("rank"), T)
    return ranks


def _merge_plan(args, job: MergeJob, base, tasks, entries, selected, ranks, alpha) -> None:
    T = len(tasks)
    kinds = {"matrix": 0, "other": 0, "copied": 0}
    for key in base:
        t = _meta_tensor(base, key)
        kind = "copied" if key not in selected or not t.is_floating_point() else \
            "matrix" if is_matrix_key(key, t) else "other"
        kinds[kind] += 1
    work, work_key = _working_set(base, [k for k in base if k in selected], job.method, T)
    batches = plan_shape_batches(base, tasks, selected, job.method, _device(job.device), job.batch, job.batch_bytes)
    largest = max((nbytes for _, nbytes in batches), default=0)
    size = sum(e.nbytes for e in entries)
    shards = plan_shards(entries, job.max_shard_size)
    if len(shards) > 1 and job.output is not None and job.output.suffix == ".safetensors":
        raise OutputError(f"{job.output}: the output ({human_size(size)}) is larger than the shard limit "
                          f"({human_size(job.max_shard_size)}); give a folder as the output to write shards")
    ckpt = base.nbytes()
    print("tsv-fast merge: dry run (inputs checked from their headers; nothing merged or written)")
    print(f"  method   {job.method} ({get_method(job.method).summary}), alpha {alpha:g}"
          + (f", options {job.options}" if job.options else ""))
    print(f"  base     {job.base} ({len(base)} tensors, {human_size(ckpt)})")
    print(f"  tasks    {T}: {', '.join(map(str, job.tasks))}")
    how = "TSV" if job.method == "tsv" else job.method
    print(f"  keys     {kinds['matrix']} matrix keys ({how}), {kinds['other']} other floating keys"
          f"{' (mean of task vectors)' if job.method == 'tsv' else ''}, {kinds['copied']} copied from the base")
    if ranks:
        print("  ranks    " + ", ".join(f"{s}: k={k} per task (T·k={T * k})" for s, k in ranks.items()))
    where = job.output if job.output is not None else "(no -o given)"
    print(f"  output   {where}: {human_size(size)} in {len(shards)} file(s), dtype "
          f"{job.dtype or 'as the base'}{_exists_note(job.output, job.overwrite)}")
    if batches:  # a batch's stacked deltas, plus at most as much again while solving (the merge's bound)
        batched = {k for keys, _ in batches for k in keys}
        waiting = sum(e.nbytes for e in entries if e.key in batched)  # merged keys held until their turn
        held = (f"≈ {human_size(2 * largest)} working set at most ({len(batches)} shape batches, the largest "
                f"{human_size(largest)} of stacked deltas) + up to {human_size(waiting)} of merged keys "
                f"waiting for their turn")
    else:
        held = f"≈ {human_size(work)} working set (largest key {work_key}, all {T} tasks)"
    if job.method == "ties" and job.options.get("trim") == "model":  # methods.ties_model_thresholds' pass
        merged = [_meta_tensor(base, k) for k in base if k in selected]
        merged = [t for t in merged if t.is_floating_point()]
        wide = 8 if any(t.dtype == torch.float64 for t in merged) else 4
        held += (f"; before it, a first pass over each task holds that task's |τ| of every merged key, "
                 f"≈ {human_size(wide * sum(t.numel() for t in merged))}")
    print(f"  memory   {held} + {human_size(_rss_mib() * 2**20)} Python/torch runtime; tensors are read and "
          f"written one key{' batch' if batches else ''} at a time (loading every checkpoint first would "
          f"need ≈ {human_size((T + 1) * ckpt + size)})")


# ---------------------------------------------------------------------------------------------
# compress


def cmd_compress(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.rank, args.rank_fraction, args.energy)) > 1:
        raise UsageError("give only one of --rank, --rank-fraction, --energy")
    if args.dtype is not None and args.dtype not in DTYPES:
        raise UsageError(f"--dtype: unknown dtype {args.dtype!r}; choose one of {sorted(DTYPES)}")
    base_path, task_paths = Path(args.inputs[0]), [Path(p) for p in args.inputs[1:]]
    base, tasks = _open_inputs(base_path, task_paths, prefix=args.prefix, unsafe_pickle=args.unsafe_pickle,
                               min_tasks=1, command="compress")
    rank = args.rank if args.rank is not None else args.rank_fraction
    T = args.num_tasks if args.num_tasks is not None else len(tasks)
    if len(tasks) == 1 and rank is None and args.energy is None and args.num_tasks is None:
        warnings.warn("one task and no --rank/--rank-fraction/--energy/--num-tasks: k = floor(r/1) = r keeps "
                      "full rank (no compression)", stacklevel=1)
    dtype = DTYPES[args.dtype] if args.dtype else None
    names = [str(p) for p in task_paths]
    files = _unique_names(task_paths)  # the store's task names, valid before any work
    store = Path(args.output) if args.output else None
    if store is not None:
        check_output(store, _input_files([base_path, *task_paths]), overwrite=args.overwrite or args.dry_run,
                     record=OWN["compress"], others=list(OWN.values()), folder=True)
    as_sources(base, tasks, names)  # keys, shapes, dtypes: from the headers, before any work
    selected = select_floating_keys(base, args.include, args.exclude, "compress")
    check_energy(args.energy, "--energy")  # settings too: a dry run that passes must run
    solver = args.solver or "exact"
    get_solver(solver)
    device = _device(args.device or "auto")
    if args.dry_run:
        _compress_plan(base, tasks, selected, rank, args.energy, T, dtype, store, args.overwrite)
        return 0
    if store is None:
        raise UsageError("compress needs -o STORE (or --dry-run)")
    start = time.perf_counter()
    compressed = compress(base, tasks, rank, energy=args.energy, num_tasks=args.num_tasks, names=names,
                          include=args.include, exclude=args.exclude, solver=solver,
                          factor_dtype=dtype, device=device, progress=_progress(args))
    with staged_output(store, folder=True, overwrite=args.overwrite, record=OWN["compress"],
                       others=list(OWN.values())) as stage:
        # The store format of tsv_fast.TaskStore (manifest with the base fingerprint), so
        # TaskStore / MultiTaskModel open what this command writes.
        task_store = TaskStore(stage, base=base, default_rank=rank, num_tasks=T, dtype=dtype)
        settings = _record("compress", rank=rank, energy=args.energy, num_tasks=T, solver=args.solver or "exact",
                           dtype=args.dtype, include=args.include, exclude=args.exclude, prefix=args.prefix,
                           base=_input_record([base_path])[0])
        for task, path, name in zip(compressed, task_paths, files):
            task_store.add(name, task, info={"source": _input_record([path])[0], "compress": settings})
    total = sum(t.nbytes() for t in compressed)
    _say(args, f"compressed {len(tasks)} task(s) into {store}: {human_size(total)} "
               f"({100 * total / (len(tasks) * base.nbytes()):.1f}% of {len(tasks)} checkpoint(s)), "
               f"{time.perf_counter() - start:.1f} s")
    return 0


def _compress_plan(base, tasks, selected, rank, energy, T, dtype, store, overwrite) -> None:
    per_task, ranks = 0, {}
    for key in base:
        t = _meta_tensor(base, key)
        if key not in selected or not t.is_floating_point():
            continue
        item = (dtype or t.dtype).itemsize
        if is_matrix_key(key, t):
            k = min(t.shape) if energy is not None else resolve_rank(t.shape, rank, T)
            ranks["x".join(map(str, t.shape))] = k
            per_task += k * (sum(t.shape) + 1) * item
        else:
            per_task += t.numel() * item
    work, work_key = _working_set(base, selected, "tsv", len(tasks))
    bound = "at most " if energy is not None else ""
    print("tsv-fast compress: dry run (inputs checked from their headers; nothing computed or written)")
    print(f"  tasks    {len(tasks)}, ranks " + (f"chosen per key to keep {energy:.0%} energy" if energy is not None
                                                 else ", ".join(f"{s}: k={k}" for s, k in ranks.items())))
    print(f"  output   {store or '(no -o given)'}: {bound}{human_size(per_task)} per task, {bound}"
          f"{human_size(per_task * len(tasks))} in all ({100 * per_task / base.nbytes():.1f}% of a checkpoint each)"
          f"{_exists_note(store, overwrite)}")
    print(f"  memory   ≈ {human_size(per_task * len(tasks))} compressed tasks (kept until written) + "
          f"{human_size(work)} working set (largest key {work_key}) + {human_size(_rss_mib() * 2**20)} runtime")


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Task names from the file-name stems (``ft/sun397.safetensors`` → ``sun397``), made valid
    store names (``my task`` → ``my-task``, ``café`` → ``cafe``, ``_t1`` → ``t1``) and unique."""
    names: list[str] = []
    for n, p in enumerate(paths):
        stem = p.parent.name if p.name.endswith(".index.json") else p.stem if p.is_file() else p.name
        ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
        stem = re.sub(r"[^A-Za-z0-9._+-]", "-", ascii_stem).lstrip("._+-")[:120] or f"task{n}"
        name, i = stem, 2
        while name in names:
            name, i = f"{stem}-{i}", i + 1
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------
# interference


def cmd_interference(args: argparse.Namespace) -> int:
    base_path, task_paths = Path(args.inputs[0]), [Path(p) for p in args.inputs[1:]]
    base, tasks = _open_inputs(base_path, task_paths, prefix=args.prefix, unsafe_pickle=args.unsafe_pickle,
                               min_tasks=2, command="interference")
    out = Path(args.output)
    check_output(out, _input_files([base_path, *task_paths]), overwrite=args.overwrite, record=OWN["interference"],
                 others=list(OWN.values()), folder=True)
    report = interference(base, tasks, names=[str(p) for p in task_paths], include=args.include,
                          exclude=args.exclude, solver=args.solver or "exact", device=_device(args.device or "auto"),
                          progress=_progress(args))
    report.tasks = _unique_names(task_paths)  # short labels for the tables and plots
    pairs = [(i, j) for i in range(len(report.tasks)) for j in range(i + 1, len(report.tasks))]
    summary = _record("interference", tasks=report.tasks, per_key=report.per_key, by_block=report.by_block(),
                      per_pair={k: v.tolist() for k, v in report.per_pair.items()},
                      inputs={"base": _input_record([base_path])[0], "tasks": _input_record(task_paths)})
    # a failed write names the report's file (a full disk's OSError names none)
    with staged_output(out, folder=True, overwrite=args.overwrite, record=OWN["interference"],
                       others=list(OWN.values())) as stage:
        with writing(out / "sti_per_layer.csv"), open(stage / "sti_per_layer.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "sti"])
            w.writerows([k, v] for k, v in report.per_key.items())
        with writing(out / "sti_per_pair.csv"), open(stage / "sti_per_pair.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "task_a", "task_b", "sti"])
            for k, grid in report.per_pair.items():
                w.writerows([k, report.tasks[i], report.tasks[j], grid[i, j].item()] for i, j in pairs)
        with writing(out / STI_RECORD):
            (stage / STI_RECORD).write_text(json.dumps(summary, indent=2))
        pngs = []
        for name, plot in (("sti_heatmap.png", plot_sti_heatmap), ("sti_by_depth.png", plot_sti_by_depth)):
            with writing(out / name):
                pngs.append(plot(report, stage / name))
    _say(args, f"STI of {len(report.per_key)} matrix keys, {len(pairs)} task pairs: {out}/ "
               f"(sti_per_layer.csv, sti_per_pair.csv, sti.json"
               + "".join(f", {p.name}" for p in pngs if p is not None) + ")")
    if report.per_key:
        top = max(report.by_block().items(), key=lambda kv: kv[1])
        _say(args, f"highest STI: {top[0]} ({top[1]:.4g})")
    return 0


# ---------------------------------------------------------------------------------------------
# inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.num_tasks is not None and not args.base:
        raise UsageError("inspect --num-tasks sets the rank floor(r/T) of the deltas against --base: give --base too")
    what = "inspect reads checkpoints (`tsv_fast.TaskStore` opens a store in Python)"
    for path in ([args.base] if args.base else []) + args.files:
        _refuse_store(Path(path), what)
    base = open_checkpoint(args.base, prefix=args.prefix, unsafe_pickle=args.unsafe_pickle) if args.base else None
    T = args.num_tasks if args.num_tasks is not None else len(args.files)
    if base is not None and args.num_tasks is None and len(args.files) < 2:  # k = floor(r/1) = r: all energy
        raise UsageError("inspect --base with one file: give --num-tasks T for the rank floor(r/T)")
    for path in args.files:
        ckpt = open_checkpoint(path, prefix=args.prefix, unsafe_pickle=args.unsafe_pickle, base=base)
        fmt = "safetensors" if hasattr(ckpt, "meta") else "pytorch"
        print(f"{path}: {fmt}, {len(ckpt)} tensors, {human_size(ckpt.nbytes())}, {len(ckpt.files)} file(s)")
        if base is not None:
            as_sources(base, [ckpt], [str(path)])
        rows, energies = [], []
        for key in ckpt:
            t = _meta_tensor(ckpt, key, str(path))
            kind = "matrix" if is_matrix_key(key, t) else "float" if t.is_floating_point() else "buffer"
            row = [key, "x".join(map(str, t.shape)) or "scalar", str(t.dtype).removeprefix("torch."),
                   human_size(tensor_nbytes(tuple(t.shape), t.dtype)), kind]
            if base is not None and kind == "matrix":
                task_t, base_t = _finite(ckpt[key], path, key), _finite(base[key], args.base, key)
                k, erank, energy = _spectrum(task_t, base_t, T)
                energies.append(energy)
                row += [str(k), f"{erank:.1f}", "-" if math.isnan(energy) else f"{energy:.1%}"]
            elif base is not None:
                row += ["", "", ""]
            rows.append(row)
        if not args.quiet:
            head = ["key", "shape", "dtype", "size", "TSV"] + (["k", "eff.rank", "energy@k"] if base else [])
            _table(head, rows)
        n_matrix = sum(r[4] == "matrix" for r in rows)
        line = f"  {n_matrix} matrix keys (TSV factorises these), {len(rows) - n_matrix} other keys"
        kept = [e for e in energies if not math.isnan(e)]
        if kept:
            line += (f"; task vector keeps {sum(kept) / len(kept):.1%} of its energy on average at "
                     f"k = floor(r/{T})")
        print(line)
    return 0


def _finite(t: torch.Tensor, path, key: str) -> torch.Tensor:
    if nonfinite([t]):
        raise TSVInputError(f"{path}: {key}: contains NaN or Inf")
    return t


def _spectrum(task: torch.Tensor, base: torch.Tensor, T: int) -> tuple[int, float, float]:
    """k = floor(r/T), effective rank exp(H(s/Σs)) (Roy & Vetterli) and the share of Σs² in
    the top k singular values of the task vector."""
    s = torch.linalg.svdvals(task.double() - base.double())
    k = min(task.shape) // T
    if s.sum() == 0:
        return k, 0.0, float("nan")
    p = s / s.sum()
    erank = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()
    return k, erank, (s[:k].pow(2).sum() / s.pow(2).sum()).item()


def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


# ---------------------------------------------------------------------------------------------
# Parser and entry point


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in the tool's format (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"tsv-fast: error: {message} (see '{self.prog} --help')\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tsv-fast", description="Merge, compress, measure interference and inspect "
                                                  "checkpoints with Task Singular Vectors.",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run 'tsv-fast COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"tsv-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="more detail; tracebacks on failures")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary (warnings and "
                                                                        "errors are still shown)")
    reading = argparse.ArgumentParser(add_help=False)
    reading.add_argument("--prefix", default=None, help="use only keys starting with this, e.g. 'visual.' for the "
                                                        "image tower of a full open_clip checkpoint")
    reading.add_argument("--unsafe-pickle", action="store_true", default=None,
                         help="allow whole pickled models (torch.load weights_only=False): runs code from the "
                              "file, only for files you trust")
    work = argparse.ArgumentParser(add_help=False)
    work.add_argument("--include", action="append", default=None, metavar="GLOB",
                      help="use only keys matching this fnmatch pattern (repeatable)")
    work.add_argument("--exclude", action="append", default=None, metavar="GLOB",
                      help="skip keys matching this pattern (repeatable)")
    work.add_argument("--solver", default=None, help=f"top-k SVD solver: {', '.join(SOLVERS)} (default exact)")
    work.add_argument("--device", default=None, help="auto (cuda if visible), cpu or cuda (default auto)")
    writing = argparse.ArgumentParser(add_help=False)
    writing.add_argument("--overwrite", action="store_true", default=None,
                         help="replace an existing output (a folder only if tsv-fast wrote it)")
    writing.add_argument("--dry-run", action="store_true", default=None,
                         help="check the inputs, print the plan, output size and a memory estimate; do nothing")

    methods = "\n".join(f"  {m.name:<16} {m.summary} (default alpha {m.default_alpha:g})" for m in METHODS.values())
    merge = sub.add_parser(
        "merge", parents=[common, reading, work, writing], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="merge fine-tuned checkpoints into one (TSV-M or a baseline)",
        description=_paragraphs(
            "Merge TASK checkpoints (at least 2: merging one task is almost surely a mistake; the Python API "
            "allows it) into BASE, streaming key by key to OUT.",
            "OUT ending in .safetensors is one file (record in OUT.json); any other OUT is a Hugging Face folder "
            "(model.safetensors, or shards above --max-shard-size with model.safetensors.index.json, and "
            f"{MERGE_RECORD}).",
            f"methods:\n{methods}",
            "CONFIG.yaml: the same settings as fields (base, tasks, output, method, alpha, "
            + ", ".join(f.field for f in option_flags()) + ", solver, batch, batch_bytes, device, dtype, include, exclude, prefix, "
            "max_shard_size, overwrite, unsafe_pickle, dry_run); paths in it are relative to its folder; flags "
            "given on the command line override it."))
    merge.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="BASE TASK TASK... or one CONFIG.yaml; a TASK may be a task store folder "
                            "(from `tsv-fast compress`), standing for all its tasks")
    merge.add_argument("-o", "--output", default=None, metavar="OUT", help="output file or folder")
    merge.add_argument("--method", default=None, help=f"{' | '.join(METHODS)} (default tsv)")
    merge.add_argument("--alpha", type=float, default=None, help="scale of the merged delta (default: the method's)")
    merge.add_argument("--batch", default=None, choices=BATCH_MODES,
                       help="TSV-M top-k per key, or per shape across layers (one batch per matrix shape, "
                            "held in memory up to --batch-bytes of deltas); auto = shape on a GPU, key on a CPU")
    merge.add_argument("--batch-bytes", default=None, metavar="SIZE",
                       help="stacked deltas of one shape batch, e.g. 8GiB, or auto (default: a quarter of the "
                            "GPU's free memory, 2GiB on a CPU): larger batches make fewer, fuller GPU launches; "
                            "peak memory stays about twice one batch")
    flags = option_flags()
    shared = {f.option for f in flags if sum(g.option == f.option for g in flags) > 1}
    groups = {option: merge.add_mutually_exclusive_group() for option in shared}
    for flag in flags:
        typed = {"action": argparse.BooleanOptionalAction} if flag.type is bool else {"type": flag.type}
        groups.get(flag.option, merge).add_argument(f"--{flag.field.replace('_', '-')}", dest=flag.field,
                                                    default=None, help=flag.help, **typed)
    merge.add_argument("--dtype", default=None,
                       help="output dtype: float32, float16, bfloat16 or float64 (default: the base's)")
    merge.add_argument("--max-shard-size", default=None, help=f"shard a folder output above this (default "
                                                              f"{DEFAULT_SHARD_SIZE}); a .safetensors OUT "
                                                              f"larger than a limit given here is refused")
    merge.set_defaults(func=cmd_merge)

    comp = sub.add_parser("compress", parents=[common, reading, work, writing],
                          help="TSV-C: store each task as low-rank factors",
                          description="TSV-C: per task and matrix key, the top-k singular triplets of the task "
                                      "vector (k = floor(r/T) by default). STORE is a folder with one safetensors "
                                      f"file per task (CompressedTask.to_state_dict layout) and {MANIFEST}.")
    comp.add_argument("inputs", nargs="+", metavar="INPUT", help="BASE TASK...")
    comp.add_argument("-o", "--output", default=None, metavar="STORE", help="output folder")
    comp.add_argument("--rank", type=int, default=None, help="per-task rank k")
    comp.add_argument("--rank-fraction", type=float, default=None, help="per-task rank floor(f·r)")
    comp.add_argument("--energy", type=float, default=None, help="smallest k keeping this share of Σs² (e.g. 0.9)")
    comp.add_argument("--num-tasks", type=_positive_int, default=None,
                      help="T in floor(r/T) (default: number of tasks)")
    comp.add_argument("--dtype", default=None,
                      help="factor dtype: float32, float16, bfloat16 or float64 (default: the base's)")
    comp.set_defaults(func=cmd_compress)

    inter = sub.add_parser("interference", parents=[common, reading, work],
                           help="STI per layer and task pair: CSV, JSON and plots",
                           description="Singular Task Interference per matrix key and task pair. REPORT is a folder: "
                                       "sti_per_layer.csv, sti_per_pair.csv, sti.json, sti_heatmap.png (layers × "
                                       "task pairs) and sti_by_depth.png.")
    inter.add_argument("inputs", nargs="+", metavar="INPUT", help="BASE TASK TASK...")
    inter.add_argument("-o", "--output", required=True, metavar="REPORT", help="output folder")
    inter.add_argument("--overwrite", action="store_true", help="replace an existing report (one tsv-fast wrote)")
    inter.set_defaults(func=cmd_interference)

    insp = sub.add_parser("inspect", parents=[common, reading], help="keys, shapes, dtypes, sizes; task spectra",
                          description="List each FILE's tensors and which ones TSV treats as matrices. With --base, "
                                      "treat each FILE as a fine-tuned task: effective rank of its task vector and "
                                      "the energy kept at k = floor(r/T).")
    insp.add_argument("files", nargs="+", metavar="FILE")
    insp.add_argument("--base", default=None, help="the pretrained checkpoint the FILEs were fine-tuned from")
    insp.add_argument("--num-tasks", type=_positive_int, default=None,
                      help="T for k = floor(r/T) (default: number of FILEs)")
    insp.set_defaults(func=cmd_inspect)

    bench = sub.add_parser("bench", parents=[common],
                           help="accuracy benchmarks on real fine-tunes (vision-mini, text-8)",
                           description="tsv-fast bench accuracy --benchmark {vision-mini,text-8} [OPTIONS]: the real "
                                       "evaluation of README.md (python -m tsv_fast.evaluation); every OPTION after "
                                       "'accuracy' goes to it (see: tsv-fast bench accuracy --help).")
    bench.add_argument("kind", choices=["accuracy"])
    bench.add_argument("options", nargs=argparse.REMAINDER, help="options of python -m tsv_fast.evaluation")
    bench.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    from .evaluation.__main__ import main as run_accuracy_benchmark

    try:
        run_accuracy_benchmark(args.options, prog="tsv-fast bench accuracy")
    except SystemExit as exc:  # its own --help and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    return 0


def _paragraphs(*texts: str) -> str:
    """Wrapped help paragraphs (tables, with newlines, are kept as they are)."""
    return "\n\n".join(t if "\n" in t else textwrap.fill(t, 88) for t in texts)


def _progress(args) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _say(args, message: str) -> None:
    if not args.quiet:
        print(message)


@contextlib.contextmanager
def _cli_environment() -> Iterator[None]:
    """Warnings as one 'tsv-fast: warning:' line each (even with -q: --unsafe-pickle's must not
    be hidden); SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C, so staged outputs are
    removed, unless the signal is ignored (``nohup``: the run must go on)."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"tsv-fast: warning: {message}", file=sys.stderr)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, interrupt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.showwarning = show
            yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 2
    with _cli_environment():
        try:
            if args.verbose:
                print(f"tsv-fast {__version__}: {backend()}", file=sys.stderr)
            return args.func(args)
        except (TSVInputError, OutputError) as exc:
            if args.verbose:
                traceback.print_exc()
            print(f"tsv-fast: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                print("tsv-fast: interrupted; no output was written", file=sys.stderr)
            return 130
        except Exception as exc:
            if args.verbose:
                traceback.print_exc()
            print(f"tsv-fast: error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())}"
                  + ("" if args.verbose else " (run with -v for the traceback)"), file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())

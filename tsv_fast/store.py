"""A folder of compressed tasks (TSV-C) over one base model: the deployment format.

Layout::

    STORE/manifest.json         names, per-key ranks, dtype, base fingerprint, version
    STORE/<name>.safetensors    one task: ``key::U`` (m×k), ``key::S`` (k), ``key::V`` (n×k)
                                per matrix key, ``key::delta`` for the other keys

Keys whose delta is exactly zero (a frozen text tower) are not stored. Every write goes
to a temporary file in the folder and is renamed into place (``os.replace``), task
file first, manifest second, so a crash never leaves a half-written task or a manifest
entry without its file. One writer at a time: there is no lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoints import SAFETENSORS_DTYPES, is_plain_file_name
from .compress import compress
from .errors import TSVInputError
from .keys import Rank, check_num_tasks, check_rank, is_matrix_key
from .tasks import CompressedTask, StateDict, Task, as_sources, nonfinite, tensor_meta
from .writer import OutputError, atomic_write_file, cannot_write

__all__ = ["TaskStore", "base_fingerprint", "expected_nbytes", "MANIFEST", "FINGERPRINT_METHOD"]

MANIFEST = "manifest.json"
FORMAT = "tsv-fast task store"
FORMAT_VERSION = 1
_SAMPLES = 64
FINGERPRINT_METHOD = (f"sha256 over the sorted key names, shapes and dtypes of the base and, per tensor, "
                      f"{_SAMPLES} values at a fixed stride (as float64 / int64); it tells bases apart, "
                      f"not every single-value edit")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def base_fingerprint(base: StateDict, as_dtype: torch.dtype | None = None) -> str:
    """Cheap, deterministic identity of a base state dict (see ``FINGERPRINT_METHOD``).

    Reads 64 values per tensor rather than hashing every byte, so fingerprinting a
    ViT-B/32 costs milliseconds; device and storage layout do not change it, dtype does.
    ``as_dtype``: the fingerprint of the base with its floating tensors cast to that dtype
    (only the sampled values are cast), as a model converted with ``.half()`` gives.
    """
    return _fingerprints(base, [as_dtype])[0]


def _fingerprints(base: StateDict, dtypes: list[torch.dtype | None]) -> list[str]:
    """:func:`base_fingerprint` for each of ``dtypes``, reading each tensor once."""
    hashes = [hashlib.sha256() for _ in dtypes]
    for key in sorted(base):
        t = base[key]
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _SAMPLES)][:_SAMPLES].cpu() if flat.numel() else None
        for h, dtype in zip(hashes, dtypes):
            dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
            h.update(f"{key}|{tuple(t.shape)}|{_dtype_name(dtype)}\n".encode())
            if sample is not None:
                s = sample.to(dtype)
                s = s.double() if s.is_floating_point() else s.long()
                h.update(s.numpy().tobytes())
    return [h.hexdigest() for h in hashes]


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _DTYPES.values():
            raise TSVInputError(f"store dtype must be one of {sorted(_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise TSVInputError(f"store dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _check_manifest_fields(manifest: dict, path: Path) -> None:
    """Refuse a hand-edited manifest whose fields have the wrong types, naming the field."""
    def bad(field: str, expected: str):
        return TSVInputError(f"{path}: field {field!r}: expected {expected}, got {manifest[field]!r}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if "format_version" in manifest and not is_int(manifest["format_version"]):
        raise bad("format_version", "an integer")
    if "num_tasks" in manifest and not (is_int(manifest["num_tasks"]) and manifest["num_tasks"] >= 1):
        raise bad("num_tasks", "an integer >= 1")
    rank = manifest.get("default_rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
        raise bad("default_rank", "null, an integer or a fraction")
    if manifest.get("dtype") is not None and manifest["dtype"] not in _DTYPES:
        raise bad("dtype", f"null or one of {sorted(_DTYPES)}")
    if "base" in manifest:
        base = manifest["base"]
        if not isinstance(base, dict) or not isinstance(base.get("fingerprint", ""), str) \
                or not isinstance(base.get("keys", {}), dict):
            raise bad("base", "a mapping with a 'fingerprint' string and a 'keys' mapping")


class TaskStore:
    """Compressed tasks over one base, in a folder (see the module docstring for the layout).

    Args:
        path: the store folder (created with its manifest when absent; needs ``base``).
        base: the base state dict. Required to create a store and to :meth:`add`; when
            given for an existing store it must match the stored fingerprint.
        default_rank: rank used by :meth:`add` when it is given none: an int k, a float
            f in (0, 1] (floor(f·r)), or None for floor(r / ``num_tasks``).
        num_tasks: T in the default floor(r/T) (8, the paper's setting).
        dtype: dtype of the stored factors and deltas (float32, float16, bfloat16);
            None keeps each base tensor's dtype.

    ``default_rank``, ``num_tasks`` and ``dtype`` are fixed when the store is created and
    read from the manifest afterwards; giving a different value when reopening is an error.
    """

    def __init__(self, path: str | os.PathLike, base: StateDict | None = None, *, default_rank: Rank = None,
                 num_tasks: int | None = None, dtype: torch.dtype | str | None = None):
        self.path = Path(path)
        self.base = base
        dtype = _parse_dtype(dtype)
        manifest_path = self.path / MANIFEST
        if manifest_path.exists():
            self._manifest = self._read_manifest(manifest_path)
            self._check_reopen(default_rank, num_tasks, dtype)
            if base is not None:
                self.check_base(base)
        else:
            if base is None:
                raise TSVInputError(f"no task store at {self.path} (no {MANIFEST}); give base= to create one")
            if self.path.exists() and not self.path.is_dir():
                raise TSVInputError(f"task store path {self.path} exists and is not a folder")
            if self.path.exists() and any(self.path.iterdir()):
                raise TSVInputError(f"{self.path} is a non-empty folder without {MANIFEST}: not a task store; "
                                    f"refusing to create one there")
            num_tasks = check_num_tasks(num_tasks)
            default_rank = check_rank(default_rank)
            self._manifest = self._new_manifest(base, default_rank, num_tasks or 8, dtype)
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise cannot_write(self.path, exc) from exc
            self._write_manifest()

    # ------------------------------------------------------------------ manifest
    def _new_manifest(self, base: StateDict, default_rank: Rank, num_tasks: int, dtype) -> dict:
        from . import __version__

        keys = {}
        total = 0
        for key in base:
            shape, dt = tensor_meta(base, key, "base")
            keys[key] = {"shape": list(shape), "dtype": _dtype_name(dt)}
            total += _numel(shape) * dt.itemsize
        # the base's identity in each floating dtype too: a model converted with .half() (or a
        # float16 checkpoint loaded as float32) holds the same base
        fingerprint, *converted = _fingerprints(base, [None, *_DTYPES.values()])
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "tool": "tsv-fast", "version": __version__,
                "default_rank": default_rank, "num_tasks": num_tasks, "dtype": _dtype_name(dtype),
                "base": {"fingerprint": fingerprint, "fingerprint_method": FINGERPRINT_METHOD,
                         "fingerprints_as": dict(zip(_DTYPES, converted)), "nbytes": total, "keys": keys},
                "tasks": []}

    def _read_manifest(self, path: Path) -> dict:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TSVInputError(f"{path}: cannot read the task store manifest: {e}") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("tasks"), list):
            raise TSVInputError(f"{path}: not a task store manifest (no 'tasks' list)")
        _check_manifest_fields(manifest, path)
        if manifest.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise TSVInputError(f"{path}: format version {manifest['format_version']} is newer than this "
                                f"tsv-fast reads ({FORMAT_VERSION}); upgrade tsv-fast")
        names, files = set(), {}
        for i, entry in enumerate(manifest["tasks"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                    or not isinstance(entry.get("file"), str):
                raise TSVInputError(f"{path}: tasks[{i}] lacks 'name' or 'file' (strings)")
            file = entry["file"]
            if not is_plain_file_name(file):  # a hand-edited "../base.safetensors"
                raise TSVInputError(f"{path}: tasks[{i}]: file {file!r} is not a file name inside the store")
            if entry["name"] in names:
                raise TSVInputError(f"{path}: tasks[{i}]: task name {entry['name']!r} appears twice")
            if file in files:  # removing one task would delete the other's file
                raise TSVInputError(f"{path}: tasks[{i}]: file {file!r} of task {entry['name']!r} is also the file "
                                    f"of task {files[file]!r}")
            names.add(entry["name"])
            files[file] = entry["name"]
        manifest.setdefault("num_tasks", 8)
        manifest.setdefault("default_rank", None)
        manifest.setdefault("dtype", None)
        if "fingerprint" not in manifest.get("base", {}):
            warnings.warn(f"{path}: the manifest has no base fingerprint (written by another tool?); the base "
                          f"cannot be checked, only the keys and shapes of each task", stacklevel=3)
        return manifest

    def _check_reopen(self, default_rank, num_tasks, dtype) -> None:
        m = self._manifest
        given = {"default_rank": check_rank(default_rank), "num_tasks": check_num_tasks(num_tasks),
                 "dtype": _dtype_name(dtype)}  # validated as at creation, then as plain int / float
        for field, value in given.items():
            if value is not None and (value != m[field] or type(value) is not type(m[field])):  # rank 1 ≠ 1.0
                raise TSVInputError(f"task store {self.path}: {field}={value!r} differs from the store's "
                                    f"{m[field]!r} (fixed when the store was created)")

    def check_base(self, base: StateDict, what: str = "the given base") -> None:
        """Refuse a base other than the store's (``what`` names it in the error). The store's
        base held in another floating dtype (converted with ``.half()``, or a float16 checkpoint
        loaded as float32) is the same base: its fingerprint is one recorded at creation."""
        info = self._manifest.get("base", {})
        stored = info.get("fingerprint")
        if stored is None:
            return
        got = base_fingerprint(base)
        converted = info.get("fingerprints_as")
        if got == stored or (isinstance(converted, dict) and got in converted.values()):
            return
        keys = info.get("keys", {})
        diff = [k for k in keys if k not in base] + [k for k in base if k not in keys]
        hint = f"; keys differ, e.g. {diff[:3]}" if diff else ""
        held = sorted({_dtype_name(tensor_meta(base, k, "base")[1]) for k in base} & set(_DTYPES))
        store_held = sorted({v.get("dtype") for v in keys.values() if isinstance(v, dict)} & set(_DTYPES))
        if not diff and store_held and held != store_held:
            hint = f"; it is held in {', '.join(held)}, the store's base in {', '.join(store_held)}"
            if not isinstance(converted, dict):  # a store written before the per-dtype fingerprints
                hint += (f" (this store compares the base only in its own dtype: give it in that dtype, e.g. "
                         f"build a MultiTaskModel from the model in {store_held[0]} and convert it afterwards)")
        raise TSVInputError(f"task store {self.path} was built from a different base: fingerprint "
                            f"{got[:12]}… of {what} vs {stored[:12]}… in {MANIFEST}{hint}")

    def _write_manifest(self, manifest: dict | None = None) -> None:
        """Write ``manifest`` (default: the current one), and only then adopt it, so that a
        failed write leaves the in-memory manifest equal to the one on disk."""
        manifest = self._manifest if manifest is None else manifest
        text = json.dumps(manifest, indent=1)
        _write(self.path / MANIFEST, lambda tmp: Path(tmp).write_text(text))
        self._manifest = manifest

    @property
    def manifest(self) -> dict:
        """A copy of the manifest (names, ranks, dtype, base fingerprint, version)."""
        return json.loads(json.dumps(self._manifest))

    @property
    def fingerprint(self) -> str | None:
        return self._manifest.get("base", {}).get("fingerprint")

    @property
    def dtype(self) -> torch.dtype | None:
        return _parse_dtype(self._manifest["dtype"])

    @property
    def num_tasks(self) -> int:
        return self._manifest["num_tasks"]

    @property
    def default_rank(self) -> Rank:
        return self._manifest["default_rank"]

    # ------------------------------------------------------------------ tasks
    def names(self) -> list[str]:
        """Stored task names, in the order they were added."""
        return [e["name"] for e in self._manifest["tasks"]]

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self._manifest["tasks"])

    def _entry(self, name: str) -> dict:
        for e in self._manifest["tasks"]:
            if e["name"] == name:
                return e
        raise TSVInputError(f"task store {self.path}: no task named {name!r}; stored: {self.names()}")

    def add(self, name: str, task: Task, rank: Rank = None, *, overwrite: bool = False,
            solver: str = "exact", info: dict | None = None) -> dict[str, Any]:
        """Compress ``task`` (a fine-tuned state dict, a ``TaskVector`` or an already
        ``CompressedTask``) and store it as ``name``; returns its manifest entry.

        ``rank``: an int k (clamped to r), a float f in (0, 1] (floor(f·r) per matrix
        key), or None for the store's default. A ``CompressedTask`` is stored with the
        ranks it has (``rank`` must be None), cast to the store's dtype. ``info`` (JSON-able)
        is kept in the task's manifest entry, e.g. where the task came from.
        """
        if self.base is None:
            raise TSVInputError(f"task store {self.path}: adding a task needs the base: TaskStore(path, base=...)")
        if not isinstance(name, str) or not _NAME.match(name):
            raise TSVInputError(f"task name {name!r} must be 1-128 characters from A-Z a-z 0-9 . _ + - "
                                f"(it names a file), not starting with . _ + -")
        if name in self.names() and not overwrite:
            raise TSVInputError(f"task store {self.path}: a task named {name!r} exists; remove it first or "
                                f"pass overwrite=True")
        file = f"{name}.safetensors"
        if name not in self.names() and (self.path / file).exists() and not overwrite:
            raise TSVInputError(f"task store {self.path}: file {file!r} exists but no task of {MANIFEST} names it "
                                f"(left by a crash or copied in?); remove it, or pass overwrite=True to replace it")
        try:  # checked before any write: the manifest is written after the task file
            json.dumps(info)
        except (TypeError, ValueError) as e:
            raise TSVInputError(f"task {name!r}: info must be JSON-able (str, numbers, lists, dicts): {e}") from None
        dtype = self.dtype
        if isinstance(task, CompressedTask):
            if rank is not None:
                raise TSVInputError(f"task {name!r} is already compressed; rank= applies only to dense tasks")
            as_sources(self.base, [task], [name])  # keys and factor shapes against the base
            ct = CompressedTask(name, {k: tuple(t.to(dtype or self.base[k].dtype) for t in f)
                                       for k, f in task.factors.items()},
                                {k: t.to(dtype or self.base[k].dtype) for k, t in task.deltas.items()})
        else:
            ct = compress(self.base, [task], self.default_rank if rank is None else rank,
                          num_tasks=self.num_tasks, names=[name], solver=solver, factor_dtype=dtype)[0]
        flat = ct.to_state_dict()
        if bad := nonfinite(list(flat.values())):  # a finite CompressedTask cast to the store's dtype
            key = list(flat)[bad[0]]
            raise TSVInputError(f"task store {self.path}: task {name!r}: key {key!r} overflows the store's dtype "
                                f"{_dtype_name(flat[key].dtype)} (Inf after the cast); use a store of a wider "
                                f"dtype (float32 or bfloat16)")
        meta = {"format": "pt", "tsv_fast_task": name, "base_fingerprint": self.fingerprint or ""}
        # an overwrite is staged beside the old file and moved in only after the manifest: a failed
        # manifest write must leave the old entry with its own file, not with the new task's factors
        target = self.path / (f".{file}.new" if name in self.names() else file)
        try:
            _write(target, lambda tmp: save_file(flat, tmp, metadata=meta))
        except OutputError as exc:  # named as the task's file, not the staged one
            raise OutputError(str(exc).replace(str(target), str(self.path / file))) from exc
        entry = {"name": name, "file": file, "bytes": ct.nbytes(),
                 "ranks": {k: ct.rank(k) for k in ct.factors}, "deltas": sorted(ct.deltas),
                 "dtype": _dtype_name(dtype), **({"info": info} if info else {})}
        tasks = [e for e in self._manifest["tasks"] if e["name"] != name]
        try:
            self._write_manifest({**self._manifest, "tasks": tasks + [entry]})
        except BaseException:
            target.unlink(missing_ok=True)  # a new name's file or a staged overwrite: no entry points at it
            raise
        if target.name != file:
            os.replace(target, self.path / file)
        return dict(entry)

    def remove(self, name: str) -> None:
        """Forget ``name``: the manifest entry goes first (atomic rewrite), then the file."""
        entry = self._entry(name)
        self._write_manifest({**self._manifest, "tasks": [e for e in self._manifest["tasks"] if e["name"] != name]})
        try:
            (self.path / entry["file"]).unlink()
        except FileNotFoundError:
            pass

    def load(self, name: str, device: str | torch.device | None = None) -> CompressedTask:
        """Read one task's factors and deltas (fresh tensors, nothing shared with other tasks),
        after checking the file's header against the manifest (:meth:`_check_file`)."""
        entry = self._entry(name)
        path = self.path / entry["file"]
        if not path.exists():
            raise TSVInputError(f"task store {self.path}: file {entry['file']!r} of task {name!r} is missing")
        try:
            with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
                slices = {k: f.get_slice(k) for k in f.keys()}  # the header: shapes and dtypes only
                header = {k: (tuple(t.get_shape()), t.get_dtype()) for k, t in slices.items()}
                self._check_file(path, name, entry, f.metadata() or {}, header)
                flat = {k: f.get_tensor(k) for k in f.keys()}
        except TSVInputError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise TSVInputError(f"{path}: cannot read task {name!r}: {e}") from None
        if bad := nonfinite(list(flat.values())):
            raise TSVInputError(f"{path}: task {name!r}: key {list(flat)[bad[0]]!r} contains NaN or Inf")
        try:
            return CompressedTask.from_state_dict(flat, name)
        except TSVInputError as e:  # a factor missing, where the manifest has no ranks to tell
            raise TSVInputError(f"{path}: {e}") from None

    def _check_file(self, path: Path, name: str, entry: dict, meta: dict, header: dict) -> None:
        """Refuse, from the file's metadata and header (no tensor read), a task file that is not
        what the manifest promises: another task's or another base's file, a missing or extra
        tensor, a rank, shape or dtype that does not fit the base and the store's dtype."""
        owner = meta.get("tsv_fast_task")
        if owner is not None and owner != name:  # a file copied in under this task's name
            raise TSVInputError(f"{path}: holds task {owner!r} (its metadata), not task {name!r} as {MANIFEST} says")
        stored = meta.get("base_fingerprint")
        if stored and self.fingerprint and stored != self.fingerprint:
            raise TSVInputError(f"{path}: task {name!r} was built from another base (fingerprint {stored[:12]}… "
                                f"vs the store's {self.fingerprint[:12]}…)")
        problem = f"{path}: task {name!r} does not match {MANIFEST}: key"
        ranks, deltas = entry.get("ranks"), entry.get("deltas")
        if isinstance(ranks, dict) and isinstance(deltas, list):  # a manifest from another tool may lack them
            promised = {f"{k}::delta" for k in deltas} | {f"{k}::{p}" for k in ranks for p in "USV"}
            if missing := sorted(promised - set(header)):
                raise TSVInputError(f"{problem} {missing[0]!r} is missing from the file")
            if extra := sorted(set(header) - promised):
                raise TSVInputError(f"{problem} {extra[0]!r} is in the file, not in the manifest")
            for key, k in ranks.items():  # e.g. another task's file copied over this one
                if header[f"{key}::S"][0] != (k,):
                    raise TSVInputError(f"{problem} {key!r} has rank {_rank_of(header[f'{key}::S'][0])} in the "
                                        f"file, {k} in the manifest")
        base_keys = self._manifest.get("base", {}).get("keys", {})
        for flat_key, (shape, dtype_name) in header.items():
            key, _, part = flat_key.rpartition("::")
            if part not in ("U", "S", "V", "delta") or (base_keys and key not in base_keys):
                raise TSVInputError(f"{path}: task {name!r}: unexpected key {flat_key!r} (not a factor or delta of "
                                    f"a base key)")
            base = base_keys.get(key)
            base = base if isinstance(base, dict) else {}
            if isinstance(base.get("shape"), list):
                if part != "delta" and len(base["shape"]) != 2:
                    raise TSVInputError(f"{path}: task {name!r}: key {flat_key!r}: factors of a key that is not a "
                                        f"matrix (base shape {tuple(base['shape'])})")
                m, n = (base["shape"] + [None, None])[:2]
                k = _rank_of(header.get(f"{key}::S", ((),))[0])
                want = {"delta": tuple(base["shape"]), "U": (m, k), "S": (k,), "V": (n, k)}[part]
                if shape != want:
                    raise TSVInputError(f"{path}: task {name!r}: key {flat_key!r} has shape {shape}, expected "
                                        f"{want} (base shape {tuple(base['shape'])})")
            dtype = SAFETENSORS_DTYPES.get(dtype_name)
            want_dtype = self.dtype or _DTYPES.get(base.get("dtype"))  # None: the base's dtype
            if dtype is None or not dtype.is_floating_point or (want_dtype is not None and dtype != want_dtype):
                raise TSVInputError(f"{path}: task {name!r}: key {flat_key!r} has dtype {dtype_name}, expected "
                                    f"{_dtype_name(want_dtype) if want_dtype else 'a floating dtype'}")

    def ranks(self, name: str) -> dict[str, int]:
        return dict(self._entry(name).get("ranks", {}))

    # ------------------------------------------------------------------ sizes
    def nbytes(self, name: str) -> int:
        """Bytes of the stored tensors of ``name`` (the file adds only its JSON header)."""
        return self._size_field(self._entry(name), "bytes", f"task {name!r}")

    @property
    def base_nbytes(self) -> int:
        """Bytes of the full base model (every tensor of the base state dict)."""
        return self._size_field(self._manifest.get("base", {}), "nbytes", "base")

    def size_report(self) -> dict[str, dict[str, float]]:
        """Per task: stored bytes, file bytes and their ratio to the full model's bytes."""
        out = {}
        for e in self._manifest["tasks"]:
            path = self.path / e["file"]
            if not path.is_file():
                raise TSVInputError(f"task store {self.path}: file {e['file']!r} of task {e['name']!r} is missing")
            stored = self.nbytes(e["name"])
            out[e["name"]] = {"bytes": stored, "file_bytes": path.stat().st_size, "ratio": stored / self.base_nbytes}
        return out

    def _size_field(self, entry: dict, field: str, what: str) -> int:
        """A byte count from the manifest; one written by another tool may lack it."""
        value = entry.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TSVInputError(f"{self.path / MANIFEST}: {what}: field {field!r}: expected a byte count, "
                                f"got {value!r}")
        return value

    def __repr__(self) -> str:
        return f"TaskStore({str(self.path)!r}, tasks={self.names()})"


def _write(path: Path, write) -> None:
    """:func:`atomic_write_file`, with a full disk or a read-only folder (``OSError``, or
    ``SafetensorError`` from ``save_file``) reported as an :class:`OutputError` naming the file."""
    try:
        atomic_write_file(path, write)
    except (OSError, SafetensorError) as exc:
        raise cannot_write(path, exc) from exc


def expected_nbytes(base: StateDict, ranks: Mapping[str, int], delta_keys, dtype: torch.dtype | None) -> int:
    """Bytes a task must take given its ranks: ``(m + n + 1)·k`` per matrix key plus the
    whole non-matrix deltas, in the store dtype (the base's when None)."""
    total = 0
    for key, k in ranks.items():
        b = base[key]
        if not is_matrix_key(key, b):
            raise TSVInputError(f"key {key!r} has a rank but is not a matrix key")
        total += (b.shape[0] + b.shape[1] + 1) * k * (dtype or b.dtype).itemsize
    for key in delta_keys:
        total += base[key].numel() * (dtype or base[key].dtype).itemsize
    return total


def _rank_of(s_shape: tuple) -> int | tuple | None:
    """The rank a ``key::S`` shape holds (its length; the shape itself when not 1-D)."""
    return s_shape[0] if len(s_shape) == 1 else (s_shape or None)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

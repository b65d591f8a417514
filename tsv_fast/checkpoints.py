"""Reading checkpoints from disk: lazily for safetensors, safely for PyTorch pickles.

* safetensors files and sharded Hugging Face folders (``model.safetensors.index.json``)
  open as a :class:`SafetensorsCheckpoint`: shapes and dtypes come from the headers
  (its ``meta(key)`` lets the merge check everything before reading a value), and each
  tensor is read from disk only when asked for, with no reference kept, so a streaming
  merge holds about one key of every task at a time.
* PyTorch ``.pt/.bin/.pth/.ckpt`` state dicts load with ``weights_only=True`` (memory
  mapped when the file allows). Wrappers such as ``{"state_dict": ...}`` are removed.
  Whole pickled models (as the CLIP task-vector
  checkpoints of the literature are) are refused unless ``unsafe_pickle=True``, because
  unpickling them runs code from the file.
* Key names are kept as stored, in every format. A checkpoint saved from DistributedDataParallel
  (every key starts with ``module.``) is matched to a base saved without it, or the other way
  round, by ``open_checkpoint(..., base=)``: its keys are then named as the base's.

Every failure raises :class:`CheckpointError` naming the file (and key).
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .errors import TSVInputError

INDEX_NAME = "model.safetensors.index.json"
TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
UNSAFE_FLAG = "--unsafe-pickle"

# safetensors dtype names (the format's spec) <-> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# Written by the writer, refused on reading: torch has no NaN/Inf check, arithmetic or SVD for float8.
_UNREADABLE = {torch.float8_e4m3fn, torch.float8_e5m2}

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
DDP_PREFIX = "module."  # DistributedDataParallel's name for the wrapped model


class CheckpointError(TSVInputError):
    """A checkpoint that cannot be read; the message starts with the file (and key)."""


class SafetensorsCheckpoint(Mapping[str, Tensor]):
    """Lazy ``name → tensor`` view of one safetensors file or of the shards of one model.

    Only the headers are read when it is built; ``self[key]`` reads that tensor (the
    file is opened for the call and the mapping is released after it), so no tensor
    stays in memory because of this object.
    """

    def __init__(self, files: list[Path], label: str, weight_map: Mapping[str, str] | None = None,
                 prefix: str | None = None):
        self.label = label
        self.files = files
        self._file: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._stored: dict[str, str] = {}  # a renamed key -> its name in the file (see renamed)
        found = []  # every key first: whether --prefix sees past a DDP prefix depends on all of them
        for path in files:
            with _safe_open(path, label) as handle:
                names = handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys()
                for key in names:
                    if weight_map is None or weight_map.get(key) == path.name:
                        part = handle.get_slice(key)
                        found.append((path, key, part.get_dtype(), tuple(part.get_shape())))
        keep = _prefix_filter(prefix, [key for _, key, _, _ in found])
        for path, key, dtype_name, shape in found:
            if keep(key):
                dtype = SAFETENSORS_DTYPES.get(dtype_name)
                _check_dtype(dtype, dtype_name, path, key)
                self._file[key] = path
                self._meta[key] = (shape, dtype)
        if weight_map is not None:
            lost = [k for k, f in weight_map.items() if k not in self._file and keep(k)]
            if lost:
                raise CheckpointError(f"{label}: {lost[0]}: listed in {INDEX_NAME} (in {weight_map[lost[0]]}) "
                                      f"but not found in that shard ({len(lost)} such key(s))")

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype from the header, without reading the tensor."""
        return self._meta[key]

    def nbytes(self) -> int:
        return sum(tensor_nbytes(*m) for m in self._meta.values())

    def renamed(self, rename: Callable[[str], str]) -> SafetensorsCheckpoint:
        """The same files with each key ``k`` named ``rename(k)`` (read under its stored name)."""
        view = copy.copy(self)
        view._file = {rename(k): f for k, f in self._file.items()}
        view._meta = {rename(k): m for k, m in self._meta.items()}
        view._stored = {rename(k): self._stored.get(k, k) for k in self._meta}
        return view

    def __getitem__(self, key: str) -> Tensor:
        path = self._file[key]  # KeyError for unknown keys, as a Mapping should
        stored = self._stored.get(key, key)
        try:
            with safe_open(path, framework="pt") as handle:
                return handle.get_tensor(stored)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: {stored}: cannot read the tensor: {exc}") from exc

    def __contains__(self, key: object) -> bool:  # the Mapping default would read the tensor
        return key in self._meta

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def __repr__(self) -> str:
        return f"SafetensorsCheckpoint({self.label!r}, {len(self)} tensors, {len(self.files)} file(s))"


def _check_dtype(dtype: torch.dtype | None, name: str, path: Path, key: str) -> None:
    """Refuse, when a checkpoint is opened, dtypes the merge cannot compute in or write."""
    if dtype is None or dtype in _UNREADABLE:
        what = "float8 is not supported (convert to bfloat16, float16 or float32)" if dtype in _UNREADABLE \
            else "not supported"
        raise CheckpointError(f"{path}: {key}: dtype {name}: {what}")


class TorchCheckpoint(dict):
    """A state dict loaded from a PyTorch file, with the ``files`` it came from."""

    def __init__(self, state: Mapping[str, Tensor], label: str, files: list[Path]):
        super().__init__(state)
        self.label, self.files = label, files

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values())


Checkpoint = SafetensorsCheckpoint | TorchCheckpoint


def is_plain_file_name(name) -> bool:
    """A bare file name (no folder part, no ``..``): what an index or manifest may refer to, so a
    hand-edited ``"../base.safetensors"`` cannot reach outside its folder."""
    return isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..") and "\\" not in name


def open_checkpoint(path: str | Path, *, prefix: str | None = None, unsafe_pickle: bool = False,
                    base: Mapping[str, object] | None = None) -> Checkpoint:
    """Open a checkpoint file or folder (format from its name, or sniffed from its first bytes).

    Args:
        path: a ``.safetensors`` file, a folder or index file of a sharded Hugging Face
            checkpoint, or a PyTorch ``.pt/.bin/.pth/.ckpt`` file.
        prefix: keep only keys starting with this (e.g. ``"visual."`` for the image tower
            of a full open_clip checkpoint), or with ``module.`` and this when every key of
            the checkpoint starts with ``module.`` (saved from DDP); names are kept as they are.
        unsafe_pickle: allow whole pickled models (``torch.load(weights_only=False)``);
            only for files you trust, since unpickling can run arbitrary code.
        base: the base this checkpoint is a fine-tune of: when one of the two was saved from DDP
            (every key starting with ``module.``), the keys are named as the base's (``module.``
            removed or added, whichever names more of the base's keys), so that they pair up
            (and a merge keeps the base's names), whatever the formats.
    """
    label = str(path)
    kind, files, weight_map = _resolve(Path(path))
    if kind == "safetensors":
        ckpt: Checkpoint = SafetensorsCheckpoint(files, label, weight_map, prefix)
    else:
        state = _load_torch(files[0], label, unsafe_pickle)
        keep = _prefix_filter(prefix, state)
        state = {k: v for k, v in state.items() if keep(k)}
        for key, value in state.items():  # after the prefix, as for safetensors: other towers may hold anything
            _check_dtype(value.dtype if value.dtype in DTYPE_NAMES else None, str(value.dtype).removeprefix("torch."),
                         files[0], key)
        ckpt = TorchCheckpoint(state, label, files)
    if len(ckpt) == 0:
        if prefix:
            starts = sorted({k.split(".")[0] + "." for k in open_checkpoint(path, unsafe_pickle=unsafe_pickle)})
            raise CheckpointError(f"{label}: no key starts with {prefix!r} (keys start with {', '.join(starts[:8])})")
        raise CheckpointError(f"{label}: the checkpoint holds no tensors")
    return ckpt if base is None else _named_as(ckpt, base)


def is_ddp(keys: Iterable[str]) -> bool:
    """Every key starts with ``module.``: a state dict saved from DistributedDataParallel."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(DDP_PREFIX) for k in keys)


def _prefix_filter(prefix: str | None, keys: Iterable[str]) -> Callable[[str], bool]:
    """Which keys ``--prefix`` keeps: those starting with it, and, in a checkpoint saved from DDP,
    those starting with ``module.`` and it (``visual.`` keeps ``module.visual.*`` there)."""
    if not prefix:
        return lambda key: True
    ddp = is_ddp(keys)
    return lambda key: key.startswith(prefix) or (ddp and key.startswith(DDP_PREFIX + prefix))


def _named_as(ckpt: Checkpoint, base: Mapping[str, object]) -> Checkpoint:
    """``ckpt`` with its keys named as ``base``'s when one of them was saved from DDP: ``module.``
    removed from or added to every key, whichever names more of the base's keys. Comparing the
    names, not just whether each side is all ``module.``, also pairs a model whose own keys start
    with ``module.`` (a wrapper) with a DDP save of it (``module.module.*``)."""
    keys, wanted = list(ckpt), set(base)
    renames = [None, lambda k: DDP_PREFIX + k] + ([lambda k: k[len(DDP_PREFIX):]] if is_ddp(keys) else [])
    hits = [sum((k if r is None else r(k)) in wanted for k in keys) for r in renames]
    rename = renames[hits.index(max(hits))]  # the names as stored on a tie
    if rename is None:
        return ckpt
    if isinstance(ckpt, TorchCheckpoint):
        return TorchCheckpoint({rename(k): v for k, v in ckpt.items()}, ckpt.label, ckpt.files)
    return ckpt.renamed(rename)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files that make up a checkpoint (the shards and index of a sharded one)."""
    kind, files, weight_map = _resolve(Path(path))
    index = [Path(path) if Path(path).is_file() else Path(path) / INDEX_NAME] if weight_map is not None else []
    return index + files


def fingerprint(path: str | Path) -> dict:
    """A fast identity record of a file: size and sha256 of its first and last MiB, plus the
    whole safetensors header when it is longer. Hashing whole multi-GB checkpoints would
    cost more than the merge; this still tells files apart in practice."""
    path = Path(path)
    size = path.stat().st_size
    mib = 1 << 20
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(mib)
        if path.suffix == ".safetensors" and len(head) >= 8:
            header_end = 8 + int.from_bytes(head[:8], "little")
            if header_end > len(head):
                head += f.read(header_end - len(head))
        digest.update(head)
        if size > len(head):
            f.seek(max(len(head), size - mib))
            digest.update(f.read())
    return {"file": str(path), "size": size, "sha256_head_tail": digest.hexdigest()}


FINGERPRINT_METHOD = ("sha256 of the first MiB (or the whole safetensors header when longer) "
                      "and of the last MiB of each file, with its size; not a hash of the whole file")


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def _resolve(path: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(format, files, weight map of a sharded checkpoint) for a path a user gave."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            return _resolve(path / INDEX_NAME)
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return "safetensors", found, None
        indexes = sorted(path.glob("*.index.json"))
        if not found and len(indexes) == 1:  # e.g. pytorch_model.bin.index.json: refused, naming why
            return _resolve(indexes[0])
        what = f"{len(found)} .safetensors files" if found else "no .safetensors file"
        raise CheckpointError(f"{path}: folder has no {INDEX_NAME} and {what}; give the file itself")
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a valid sharded-checkpoint index ({exc!r})") from exc
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path}: weight_map: expected a mapping of key → shard file name, "
                                  f"got a {type(weight_map).__name__}")
        for key, name in weight_map.items():
            if not is_plain_file_name(name):
                raise CheckpointError(f"{path}: {key}: shard {name!r} is not a file name in the index's folder")
        files = [path.parent / name for name in dict.fromkeys(weight_map.values())]
        if torch_shards := [f for f in files if f.suffix in TORCH_SUFFIXES]:
            raise CheckpointError(f"{path}: lists PyTorch shards ({torch_shards[0].name}, ...): sharded PyTorch "
                                  f"checkpoints are not supported; convert the shards to safetensors")
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard listed in {path} is missing")
        return "safetensors", files, weight_map
    if path.suffix == ".safetensors":
        return "safetensors", [path], None
    if path.suffix in TORCH_SUFFIXES:
        return "torch", [path], None
    return ("torch" if _looks_like_torch(path) else "safetensors"), [path], None


def _looks_like_torch(path: Path) -> bool:
    """A torch.save zip archive, or a (legacy) pickle: protocol byte 0x80 first."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return magic == b"PK" or magic[:1] == b"\x80"


def _torch_named_safetensors(path: Path) -> bool:
    """A torch.save zip (``PK\\x03\\x04``) or pickle (``\\x80``, protocol 2–5) under a safetensors
    name. A safetensors file starts with its header's u64 length and then ``{`` at byte 8, and
    that length's low bytes can look like either magic: such a file is a corrupt safetensors."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    return (head[:4] == b"PK\x03\x04" or pickle) and head[8:9] != b"{"


def _safe_open(path: Path, label: str):
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as exc:
        if _torch_named_safetensors(path):  # e.g. a .bin renamed: say so, not "corrupt"
            raise CheckpointError(f"{path}: a PyTorch checkpoint (torch.save zip or pickle) named like a "
                                  f"safetensors file; rename it to .pt/.bin (or convert it)") from exc
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {exc}") from exc


def _load_torch(path: Path, label: str, unsafe_pickle: bool) -> dict[str, Tensor]:
    if not _looks_like_torch(path):
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt?): neither a torch.save zip "
                              f"archive nor a pickle")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy format: no mmap
    except (pickle.UnpicklingError, RuntimeError) as exc:
        # torch's weights-only unpickler says "Weights only load failed" for garbage bytes too;
        # only "GLOBAL module.name" means the file names a class or function to run.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt?): "
                                  f"{_torch_reason(exc)}") from exc
        if not unsafe_pickle:
            raise CheckpointError(
                f"{path}: holds pickled Python objects, not just tensors (e.g. a whole saved model, here "
                f"{found.group(1)}); loading it would run code from the file. Convert it to a state dict, or pass "
                f"{UNSAFE_FLAG} if you trust its source") from None
        warnings.warn(f"{path}: loading with weights_only=False ({UNSAFE_FLAG}): this runs code from the file",
                      stacklevel=3)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # e.g. the pickled model's class cannot be imported
            raise CheckpointError(f"{path}: unpickling failed: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except Exception as exc:  # torch raises assorted errors on garbage bytes
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc
    return _unwrap(obj, path)


def _torch_reason(exc: Exception) -> str:
    """The line of a torch.load error that says what is wrong (not its advice paragraphs)."""
    text = str(exc)
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    return found.group(1) if found else (text.splitlines() or [type(exc).__name__])[0]


def _unwrap(obj, path: Path) -> dict[str, Tensor]:
    """A flat ``name → tensor`` dict from what ``torch.load`` returned."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict):  # a whole module (unsafe mode only)
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (name → tensor)")
    if not all(isinstance(v, Tensor) for v in obj.values()):
        for wrapper in _WRAPPER_KEYS:  # {"state_dict": {...}, "epoch": 3, ...}
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) or hasattr(inner, "state_dict"):
                return _unwrap(inner, path)
        key, value = next((k, v) for k, v in obj.items() if not isinstance(v, Tensor))
        raise CheckpointError(f"{path}: {key}: is a {type(value).__name__}, not a tensor (expected a flat "
                              f"name → tensor dict, or one under {'/'.join(_WRAPPER_KEYS)})")
    state = dict(obj)
    for key in state:
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} is not a string (expected a name → tensor dict)")
    return state

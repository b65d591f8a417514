"""Writing outputs atomically, and safetensors files streamed tensor by tensor.

Everything is written into a hidden staging folder next to the destination and moved
into place only once complete; on any error (or Ctrl-C) the staging folder is removed,
so a failed run leaves nothing behind and never touches an input.

:class:`SafetensorsWriter` streams: every output shape and dtype is known before a
merge starts, so each shard's header is written first and each tensor's bytes follow
as the merge yields it. Memory then holds one output tensor, not the whole model
(``safetensors.torch.save_file`` needs all tensors at once). The files are plain
safetensors (read back by ``safetensors`` in the tests); sharded outputs follow the
Hugging Face layout (``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checkpoints import DTYPE_NAMES, INDEX_NAME, tensor_nbytes

if sys.byteorder != "little":  # safetensors stores little-endian; we write the raw bytes
    raise ImportError("tsv_fast.writer needs a little-endian machine")


class OutputError(Exception):
    """An output that cannot (or must not) be written; the message starts with the file."""


@dataclass(frozen=True)
class Entry:
    """One output tensor, known before it is computed."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def entries_of(tensors: Mapping[str, Tensor]) -> list[Entry]:
    return [Entry(k, tuple(t.shape), t.dtype) for k, t in tensors.items()]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MiB"``, ``"2e9"`` or an int."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(text))
        try:
            if not m or m.group(2).upper() not in _UNITS:
                raise ValueError
            value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
        except (ValueError, OverflowError):  # also "1.2.3", or beyond float range ("1e400")
            raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MiB or a number of bytes)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_output(out: Path, inputs: Iterable[Path], *, overwrite: bool, also: Sequence[Path] = (),
                 records: Sequence[str] = (), folder: bool = False) -> None:
    """Refuse, before any work, an output that is an input, contains one or lies in a folder
    given as one, that exists without ``overwrite``, or whose folder cannot be written.
    ``also``: other paths the output will
    create (its JSON record). ``records``: file names that mark a folder as written by
    tsv-fast; with ``records`` given, a non-empty folder holding none of them is never
    replaced (``-o ~ --overwrite`` must not delete a home folder). A ``folder`` output never
    replaces a file (``-o notes.txt --overwrite`` must not turn a user's file into a folder)."""
    target = out.resolve()
    for path in inputs:
        p = path.resolve()
        if p == target:
            raise OutputError(f"{out}: is one of the inputs ({path}); choose another output path")
        if target in p.parents:
            raise OutputError(f"{out}: contains an input ({path}); choose another output path")
        if p.is_dir() and p in target.parents:  # a folder input's contents define it (one file, shards, a store)
            raise OutputError(f"{out}: is inside the input folder {path}, whose contents it would change; "
                              f"choose another output path")
    for path in (out, *also):
        if path.exists() and not overwrite:
            raise OutputError(f"{path}: already exists (pass --overwrite to replace it)")
    if folder and out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, and this output is a folder; refusing to replace it, even with "
                          f"--overwrite: choose another output or remove it yourself")
    if records and out.is_dir() and any(out.iterdir()) and not any((out / r).exists() for r in records):
        raise OutputError(f"{out}: is a folder tsv-fast did not write (no {' or '.join(records)}); refusing to "
                          f"replace it, even with --overwrite: choose another output or remove it yourself")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """Fail now, not after the work, when ``out``'s folder cannot be created or written:
    a temporary folder is made (and removed) in the nearest existing ancestor."""
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{out}: cannot write: {folder} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tsv-fast-probe-", dir=folder))
    except OSError as exc:
        raise cannot_write(out, exc) from exc


def atomic_write_file(path: Path, write) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@functools.cache
def _umask() -> int:
    """The process's umask, read once: reading it means setting it, which other threads would see."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def cannot_write(path, exc: Exception) -> OutputError:
    """The error for an output that could not be written (a full disk, a read-only folder),
    naming the output, not a staging file."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())
    return OutputError(f"{path}: cannot write: {reason}")


@contextmanager
def staged_output(out: Path, *, folder: bool, overwrite: bool) -> Iterator[Path]:
    """A fresh staging folder next to ``out``, moved into place when the block succeeds.

    ``folder=True``: the staging folder becomes ``out``. ``folder=False``: the files
    written into it are moved into ``out``'s folder under their names (``out`` and its
    JSON record). On any exception the staging folder, and the parent folders this call
    created, are deleted. Errors name ``out``, never the hidden staging folder.
    """
    out = Path(out)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    stage, done = None, False
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tsv-fast-tmp-", dir=out.parent))
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp's 0700 would carry over to a folder output
        except OSError as exc:
            raise cannot_write(out, exc) from exc
        try:
            yield stage
            if folder:
                _replace(stage, out, overwrite)
            else:
                names = sorted(p.name for p in stage.iterdir())
                for name in names:
                    if (out.parent / name).exists() and not overwrite:
                        raise OutputError(f"{out.parent / name}: already exists (pass --overwrite to replace it)")
                for name in names:
                    _replace(stage / name, out.parent / name, overwrite)
        except OutputError as exc:
            raise OutputError(str(exc).replace(str(stage), str(out if folder else out.parent))) from exc
        except OSError as exc:
            if exc.filename is None or not _is_staged(Path(exc.filename), stage, out):
                raise  # not about the output (e.g. an input that cannot be read)
            raise cannot_write(out, exc) from exc
        done = True
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if not done:
            for parent in created:  # a folder something else has written into stays
                try:
                    parent.rmdir()
                except OSError:
                    break


def _is_staged(path: Path, stage: Path, out: Path) -> bool:
    """Whether ``path`` is the staging folder, in it, or a hidden file of ours beside ``out``."""
    return path == stage or stage in path.parents or (path.parent == out.parent
                                                       and path.name.startswith(f".{out.name}."))


def _replace(src: Path, dst: Path, overwrite: bool) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` (when allowed) is moved aside first and
    deleted only after the rename succeeded."""
    if not dst.exists() and not dst.is_symlink():
        os.rename(src, dst)
        return
    if not overwrite:
        raise OutputError(f"{dst}: already exists (pass --overwrite to replace it)")
    if src.is_file() and dst.is_file():
        os.replace(src, dst)  # atomic for files
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tsv-fast-old-", dir=dst.parent)) / dst.name
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old.parent, ignore_errors=True)


def plan_shards(entries: Sequence[Entry], max_shard_bytes: int | None,
                single_name: str = "model.safetensors") -> list[tuple[str, list[Entry]]]:
    """Split ``entries`` (in order) into shards of at most ``max_shard_bytes`` (a tensor larger
    than the limit gets a shard of its own); one shard is named ``single_name``."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and max_shard_bytes is not None and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    if len(shards) == 1:
        return [(single_name, shards[0])]
    n = len(shards)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", s) for i, s in enumerate(shards)]


def _write_tensor(f, tensor: Tensor) -> None:
    """Raw little-endian bytes of ``tensor`` (a seam for the disk-failure tests)."""
    f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


class SafetensorsWriter:
    """Writes the planned shards into ``folder`` as tensors arrive, in plan order.

    ``metadata`` (str → str) goes into every shard's header. Call :meth:`finish` after the
    last tensor: it checks nothing is missing and writes the index of a sharded output.
    """

    def __init__(self, folder: Path, shards: list[tuple[str, list[Entry]]], metadata: Mapping[str, str],
                 shown_as: Path | None = None):
        self.folder, self.shards, self.metadata = Path(folder), shards, dict(metadata)
        self.shown_as = Path(shown_as) if shown_as is not None else self.folder  # the folder errors name
        self._by_name = dict(shards)
        self._order = [(name, i, e) for name, entries in shards for i, e in enumerate(entries)]
        self._next = 0
        self._file = None

    def write(self, key: str, tensor: Tensor) -> None:
        if self._next >= len(self._order):
            raise OutputError(f"{self.shown_as}: {key}: more tensors than planned")
        name, index, entry = self._order[self._next]
        path = self.folder / name
        shown = self.shown_as / name
        if key != entry.key or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise OutputError(f"{shown}: {key}: got {tuple(tensor.shape)} {tensor.dtype}, the plan has "
                              f"{entry.key!r} {entry.shape} {entry.dtype}")
        try:
            if index == 0:
                self._file = open(path, "wb")
                self._file.write(self._header(name))
            _write_tensor(self._file, tensor)
            if index == len(self._by_name[name]) - 1:
                self._close()
        except OSError as exc:
            self.abort()
            raise OutputError(f"{shown}: {key}: write failed: {exc.strerror or exc}") from exc
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._order):
            missing = self._order[self._next][2].key
            raise OutputError(f"{self.shown_as / self._order[self._next][0]}: {missing}: never written")
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for _, s in self.shards for e in s)},
                     "weight_map": {e.key: name for name, s in self.shards for e in s}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        """Close the open shard, ignoring errors: closing flushes, which fails again on a full
        disk and would hide the error that made us abort."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            finally:
                self._file = None

    def _close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def _header(self, name: str) -> bytes:
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for e in self._by_name[name]:
            if e.dtype not in DTYPE_NAMES:
                raise OutputError(f"{self.shown_as / name}: {e.key}: dtype {e.dtype} cannot be stored in safetensors")
            header[e.key] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                             "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        return len(raw).to_bytes(8, "little") + raw


def write_safetensors(
    out: Path,
    entries: Sequence[Entry],
    tensors: Iterable[tuple[str, Tensor]],
    *,
    metadata: Mapping[str, str],
    record: Mapping | None = None,
    record_name: str = "tsv_fast_merge.json",
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Stream ``tensors`` (in ``entries`` order) to ``out`` atomically; returns the files written.

    ``out`` ending in ``.safetensors`` is one file (its JSON ``record`` goes to
    ``<out>.json``); any other ``out`` is a Hugging Face style folder (``model.safetensors``,
    or shards plus ``model.safetensors.index.json``, and ``record_name``).
    """
    out = Path(out)
    single = out.suffix == ".safetensors"
    shards = plan_shards(entries, max_shard_bytes, out.name if single else "model.safetensors")
    if single and len(shards) > 1:
        total = sum(e.nbytes for e in entries)
        raise OutputError(f"{out}: the output ({human_size(total)}) is larger than the shard limit "
                          f"({human_size(max_shard_bytes)}); give a folder as the output to write shards")
    with staged_output(out, folder=not single, overwrite=overwrite) as stage:
        writer = SafetensorsWriter(stage, shards, metadata, shown_as=out.parent if single else out)
        try:
            for key, tensor in tensors:
                writer.write(key, tensor)
            writer.finish()
        finally:
            writer.abort()
        if record is not None:
            (stage / (f"{out.name}.json" if single else record_name)).write_text(json.dumps(record, indent=2))
    if single:
        return [out] + ([out.parent / f"{out.name}.json"] if record is not None else [])
    return sorted(out.iterdir())

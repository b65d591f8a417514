"""Writing outputs atomically, and safetensors files streamed tensor by tensor.

Everything is written into a hidden staging folder next to the destination and moved
into place only once complete; on any error (or Ctrl-C) the staging folder is removed,
so a failed run leaves nothing behind and never touches an input. A run killed outright
(SIGKILL) cannot remove it: the next run of the same output does, when the folder's name
shows it is from this machine and from a process that no longer exists, and no process
holds its lock.

:class:`SafetensorsWriter` streams: every output shape and dtype is known before a
merge starts, so each shard's header is written first and each tensor's bytes follow
as the merge yields it. Memory then holds one output tensor, not the whole model
(``safetensors.torch.save_file`` needs all tensors at once). The files are plain
safetensors (read back by ``safetensors`` in the tests); sharded outputs follow the
Hugging Face layout (``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checkpoints import DTYPE_NAMES, INDEX_NAME, tensor_nbytes

try:
    import fcntl
except ImportError:  # not POSIX: no locks (and no stale staging folder is ever removed)
    fcntl = None

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


@dataclass(frozen=True)
class OwnRecord:
    """The JSON file tsv-fast writes with one kind of output, and the fields that mark it as
    ours (every version wrote them): ``--overwrite`` replaces an existing output only when its
    record matches, so it never deletes a user's folder, nor one kind of output for another."""

    name: str                 # its file name in a folder output
    what: str                 # the output kind, for messages: "a merged model"
    marks: Mapping[str, str]  # e.g. {"tool": "tsv-fast", "command": "merge"}

    def matches(self, path: Path) -> bool:
        """Whether ``path`` is a JSON object holding all of ``marks``."""
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
            return False
        return isinstance(data, dict) and all(data.get(k) == v for k, v in self.marks.items())


def record_beside(out: Path) -> Path:
    """The JSON record written beside a one-file output ``X.safetensors``: ``X.safetensors.json``."""
    return out.parent / f"{out.name}.json"


def check_output(out: Path, inputs: Iterable[Path], *, overwrite: bool, also: Sequence[Path] = (),
                 record: OwnRecord | None = None, others: Sequence[OwnRecord] = (), folder: bool = False) -> None:
    """Refuse, before any work, an output that is an input, contains one or lies in a folder
    given as one, that exists without ``overwrite``, or whose folder cannot be written.

    ``also``: other files the output creates beside it (the record of a one-file output); they
    get the same checks, and with ``record`` given may replace only such a record of ours.
    ``record``: what marks a folder output as tsv-fast's, of this kind; with it given, a
    non-empty folder is replaced only when it holds that record (``-o ~ --overwrite`` must not
    delete a home folder; a merge must not replace a task store: ``others`` name the kinds it
    may be instead). A ``folder`` output never replaces a file (``-o notes.txt --overwrite``
    must not turn a user's file into a folder), and a file output never replaces a folder."""
    inputs = list(inputs)
    for path in (out, *also):
        _check_not_input(path, inputs)
    for path in (out, *also):
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise OutputError(f"{path}: already exists (pass --overwrite to replace it)")
    _check_replaceable(out, also=also, record=record, others=others, folder=folder)
    _check_writable(out)


def _check_replaceable(out: Path, *, also: Sequence[Path] = (), record: OwnRecord | None = None,
                       others: Sequence[OwnRecord] = (), folder: bool = False) -> None:
    """Refuse an existing output of another kind (a file for a folder, or the reverse) or, with
    ``record`` given, one tsv-fast did not write (see :func:`check_output`). Run before the work
    and again right before the replace: the target may have been swapped meanwhile."""
    if folder and out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, and this output is a folder; refusing to replace it, even with "
                          f"--overwrite: choose another output or remove it yourself")
    for path in ([] if folder else [out]) + list(also):
        if path.is_dir():
            raise OutputError(f"{path}: is a folder, and this output is a file; refusing to replace it, even "
                              f"with --overwrite: choose another output or remove it yourself")
    if record is not None:
        for path in also:
            if path.exists() and not record.matches(path):
                raise OutputError(f"{path}: is not a record tsv-fast wrote (expected {record.what}'s JSON "
                                  f"record); refusing to replace it, even with --overwrite: choose another "
                                  f"output or remove it yourself")
        if folder and out.is_dir() and any(out.iterdir()):
            _check_own_folder(out, record, others)


def _check_not_input(path: Path, inputs: Sequence[Path]) -> None:
    target = path.resolve()
    for given in inputs:
        p = given.resolve()
        if p == target:
            raise OutputError(f"{path}: is one of the inputs ({given}); choose another output path")
        if target in p.parents:
            raise OutputError(f"{path}: contains an input ({given}); choose another output path")
        if p.is_dir() and p in target.parents:  # a folder input's contents define it (one file, shards, a store)
            raise OutputError(f"{path}: is inside the input folder {given}, whose contents it would change; "
                              f"choose another output path")


def _check_own_folder(out: Path, record: OwnRecord, others: Sequence[OwnRecord]) -> None:
    """Refuse to replace a non-empty folder unless it holds ``record`` (tsv-fast's, this kind)."""
    if record.matches(out / record.name):
        return
    refuse = "refusing to replace it, even with --overwrite: choose another output or remove it yourself"
    for other in others:
        if other != record and other.matches(out / other.name):
            raise OutputError(f"{out}: holds {other.what} (its {other.name}), and this output is {record.what}; "
                              f"{refuse}")
    if (out / record.name).exists():
        raise OutputError(f"{out}: its {record.name} is not a record tsv-fast wrote (no "
                          f"{', '.join(f'{k!r}: {v!r}' for k, v in record.marks.items())}); {refuse}")
    raise OutputError(f"{out}: is a folder tsv-fast did not write (no {record.name}); {refuse}")


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
def writing(path: Path) -> Iterator[None]:
    """An ``OSError`` in the block is a failure to write ``path``, reported as such: a full disk
    (``ENOSPC``) carries no file name, so it could not otherwise be told from any other error."""
    try:
        yield
    except OSError as exc:
        raise cannot_write(path, exc) from exc


@contextmanager
def staged_output(out: Path, *, folder: bool, overwrite: bool, record: OwnRecord | None = None,
                  others: Sequence[OwnRecord] = ()) -> Iterator[Path]:
    """A fresh staging folder next to ``out``, moved into place when the block succeeds.

    ``folder=True``: the staging folder becomes ``out``. ``folder=False``: the files
    written into it are moved into ``out``'s folder under their names (``out`` and its
    JSON record). On any exception the staging folder, and the parent folders this call
    created, are deleted. Errors name ``out``, never the hidden staging folder.

    Right before the move, an existing target is checked again as :func:`check_output` did
    before the work (its kind, and with ``record`` given that tsv-fast wrote it, ``others``
    naming the other kinds): what was checked may have been replaced since, and the move
    deletes what it replaces.
    """
    out = Path(out)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # deepest first
    stage, lock, done = None, None, False
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_stages(out)
            stage = Path(tempfile.mkdtemp(prefix=_stage_prefix(out, os.getpid()), dir=out.parent))
            lock = _lock(stage)
            os.chmod(stage, 0o777 & ~_umask())  # mkdtemp's 0700 would carry over to a folder output
        except OSError as exc:
            raise cannot_write(out, exc) from exc
        try:
            yield stage
            if folder:
                _check_replaceable(out, record=record, others=others, folder=True)
                _replace(stage, out, overwrite)
            else:
                names = sorted(p.name for p in stage.iterdir())
                for name in names:
                    if (out.parent / name).exists() and not overwrite:
                        raise OutputError(f"{out.parent / name}: already exists (pass --overwrite to replace it)")
                _check_replaceable(out, also=[out.parent / n for n in names if n != out.name], record=record)
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
        if lock is not None:
            os.close(lock)
        if not done:
            for parent in created:  # a folder something else has written into stays
                try:
                    parent.rmdir()
                except OSError:
                    break


def _stage_prefix(out: Path, pid: int | None) -> str:
    """The staging folder's name up to its random part (up to the process id for ``pid=None``);
    it names the machine (hashed) and the process, so that a later run can tell a stage left by
    a killed run from one in use."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f".{out.name}.tsv-fast-tmp-{host}-" + ("" if pid is None else f"{pid}-")


def _remove_stale_stages(out: Path) -> None:
    """Delete staging folders of ``out`` left by runs killed outright (SIGKILL, a crash): ours by
    name, from this machine, of a process that no longer exists, unlocked. Any doubt keeps the
    folder."""
    ours = re.compile(re.escape(_stage_prefix(out, None)) + r"(\d+)-\w+")
    for path in out.parent.iterdir():
        found = ours.fullmatch(path.name)
        if found and path.is_dir() and not path.is_symlink() and not _alive(int(found.group(1))):
            lock = _lock(path)
            if lock is not None:
                try:
                    shutil.rmtree(path, ignore_errors=True)
                finally:
                    os.close(lock)


def _lock(stage: Path) -> int | None:
    """An open descriptor holding an exclusive lock on the staging folder ``stage``, None when
    another process holds it. A process id alone is no proof that a run is gone: in another
    PID namespace (containers sharing the folder and the host name) it names another process.
    The kernel releases the lock of a killed run. Where locks are unsupported (some network
    file systems), the descriptor holds none and the process id decides, as before."""
    if fcntl is None:
        return None
    try:
        fd = os.open(stage, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held: a run in progress
        os.close(fd)
        return None
    except OSError:  # no flock on this file system
        pass
    return fd


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may exist (signal 0 checks without sending; on other systems
    than POSIX, where signal 0 would not be a check, always True)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process (EPERM), or a pid out of range
        return True
    return True


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
            with writing(self.shown_as / INDEX_NAME):
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
    own: OwnRecord | None = None,
    others: Sequence[OwnRecord] = (),
) -> list[Path]:
    """Stream ``tensors`` (in ``entries`` order) to ``out`` atomically; returns the files written.

    ``out`` ending in ``.safetensors`` is one file (its JSON ``record`` goes to
    ``<out>.json``); any other ``out`` is a Hugging Face style folder (``model.safetensors``,
    or shards plus ``model.safetensors.index.json``, and ``record_name``). ``own`` and
    ``others``: what an existing output must be to be replaced (see :func:`staged_output`).
    """
    out = Path(out)
    single = out.suffix == ".safetensors"
    shards = plan_shards(entries, max_shard_bytes, out.name if single else "model.safetensors")
    if single and len(shards) > 1:
        total = sum(e.nbytes for e in entries)
        raise OutputError(f"{out}: the output ({human_size(total)}) is larger than the shard limit "
                          f"({human_size(max_shard_bytes)}); give a folder as the output to write shards")
    with staged_output(out, folder=not single, overwrite=overwrite, record=own, others=others) as stage:
        writer = SafetensorsWriter(stage, shards, metadata, shown_as=out.parent if single else out)
        try:
            for key, tensor in tensors:
                writer.write(key, tensor)
            writer.finish()
        finally:
            writer.abort()
        if record is not None:
            name = record_beside(out).name if single else record_name
            with writing((out.parent if single else out) / name):
                (stage / name).write_text(json.dumps(record, indent=2))
    if single:
        return [out] + ([record_beside(out)] if record is not None else [])
    return sorted(out.iterdir())

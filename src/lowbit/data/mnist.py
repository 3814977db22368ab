"""MNIST from the four IDX files (gzip or raw)."""

from __future__ import annotations

import functools
import gzip
import zlib
from pathlib import Path

import numpy as np

from .core import CorruptDataError, ImageArrays, channel_stats, data_root, source_key
from .download import RemoteFile, ensure_files

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
# split -> (images, labels) base names
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# md5 of the .gz as served by the mirror, and of the decompressed (original) file
_MD5 = {
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432",
                                "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3",
                               "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c",
                               "27ae3e4e09519cfbb04c329615203637"),
}
REMOTES = {
    base: RemoteFile(f"{base}.gz", f"{MNIST_URL}{base}.gz", gz, raw)
    for base, (gz, raw) in _MD5.items()
}

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, *, name: str = "IDX data", ndim: int | None = None) -> np.ndarray:
    """Decode IDX bytes (gzip-compressed or raw) into an array, validating the magic number,
    the dimensions and the exact payload size."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as e:
            raise CorruptDataError(f"{name}: truncated or corrupt gzip stream ({e})") from e
    if len(data) < 4:
        raise CorruptDataError(f"{name}: {len(data)} bytes is too short for an IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise CorruptDataError(
            f"{name}: bad IDX magic number {data[:4].hex()} (expected 0000 + type byte "
            f"{sorted(hex(k) for k in _IDX_DTYPES)} + ndim)")
    rank = data[3]
    if ndim is not None and rank != ndim:
        raise CorruptDataError(f"{name}: IDX has {rank} dimensions, expected {ndim}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise CorruptDataError(f"{name}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing bytes"
        raise CorruptDataError(
            f"{name}: file {what}: dims {dims} need {expected} payload bytes, found {got}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw) from disk; see :func:`parse_idx`."""
    path = Path(path)
    return parse_idx(path.read_bytes(), name=str(path), ndim=ndim)


def mnist_folder(root: str | Path | None = None) -> Path:
    """``<root>/mnist``, or torchvision's ``<root>/MNIST/raw`` when only that exists."""
    base = data_root(root)
    for cand in (base / "mnist", base / "MNIST" / "raw"):
        if cand.is_dir():
            return cand
    return base / "mnist"


def _find(folder: Path, base: str) -> Path | None:
    # the standard names, gzip or raw, and the dotted variant (train-images.idx3-ubyte)
    dotted = base.replace("-idx", ".idx")
    for name in (f"{base}.gz", base, f"{dotted}.gz", dotted):
        if (folder / name).is_file():
            return folder / name
    return None


def mnist_files(root: str | Path | None, split: str, download: bool,
                mirror: str | None = None) -> tuple[Path, Path]:
    """Paths of the (images, labels) files of ``split``, downloading them when asked."""
    folder = mnist_folder(root)
    bases = FILES[split]
    present = {REMOTES[b].name: p for b in bases if (p := _find(folder, b)) is not None}
    found = ensure_files(folder, "mnist", [REMOTES[b] for b in bases], download=download,
                         mirror=mirror, present=present,
                         hint=" Uncompressed IDX files with the same names (no .gz) work too.")
    return found[REMOTES[bases[0]].name], found[REMOTES[bases[1]].name]


def read_mnist_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 1, 28, 28] and labels int64 [N], validated against each other."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise CorruptDataError(f"MNIST IDX files must hold unsigned bytes: {images_path}")
    if images.shape[1:] != (28, 28):
        raise CorruptDataError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise CorruptDataError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise CorruptDataError(f"{labels_path}: label {labels.max()} outside 0..9")
    return images[:, None], labels.astype(np.int64)


@functools.lru_cache(maxsize=8)
def _train_stats(key: str, images_path: Path, labels_path: Path):
    images, _ = read_mnist_split(images_path, labels_path)
    return channel_stats(images)


def load_mnist(root: str | Path | None = None, split: str = "train", download: bool = False,
               mirror: str | None = None) -> ImageArrays:
    """MNIST ``split`` ("train" 60k or "test" 10k); mean/std from the training split."""
    images_path, labels_path = mnist_files(root, split, download, mirror)
    images, labels = read_mnist_split(images_path, labels_path)
    if split == "train":
        mean, std = channel_stats(images)
    else:
        tr = mnist_files(root, "train", download, mirror)
        mean, std = _train_stats(source_key(*tr), *tr)
    return ImageArrays(images, labels, [str(i) for i in range(10)], mean, std, "mnist", split)

"""Shared pieces of lowbit.data: errors, data/cache locations, atomic writes, ImageArrays."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit._io import atomic_write

CACHE_VERSION = 1


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are absent; the message names them and how to get them."""


class CorruptDataError(ValueError):
    """A dataset file is truncated, malformed or inconsistent."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$LOWBIT_DATA``, else ``~/.cache/lowbit``."""
    if root is not None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path or None, got {type(root).__name__}")
        return Path(root).expanduser()
    env = os.environ.get("LOWBIT_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lowbit"


def is_writable(path: Path) -> bool:
    """Whether we may write into the existing folder ``path``. A folder whose mode has no
    write bit counts as read-only even for root (who would otherwise bypass it)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return path.is_dir() and bool(mode & 0o222) and os.access(path, os.W_OK | os.X_OK)


def ensure_writable_dir(path: Path) -> bool:
    """Create ``path`` if needed (only below writable folders) and say if it is writable."""
    if not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not is_writable(parent):
            return False
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
    return is_writable(path)


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """Where decoded arrays are cached: ``$LOWBIT_CACHE`` if set, else ``<data root>/cache`` when
    that is writable, else ``~/.cache/lowbit/cache`` (for read-only data folders)."""
    env = os.environ.get("LOWBIT_CACHE")
    if env:
        path = Path(env).expanduser()
        if not ensure_writable_dir(path):
            raise PermissionError(f"$LOWBIT_CACHE={env} is not a writable folder")
        return path
    root_dir = data_root(root)
    if is_writable(root_dir) and ensure_writable_dir(root_dir / "cache"):
        return root_dir / "cache"
    fallback = Path.home() / ".cache" / "lowbit" / "cache"
    if not ensure_writable_dir(fallback):
        raise PermissionError(
            f"no writable cache folder: {root_dir}/cache and {fallback} are not writable; "
            "set $LOWBIT_CACHE")
    return fallback


def source_key(*parts: object) -> str:
    """Short hash that identifies a cache entry: source paths (with size and mtime) + options."""
    h = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for p in parts:
        if isinstance(p, Path):
            st = p.stat()
            h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        else:
            h.update(f"|{p!r}".encode())
    return h.hexdigest()[:16]


def channel_stats(images: np.ndarray | torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images ``[N, C, H, W]`` in [0, 1]
    units, computed from 256-bin histograms so no float accumulation error arises."""
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(_writable(images))
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise TypeError(f"channel_stats needs uint8 [N,C,H,W], got {t.dtype} {tuple(t.shape)}")
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(t.shape[1]):
        counts = torch.bincount(t[:, c].reshape(-1), minlength=256).numpy().astype(np.float64)
        n = counts.sum()
        if n == 0:
            raise ValueError("channel_stats: empty image array")
        mean = float((counts * levels).sum() / n)
        var = float((counts * (levels - mean) ** 2).sum() / n)
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5)
    return tuple(means), tuple(stds)


def _writable(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()


@dataclass
class ImageArrays:
    """An in-memory image classification split.

    ``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``, ``classes`` the class names
    (label i is ``classes[i]``), ``mean``/``std`` per-channel statistics of the *training*
    split in [0, 1] units (used to normalise every split the same way).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    split: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.images, np.ndarray):
            self.images = torch.from_numpy(_writable(self.images))
        if isinstance(self.labels, np.ndarray):
            self.labels = torch.from_numpy(_writable(self.labels.astype(np.int64, copy=False)))
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise TypeError(
                f"images must be uint8 [N,C,H,W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise TypeError(f"labels must be int64 [N], got {self.labels.dtype}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)})")
        c = self.images.shape[1]
        self.mean, self.std = tuple(map(float, self.mean)), tuple(map(float, self.std))
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} channel values, got {self.mean} / {self.std}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape (C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: torch.Tensor | np.ndarray | list[int] | slice) -> ImageArrays:
        """The images at ``index`` with the same classes and statistics."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return ImageArrays(self.images[index], self.labels[index], list(self.classes),
                           self.mean, self.std, self.name, self.split)


Split = tuple[np.ndarray, np.ndarray, list[str]]  # images uint8 [N,C,H,W], labels, classes
Stats = tuple[tuple[float, ...], tuple[float, ...]]


def save_arrays(path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str],
                stats: Stats) -> None:
    """Write images/labels/classes and the split's channel statistics as an uncompressed
    .npz, atomically (a crash leaves either no file or the old one)."""
    with atomic_write(path) as f:
        np.savez(f, images=images, labels=labels.astype(np.int64),
                 classes=np.array(classes, dtype=np.str_),
                 mean=np.array(stats[0], dtype=np.float64), std=np.array(stats[1], dtype=np.float64))


def _read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def cached_split(path: Path | None, build: Callable[[], Split]) -> tuple[Split, Stats]:
    """Load a decoded split from the cache file ``path`` or build, measure and cache it.
    ``path=None`` disables the cache. An unreadable cache file is rebuilt."""
    z = _read_npz(path, ("images", "labels", "classes", "mean", "std")) if path else None
    if z is not None and z["images"].dtype == np.uint8 and z["images"].ndim == 4 and (
            z["labels"].shape == (len(z["images"]),)):
        split = (z["images"], z["labels"].astype(np.int64), [str(c) for c in z["classes"]])
        return split, (tuple(map(float, z["mean"])), tuple(map(float, z["std"])))
    images, labels, classes = build()
    stats = channel_stats(images)
    if path is not None:
        save_arrays(path, images, labels, classes, stats)
    return (images, labels, classes), stats


def cached_stats(path: Path | None, build: Callable[[], Split]) -> Stats:
    """Channel statistics of a split, read from its cache file when present (cheap: the
    images are not loaded), else via :func:`cached_split`."""
    z = _read_npz(path, ("mean", "std")) if path else None
    if z is not None:
        return tuple(map(float, z["mean"])), tuple(map(float, z["std"]))
    return cached_split(path, build)[1]


def balanced_subset(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Sorted indices of at most ``limit`` items taken round-robin over classes (the first
    items of each class in order), so a small subset keeps every class; all when ``None``."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit}")
    labels = np.asarray(labels)
    rank = np.empty(n, dtype=np.int64)  # position of each item within its class
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    order = np.lexsort((np.arange(n), rank))  # by rank within class, then original order
    return np.sort(order[:limit])

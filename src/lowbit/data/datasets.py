"""``get_dataset``: one entry point for every dataset by name."""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cifar import cifar10_source, decode_cifar10
from .core import (
    DatasetNotFoundError,
    ImageArrays,
    Split,
    cache_dir,
    cached_split,
    cached_stats,
    data_root,
    source_key,
)
from .digits import load_digits_arrays
from .imagefolder import decode_split, index_imagefolder
from .mnist import load_mnist
from .ptb import Corpus, load_ptb

DEFAULT_WORKERS = 1  # 2 processes measured slower than 1 on the shared 2-core machine

# name -> (splits, options accepted besides split/root/download)
DATASETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "digits": (("train", "test"), ()),
    "mnist": (("train", "test"), ("mirror",)),
    "cifar10": (("train", "test"), ("limit", "workers", "path", "cache", "mirror")),
    "imagenet": (("train", "val", "test"),
                 ("path", "size", "resize", "limit", "workers", "cache")),
    "ptb": (("train", "valid", "test"), ("mirror",)),
}


def _check(name: str, split: str, options: dict[str, Any]) -> None:
    if not isinstance(name, str) or name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=2)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}.{hint} Valid names: {', '.join(DATASETS)}")
    splits, allowed = DATASETS[name]
    if split not in splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; valid splits: {splits}")
    bad = [k for k in options if k not in allowed]
    if bad:
        raise TypeError(f"get_dataset({name!r}) got unexpected option(s) {bad}; valid options: "
                        f"{list(allowed) or 'none'}")
    limit = options.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                              or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    workers = options.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")


def _cache_path(root: Any, use_cache: bool, stem: str, *key: object) -> Path | None:
    if not use_cache:
        return None
    try:
        folder = cache_dir(root)
    except PermissionError as e:
        warnings.warn(f"not caching decoded images: {e}", UserWarning, stacklevel=3)
        return None
    return folder / f"{stem}-{source_key(*key)}.npz"


def _load_cached(
    name: str, split: str, root: Any, use_cache: bool, key: tuple,
    build: Callable[[str], Split],
) -> ImageArrays:
    """Decode (or read from cache) ``split``; mean/std always come from the training split."""
    train_split = "train"
    path = _cache_path(root, use_cache, f"{name}-{split}", *key, split)
    (images, labels, classes), stats = cached_split(path, lambda: build(split))
    if split != train_split:
        tpath = _cache_path(root, use_cache, f"{name}-{train_split}", *key, train_split)
        stats = cached_stats(tpath, lambda: build(train_split))
    return ImageArrays(images, labels, classes, stats[0], stats[1], name, split)


def _imagenet_source(root: Any, path: Any) -> Path:
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DatasetNotFoundError(f"ImageFolder path {p} does not exist")
        return p
    base = data_root(root)
    for cand in (base / "imagenet", base):
        if (cand / "train").is_dir() or (cand / "val").is_dir():
            return cand
    for cand in (base / "imagenet.tar", base / "imagenet.tar.gz"):
        if cand.is_file():
            return cand
    raise DatasetNotFoundError(
        f"ImageNet-style data not found: expected {base}/imagenet/{{train,val}}/<class>/<image> "
        f"(JPEG/PNG), {base}/imagenet.tar of that layout, or path=... pointing at such a "
        f"folder. ImageNet cannot be downloaded automatically (register at "
        f"https://image-net.org and arrange train/ and val/ in class folders).")


def get_dataset(
    name: str, split: str = "train", root: str | os.PathLike | None = None,
    download: bool = False, **options: Any,
) -> ImageArrays | Corpus:
    """Load a dataset split as in-memory arrays.

    Names and splits: ``digits`` (train/test, built in), ``mnist`` (train/test), ``cifar10``
    (train/test), ``imagenet`` (an ImageFolder: train/val), ``ptb`` (returns the whole
    :class:`Corpus`; ``split`` is only validated). Image datasets return :class:`ImageArrays`
    whose mean/std are those of the training split.

    Options: ``limit`` (class-balanced subset size), ``workers`` (decode processes),
    ``path`` (explicit file/folder), ``cache`` (default True: decoded arrays are cached under
    :func:`cache_dir`), ``size``/``resize`` (imagenet: resize the shorter side to ``resize``,
    default 256, then center-crop ``size``, default 224), ``mirror`` (download base URL).
    """
    _check(name, split, options)
    mirror = options.get("mirror")
    if name == "digits":
        return load_digits_arrays(split)
    if name == "mnist":
        return load_mnist(root, split, download, mirror)
    if name == "ptb":
        return load_ptb(root, download, mirror)
    limit, workers = options.get("limit"), options.get("workers", DEFAULT_WORKERS)
    use_cache = bool(options.get("cache", True))
    if name == "cifar10":
        kind, source = cifar10_source(root, download, mirror, options.get("path"))
        return _load_cached(
            "cifar10", split, root, use_cache, (source, kind, limit),
            lambda s: decode_cifar10(kind, source, s, limit, workers))
    # imagenet
    source = _imagenet_source(root, options.get("path"))
    size = int(options.get("size", 224))
    resize = int(options.get("resize") or round(size * 256 / 224))
    if size < 1 or resize < size:
        raise ValueError(f"need 1 <= size <= resize, got size={size} resize={resize}")
    return _load_cached(
        "imagenet", split, root, use_cache, (source, limit, size, resize),
        lambda s: decode_split(index_imagefolder(source), s, size=size, resize=resize,
                               limit=limit, workers=workers))

"""CIFAR-10: the standard pickled batches (``cifar-10-python.tar.gz`` or its extracted
``cifar-10-batches-py/``), or an ImageFolder (a folder or a tar of ``{train,test}/<class>/``)."""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .core import (
    CorruptDataError,
    DatasetNotFoundError,
    Split,
    balanced_subset,
    data_root,
)
from .download import RemoteFile, ensure_files, resolve_url
from .imagefolder import decode_split, index_imagefolder

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
REMOTE = RemoteFile("cifar-10-python.tar.gz",
                    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    "c58f30108f718f92721af3b95e74349a")
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]


def _numpy_attr(module: str, name: str):
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
            "ndarray": np.ndarray, "dtype": np.dtype}[name]


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that only builds plain containers, bytes (``_codecs.encode``) and numpy
    arrays: any other global (which could run code) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles from Python 3
            return codecs.encode
        if (module, name) in self.ALLOWED:
            return _numpy_attr(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle global {module}.{name}")


def _get(d: dict, key: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise KeyError(key)


def parse_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch -> (images uint8 [N,3,32,32], labels int64 [N])."""
    try:
        d = SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
        if not isinstance(d, dict):
            raise TypeError(f"a dict, got {type(d).__name__}")
        raw = np.asarray(_get(d, "data"))
        labels = np.asarray(_get(d, "labels"), dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError,
            IndexError) as e:
        raise CorruptDataError(f"{name}: not a valid CIFAR-10 batch ({type(e).__name__}: {e})"
                               ) from e
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
        raise CorruptDataError(f"{name}: data must be uint8 [N, 3072], got {raw.dtype} "
                               f"{raw.shape}")
    if labels.shape != (len(raw),):
        raise CorruptDataError(f"{name}: {len(raw)} images but {labels.shape} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise CorruptDataError(f"{name}: labels outside 0..9")
    return raw.reshape(-1, 3, 32, 32), labels


def _parse_meta(data: bytes, name: str) -> list[str]:
    try:
        d = SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(d, "label_names")]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
            AttributeError) as e:
        raise CorruptDataError(f"{name}: not a valid CIFAR-10 batches.meta ({e})") from e
    if len(names) != 10:
        raise CorruptDataError(f"{name}: expected 10 label names, got {len(names)}")
    return names


def _read_members(source: Path, wanted: list[str]) -> dict[str, bytes]:
    """Raw bytes of the wanted batch files (by base name) from a tar(.gz) or a folder."""
    found: dict[str, bytes] = {}
    if source.is_dir():
        for w in wanted:
            if (source / w).is_file():
                found[w] = (source / w).read_bytes()
        return found
    try:
        with tarfile.open(source, "r:*") as tf:
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted:
                    f = tf.extractfile(m)
                    assert f is not None
                    found[base] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise CorruptDataError(f"{source}: truncated or corrupt archive ({e})") from e
    return found


def read_cifar_pickles(source: Path, split: str, limit: int | None = None) -> Split:
    """Decode the pickled batches of ``split`` from ``cifar-10-python.tar.gz`` or the extracted
    ``cifar-10-batches-py`` folder."""
    batches = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    raw = _read_members(source, [*batches, "batches.meta"])
    missing = [b for b in batches if b not in raw]
    if missing:
        raise CorruptDataError(f"{source}: missing CIFAR-10 batch file(s) {missing}; "
                               f"expected {batches} and batches.meta")
    classes = _parse_meta(raw["batches.meta"], "batches.meta") if "batches.meta" in raw \
        else list(CLASSES)
    parts = [parse_batch(raw[b], f"{source}:{b}") for b in batches]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    keep = balanced_subset(labels, limit)
    return np.ascontiguousarray(images[keep]), labels[keep], classes


def _is_pickle_tar(path: Path) -> bool:
    try:
        with tarfile.open(path, "r:*") as tf:
            m = tf.next()
            return m is not None and "cifar-10-batches-py" in m.name
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        return path.name.endswith("python.tar.gz")


def find_cifar10(root: str | Path | None = None, path: str | Path | None = None
                 ) -> tuple[str, Path] | None:
    """Locate CIFAR-10 under the data root (or at ``path``): returns (kind, path) with kind
    "pickle" (tar.gz or extracted folder of batches) or "folder" (ImageFolder dir or tar)."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise DatasetNotFoundError(f"CIFAR-10 path {p} does not exist")
        if p.is_dir():
            return ("pickle", p) if (p / "data_batch_1").is_file() else ("folder", p)
        return ("pickle", p) if _is_pickle_tar(p) else ("folder", p)
    base = data_root(root)
    for d in (base, base / "cifar10"):
        if (d / REMOTE.name).is_file():
            return "pickle", d / REMOTE.name
        if (d / "cifar-10-batches-py" / "data_batch_1").is_file():
            return "pickle", d / "cifar-10-batches-py"
    for d in (base / "cifar10-jpeg", base / "cifar10"):
        if (d / "train").is_dir() or (d / "test").is_dir():
            return "folder", d
    for t in (base / "cifar10-jpeg.tar", base / "cifar10" / "cifar10-jpeg.tar"):
        if t.is_file():
            return "folder", t
    return None


def cifar10_source(root: str | Path | None, download: bool, mirror: str | None = None,
                   path: str | Path | None = None) -> tuple[str, Path]:
    """Where CIFAR-10 is, downloading ``cifar-10-python.tar.gz`` when absent and asked to."""
    found = find_cifar10(root, path)
    if found is not None:
        return found
    base = data_root(root)
    if not download:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found under {base}. Expected one of:\n"
            f"  {base}/cifar-10-python.tar.gz (or {base}/cifar10/cifar-10-python.tar.gz)\n"
            f"  {base}/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta\n"
            f"  {base}/cifar10-jpeg.tar or {base}/cifar10-jpeg/{{train,test}}/<class>/*.jpg\n"
            f"Get it with `python -m lowbit.data download cifar10 --root {base}` (or "
            f"lowbit.data.get_dataset('cifar10', download=True)), or download "
            f"{resolve_url(REMOTE, 'cifar10', mirror)} (md5 {REMOTE.md5}) into {base}/cifar10. "
            f"The data folder is the root argument, else $LOWBIT_DATA, else ~/.cache/lowbit.")
    files = ensure_files(base / "cifar10", "cifar10", [REMOTE], download=True, mirror=mirror)
    return "pickle", files[REMOTE.name]


def decode_cifar10(kind: str, source: Path, split: str, limit: int | None = None,
                   workers: int = 1) -> Split:
    """Decode ``split`` of CIFAR-10 from a source found by :func:`find_cifar10`."""
    if kind == "pickle":
        return read_cifar_pickles(source, split, limit)
    return decode_split(index_imagefolder(source), split, limit=limit, workers=workers)

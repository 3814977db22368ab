"""lowbit.data: readers (real and synthetic data), bad input, caching, BatchLoader, PTB."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lowbit.data import (
    BatchLoader,
    CorruptDataError,
    DatasetNotFoundError,
    ImageArrays,
    batchify,
    cache_dir,
    channel_stats,
    data_root,
    get_dataset,
    lm_batches,
)
from lowbit.data.cifar import CLASSES, SafeUnpickler, parse_batch
from lowbit.data.core import atomic_write, balanced_subset
from lowbit.data.mnist import parse_idx
from lowbit.data.ptb import Vocab, tokenize


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test caches under its own tmp folder and never touches ~/.cache."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOWBIT_MIRROR", raising=False)


# ---------------------------------------------------------------- locations and atomic writes


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root() == tmp_path / "env"
    monkeypatch.delenv("LOWBIT_DATA")
    assert data_root() == tmp_path / "home" / ".cache" / "lowbit"
    with pytest.raises(TypeError, match="root"):
        data_root(3)


def test_cache_dir_falls_back_for_read_only_root(monkeypatch, tmp_path):
    monkeypatch.delenv("LOWBIT_CACHE")
    writable = tmp_path / "data"
    writable.mkdir()
    assert cache_dir(writable) == writable / "cache"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cache_dir(ro) == tmp_path / "home" / ".cache" / "lowbit" / "cache"
        assert not (ro / "cache").exists()  # nothing created in the read-only folder
    finally:
        ro.chmod(0o755)


def test_cache_dir_never_writes_into_shared(shared_datasets, monkeypatch, tmp_path):
    monkeypatch.delenv("LOWBIT_CACHE")
    if os.stat(shared_datasets).st_mode & 0o222:
        pytest.skip("the shared folder is writable here")
    assert cache_dir(shared_datasets) == tmp_path / "home" / ".cache" / "lowbit" / "cache"
    assert not (shared_datasets / "cache").exists()


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"partial")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
    with atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_channel_stats_exact_against_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 7, 5), generator=g, dtype=torch.uint8)
    mean, std = channel_stats(x)
    ref = x.double().div(255).permute(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(mean, ref.mean(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(1, unbiased=False).numpy(), rtol=1e-12)


def test_balanced_subset_keeps_every_class():
    labels = np.repeat(np.arange(5), [10, 3, 7, 1, 9])
    idx = balanced_subset(labels, 12)
    counts = np.bincount(labels[idx], minlength=5)
    assert counts.sum() == 12 and counts.min() >= 1 and list(idx) == sorted(idx)
    assert counts.max() - counts[counts < [10, 3, 7, 1, 9]].min() <= 1
    assert len(balanced_subset(labels, None)) == len(labels)


# ---------------------------------------------------------------- digits


def test_digits_split():
    train, test = get_dataset("digits"), get_dataset("digits", "test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    from sklearn.datasets import load_digits

    d = load_digits()
    ref = {tuple(np.round(im * 255 / 16).astype(np.uint8).ravel()) for im in d.images}
    got = [tuple(im.ravel()) for im in torch.cat([train.images, test.images]).numpy()]
    assert set(got) == ref  # together exactly the bundled images
    # stratified: every class in both splits
    assert (torch.bincount(test.labels, minlength=10) >= 30).all()
    assert test.mean == train.mean and train.mean == channel_stats(train.images)[0]
    again = get_dataset("digits")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)


# ---------------------------------------------------------------- MNIST / IDX


def idx_bytes(arr: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    head = bytes([0, 0, codes[arr.dtype], arr.ndim])
    head += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(["u1", "i1", ">i2", ">i4", ">f4", ">f8"]),
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    compress=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_idx_round_trip(dtype, shape, compress, seed):
    rng = np.random.default_rng(seed)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    data = idx_bytes(arr)
    out = parse_idx(gzip.compress(data) if compress else data)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.array_equal(out, arr)


def test_idx_bad_input():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    good = idx_bytes(arr)
    with pytest.raises(CorruptDataError, match="truncated"):
        parse_idx(good[:-1])
    with pytest.raises(CorruptDataError, match="trailing"):
        parse_idx(good + b"\0")
    with pytest.raises(CorruptDataError, match="magic"):
        parse_idx(b"\x01" + good[1:])
    with pytest.raises(CorruptDataError, match="magic"):
        parse_idx(good[:2] + b"\x07" + good[3:])
    with pytest.raises(CorruptDataError, match="dimensions"):
        parse_idx(good, ndim=1)
    with pytest.raises(CorruptDataError, match="header"):
        parse_idx(good[:9])
    with pytest.raises(CorruptDataError, match="gzip"):
        parse_idx(gzip.compress(good)[:-12])


def write_mnist(folder: Path, n_train: int = 12, n_test: int = 6, *, gz: bool = True,
                seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-ubyte"
            (folder / (name + ".gz" if gz else name)).write_bytes(
                gzip.compress(data) if gz else data)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_synthetic_gz_and_raw(tmp_path, gz):
    ref = write_mnist(tmp_path / "mnist", gz=gz)
    train = get_dataset("mnist", root=tmp_path)
    test = get_dataset("mnist", "test", root=tmp_path)
    assert np.array_equal(train.images[:, 0].numpy(), ref["train"][0])
    assert np.array_equal(test.labels.numpy(), ref["t10k"][1].astype(np.int64))
    assert test.mean == train.mean == channel_stats(ref["train"][0][:, None])[0]


def test_mnist_count_mismatch_and_truncation(tmp_path):
    write_mnist(tmp_path / "mnist")
    labels = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(CorruptDataError, match="12 images but .* 5 labels"):
        get_dataset("mnist", root=tmp_path)
    images = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:200])
    with pytest.raises(CorruptDataError, match="train-images"):
        get_dataset("mnist", root=tmp_path)


def test_missing_dataset_message_names_files_and_command(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        get_dataset("mnist", root=tmp_path)
    msg = str(e.value)
    for piece in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                  "python -m lowbit.data download mnist", "ossci-datasets.s3.amazonaws.com",
                  str(tmp_path / "mnist")):
        assert piece in msg
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz") as e:
        get_dataset("cifar10", root=tmp_path)
    assert "www.cs.toronto.edu/~kriz" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="ptb.train.txt"):
        get_dataset("ptb", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="imagenet"):
        get_dataset("imagenet", root=tmp_path)


def test_get_dataset_argument_errors():
    with pytest.raises(ValueError, match="mnist"):
        get_dataset("mnsit")
    with pytest.raises(ValueError, match="valid splits"):
        get_dataset("digits", "val")
    with pytest.raises(TypeError, match="valid options"):
        get_dataset("digits", limit=3)
    with pytest.raises(ValueError, match="limit"):
        get_dataset("cifar10", limit=0)


MNIST_RAW_MD5 = {  # README of the shared datasets: md5 of the decompressed files
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}


def test_mnist_real(shared_datasets):
    if not (shared_datasets / "mnist").is_dir():
        pytest.skip("no MNIST in the shared datasets")
    train = get_dataset("mnist", root=shared_datasets)
    test = get_dataset("mnist", "test", root=shared_datasets)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    # the arrays are byte-for-byte the payload of the verified original files
    raw = gzip.decompress((shared_datasets / "mnist/train-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == MNIST_RAW_MD5["train-images-idx3-ubyte.gz"]
    assert train.images.numpy().tobytes() == raw[16:]
    raw = gzip.decompress((shared_datasets / "mnist/t10k-labels-idx1-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == MNIST_RAW_MD5["t10k-labels-idx1-ubyte.gz"]
    assert test.labels.numpy().astype(np.uint8).tobytes() == raw[8:]
    assert set(train.labels.unique().tolist()) == set(range(10))
    assert test.mean == train.mean


# ---------------------------------------------------------------- CIFAR-10 pickled


def make_cifar_pickles(target: Path, n: int = 8, n_test: int = 6, *, folder: bool = False,
                       seed: int = 0, str_keys: bool = False) -> dict:
    """A small cifar-10-python.tar.gz (or extracted folder) in the standard layout."""
    rng = np.random.default_rng(seed)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    members, ref = {}, {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        m = n_test if name == "test_batch" else n
        data = rng.integers(0, 256, (m, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, m).tolist()
        members[name] = pickle.dumps({key("batch_label"): b"x", key("labels"): labels,
                                      key("data"): data, key("filenames"): [b"f"] * m},
                                     protocol=2)
        split = "test" if name == "test_batch" else "train"
        ref[split][0].append(data.reshape(m, 3, 32, 32))
        ref[split][1].extend(labels)
    members["batches.meta"] = pickle.dumps(
        {key("label_names"): [c.encode() for c in CLASSES], key("num_vis"): 3072}, protocol=2)
    if folder:
        d = target / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for name, blob in members.items():
            (d / name).write_bytes(blob)
    else:
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(target / "cifar-10-python.tar.gz", "w:gz") as tf:
            for name, blob in members.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    return {s: (np.concatenate(a), np.array(b)) for s, (a, b) in ref.items()}


@pytest.mark.parametrize("folder,str_keys", [(False, False), (True, False), (False, True)])
def test_cifar_pickled(tmp_path, folder, str_keys):
    ref = make_cifar_pickles(tmp_path / "data", folder=folder, str_keys=str_keys)
    train = get_dataset("cifar10", root=tmp_path / "data")
    test = get_dataset("cifar10", "test", root=tmp_path / "data")
    assert np.array_equal(train.images.numpy(), ref["train"][0])
    assert np.array_equal(train.labels.numpy(), ref["train"][1])
    assert np.array_equal(test.images.numpy(), ref["test"][0])
    assert train.classes == CLASSES and test.mean == train.mean
    assert train.mean == channel_stats(ref["train"][0])[0]
    # served from the cache the second time, identical
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)
    again = get_dataset("cifar10", root=tmp_path / "data")
    assert torch.equal(again.images, train.images) and again.std == train.std


def py2_pickle_batch(raw: bytes, n: int, labels: list[int]) -> bytes:
    """The opcode stream Python 2's pickle (protocol 2) writes for a CIFAR-10 batch dict
    {'data': uint8 ndarray [n, 3072], 'labels': [...]}: str keys and the array payload are
    BINSTRINGs (byte-identical to a real Python 2.7 dump up to dict order and memo opcodes)."""

    def sbs(s: bytes) -> bytes:  # SHORT_BINSTRING
        return b"U" + bytes([len(s)]) + s

    dtype = (b"cnumpy\ndtype\n" + sbs(b"u1") + b"K\x00K\x01\x87R"
             + b"(K\x03" + sbs(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85"
             + sbs(b"b") + b"\x87R" + b"(K\x01" + b"K" + bytes([n]) + b"M\x00\x0c\x86" + dtype
             + b"\x89" + b"T" + len(raw).to_bytes(4, "little") + raw + b"tb")
    items = b"".join(b"K" + bytes([v]) for v in labels)
    return (b"\x80\x02}(" + sbs(b"data") + array + sbs(b"labels") + b"](" + items + b"e"
            + b"u.")


def test_cifar_python2_pickle_format():
    raw = bytes((i * 7) % 256 for i in range(2 * 3072))
    images, labels = parse_batch(py2_pickle_batch(raw, 2, [3, 7]), "py2")
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 7]
    assert images.tobytes() == raw  # rows are channel-major 3x32x32, as in CIFAR-10


def test_safe_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    blob = pickle.dumps({b"data": Evil()}, protocol=2)
    with pytest.raises(CorruptDataError, match="refusing"):
        parse_batch(blob, "evil")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        SafeUnpickler(io.BytesIO(pickle.dumps(print))).load()


def test_cifar_bad_input(tmp_path):
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]})
    assert parse_batch(good, "ok")[0].shape == (2, 3, 32, 32)
    with pytest.raises(CorruptDataError, match="not a valid"):
        parse_batch(good[:-5], "cut")
    with pytest.raises(CorruptDataError, match="uint8"):
        parse_batch(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}),
                    "shape")
    with pytest.raises(CorruptDataError, match="labels"):
        parse_batch(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}),
                    "count")
    make_cifar_pickles(tmp_path / "a")
    tgz = tmp_path / "a" / "cifar-10-python.tar.gz"
    tgz.write_bytes(tgz.read_bytes()[: tgz.stat().st_size // 2])
    with pytest.raises(CorruptDataError, match="truncated or corrupt"):
        get_dataset("cifar10", root=tmp_path / "a")
    make_cifar_pickles(tmp_path / "b", folder=True)
    (tmp_path / "b" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(CorruptDataError, match="data_batch_3"):
        get_dataset("cifar10", root=tmp_path / "b")
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []  # no partial cache


# ---------------------------------------------------------------- ImageFolder (folder / tar)


def make_image_folder(root: Path, splits=("train", "test"), classes=("cat", "dog", "emu"),
                      per_class: int = 4, size=(6, 5), seed: int = 0) -> dict:
    """PNG (lossless) images in <root>/<split>/<class>/NNNN.png; returns the pixel arrays."""
    rng = np.random.default_rng(seed)
    ref: dict[str, list] = {}
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.png")
                ref.setdefault(split, []).append((c, arr.transpose(2, 0, 1)))
    return ref


def tar_folder(src: Path, dest: Path, arcname: str, mode: str = "w") -> Path:
    with tarfile.open(dest, mode) as tf:
        tf.add(src, arcname=arcname)
    return dest


@pytest.mark.parametrize("form", ["dir", "tar", "tar.gz"])
def test_cifar_image_folder_forms(tmp_path, form):
    ref = make_image_folder(tmp_path / "src" / "cifar10-jpeg", size=(32, 32))
    if form == "dir":
        path = tmp_path / "src" / "cifar10-jpeg"
    else:
        path = tar_folder(tmp_path / "src" / "cifar10-jpeg", tmp_path / f"c.{form}",
                          "cifar10-jpeg", "w" if form == "tar" else "w:gz")
    train = get_dataset("cifar10", path=path)
    test = get_dataset("cifar10", "test", path=path)
    assert train.classes == ["cat", "dog", "emu"]
    assert np.array_equal(train.images.numpy(), np.stack([a for _, a in ref["train"]]))
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(test.images.numpy(), np.stack([a for _, a in ref["test"]]))
    assert test.mean == train.mean


def test_cifar_tar_found_under_root_and_limit(tmp_path):
    make_image_folder(tmp_path / "src" / "cifar10-jpeg", size=(32, 32), per_class=5)
    tar_folder(tmp_path / "src" / "cifar10-jpeg", tmp_path / "cifar10-jpeg.tar", "cifar10-jpeg")
    sub = get_dataset("cifar10", root=tmp_path, limit=7)
    assert len(sub) == 7 and torch.bincount(sub.labels).tolist() == [3, 2, 2]
    full = get_dataset("cifar10", root=tmp_path, workers=2)
    assert len(full) == 15
    # the subset is made of the first files of each class
    assert torch.equal(sub.images[:3], full.images[:3])


def test_image_folder_bad_input_leaves_no_cache(tmp_path):
    make_image_folder(tmp_path / "d", size=(32, 32))
    bad = tmp_path / "d" / "train" / "dog" / "0002.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated image
    with pytest.raises(CorruptDataError, match="0002.png"):
        get_dataset("cifar10", path=tmp_path / "d")
    cache = tmp_path / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []
    # a tar cut in the middle
    make_image_folder(tmp_path / "e", size=(32, 32))
    t = tar_folder(tmp_path / "e", tmp_path / "e.tar", "e")
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    with pytest.raises(CorruptDataError, match="truncated"):
        get_dataset("cifar10", path=t)
    # garbage that is not a tar at all
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file" * 100)
    with pytest.raises(CorruptDataError):
        get_dataset("cifar10", path=junk)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_image_folder_mixed_sizes_need_size(tmp_path):
    make_image_folder(tmp_path / "d", splits=("train",), size=(8, 8))
    make_image_folder(tmp_path / "d", splits=("train",), classes=("fox",), size=(9, 7))
    with pytest.raises(CorruptDataError, match="size"):
        get_dataset("cifar10", path=tmp_path / "d")


def test_imagenet_folder_resize_and_center_crop(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root / "imagenet", splits=("train", "val"), size=(40, 30), per_class=2)
    ds = get_dataset("imagenet", root=root, size=16, resize=20)
    assert ds.images.shape == (6, 3, 16, 16)
    # independent reference with PIL: shorter side 30 -> 20, width 40 -> 27, center crop
    src = Image.open(root / "imagenet" / "train" / "cat" / "0000.png").convert("RGB")
    ref = src.resize((27, 20), Image.Resampling.BILINEAR).crop((5, 2, 21, 18))
    assert np.array_equal(ds.images[0].numpy(), np.asarray(ref).transpose(2, 0, 1))
    val = get_dataset("imagenet", "val", root=root, size=16, resize=20)
    test_alias = get_dataset("imagenet", "test", root=root, size=16, resize=20)
    assert torch.equal(val.images, test_alias.images) and val.mean == ds.mean
    with pytest.raises(ValueError, match="resize"):
        get_dataset("imagenet", root=root, size=32, resize=20)


def test_cifar_real_subset(shared_datasets):
    tar = shared_datasets / "cifar10-jpeg.tar"
    if not tar.is_file():
        pytest.skip("no CIFAR-10 tar in the shared datasets")
    ds = get_dataset("cifar10", root=shared_datasets, limit=200)
    assert ds.images.shape == (200, 3, 32, 32) and ds.classes == CLASSES
    assert torch.bincount(ds.labels).tolist() == [20] * 10
    # independent decode of one member straight from the tar
    with tarfile.open(tar) as tf:
        member = next(m for m in tf if m.name == "cifar10-jpeg/train/bird/0003.jpg")
        ref = np.asarray(Image.open(tf.extractfile(member)).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(ds.images[2 * 20 + 3].numpy(), ref)
    assert 0.3 < min(ds.mean) < max(ds.mean) < 0.6


@pytest.mark.slow
def test_cifar_real_full_decode(shared_datasets):
    if not (shared_datasets / "cifar10-jpeg.tar").is_file():
        pytest.skip("no CIFAR-10 tar in the shared datasets")
    train = get_dataset("cifar10", root=shared_datasets)
    test = get_dataset("cifar10", "test", root=shared_datasets)
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- BatchLoader


def toy(n: int = 37, c: int = 3, h: int = 6, w: int = 6, seed: int = 0) -> ImageArrays:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    mean, std = channel_stats(images)
    return ImageArrays(images, torch.arange(n) % 4, ["a", "b", "c", "d"], mean, std)


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_plain_matches_reference():
    ds = toy()
    loader = BatchLoader(ds, 8, shuffle=False)
    xs, ys = zip(*collect(loader))
    assert len(loader) == 5 and [len(y) for y in ys] == [8, 8, 8, 8, 5]
    x = torch.cat(xs)
    mean = torch.tensor(ds.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float64).view(1, 3, 1, 1)
    ref = (ds.images.double() / 255 - mean) / std
    assert x.dtype == torch.float32 and torch.equal(torch.cat(ys), ds.labels)
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=2e-6)
    # normalised with its own statistics: zero mean, unit variance per channel
    flat = x.double().permute(1, 0, 2, 3).reshape(3, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_loader_determinism_and_resume():
    ds = toy()
    a = BatchLoader(ds, 8, augment="crop_flip", seed=5)
    b = BatchLoader(ds, 8, augment="crop_flip", seed=5)
    runs_a = []
    for epoch in range(3):
        a.set_epoch(epoch)
        runs_a.append(collect(a))
    b.set_epoch(2)  # a fresh loader resumed at epoch 2 sees exactly epoch 2
    for (xa, ya), (xb, yb) in zip(runs_a[2], collect(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(runs_a[0][0][1], runs_a[1][0][1])  # new order each epoch
    assert not torch.equal(runs_a[0][0][0], collect(BatchLoader(ds, 8, augment="crop_flip",
                                                                seed=6))[0][0])
    tail = [(x.clone(), y.clone()) for x, y in b.batches(start=3)]  # mid-epoch resume
    for (xa, ya), (xb, yb) in zip(runs_a[2][3:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(tail) == 2
    for epoch in range(3):  # each epoch is a permutation of the data
        assert sorted(torch.cat([y for _, y in runs_a[epoch]]).tolist()) == sorted(
            ds.labels.tolist())


@pytest.mark.parametrize("n,world,drop_last", [(37, 3, False), (37, 3, True), (36, 4, False),
                                               (5, 4, False)])
def test_loader_sharding(n, world, drop_last):
    ds = toy(n)
    ds.labels = torch.arange(n)  # label = index, to see which samples each rank got
    ds.classes = [str(i) for i in range(n)]
    shards = []
    for rank in range(world):
        loader = BatchLoader(ds, 4, seed=1, drop_last=drop_last, rank=rank, world_size=world)
        loader.set_epoch(3)
        ys = [y for _, y in loader]
        shards.append(torch.cat(ys) if ys else torch.empty(0, dtype=torch.long))
        assert len(ys) == len(loader)
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1  # equal shard sizes on every rank
    seen = torch.cat(shards)
    if drop_last:
        assert len(seen) == world * ((n // world) // 4 * 4)  # short shards and batches cut
        assert len(set(seen.tolist())) == len(seen)
    else:
        assert set(seen.tolist()) == set(range(n))  # everything, padding only repeats
        assert len(seen) == -(-n // world) * world


def test_crop_flip_are_windows_of_padded_image_uniformly():
    ds = toy(n=64, c=2, h=5, w=5, seed=1)
    loader = BatchLoader(ds, 64, shuffle=False, augment="crop_flip", padding=2)
    mean = torch.tensor(ds.mean).view(1, 2, 1, 1)
    std = torch.tensor(ds.std).view(1, 2, 1, 1)
    padded = torch.nn.functional.pad(ds.images.float() / 255, (2, 2, 2, 2))
    # every 5x5 window of the padded images, and its mirror: [64, 25 offsets, 2 flips, C, 5, 5]
    win = padded.unfold(2, 5, 1).unfold(3, 5, 1)  # [64, C, 5, 5, 5, 5] (dy, dx, h, w)
    win = win.permute(0, 2, 3, 1, 4, 5).reshape(64, 25, 2, 5, 5)
    cands = torch.stack([win, win.flip(-1)], 2)
    offsets, flips = [], 0
    for epoch in range(40):
        loader.set_epoch(epoch)
        (x, _), = list(loader)
        pix = x * std + mean  # undo the normalisation
        err = (cands - pix[:, None, None]).abs().amax((3, 4, 5))  # [64, 25, 2]
        hit = err < 1e-5
        assert hit.flatten(1).any(1).all(), "output is not a (flipped) window of the input"
        first = hit.flatten(1).float().argmax(1)
        offsets += (first // 2).tolist()
        flips += int((first % 2).sum())
    n = len(offsets)
    from scipy.stats import binomtest, chisquare

    counts = np.bincount(offsets, minlength=25)
    assert chisquare(counts).pvalue > 1e-3  # offsets uniform over the 5x5 window
    assert binomtest(flips, n, 0.5).pvalue > 1e-3  # flips with probability 1/2


def test_loader_argument_errors():
    ds = toy()
    with pytest.raises(ValueError, match="augment"):
        BatchLoader(ds, 4, augment="rotate")
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, 0)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="epoch"):
        BatchLoader(ds, 4).set_epoch(-1)
    with pytest.raises(TypeError, match="ImageArrays"):
        BatchLoader([1, 2, 3], 4)


def test_image_arrays_validation():
    with pytest.raises(TypeError, match="uint8"):
        ImageArrays(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), ["a"], (0,), (1,))
    with pytest.raises(ValueError, match="labels"):
        ImageArrays(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 3]), ["a"],
                    (0,), (1,))
    with pytest.raises(ValueError, match="channel"):
        ImageArrays(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 0]), ["a"],
                    (0,), (1,))
    ds = toy()
    sub = ds.subset([3, 1])
    assert torch.equal(sub.images, ds.images[[3, 1]]) and sub.mean == ds.mean


# ---------------------------------------------------------------- Penn Treebank


def test_ptb_real_stand_in(shared_datasets):
    if not (shared_datasets / "ptb" / "ptb.valid.txt").is_file():
        pytest.skip("no PTB in the shared datasets")
    with pytest.warns(UserWarning, match="stands in"):
        corpus = get_dataset("ptb", root=shared_datasets)
    assert corpus.stand_in is not None
    assert len(corpus.train) == 73760  # the README's token count for ptb.valid.txt
    assert len(corpus.vocab) <= 10000
    text = (shared_datasets / "ptb" / "ptb.test.txt").read_text()
    assert len(corpus.test) == len(text.split()) + sum(1 for ln in text.splitlines()
                                                       if ln.strip())
    assert torch.equal(corpus.valid, corpus.test)
    assert corpus.vocab.decode(corpus.train[:5]) == tokenize(
        (shared_datasets / "ptb" / "ptb.valid.txt").read_text())[:5]


def test_ptb_three_files(tmp_path):
    d = tmp_path / "ptb"
    d.mkdir()
    (d / "ptb.train.txt").write_text(" the cat sat \n the dog \n\n")
    (d / "ptb.valid.txt").write_text(" the emu sat \n")
    (d / "ptb.test.txt").write_text(" dog <unk> \n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corpus = get_dataset("ptb", root=tmp_path)
    assert corpus.stand_in is None
    v = corpus.vocab
    assert v.itos[:2] == ["the", "<eos>"]  # by frequency
    assert set(v.itos) == {"the", "cat", "sat", "<eos>", "dog", "<unk>"}
    assert v.decode(corpus.valid) == ["the", "<unk>", "sat", "<eos>"]  # emu is not in train
    assert v.decode(corpus.train) == ["the", "cat", "sat", "<eos>", "the", "dog", "<eos>"]
    (d / "ptb.test.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(CorruptDataError, match="UTF-8"):
        get_dataset("ptb", root=tmp_path)


def test_vocab_build_order():
    v = Vocab.build("b a b c a b".split())
    assert v.itos[:3] == ["b", "a", "c"] and "<unk>" in v.stoi and "<eos>" in v.stoi
    assert v.encode(["a", "zzz"]).tolist() == [v.stoi["a"], v.stoi["<unk>"]]


def test_lm_batches():
    tokens = torch.arange(103)
    data = batchify(tokens, 4)
    assert data.shape == (25, 4) and torch.equal(data[:, 1], torch.arange(25, 50))
    pairs = list(lm_batches(tokens, 4, 7))
    assert [x.shape for x, _ in pairs] == [(7, 4), (7, 4), (7, 4), (3, 4)]
    for x, y in pairs:
        assert torch.equal(y, x + 1)  # target is the next token
    assert torch.equal(torch.cat([x for x, _ in pairs]), data[:-1])
    with pytest.raises(ValueError, match="bptt"):
        next(lm_batches(tokens, 4, 0))
    with pytest.raises(ValueError, match="too few"):
        batchify(torch.arange(5), 4)

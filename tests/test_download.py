"""Downloads against a local HTTP server on 127.0.0.1: success, checksum mismatch, cut
transfers, HTTP errors, and the dataset-level path through $LOWBIT_MIRROR."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from lowbit.data import ChecksumError, DownloadError, download_url, get_dataset
from lowbit.data.__main__ import main as data_cli
from lowbit.data.cifar import REMOTE as CIFAR_REMOTE


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/cut/<path>`` announces the full length but sends half and hangs up."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/cut/"):
            data = (Path(self.directory) / self.path[len("/cut/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", served, httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOWBIT_MIRROR", raising=False)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def blob(n: int = 300_000, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_download_success(server, tmp_path):
    url, served, httpd = server
    data = blob()
    (served / "f.bin").write_bytes(data)
    dest = download_url(f"{url}/f.bin", tmp_path / "out" / "f.bin", md5(data), progress=False)
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["f.bin"]  # no temp file left


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, served, httpd = server
    (served / "f.bin").write_bytes(blob())
    out = tmp_path / "out"
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        download_url(f"{url}/f.bin", out / "f.bin", "0" * 32, progress=False, retries=2)
    assert list(out.iterdir()) == []
    assert len(httpd.requests) == 1  # a wrong checksum is not retried


def test_download_interrupted_leaves_nothing_and_retries(server, tmp_path):
    url, served, httpd = server
    data = blob()
    (served / "f.bin").write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match="nothing was written"):
        download_url(f"{url}/cut/f.bin", out / "f.bin", md5(data), progress=False, retries=1)
    assert list(out.iterdir()) == []
    assert httpd.requests == ["/cut/f.bin", "/cut/f.bin"]


def test_download_http_error_not_retried(server, tmp_path):
    url, _, httpd = server
    with pytest.raises(DownloadError, match="404"):
        download_url(f"{url}/missing.bin", tmp_path / "m.bin", None, progress=False, retries=3)
    assert len(httpd.requests) == 1
    assert not (tmp_path / "m.bin").exists()
    with pytest.raises(ValueError, match="retries"):
        download_url(f"{url}/x", tmp_path / "x", retries=-1)


def test_download_accepts_decompressed_checksum(server, tmp_path):
    url, served, _ = server
    raw = blob(5000)
    packed = gzip.compress(raw, compresslevel=1)  # a re-compressed copy: different gz bytes
    (served / "f.gz").write_bytes(packed)
    dest = download_url(f"{url}/f.gz", tmp_path / "f.gz", "1" * 32, raw_md5=md5(raw),
                        progress=False)
    assert gzip.decompress(dest.read_bytes()) == raw
    with pytest.raises(ChecksumError):
        download_url(f"{url}/f.gz", tmp_path / "g.gz", "1" * 32, raw_md5="2" * 32,
                     progress=False)


def test_mnist_download_through_mirror(server, tmp_path, shared_datasets, monkeypatch):
    src = shared_datasets / "mnist"
    if not src.is_dir():
        pytest.skip("no MNIST in the shared datasets")
    url, served, httpd = server
    shutil.copytree(src, served / "mnist")
    monkeypatch.setenv("LOWBIT_MIRROR", url)
    root = tmp_path / "data"
    test = get_dataset("mnist", "test", root=root, download=True)
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(
        p.name for p in src.iterdir())
    ref = get_dataset("mnist", "test", root=shared_datasets)
    assert np.array_equal(test.images.numpy(), ref.images.numpy())
    n = len(httpd.requests)
    get_dataset("mnist", "test", root=root, download=True)  # present: nothing fetched again
    assert len(httpd.requests) == n == 4


def test_mnist_download_wrong_files_rejected(server, tmp_path, monkeypatch):
    url, served, _ = server
    (served / "mnist").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (served / "mnist" / f"{name}.gz").write_bytes(gzip.compress(b"not mnist"))
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz"):
        get_dataset("mnist", root=root, download=True, mirror=url)
    assert list((root / "mnist").iterdir()) == []


def test_cifar_download_checksum_and_cut(server, tmp_path, monkeypatch):
    url, served, _ = server
    (served / "cifar10").mkdir()
    (served / "cifar10" / CIFAR_REMOTE.name).write_bytes(blob(50_000))
    monkeypatch.setenv("LOWBIT_MIRROR", url)
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match=CIFAR_REMOTE.md5):
        get_dataset("cifar10", root=root, download=True)
    assert list((root / "cifar10").iterdir()) == []
    monkeypatch.setenv("LOWBIT_MIRROR", f"{url}/cut")
    with pytest.raises(DownloadError, match="interrupted|IncompleteRead"):
        get_dataset("cifar10", root=root, download=True)
    assert list((root / "cifar10").iterdir()) == []


def test_ptb_download_keeps_only_verified_files(server, tmp_path, shared_datasets):
    src = shared_datasets / "ptb"
    if not (src / "ptb.valid.txt").is_file():
        pytest.skip("no PTB in the shared datasets")
    url, served, _ = server
    (served / "ptb").mkdir()
    for name in ("ptb.valid.txt", "ptb.test.txt"):
        shutil.copy(src / name, served / "ptb" / name)
    (served / "ptb" / "ptb.train.txt").write_text("not the real training text\n")
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match="ptb.train.txt"):
        get_dataset("ptb", root=root, download=True, mirror=url)
    assert not (root / "ptb" / "ptb.train.txt").exists()


def test_download_into_read_only_folder(server, tmp_path):
    url, _, _ = server
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(DownloadError, match="not writable"):
            get_dataset("cifar10", root=ro, download=True, mirror=url)
    finally:
        ro.chmod(0o755)


def test_cli_download(server, tmp_path, shared_datasets, capsys):
    src = shared_datasets / "mnist"
    if not src.is_dir():
        pytest.skip("no MNIST in the shared datasets")
    url, served, _ = server
    shutil.copytree(src, served / "mnist")
    assert data_cli(["download", "mnist", "--root", str(tmp_path / "d"), "--mirror", url]) == 0
    assert "mnist ready" in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "mnist").iterdir())) == 4

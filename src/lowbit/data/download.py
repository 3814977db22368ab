"""Downloads with checksum verification: temp file, streamed with a progress bar, md5 checked,
then renamed into place. A short or failed transfer or a wrong checksum leaves nothing behind.

``$LOWBIT_MIRROR`` (or the ``mirror`` argument) replaces every dataset's public base URL with
``<mirror>/<dataset>/<file name>``, e.g. a local server for tests or an institute mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .core import DatasetNotFoundError, ensure_writable_dir

MIRROR_ENV = "LOWBIT_MIRROR"
CHUNK = 1 << 16


class DownloadError(OSError):
    """A transfer failed or was cut short; no file was written."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the published checksum; no file was written."""


@dataclass(frozen=True)
class RemoteFile:
    """A dataset file at a public URL with its md5 (of the file as served). ``raw_md5`` is the
    md5 of the gunzipped content, accepted as well (mirrors re-compress the same data)."""

    name: str
    url: str
    md5: str | None
    raw_md5: str | None = None


def md5sum(path: str | os.PathLike, *, gunzip: bool = False) -> str:
    """Hex md5 of a file (of its decompressed content with ``gunzip=True``)."""
    h = hashlib.md5(usedforsecurity=False)
    opener = gzip.open if gunzip else open
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_url(remote: RemoteFile, dataset: str, mirror: str | None = None) -> str:
    """The URL to fetch ``remote`` from: the mirror (argument, else ``$LOWBIT_MIRROR``) or the
    public URL."""
    base = mirror or os.environ.get(MIRROR_ENV)
    if base:
        return f"{base.rstrip('/')}/{dataset}/{remote.name}"
    return remote.url


def _transfer(url: str, tmp: Path, timeout: float, progress: bool, desc: str) -> tuple[int, str]:
    """Stream ``url`` into ``tmp``; returns (bytes, md5). Raises on a short transfer."""
    h = hashlib.md5(usedforsecurity=False)
    got = 0
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
                  leave=False) as bar:
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
        if total is not None and got != total:
            raise DownloadError(f"interrupted transfer of {url}: got {got} of {total} bytes")
        out.flush()
        os.fsync(out.fileno())
    return got, h.hexdigest()


def download_url(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    *,
    raw_md5: str | None = None,
    retries: int = 1,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through a temporary file in the same folder.

    The file is renamed into place only when the transfer is complete (``Content-Length``
    matched) and its md5 equals ``md5`` (or, for gzip files, the md5 of its decompressed
    content equals ``raw_md5``). Otherwise the temporary file is deleted and
    :class:`DownloadError` / :class:`ChecksumError` is raised. Network failures are retried
    ``retries`` times; checksum failures and HTTP 4xx are not.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(retries + 1):
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            size, digest = _transfer(url, tmp, timeout, progress, dest.name)
            ok = md5 is None and raw_md5 is None
            ok = ok or (md5 is not None and digest == md5)
            if not ok and raw_md5 is not None:
                try:
                    ok = md5sum(tmp, gunzip=True) == raw_md5
                except (OSError, EOFError):
                    ok = False
            if not ok:
                want = " or ".join(
                    x for x in (md5 and f"md5 {md5}", raw_md5 and f"decompressed md5 {raw_md5}")
                    if x)
                raise ChecksumError(
                    f"checksum mismatch for {url} ({size} bytes): got md5 {digest}, expected "
                    f"{want}. The file was discarded; the mirror may be corrupt or stale.")
            os.replace(tmp, dest)
            return dest
        except ChecksumError:
            raise
        except urllib.error.HTTPError as e:
            last = e
            if 400 <= e.code < 500:
                break
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                DownloadError, OSError) as e:
            last = e
        finally:
            tmp.unlink(missing_ok=True)
        if attempt < retries:
            time.sleep(0.5 * (attempt + 1))
    if isinstance(last, DownloadError):
        raise DownloadError(f"{last} (after {retries + 1} attempt(s); nothing was written)")
    raise DownloadError(
        f"could not download {url}: {type(last).__name__}: {last} "
        f"(after {retries + 1} attempt(s); nothing was written)") from last


def ensure_files(
    folder: Path,
    dataset: str,
    remotes: list[RemoteFile],
    *,
    download: bool,
    mirror: str | None = None,
    present: dict[str, Path] | None = None,
    hint: str = "",
) -> dict[str, Path]:
    """Make sure every remote file is in ``folder`` (downloading when ``download``); returns
    name -> path. ``present`` maps names already found elsewhere (e.g. an uncompressed copy).
    Missing files without ``download`` raise :class:`DatasetNotFoundError` naming them, the
    URLs and how to fetch them."""
    present = dict(present or {})
    missing = [r for r in remotes if r.name not in present and not (folder / r.name).is_file()]
    for r in remotes:
        if r.name not in present and (folder / r.name).is_file():
            present[r.name] = folder / r.name
    if not missing:
        return present
    if not download:
        lines = "\n".join(f"  {r.name}  <- {resolve_url(r, dataset, mirror)}" for r in missing)
        raise DatasetNotFoundError(
            f"{dataset} not found in {folder}. Missing files:\n{lines}\n"
            f"Get them with `python -m lowbit.data download {dataset} --root {folder.parent}` "
            f"(or lowbit.data.get_dataset({dataset!r}, download=True)), or download the URLs "
            f"above into {folder}. The data folder is the root argument, else $LOWBIT_DATA, "
            f"else ~/.cache/lowbit.{hint}")
    if not ensure_writable_dir(folder):
        raise DownloadError(f"cannot download {dataset}: {folder} is not writable "
                            f"(pass a writable root or set $LOWBIT_DATA)")
    for r in missing:
        present[r.name] = download_url(resolve_url(r, dataset, mirror), folder / r.name,
                                       r.md5, raw_md5=r.raw_md5)
    return present

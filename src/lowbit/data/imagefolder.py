"""ImageFolder datasets (``<split>/<class>/<image>``) from a folder or a tar of one, decoded
once into uint8 arrays (optionally resized + center-cropped) and cached."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import io
import mmap
import multiprocessing as mp
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .core import CorruptDataError, Split, balanced_subset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_ALIASES = {"train": ("train",), "test": ("test", "val", "valid"),
                 "val": ("val", "valid", "test"), "valid": ("valid", "val", "test")}
CHUNK = 1000  # images per decode task
_ZERO_BLOCK = bytes(512)

# location of an image: a file path, or (offset, size) of a member in an uncompressed tar,
# or a member name in a compressed tar (read sequentially)
Loc = str | tuple[int, int]


@dataclass(frozen=True)
class FolderIndex:
    """What a folder/tar holds: kind "dir" | "tar" | "tar-stream", and split -> class ->
    sorted [(file name, location)]."""

    source: Path
    kind: str
    splits: dict[str, dict[str, list[tuple[str, Loc]]]]

    def split_name(self, split: str) -> str:
        for cand in SPLIT_ALIASES.get(split, (split,)):
            if cand in self.splits:
                return cand
        raise CorruptDataError(
            f"{self.source}: no {split!r} split; found {sorted(self.splits) or 'none'} "
            f"(expected <split>/<class>/<image> with split in train/val/test)")

    def classes(self) -> list[str]:
        """Class names (sorted) from the training split if present, else from all splits."""
        if "train" in self.splits:
            return sorted(self.splits["train"])
        return sorted({c for s in self.splits.values() for c in s})


def _add(splits: dict, parts: tuple[str, ...], loc: Loc) -> None:
    if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_EXTS):
        return
    split, cls, name = parts[-3:]
    if name.startswith("."):
        return
    splits.setdefault(split, {}).setdefault(cls, []).append((name, loc))


def _finish(source: Path, kind: str, splits: dict) -> FolderIndex:
    if not splits:
        raise CorruptDataError(
            f"{source}: no images found in an ImageFolder layout <split>/<class>/<image> "
            f"(extensions {', '.join(IMAGE_EXTS)})")
    for classes in splits.values():
        for files in classes.values():
            files.sort(key=lambda t: t[0])
    return FolderIndex(source, kind, splits)


@functools.lru_cache(maxsize=4)
def _index_cached(source: Path, key: tuple[int, int]) -> FolderIndex:
    if source.is_dir():
        return _scan_dir(source)
    return _scan_tar(source)


def index_imagefolder(source: str | os.PathLike) -> FolderIndex:
    """Scan a folder or tar holding ``[prefix/]<split>/<class>/<image>``."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"image folder {source} does not exist")
    st = source.stat()
    return _index_cached(source.resolve(), (st.st_size, st.st_mtime_ns))


def _scan_dir(root: Path) -> FolderIndex:
    splits: dict = {}
    for dirpath, _, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        for f in files:
            _add(splits, (*rel, f), str(Path(dirpath) / f))
    return _finish(root, "dir", splits)


def _fast_tar_members(path: Path) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of the regular files of a plain ustar/GNU tar, read straight
    from the 512-byte headers (several times faster than ``tarfile``). Returns ``None`` for
    anything it does not handle (long names, pax headers, compression) so the caller falls
    back to ``tarfile``; raises :class:`CorruptDataError` for a truncated or corrupt tar."""
    total = path.stat().st_size
    if total < 512:
        return None
    out: list[tuple[str, int, int]] = []
    headers: list[int] = []
    stored: list[int] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        offset = 0
        while True:
            if offset + 512 > total:
                raise CorruptDataError(f"{path}: truncated tar (header at byte {offset})")
            h = mm[offset: offset + 512]
            if h == _ZERO_BLOCK:
                break
            if h[257:262] != b"ustar":
                return None
            try:
                stored.append(int(h[148:156].split(b"\0")[0].strip(), 8))
                size = int(h[124:136].split(b"\0")[0].strip() or b"0", 8)
            except ValueError:
                return None
            kind = h[156:157]
            if kind not in (b"0", b"\0", b"5"):
                return None
            headers.append(offset)
            data = offset + 512
            if data + size > total:
                raise CorruptDataError(f"{path}: truncated tar: member at byte {offset} needs "
                                       f"{size} bytes, the file ends first")
            if kind != b"5":
                name = h[0:100].split(b"\0")[0]
                prefix = h[345:500].split(b"\0")[0]
                full = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
                out.append((full, data, size))
            offset = data + (size + 511) // 512 * 512
        if headers:  # header checksums, all at once: byte sum with the checksum field as spaces
            raw = np.frombuffer(mm, dtype=np.uint8)
            blocks = raw[np.array(headers)[:, None] + np.arange(512)].astype(np.int64)
            sums = blocks.sum(1) - blocks[:, 148:156].sum(1) + 8 * 32
            bad = np.flatnonzero(sums != np.array(stored))
            del raw
            if len(bad):
                raise CorruptDataError(
                    f"{path}: corrupt tar header at byte {headers[bad[0]]} (checksum)")
    return out or None


def _scan_tar(path: Path) -> FolderIndex:
    splits: dict = {}
    fast = _fast_tar_members(path)
    if fast is not None:
        for name, off, size in fast:
            _add(splits, tuple(name.split("/")), (off, size))
        return _finish(path, "tar", splits)
    try:
        with tarfile.open(path, "r:") as tf:  # uncompressed: random access by offset
            for m in tf:
                if m.isfile():
                    _add(splits, tuple(m.name.split("/")), (m.offset_data, m.size))
        return _finish(path, "tar", splits)
    except tarfile.ReadError as e:
        if splits or "truncated" in str(e) or "unexpected end" in str(e):
            raise CorruptDataError(f"{path}: truncated or corrupt tar ({e})") from e
    try:
        with tarfile.open(path, "r:*") as tf:  # compressed: read sequentially
            for m in tf:
                if m.isfile():
                    _add(splits, tuple(m.name.split("/")), m.name)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptDataError(f"{path}: truncated or corrupt tar ({e})") from e
    return _finish(path, "tar-stream", splits)


def decode_image(data: bytes, name: str, size: int | None = None,
                 resize: int | None = None) -> np.ndarray:
    """Decode one image to uint8 RGB ``[3, H, W]``; with ``size``, resize the shorter side to
    ``resize`` (bilinear) and center-crop ``size`` x ``size``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if size is not None:
                r = resize or size
                w, h = im.size
                s = r / min(w, h)
                nw, nh = max(r, round(w * s)), max(r, round(h * s))
                if (nw, nh) != (w, h):
                    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise CorruptDataError(f"cannot decode image {name}: {e}") from e
    return arr.transpose(2, 0, 1)


def _stack(arrays: list[np.ndarray], names: list[str]) -> np.ndarray:
    shape = arrays[0].shape
    for a, n in zip(arrays, names):
        if a.shape != shape:
            raise CorruptDataError(
                f"images differ in size: {names[0]} is {shape[1]}x{shape[2]} but {n} is "
                f"{a.shape[1]}x{a.shape[2]}; pass size=... to resize and crop them")
    return np.stack(arrays)


def _decode_chunk(task: tuple[str, str, list[tuple[str, Loc]], int | None, int | None]
                  ) -> np.ndarray:
    kind, source, items, size, resize = task
    out, names = [], []
    if kind == "dir":
        for _name, loc in items:
            with open(loc, "rb") as f:
                out.append(decode_image(f.read(), str(loc), size, resize))
            names.append(str(loc))
    else:
        with open(source, "rb") as f:
            for name, (offset, length) in items:
                f.seek(offset)
                data = f.read(length)
                if len(data) != length:
                    raise CorruptDataError(
                        f"{source}: truncated tar: member {name} needs {length} bytes, "
                        f"found {len(data)}")
                out.append(decode_image(data, f"{source}:{name}", size, resize))
                names.append(name)
    return _stack(out, names)


def _decode_stream(source: Path, wanted: dict[str, int], size: int | None,
                   resize: int | None) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(wanted)
    try:
        with tarfile.open(source, "r:*") as tf:
            for m in tf:
                i = wanted.get(m.name)
                if i is not None:
                    f = tf.extractfile(m)
                    assert f is not None
                    out[i] = decode_image(f.read(), f"{source}:{m.name}", size, resize)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptDataError(f"{source}: truncated or corrupt tar ({e})") from e
    missing = [n for n, i in wanted.items() if out[i] is None]
    if missing:
        raise CorruptDataError(f"{source}: members vanished while reading: {missing[:3]}")
    return out  # type: ignore[return-value]


def decode_split(
    index: FolderIndex,
    split: str,
    *,
    size: int | None = None,
    resize: int | None = None,
    limit: int | None = None,
    workers: int = 1,
    classes: list[str] | None = None,
) -> Split:
    """Decode one split into (images uint8 [N,3,H,W], labels int64 [N], classes).

    Images are ordered by (class, file name); ``limit`` keeps a class-balanced subset;
    ``workers > 1`` decodes in that many processes. Without ``size`` all images must share
    one size.
    """
    classes = classes if classes is not None else index.classes()
    lookup = {c: i for i, c in enumerate(classes)}
    per_class = index.splits[index.split_name(split)]
    unknown = sorted(set(per_class) - set(lookup))
    if unknown:
        raise CorruptDataError(
            f"{index.source}: split {split!r} has classes {unknown[:5]} that the training "
            f"split does not have")
    items: list[tuple[str, Loc]] = []
    labels: list[int] = []
    for c in sorted(per_class, key=lookup.__getitem__):
        for name, loc in per_class[c]:
            items.append((f"{c}/{name}", loc))
            labels.append(lookup[c])
    keep = balanced_subset(np.array(labels), limit)
    items = [items[i] for i in keep]
    label_arr = np.array(labels, dtype=np.int64)[keep]
    if not items:
        raise CorruptDataError(f"{index.source}: split {split!r} holds no images")
    if index.kind == "tar-stream":
        wanted = {loc: i for i, (_, loc) in enumerate(items)}  # loc is the member name
        images = _stack(_decode_stream(index.source, wanted, size, resize),
                        [n for n, _ in items])
        return images, label_arr, classes
    tasks = [(index.kind, str(index.source), items[i:i + CHUNK], size, resize)
             for i in range(0, len(items), CHUNK)]
    if workers > 1 and len(tasks) > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            chunks = list(pool.map(_decode_chunk, tasks))
    else:
        chunks = [_decode_chunk(t) for t in tasks]
    return _stack_chunks(chunks, items), label_arr, classes


def _stack_chunks(chunks: list[np.ndarray], items: list[tuple[str, Loc]]) -> np.ndarray:
    shapes = {c.shape[1:] for c in chunks}
    if len(shapes) > 1:
        raise CorruptDataError(f"images differ in size across the split: {sorted(shapes)}; "
                               f"pass size=... to resize and crop them")
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

"""In-memory batching with batched tensor augmentation, deterministic from (seed, epoch)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .core import ImageArrays

AUGMENTATIONS = (None, "crop_flip", "flip")


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (mixed by numpy's SeedSequence)."""
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in key]).generate_state(1,
                                                                                  np.uint64)[0])
    return torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each image by ``padding`` and cut a random ``H x W`` window per image
    (offsets uniform in ``[0, 2*padding]``), for a whole batch ``[B, C, H, W]`` at once
    (two gathers: rows, then columns)."""
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    off = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    rows = off[0][:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = off[1][:, None] + torch.arange(w, device=x.device)  # [B, W]
    xr = torch.gather(xp, 2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2 * padding))
    return torch.gather(xr, 3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(3), x)


class BatchLoader:
    """Batches of ``(x float32 [B,C,H,W] normalised, y int64 [B])`` from an ImageArrays.

    The order (``shuffle``) and the augmentation are pure functions of ``(seed, epoch)``
    (and rank, batch index), set with :meth:`set_epoch`, so a resumed run sees exactly the
    batches an uninterrupted one would. For data-parallel runs every rank permutes with the
    same generator and takes ``order[rank::world_size]``; the order is padded by wrapping
    around (or truncated with ``drop_last``) so that all ranks get equally many batches.

    ``augment``: ``None``, ``"flip"`` (random horizontal flip) or ``"crop_flip"`` (zero padding
    of ``padding`` pixels + random crop, then flip), applied on [0, 1] pixels before the
    per-channel normalisation ``(x - mean) / std``.
    """

    def __init__(
        self,
        dataset: ImageArrays,
        batch_size: int,
        shuffle: bool = True,
        augment: str | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        *,
        padding: int = 4,
        device: str | torch.device | None = None,
    ) -> None:
        if not hasattr(dataset, "images") or not hasattr(dataset, "labels"):
            raise TypeError(f"dataset must be an ImageArrays, got {type(dataset).__name__}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        n = len(dataset.labels)
        if n == 0:
            raise ValueError("dataset is empty")
        if drop_last and n < world_size:
            raise ValueError(f"{n} samples cannot be split over {world_size} ranks")
        self.dataset = dataset
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.padding = padding
        self.device = torch.device(device) if device is not None else None
        self.epoch = 0
        self.images = dataset.images if self.device is None else dataset.images.to(self.device)
        self.labels = dataset.labels if self.device is None else dataset.labels.to(self.device)
        c = self.images.shape[1]
        dev = self.images.device
        self.mean = torch.tensor(dataset.mean, dtype=torch.float32, device=dev).view(1, c, 1, 1)
        self.std = torch.tensor(dataset.std, dtype=torch.float32, device=dev).view(1, c, 1, 1)
        if (self.std <= 0).any():
            raise ValueError(f"dataset std must be positive, got {dataset.std}")

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n = len(self.dataset.labels)
        return n // self.world_size if self.drop_last else math.ceil(n / self.world_size)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order."""
        n = len(self.dataset.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=_generator(self.seed, self.epoch, 0))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # wrap around so every rank has the same count
            order = torch.cat([order, order[: total - n]])
        return order[:total][self.rank:: self.world_size]

    def transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 images -> augmented (when ``generator`` is given) and normalised float32.
        Crop and flip only move pixels, so they run on the uint8 batch (4x less memory
        traffic); zero padding is black, as with padding the [0, 1] image."""
        x = images
        if generator is not None and self.augment == "crop_flip":
            x = random_crop(x, self.padding, generator)
        if generator is not None and self.augment in ("crop_flip", "flip"):
            x = random_flip(x, generator)
        return (x.float().div_(255.0) - self.mean) / self.std

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate this epoch's batches from batch index ``start`` (for mid-epoch resume)."""
        idx = self.indices()
        for b in range(start, len(self)):
            sel = idx[b * self.batch_size: (b + 1) * self.batch_size]
            if self.device is not None:
                sel = sel.to(self.device)
            gen = (_generator(self.seed, self.epoch, 1, self.rank, b)
                   if self.augment is not None else None)
            yield self.transform(self.images[sel], gen), self.labels[sel]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(0)

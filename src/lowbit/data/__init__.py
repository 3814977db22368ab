"""Dataset readers, downloads and in-memory batching with batched augmentation.

``get_dataset(name, split, root, download)`` for "digits", "mnist", "cifar10", "imagenet"
(an ImageFolder) and "ptb"; ``BatchLoader`` for deterministic (seed, epoch) batches;
``lm_batches`` for word-level language modelling. Data location: :func:`data_root`.
"""

from __future__ import annotations

from .core import (
    CorruptDataError,
    DatasetNotFoundError,
    ImageArrays,
    cache_dir,
    channel_stats,
    data_root,
)
from .datasets import DATASETS, get_dataset
from .download import ChecksumError, DownloadError, download_url
from .loader import BatchLoader
from .ptb import Corpus, Vocab, batchify, lm_batches, load_ptb

__all__ = [
    "BatchLoader", "ChecksumError", "Corpus", "CorruptDataError", "DATASETS",
    "DatasetNotFoundError", "DownloadError", "ImageArrays", "Vocab", "batchify", "cache_dir",
    "channel_stats", "data_root", "download_url", "get_dataset", "lm_batches", "load_ptb",
]

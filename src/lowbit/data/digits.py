"""scikit-learn's bundled 8x8 digits: the default dataset, no download needed."""

from __future__ import annotations

import functools

import numpy as np

from .core import ImageArrays, channel_stats

TEST_FRACTION = 0.2
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # pixel values 0..16 -> 0..255 (uint8), exact for the integers 0 and 16
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = d.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=labels)
    idx_train.sort()
    idx_test.sort()
    return {"train": (images[idx_train], labels[idx_train]),
            "test": (images[idx_test], labels[idx_test])}


def load_digits_arrays(split: str = "train") -> ImageArrays:
    """The 1,797 8x8 digit images, split 80/20 (stratified, seed 0) into "train"/"test";
    uint8 [N, 1, 8, 8] scaled from 0..16 to 0..255, mean/std from the training split."""
    parts = _digits_split()
    images, labels = parts[split]
    mean, std = channel_stats(parts["train"][0])
    return ImageArrays(images.copy(), labels.copy(), [str(i) for i in range(10)], mean, std,
                       "digits", split)

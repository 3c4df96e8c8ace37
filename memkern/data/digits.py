"""The embedded default dataset: scikit-learn's copy of the UCI handwritten digits.

1,797 real 8x8 grey images (pixel values 0..16) ship inside scikit-learn, so the default works
offline. The split is fixed and seeded: 1,437 train / 360 test (80/20), stratified by class.
"""
from __future__ import annotations

import numpy as np
import torch

from memkern.data.splits import RawSplits

SPLIT_SEED = 0
TEST_SIZE = 360


def load_digits_splits() -> RawSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]  # [1797, 1, 8, 8]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=TEST_SIZE,
                                           random_state=SPLIT_SEED, stratify=labels)
    return RawSplits(
        name="digits",
        train_images=torch.from_numpy(images[np.sort(train_idx)]),
        train_labels=torch.from_numpy(labels[np.sort(train_idx)]),
        test_images=torch.from_numpy(images[np.sort(test_idx)]),
        test_labels=torch.from_numpy(labels[np.sort(test_idx)]),
        num_classes=10,
    )

"""Model-free baselines: what a segmentation model must beat to be worth training.

``ColourLookup`` predicts each pixel's class from its RGB value alone. On data where every class
had its own flat colour it would be near perfect; the embedded synthetic scenes are built so that
it is not (shared colour pools, lighting, weather, noise), and ``tests/test_difficulty.py`` checks
that a briefly trained UNet beats it by a wide margin.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from fedseg.data.normalize import denormalize
from fedseg.labels import IGNORE_INDEX
from fedseg.metrics import confusion_matrix


class FrameSet(Protocol):
    """What the baselines read: ``SegmentationDataset``'s (normalised image, mask) pairs."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class ColourLookup:
    """Per-pixel colour -> class table: the majority class of each quantised RGB bin.

    ``bits`` per channel (5: 32^3 = 32768 bins) sets how finely colours are told apart. Fitting
    counts (bin, class) pairs over the training pixels, skipping ``IGNORE_INDEX``; a bin holds its
    most frequent class (the lowest class id on a tie) and a bin never seen in training predicts
    the most frequent class overall. Input is the raw uint8 camera image (``denormalize`` recovers
    it from a dataset item).
    """

    def __init__(self, num_classes: int, *, bits: int = 5) -> None:
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be in 1..8 (per RGB channel), got {bits}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.bits = bits
        self.counts = np.zeros((1 << (3 * bits), num_classes), np.int64)  # (bin, class) pixel counts

    def bins(self, rgb: np.ndarray) -> np.ndarray:
        """Bin index of every pixel of a (..., 3) uint8 image: the top ``bits`` of R, G, B."""
        if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
            raise ValueError(f"expected a (..., 3) uint8 RGB array, got {rgb.dtype} {rgb.shape}")
        q = (rgb >> (8 - self.bits)).astype(np.int64)
        return (q[..., 0] << (2 * self.bits)) | (q[..., 1] << self.bits) | q[..., 2]

    def add(self, rgb: np.ndarray, mask: np.ndarray) -> ColourLookup:
        """Count the pixels of one (H, W, 3) uint8 image with its (H, W) class mask."""
        bins, classes = self.bins(rgb).ravel(), np.asarray(mask).ravel().astype(np.int64)
        if bins.shape != classes.shape:
            raise ValueError(f"image {rgb.shape} and mask {np.shape(mask)} differ in size")
        keep = classes != IGNORE_INDEX
        bins, classes = bins[keep], classes[keep]
        if classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise ValueError(f"mask holds ids outside 0..{self.num_classes - 1} (other than {IGNORE_INDEX})")
        pairs = np.bincount(bins * self.num_classes + classes, minlength=self.counts.size)
        self.counts += pairs.reshape(self.counts.shape)
        return self

    def fit(self, dataset: FrameSet) -> ColourLookup:
        """Count every frame of ``dataset`` (its images de-normalised back to uint8)."""
        for i in range(len(dataset)):
            image, mask = dataset[i]
            self.add(denormalize(image), mask.numpy())
        return self

    def table(self) -> np.ndarray:
        """The class predicted for every bin, (bins,) int64."""
        if not self.counts.any():
            raise ValueError("ColourLookup has seen no labelled pixel: call fit() or add() first")
        table = self.counts.argmax(axis=1)
        table[self.counts.sum(axis=1) == 0] = int(self.counts.sum(axis=0).argmax())
        return table

    def predict(self, rgb: np.ndarray) -> np.ndarray:
        """Class of every pixel of a (..., 3) uint8 image, shape (...)."""
        return self.table()[self.bins(rgb)]

    def confmat(self, dataset: FrameSet) -> np.ndarray:
        """Summed (C, C) confusion matrix over ``dataset`` (rows = true class), for ``metrics.scores``."""
        table = self.table()
        total = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        for i in range(len(dataset)):
            image, mask = dataset[i]
            pred = torch.from_numpy(table[self.bins(denormalize(image))])
            total += confusion_matrix(pred, mask, self.num_classes)
        return total.numpy()

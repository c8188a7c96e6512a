"""Torch datasets over the readers of `medstudent.data`, shared by training, validation and self-training.

Decoded images are cached in RAM (optional): decoding a 1716x942 JPEG costs more than a CPU augmentation
pass, and the STAS sets fit easily (320 images ~ 1.5 GB).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medstudent.data.layouts import ClassificationDataset, SegmentationDataset, UnlabeledDataset
from medstudent.errors import DataError


class SegTorchDataset(Dataset):
    """(image, mask) samples of a segmentation data set; `masks` overrides the annotations (pseudo labels,
    with 255 = ignore)."""

    def __init__(
        self,
        source: SegmentationDataset | UnlabeledDataset,
        indices: Sequence[int],
        transform: Callable,
        cache: bool = True,
        masks: dict[int, np.ndarray] | None = None,
        skip_bad: bool = False,
    ):
        self.source = source
        self.indices = list(indices)
        self.transform = transform
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None
        self.masks = masks or {}
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        if i in self.masks:
            img = self.source.load_image(i)
            mask = self.masks[i]
            if mask.shape != img.shape[:2]:
                raise DataError(
                    None, f"pseudo mask {mask.shape} does not match image {img.shape[:2]} (item {i})"
                )
        else:
            img, mask = self.source.load(i)  # type: ignore[union-attr]
            if mask.max(initial=0) >= 255:
                raise DataError(
                    self.source.items[i].annotation, "mask uses class id 255, reserved for 'ignore'"
                )
        if self.cache is not None:
            self.cache[i] = (img, mask)
        return img, mask

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        try:
            img, mask = self._load(i)
        except DataError as e:
            if not self.skip_bad:
                raise
            warnings.warn(f"skipped: {e}", stacklevel=2)
            self.skipped.append(str(e))
            return self[(k + 1) % len(self)]
        out = self.transform(image=img, mask=mask)
        return {
            "image": out["image"],
            "mask": torch.as_tensor(out["mask"]).long(),
            "index": i,
            "orig_hw": torch.tensor(img.shape[:2]),
        }


class ClsTorchDataset(Dataset):
    """(image, label) samples; `targets` overrides labels with soft probability vectors (self-training)."""

    def __init__(
        self,
        source: ClassificationDataset | UnlabeledDataset,
        indices: Sequence[int],
        transform: Callable,
        labels: dict[int, int | np.ndarray] | None = None,
        cache: bool = False,
        num_classes: int | None = None,
    ):
        self.source = source
        self.indices = list(indices)
        self.transform = transform
        self.labels = labels or {}
        self.num_classes = num_classes
        self.cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.indices)

    def _image(self, i: int) -> np.ndarray:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        img = self.source.load_image(i)
        if self.cache is not None:
            self.cache[i] = img
        return img

    def target(self, i: int) -> torch.Tensor:
        """Soft target vector (float) for every sample, so hard and soft labels can share a batch."""
        lab = self.labels.get(i)
        if lab is None:
            lab = self.source.items[i].label  # type: ignore[union-attr]
        if np.ndim(lab) == 0:
            t = torch.zeros(self.num_classes or 1)
            t[int(lab)] = 1.0
            return t
        return torch.as_tensor(np.asarray(lab, dtype=np.float32))

    def __getitem__(self, k: int) -> dict:
        i = self.indices[k]
        out = self.transform(image=self._image(i))
        t = self.target(i)
        return {"image": out["image"], "label": int(t.argmax()), "target": t, "index": i}

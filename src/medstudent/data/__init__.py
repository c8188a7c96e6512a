"""Data layer: readers for the three real layouts, integrity checks, statistics, splits and synthetic data."""

from medstudent.data.io import IMAGE_EXTS, list_images, read_image, read_mask
from medstudent.data.labelme import labelme_to_mask, mask_to_labelme, read_labelme
from medstudent.data.layouts import (
    ClassificationDataset,
    SegmentationDataset,
    UnlabeledDataset,
    detect_layout,
    open_dataset,
)

__all__ = [
    "IMAGE_EXTS",
    "ClassificationDataset",
    "SegmentationDataset",
    "UnlabeledDataset",
    "detect_layout",
    "labelme_to_mask",
    "list_images",
    "mask_to_labelme",
    "open_dataset",
    "read_image",
    "read_labelme",
    "read_mask",
]

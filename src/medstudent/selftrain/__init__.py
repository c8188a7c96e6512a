"""Noisy Student self-training for classification and segmentation."""

from medstudent.selftrain.loop import run_selftrain, student_config
from medstudent.selftrain.pseudo import balance_indices, seg_pseudo_mask, select_cls_pseudo

__all__ = ["balance_indices", "run_selftrain", "select_cls_pseudo", "seg_pseudo_mask", "student_config"]

"""medstudent: 2D medical-image segmentation, classification and Noisy Student self-training."""

__version__ = "0.1.0"

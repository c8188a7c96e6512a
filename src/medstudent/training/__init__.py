"""Training: one Lightning module and one `train` entry for segmentation and classification."""

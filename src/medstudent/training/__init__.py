"""Training: one Lightning module and one `train` entry for segmentation and classification (`train`), with
its data loaders (`loaders`), callbacks (`callbacks`) and training-curve plot (`curves`)."""

"""Inference: load runs, predict with TTA / sliding window / ensembles, post-process, write outputs."""

"""Whole-slide inference on the core, for either engine: stream (regions read ahead and predicted),
outputs (post-processing in slide coordinates), predict (one slide's files) and cohort (many slides,
manifest and resume). Torch-free: the CLI hands in an engine."""

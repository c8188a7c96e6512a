"""Torch-free inference core: the steps around the network, written once for every engine.

`contract` (the inference contract as typed data, pipeline.json), `inferer` (preprocess -> tiles -> TTA ->
map back -> scales -> ensemble, over any `Engine`), `tta`, `tiling`, `ensemble`, `postprocess`, `budget`
(the time-budget planner), `folder` (the folder loop that writes masks, probabilities, labelme, overlays,
predictions.csv), `overlay` and `workflow` (`predict` for any engine). Imports numpy, pydantic, OpenCV,
Pillow, scipy and scikit-image only (an import-linter contract forbids torch here).
"""

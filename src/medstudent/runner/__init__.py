"""The ONNX engine: exported model folders run by ONNX Runtime (`medstudent predict --engine onnx`).

Imports numpy, Pillow, OpenCV, scipy/scikit-image and onnxruntime only (through `medstudent.core`); never
torch, MONAI, timm or albumentations. The steps around the network are the core's.
"""

from medstudent.runner.onnx_runner import OnnxPipeline, predict_onnx_folder

__all__ = ["OnnxPipeline", "predict_onnx_folder"]

"""trtglm: GLM checkpoints -> ONNX -> TensorRT engines."""

__version__ = "0.1.0"

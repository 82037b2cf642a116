"""Export: a sheaf compacted into a slim HF folder (safetensors + self-contained modeling file) and ONNX."""

from .hf import FORMATS, TOLERANCE, export, load, save_model

__all__ = ["FORMATS", "TOLERANCE", "export", "load", "save_model"]

"""`--quantize int8`: model.int8.onnx, the fp32 model.onnx with its weights dynamically quantized to int8
(onnxruntime's quantize_dynamic, uint8 weights; activations are quantized per call at run time)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

QUANTIZATIONS = ("int8",)
INT8_FILE = "model.int8.onnx"
MAX_INT8_LOSS = 2.0  # accuracy points int8 may lose against the fp32 export before the export warns


def quantize_int8(src: Path, dst: Path) -> None:
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise UserError("--quantize int8 needs onnxruntime: pip install onnx onnxruntime") from None
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)  # quantize_dynamic logs a hint about pre-processing on the root logger
    try:
        # uint8 weights (u8u8): with int8 weights (u8s8) x86 CPUs without VNNI saturate the 16-bit sums of
        # onnxruntime's AVX2 kernel, and a file quantized that way runs worse wherever it lands on one (a tiny
        # llama's logits moved 0.44 from fp32 on an AVX2 EPYC, 0.09 with uint8 weights)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
    finally:
        logging.disable(before)


def int8_warning(info: dict[str, Any]) -> Optional[str]:
    """One line when the int8 model loses more than MAX_INT8_LOSS accuracy points against the fp32 export."""
    loss = info.get("int8_accuracy_loss")
    if loss is None or loss <= MAX_INT8_LOSS:
        return None
    rows = {r["file"]: r for r in info["files"]}
    return (f"int8 ONNX loses {loss:.1f} points of {info['test_split']} accuracy against the fp32 export "
            f"({info['test_accuracy']:.3f} -> {rows[INT8_FILE]['accuracy']:.3f}, n={info['test_n']}); "
            "ship model.onnx where that matters")

"""Quantization and offline graph optimization of an exported model (ONNX Runtime's own tools).

Precisions, as named across edgeprune:
- "fp32": the export as traced;
- "int8" / "int4": weight-only, block-wise symmetric (MatMulNBits, the format onnxruntime-genai
  ships); activations stay float, so decode, which is bound by reading weights, speeds up almost
  in proportion to the bytes saved;
- "dynamic-int8": `quantize_dynamic`, int8 weights per output channel and uint8 activations
  quantized at every call (slower than weight-only in decode on CPUs measured so far).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgeprune.errors import EdgepruneError

PRECISIONS = ("fp32", "int8", "int4", "dynamic-int8")
WEIGHT_ONLY_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # quality of 4-bit falls off with larger blocks; 32 is what onnxruntime-genai uses for CPU
ACCURACY_LEVEL = 4  # int8 activations inside the kernel: the dot-product (VNNI / NEON sdot) paths run

# MatMuls left in fp32 by dynamic int8: SmolLM2's down_proj inputs (SwiGLU products) have outliers that uint8
# activations flatten; keeping them fp32 lifted dense top-1 agreement from 62% to 85% (137 -> 217 MB).
KEEP_FP32 = ("/mlp/down_proj/",)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise EdgepruneError(f"unknown precision '{precision}': choose from {', '.join(PRECISIONS)}")
    return precision


def fp32_nodes(source: Path, patterns: tuple[str, ...]) -> list[str]:
    """Names of MatMul nodes whose name contains one of `patterns`."""
    graph = onnx.load(str(source), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(p in n.name for p in patterns)]


def quantize_int8(source: Path, target: Path, keep_fp32: tuple[str, ...] = KEEP_FP32) -> Path:
    """Dynamic quantization: int8 weights per output channel (as Optimum's arm64 preset), uint8 activations per call.

    Per-channel scales keep top-1 agreement higher than one scale per matrix at the same size;
    MatMuls named by `keep_fp32` stay in float.
    """
    excluded = fp32_nodes(source, keep_fp32)
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=excluded)
    return target


def matmul_nbits_quantizer() -> type:
    """ORT's MatMulNBitsQuantizer, imported without the INFO logging its module turns on for the whole process."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as module  # calls logging.basicConfig(INFO)

    root.handlers[:] = handlers
    root.setLevel(level)
    module.logger.setLevel(logging.WARNING)  # else one line per node
    return module.MatMulNBitsQuantizer


def quantize_weight_only(source: Path, target: Path, bits: int, block_size: int = BLOCK_SIZE) -> Path:
    """Every MatMul with a constant weight becomes MatMulNBits: `bits`-bit symmetric blocks of `block_size` inputs.

    Round-to-nearest, no calibration data: seconds for a 135M decoder. Weights fed through
    another node (the tied lm_head's Transpose of the embedding) stay float.
    """
    if bits not in WEIGHT_ONLY_BITS.values():
        raise EdgepruneError(f"weight-only quantization takes 4 or 8 bits, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise EdgepruneError(f"block size {block_size} is not a power of two >= 16: use 32 (or 64, 128)")
    quantizer = matmul_nbits_quantizer()(
        onnx.load(str(source)), bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    return Path(target)


def quantize_model(source: Path, target: Path, precision: str, block_size: int = BLOCK_SIZE) -> Path:
    """Write `source` at `precision` to `target` (fp32: a copy is not made, `source` is returned)."""
    check_precision(precision)
    if precision == "fp32":
        return Path(source)
    if precision == "dynamic-int8":
        return quantize_int8(source, target)
    return quantize_weight_only(source, target, WEIGHT_ONLY_BITS[precision], block_size)


def optimize_graph(source: Path, target: Path) -> Path:
    """Save ORT's extended (hardware-independent) fusions, so a board loads a pre-fused graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return target

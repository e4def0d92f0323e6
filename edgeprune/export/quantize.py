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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgeprune.errors import EdgepruneError
from edgeprune.export.files import save_onnx

PRECISIONS = ("fp32", "int8", "int4", "dynamic-int8")
WEIGHT_ONLY_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # quality of 4-bit falls off with larger blocks; 32 is what onnxruntime-genai uses for CPU
VOCAB_BITS = 8  # least bits for the embedding and tied lm_head (see quantize_weight_only)
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
    MatMuls named by `keep_fp32` stay in float. Weights use 7 bits (`reduce_range`): x86 CPUs without
    VNNI (AVX2, e.g. AMD EPYC Zen 2/3) multiply uint8 x int8 with VPMADDUBSW, whose int16 pair sums
    saturate on full-range weights; there the tiny test Llama's int8 top-1 agreement was 0% (7 bits: 100%).
    """
    excluded = fp32_nodes(source, keep_fp32)
    quantize_dynamic(
        source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True, nodes_to_exclude=excluded
    )
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


def quantize_weight_only(
    source: Path, target: Path, bits: int, block_size: int = BLOCK_SIZE, embedding: bool = True
) -> Path:
    """Every MatMul with a constant weight becomes MatMulNBits: `bits`-bit symmetric blocks of `block_size` inputs.

    Round-to-nearest, no calibration data: seconds for a 135M decoder. With `embedding`, the token
    embedding becomes GatherBlockQuantized; a tied lm_head shares its packed tensor, so the
    vocabulary matrix, a fifth of SmolLM2's weights, is stored once. That matrix keeps at least
    VOCAB_BITS: at 4 bits it cost the default decoder 11% more held-out perplexity.
    """
    if bits not in WEIGHT_ONLY_BITS.values():
        raise EdgepruneError(f"weight-only quantization takes 4 or 8 bits, not {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise EdgepruneError(f"block size {block_size} is not a power of two >= 16: use 32 (or 64, 128)")
    model = onnx.load(str(source))
    token_embedding = find_token_embedding(model.graph, block_size) if embedding else None
    vocab_bits = max(bits, VOCAB_BITS)
    head = head_matmul(model.graph, token_embedding) if token_embedding is not None else None
    for pass_bits, exclude in ((bits, [head] if head else []), (vocab_bits, [])):
        quantizer = matmul_nbits_quantizer()(
            model,
            bits=pass_bits,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=ACCURACY_LEVEL,
            nodes_to_exclude=exclude,
        )
        quantizer.process()  # the second pass finds only the excluded head left with a constant weight
        model = quantizer.model.model
        if not exclude:
            break
    if token_embedding is not None:
        quantize_embedding(model.graph, token_embedding, vocab_bits, block_size)
    return save_onnx(model, Path(target))


def head_matmul(graph: onnx.GraphProto, embedding: TokenEmbedding) -> str | None:
    """The name of the MatMul reading the tied head weight (None when the head is not tied)."""
    return next((n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] == embedding.head_weight), None)


def initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in graph.initializer}


@dataclass(frozen=True)
class TokenEmbedding:
    """The token-id Gather, its float [vocab, hidden] table if it reads one, and the tied head's [hidden, vocab] weight.

    Optimum reads the table directly and feeds the lm_head a Transpose of it; onnxruntime-genai's
    builder stores the head's weight and feeds the Gather a Transpose of that.
    """

    gather: str  # node name
    table: str | None
    head_weight: str | None


def find_token_embedding(graph: onnx.GraphProto, block_size: int) -> TokenEmbedding | None:
    """Locate the embedding (None if there is none whose hidden size fills whole blocks); untie an Optimum head.

    The quantizer only sees constant MatMul weights, so an lm_head reading a Transpose of the table
    gets its own transposed copy; it lives until `quantize_embedding` points the Gather at its blocks.
    """
    inputs = {i.name for i in graph.input}
    weights = initializer_map(graph)
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.input[1] not in inputs or axis != 0:
            continue
        source = producers.get(node.input[0])
        if node.input[0] in weights:
            table, head_weight = weights[node.input[0]], untie_lm_head(graph, node.input[0])
        elif source is not None and source.op_type == "Transpose" and source.input[0] in weights:
            table, head_weight = None, source.input[0]
        else:
            continue
        dims = list(table.dims) if table is not None else list(reversed(weights[head_weight].dims))
        if len(dims) != 2 or dims[1] % block_size or (table is not None and table.data_type != onnx.TensorProto.FLOAT):
            return None
        return TokenEmbedding(node.name, table.name if table is not None else None, head_weight)
    return None


def untie_lm_head(graph: onnx.GraphProto, table: str) -> str | None:
    """Replace a Transpose of `table` read only by MatMuls with an initializer; its name (None: not tied)."""
    transpose = next((n for n in graph.node if n.op_type == "Transpose" and n.input[0] == table), None)
    if transpose is None:
        return None
    readers = [n for n in graph.node if transpose.output[0] in n.input]
    if not readers or any(n.op_type != "MatMul" or n.input[1] != transpose.output[0] for n in readers):
        return None
    name = transpose.output[0]
    array = numpy_helper.to_array(initializer_map(graph)[table])
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), name))
    graph.node.remove(transpose)
    return name


def quantize_embedding(graph: onnx.GraphProto, embedding: TokenEmbedding, bits: int, block_size: int) -> None:
    """Replace the embedding Gather by GatherBlockQuantized over MatMulNBits-layout blocks (shared when tied).

    MatMulNBits stores a [K, N] weight as [N, K / block, block * bits / 8] bytes with implicit zero
    point 2^(bits-1); viewed as [N, K * bits / 8] that is GatherBlockQuantized's uint8 layout with
    the same default zero point, so one tensor serves both ops.
    """
    weights = initializer_map(graph)
    gather = next(n for n in graph.node if n.name == embedding.gather)
    head = next(
        (n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"{embedding.head_weight}_Q{bits}"),
        None,
    )
    if head is not None:
        packed_name, scales_name = head.input[1], head.input[2]
        vocab, hidden = (
            next(a.i for a in head.attribute if a.name == "N"),
            next(a.i for a in head.attribute if a.name == "K"),
        )
    else:
        table = numpy_helper.to_array(weights[embedding.table])
        vocab, hidden = table.shape
        packed, scales = block_quantize(table, bits, block_size)
        packed_name, scales_name = f"{embedding.table}_Q{bits}", f"{embedding.table}_scales"
        graph.initializer.extend(
            [numpy_helper.from_array(packed, packed_name), numpy_helper.from_array(scales, scales_name)]
        )
    prefix = gather.name or gather.output[0]
    shape_name = f"{prefix}/packed_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([vocab, hidden * bits // 8], dtype=np.int64), shape_name))
    nodes = [
        helper.make_node("Reshape", [packed_name, shape_name], [f"{prefix}/packed"], name=f"{prefix}/Reshape"),
        helper.make_node(
            "GatherBlockQuantized",
            [f"{prefix}/packed", gather.input[1], scales_name],
            list(gather.output),
            name=f"{prefix}/GatherBlockQuantized",
            domain="com.microsoft",
            bits=bits,
            block_size=block_size,
            gather_axis=0,
            quantize_axis=1,
        ),
    ]
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    drop_unused(graph)


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nothing reads (the Transpose that fed the float Gather), then orphan initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(out in read for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(init)


def block_quantize(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A [vocab, hidden] table in MatMulNBits layout (as the weight of x @ table.T): packed bytes and scales."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits)
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(table.T))
    return packed, scales


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

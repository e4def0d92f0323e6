"""Quantization and offline graph optimization of an exported model (ONNX Runtime's own tools).

Precisions, as named across edgeprune:
- "fp32": the export as traced;
- "int8" / "int4": weight-only, block-wise symmetric (MatMulNBits, the format onnxruntime-genai
  ships); activations stay float, so decode, which is bound by reading weights, speeds up almost
  in proportion to the bytes saved;
- "int8-b64" / "int8-b128": int8 with 64 or 128 inputs per scale: fewer scales to apply, and on CPUs
  whose int8 kernel is slow per block (AVX2 without VNNI) faster than int8 and int4; a little further
  from dense (benchmarks/RESULTS.md, "Precision levers");
- "int4-mixed": int4, with the MatMuls a 4-bit error hurts most (every down projection, the first and
  last layers) at 8 bits;
- "int4-fit": int4, with the 8-bit MatMuls named by the caller (a run chooses them to fill a file budget,
  `bit_allocation.py`);
- "dynamic-int8": `quantize_dynamic`, int8 weights per output channel and uint8 activations
  quantized at every call (slower than weight-only in decode on CPUs measured so far).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgeprune.errors import EdgepruneError
from edgeprune.export.files import save_onnx
from edgeprune.precisions import PRECISIONS, WEIGHT_ONLY_PRECISIONS

MIN_BLOCK, MAX_BLOCK = 16, 256  # the block lengths ONNX Runtime's MatMulNBits CPU kernels (MLAS) take
BLOCK_SIZE = 32  # quality of 4-bit falls off with larger blocks; 32 is what onnxruntime-genai uses for CPU
VOCAB_BITS = 8  # least bits for the embedding and tied lm_head (see quantize_weight_only)
ACCURACY_LEVEL = 4  # int8 activations inside the kernel: the dot-product (VNNI / NEON sdot) paths run


@dataclass(frozen=True)
class WeightOnly:
    """How a weight-only precision is made: projection bits, block (None: the caller's), MatMuls kept at 8 bits."""

    bits: int
    block_size: int | None = None
    mixed: bool = False  # the MatMuls `sensitive_matmuls` names keep 8 bits, in blocks of MIXED_EIGHT_BIT_BLOCK
    fitted: bool = False  # the caller names the 8-bit MatMuls (same blocks as mixed)


# Measured on the default decoder (KL from dense on held-out text): int4 0.29; with every down_proj at 8 bits
# 0.19, qkv 0.20, up 0.25, gate 0.27, o 0.28; the first and last two layers whole 0.21; those and down 0.15;
# those, down and qkv 0.055 (the separate reductions roughly add up).
MIXED_EIGHT_BIT_BLOCK = 128  # at 8 bits a 128 block costs KL 0.012 vs 0.005 and runs faster (AVX2: 1.3x)
MIXED_END_LAYERS = 2  # layers at each end kept at 8 bits by "int4-mixed"
MIXED_KINDS = ("qkv_proj", "q_proj", "k_proj", "v_proj", "down_proj")  # kept at 8 bits in every layer by int4-mixed
WEIGHT_ONLY = {
    "int8": WeightOnly(8),
    "int8-b64": WeightOnly(8, 64),
    "int8-b128": WeightOnly(8, 128),
    "int4-mixed": WeightOnly(4, mixed=True),
    "int4-fit": WeightOnly(4, fitted=True),
    "int4": WeightOnly(4),
}
assert tuple(WEIGHT_ONLY) == WEIGHT_ONLY_PRECISIONS, "a recipe for every weight-only precision, in its order"

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
    source: Path,
    target: Path,
    bits: int,
    block_size: int = BLOCK_SIZE,
    embedding: bool = True,
    symmetric: bool = True,
    eight_bit: tuple[str, ...] = (),
    eight_bit_block: int | None = None,
    vocab_bits: int | None = None,
) -> Path:
    """Every MatMul with a constant weight becomes MatMulNBits: `bits`-bit blocks of `block_size` inputs.

    Round-to-nearest, no calibration data: seconds for a 135M decoder. `symmetric` False stores a
    zero point per block (min/max instead of +-max: a finer step where a block is lopsided). MatMuls
    whose name contains one of `eight_bit` keep 8 bits (mixed precision), in blocks of `eight_bit_block`
    (None: `block_size`). With `embedding`, the token
    embedding becomes GatherBlockQuantized; a tied lm_head shares its packed tensor, so the
    vocabulary matrix, a fifth of SmolLM2's weights, is stored once. That matrix keeps at least
    VOCAB_BITS unless `vocab_bits` says otherwise: at 4 bits it cost the default decoder 11% more held-out
    perplexity (int4-fit lowers it only when a file budget leaves nothing better to give up). Kept at 8 bits
    over 4-bit projections it takes the 8-bit parts' blocks (`eight_bit_block`, as large as its rows allow):
    each block's scale is stored twice (the Gather's table, the head's packed copy) and packed with a sum.
    """
    if bits not in (4, 8):
        raise EdgepruneError(f"weight-only quantization takes 4 or 8 bits, not {bits}")
    if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size & (block_size - 1):
        raise EdgepruneError(
            f"block size {block_size} is not a power of two from {MIN_BLOCK} to {MAX_BLOCK}: use 32 (or 64, 128)"
        )
    model = onnx.load(str(source))
    token_embedding = find_token_embedding(model.graph) if embedding else None
    vocab_bits = vocab_bits or max(bits, VOCAB_BITS)
    vocab_block = block_size
    if token_embedding is not None:
        vocab_block = vocabulary_block(token_embedding.hidden, vocab_bits, bits, block_size, eight_bit_block)
    head = head_matmul(model.graph, token_embedding.head_weight) if token_embedding is not None else None
    wider = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(p in n.name for p in eight_bit)]
    heads = [head] if head else []
    # each pass quantizes what the earlier ones excluded; the tied head last, symmetric in the table's blocks
    # (GatherBlockQuantized reads them with the implicit zero point)
    passes = [(bits, block_size, symmetric, wider + heads)]
    passes += [(8, eight_bit_block or block_size, True, heads)] if wider else []
    passes += [(vocab_bits, vocab_block, True, [])] if heads else []
    for pass_bits, pass_block, pass_symmetric, exclude in passes:
        quantizer = matmul_nbits_quantizer()(
            model,
            bits=pass_bits,
            block_size=pass_block,
            is_symmetric=pass_symmetric,
            accuracy_level=ACCURACY_LEVEL,
            nodes_to_exclude=exclude,
        )
        quantizer.process()
        model = quantizer.model.model
    if token_embedding is not None:
        quantize_embedding(model.graph, token_embedding, vocab_bits, vocab_block)
    return save_onnx(model, Path(target))


def vocabulary_block(hidden: int, vocab_bits: int, bits: int, block_size: int, eight_bit_block: int | None) -> int:
    """The vocabulary matrix's block: the projections' own at their bits; kept at 8 bits over 4-bit projections,
    the 8-bit parts' (its scales are held twice, in the Gather's table and the head); as large as its rows allow."""
    return fitting_block(hidden, block_size if vocab_bits == bits else eight_bit_block or block_size)


def fitting_block(hidden: int, block_size: int) -> int:
    """The largest power of two <= `block_size` dividing `hidden`: GatherBlockQuantized needs whole blocks per row
    (SmolLM2's 576 takes 64, not 128); the tied head shares the table's blocks, so it is quantized with the same."""
    while hidden % block_size:
        block_size //= 2
    return block_size


def head_matmul(graph: onnx.GraphProto, head_weight: str | None) -> str | None:
    """The name of the MatMul reading the tied head weight (None when the head is not tied)."""
    return next((n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] == head_weight), None)


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
    hidden: int  # row length of the table


@dataclass(frozen=True)
class EmbeddingGather:
    """The token-id Gather and the initializer it reads: the [vocab, hidden] table itself (Optimum), or, through a
    Transpose, the tied head's [hidden, vocab] weight (onnxruntime-genai's builder, `transposed`)."""

    node: str
    weight: str
    transposed: bool
    vocab: int
    hidden: int


def embedding_gather(graph: onnx.GraphProto) -> EmbeddingGather | None:
    """Locate the embedding without changing the graph (None if its hidden size is no multiple of MIN_BLOCK)."""
    inputs = {i.name for i in graph.input}
    weights = initializer_map(graph)
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or node.input[1] not in inputs or axis != 0:
            continue
        source = producers.get(node.input[0])
        if node.input[0] in weights:
            table = weights[node.input[0]]
            found = (table.name, False, list(table.dims), table.data_type == onnx.TensorProto.FLOAT)
        elif source is not None and source.op_type == "Transpose" and source.input[0] in weights:
            found = (source.input[0], True, list(reversed(weights[source.input[0]].dims)), True)
        else:
            continue
        weight, transposed, dims, is_float = found
        if len(dims) != 2 or dims[1] % MIN_BLOCK or not is_float:
            return None
        return EmbeddingGather(node.name, weight, transposed, dims[0], dims[1])
    return None


def find_token_embedding(graph: onnx.GraphProto) -> TokenEmbedding | None:
    """Locate the embedding (None if its hidden size is no multiple of MIN_BLOCK); untie an Optimum head.

    The quantizer only sees constant MatMul weights, so an lm_head reading a Transpose of the table
    gets its own transposed copy; it lives until `quantize_embedding` points the Gather at its blocks.
    """
    gather = embedding_gather(graph)
    if gather is None:
        return None
    if gather.transposed:
        return TokenEmbedding(gather.node, None, gather.weight, gather.hidden)
    return TokenEmbedding(gather.node, gather.weight, untie_lm_head(graph, gather.weight), gather.hidden)


def tied_transpose(graph: onnx.GraphProto, table: str) -> onnx.NodeProto | None:
    """The Transpose of `table` that only MatMuls read, as their weight: a head tied to the table (None: none)."""
    transpose = next((n for n in graph.node if n.op_type == "Transpose" and n.input[0] == table), None)
    if transpose is None:
        return None
    readers = [n for n in graph.node if transpose.output[0] in n.input]
    if not readers or any(n.op_type != "MatMul" or n.input[1] != transpose.output[0] for n in readers):
        return None
    return transpose


def untie_lm_head(graph: onnx.GraphProto, table: str) -> str | None:
    """Replace the tied Transpose of `table` with an initializer; its name (None: not tied)."""
    transpose = tied_transpose(graph, table)
    if transpose is None:
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


def float_activations(source: Path, target: Path) -> Path:
    """The same MatMulNBits file computing with float activations (accuracy level 0): no int8 rounding of inputs.

    What separates a platform's int8 activation kernels from its float ones when outputs differ by machine.
    """
    model = onnx.load(str(source))
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "MatMulNBits" and attribute.name == "accuracy_level":
                attribute.i = 0
    return save_onnx(model, Path(target))


def quantize_model(
    source: Path, target: Path, precision: str, block_size: int = BLOCK_SIZE, eight_bit: tuple[str, ...] | None = None
) -> Path:
    """Write `source` at `precision` to `target` (fp32: a copy is not made, `source` is returned).

    `block_size` applies to the precisions that do not name their own (int8, int4, int4-mixed, int4-fit);
    `eight_bit` names int4-fit's 8-bit MatMuls (only it takes them).
    """
    check_precision(precision)
    spec = WEIGHT_ONLY.get(precision)
    if (eight_bit is not None) != bool(spec and spec.fitted):
        raise EdgepruneError(
            "int4-fit keeps the 8-bit projections a run chooses for its file budget: use `edgeprune run --memory-mb`, "
            "or int4-mixed for a fixed choice"
            if eight_bit is None
            else f"{precision} chooses its own bits: 8-bit MatMuls are named only for int4-fit"
        )
    if precision == "fp32":
        return Path(source)
    if precision == "dynamic-int8":
        return quantize_int8(source, target)
    vocab_bits = None
    if spec.fitted:  # a tied vocabulary matrix keeps 8 bits only if the list names its head MatMul
        head = vocabulary_head(onnx.load(str(source), load_external_data=False).graph)
        vocab_bits = None if head is None else 8 if head.node in eight_bit else spec.bits
    else:
        eight_bit = tuple(sensitive_matmuls(source)) if spec.mixed else ()
    return quantize_weight_only(
        source,
        target,
        spec.bits,
        spec.block_size or block_size,
        eight_bit=eight_bit,
        eight_bit_block=MIXED_EIGHT_BIT_BLOCK,
        vocab_bits=vocab_bits,
    )


@dataclass(frozen=True)
class VocabularyHead:
    """The MatMul computing logits from a vocabulary matrix the token embedding shares, and the matrix's shape."""

    node: str
    hidden: int
    vocab: int


def vocabulary_head(graph: onnx.GraphProto) -> VocabularyHead | None:
    """The tied lm_head MatMul, found as `quantize_weight_only` finds it but without changing the graph (None: no
    embedding it quantizes, or the head is not tied).

    Optimum's head reads a Transpose of the Gather's table; onnxruntime-genai's Gather reads a Transpose of the
    head's weight. Either way the two share one quantized tensor once `quantize_embedding` has run.
    """
    gather = embedding_gather(graph)
    if gather is None:
        return None
    if gather.transposed:
        head_weight = gather.weight
    else:
        transpose = tied_transpose(graph, gather.weight)
        if transpose is None:
            return None
        head_weight = transpose.output[0]
    head = head_matmul(graph, head_weight)
    return VocabularyHead(head, gather.hidden, gather.vocab) if head is not None else None


LAYER_INDEX = re.compile(r"layers\.(\d+)/")


def sensitive_matmuls(source: Path) -> list[str]:
    """MatMuls "int4-mixed" keeps at 8 bits: every MIXED_KINDS projection and all of the first and last
    MIXED_END_LAYERS layers (layer indices from node names, as both Optimum and the fused builder write them)."""
    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    names = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    layers = {name: int(m.group(1)) for name in names if (m := LAYER_INDEX.search(name))}
    if not layers:
        return []
    last = max(layers.values())
    ends = set(range(MIXED_END_LAYERS)) | set(range(last + 1 - MIXED_END_LAYERS, last + 1))
    return [name for name, layer in layers.items() if layer in ends or any(f"/{k}/" in name for k in MIXED_KINDS)]


def optimize_graph(source: Path, target: Path) -> Path:
    """Save ORT's extended (hardware-independent) fusions, so a board loads a pre-fused graph."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return target

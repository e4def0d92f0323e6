"""Which projections keep 8 bits when the rest are 4: the most loss saved per byte, until a file budget is full.

"int4-mixed" keeps a fixed list at 8 bits (every q/k/v and down projection, the end layers): 124 MB on the
default decoder, so a 120 MB budget had to cut neurons instead, at about twice the divergence of moving a
few of those projections back to 4 bits (benchmarks/RESULTS.md, "Finer mixed precision"). "int4-fit" chooses
the list per model and budget. A projection's sensitivity is the loss its 4-bit rounding adds over its 8-bit
rounding, by the diagonal Fisher information of the model's own next-token loss on calibration windows
(the second-order estimate HAWQ-V2 and FIT use): sum over weights of F_w * (e4_w^2 - e8_w^2), where e is
the rounding error ONNX Runtime's own quantizer makes (its kernels, dequantized here). The list is then
filled greedily by sensitivity per extra byte, a knapsack whose items are nearly equal in size except one: a
tied vocabulary matrix (embedding and lm_head share its blocks), which starts at 4 bits like the rest.

Measured on the default decoder (benchmarks/RESULTS.md, "int4-fit"): 16 calibration windows rank the projections
as 32 do (Spearman 0.99) in a third of the time; at 120 MB the choice is at KL 0.066 from dense where the best
hand-made list of the same size was at 0.109; the vocabulary keeps 8 bits from 110 MB up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from edgeprune.criteria.taylor import gradients_only_for
from edgeprune.export.quantize import MIXED_EIGHT_BIT_BLOCK, vocabulary_block, vocabulary_head

VOCABULARY = (-1, "vocabulary")  # the token embedding and the tied lm_head: one matrix, quantized once
LAYER_PROJECTION = re.compile(r"layers?[./](\d+)/(.+)/MatMul")  # "/model/layers.3/mlp/down_proj/MatMul"
# the fused graph packs q, k and v into one MatMul, and gate and up into another, and calls self_attn "attn"
GRAPH_PROJECTIONS = {
    "attn/qkv_proj": ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    "attn/o_proj": ("self_attn/o_proj",),
    "mlp/gate_up_proj": ("mlp/gate_proj", "mlp/up_proj"),
}
FIT_WINDOWS = 16  # calibration windows of 128 tokens the Fisher information is averaged over
FIT_FILL = 0.999  # share of the size budget the 8-bit projections may fill (sizes are predicted to the byte)


@dataclass(frozen=True)
class Sensitivity:
    """The loss one Linear's 4-bit rounding adds over its 8-bit rounding, and how many weights it was measured on
    (a cut copy of the matrix is valued in proportion to the weights it keeps)."""

    loss: float
    weights: int


@dataclass(frozen=True)
class Projection:
    """A MatMul that may keep 8 bits (a layer's projection or the tied head): its node, the bytes 8 bits add, the
    loss they save."""

    node: str
    extra_bytes: int
    sensitivity: float

    @property
    def value_per_byte(self) -> float:
        return self.sensitivity / self.extra_bytes


def rounding_error(weight: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """W minus what MatMulNBits computes with, for a Linear weight [out, in] (blocks run along `in`).

    Quantized by ONNX Runtime's own C++ routine, symmetric, then dequantized: q - 2^(bits-1) times the block
    scale, two 4-bit values a byte, low nibble first.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    columns, rows = weight.shape  # ORT's view: the [in, out] matrix, each output column quantized alone
    source = np.ascontiguousarray(weight.detach().float().numpy().T)
    blocks = -(-rows // block_size)
    if rows % block_size:
        source = np.pad(source, ((0, blocks * block_size - rows), (0, 0)))
    packed = np.zeros((columns, blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((columns, blocks), dtype=np.float32)
    zero_points = np.zeros((columns, -(-blocks * bits // 8)), dtype=np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, source, scales, zero_points, block_size, columns, blocks * block_size, True)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1)  # low first
    codes = nibbles.reshape(columns, blocks, block_size) if bits == 4 else packed
    values = (codes.astype(np.float32) - 2 ** (bits - 1)) * scales[:, :, None]
    dequantized = values.reshape(columns, blocks * block_size)[:, :rows]
    return weight.detach().float() - torch.from_numpy(dequantized)


def fisher_diagonal(model: nn.Module, windows: torch.Tensor, weights: list[nn.Parameter]) -> list[torch.Tensor]:
    """Mean over windows of each window's squared gradient of its next-token loss, per entry of `weights`
    (a tied matrix gets the gradient of both its uses, as its rounding perturbs both)."""
    fisher = [torch.zeros_like(weight, dtype=torch.float32) for weight in weights]
    with gradients_only_for(model, weights):
        for window in windows:
            model(input_ids=window[None], labels=window[None]).loss.backward()
            for buffer, weight in zip(fisher, weights, strict=True):
                buffer.add_(weight.grad.float().square() / len(windows))
                weight.grad = None
    return fisher


def tied_vocabulary(model: nn.Module) -> nn.Parameter | None:
    """The matrix the token embedding and the lm_head share (None: not tied, or no head)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    return head.weight if head is not None and embedding is not None and head.weight is embedding.weight else None


def layer_linears(model: nn.Module) -> dict[tuple[int, str], nn.Linear]:
    """Every Linear inside a numbered layer, keyed (layer index, path below the layer with '/' separators)."""
    found = {}
    for name, module in model.named_modules():
        match = re.search(r"layers?\.(\d+)\.(.+)$", name)
        if isinstance(module, nn.Linear) and match:
            found[(int(match.group(1)), match.group(2).replace(".", "/"))] = module
    return found


def projection_sensitivity(
    model: nn.Module, windows: torch.Tensor, block_size: int, eight_bit_block: int = MIXED_EIGHT_BIT_BLOCK
) -> dict[tuple[int, str], Sensitivity]:
    """Loss 4-bit rounding adds over 8-bit rounding, per layer Linear and for a tied vocabulary matrix (VOCABULARY,
    in the blocks the embedding takes) (diagonal Fisher, second-order)."""
    matrices = {key: (linear.weight, block_size, eight_bit_block) for key, linear in layer_linears(model).items()}
    vocabulary = tied_vocabulary(model)
    if vocabulary is not None:
        hidden = vocabulary.shape[1]
        matrices[VOCABULARY] = (vocabulary, *vocabulary_blocks(hidden, block_size, eight_bit_block))
    fisher = fisher_diagonal(model, windows, [weight for weight, _, _ in matrices.values()])
    sensitivity = {}
    for (key, (weight, four_block, eight_block)), information in zip(matrices.items(), fisher, strict=True):
        four = rounding_error(weight, 4, four_block).square()
        eight = rounding_error(weight, 8, eight_block).square()
        sensitivity[key] = Sensitivity(float((information * (four - eight)).sum()) / 2, weight.numel())
    return sensitivity


def graph_projections(
    graph: onnx.GraphProto, sensitivity: dict[tuple[int, str], Sensitivity], block_size: int, eight_bit_block: int
) -> list[Projection]:
    """The graph's layer MatMuls with a constant weight, priced (extra bytes at 8 bits) and valued (sensitivity
    measured on the same model, or on the dense one it was cut from: scaled by the share of weights kept); with a
    measured VOCABULARY, the tied lm_head too (8 bits for it are 8 bits for the embedding, which shares its blocks)."""
    weights = {init.name: init for init in graph.initializer}
    found = []
    head = vocabulary_head(graph)
    if head is not None and VOCABULARY in sensitivity:
        four_block, eight_block = vocabulary_blocks(head.hidden, block_size, eight_bit_block)
        eight = quantized_bytes(head.hidden, head.vocab, 8, eight_block)
        extra = eight - quantized_bytes(head.hidden, head.vocab, 4, four_block)
        found.append(Projection(head.node, extra, sensitivity[VOCABULARY].loss))
    for node in graph.node:
        match = LAYER_PROJECTION.search(node.name)
        if node.op_type != "MatMul" or node.input[1] not in weights or not match:
            continue
        layer, path = int(match.group(1)), match.group(2)
        parts = GRAPH_PROJECTIONS.get(path, (path,))
        if any((layer, part) not in sensitivity for part in parts):
            continue
        rows, columns = weights[node.input[1]].dims
        measured = [sensitivity[(layer, part)] for part in parts]
        kept = rows * columns / sum(m.weights for m in measured)
        found.append(
            Projection(
                node.name,
                quantized_bytes(rows, columns, 8, eight_bit_block) - quantized_bytes(rows, columns, 4, block_size),
                kept * sum(m.loss for m in measured),
            )
        )
    return found


def vocabulary_blocks(hidden: int, block_size: int, eight_bit_block: int) -> tuple[int, int]:
    """The tied vocabulary matrix's blocks over 4-bit projections: at 4 bits, and kept at 8 (as `quantize` makes it)."""
    four = vocabulary_block(hidden, 4, 4, block_size, eight_bit_block)
    return four, vocabulary_block(hidden, 8, 4, block_size, eight_bit_block)


def quantized_bytes(rows: int, columns: int, bits: int, block_size: int) -> int:
    """MatMulNBits storage of a [rows, columns] weight: packed codes and one float32 scale a block."""
    blocks = -(-rows // block_size)
    return columns * blocks * (block_size * bits // 8 + 4)


def choose_eight_bit(projections: list[Projection], room_bytes: int) -> list[str]:
    """The projections to keep at 8 bits within `room_bytes`: greedy by loss saved per byte, then any that still fit.

    Greedy can pass over one large item (the vocabulary matrix is 16 times a projection) worth more than the
    small ones it admits instead, so the fill with the largest item forced in is tried too; the larger total wins.
    """
    chosen = greedy_fill(projections, room_bytes)
    largest = max(projections, key=lambda p: p.extra_bytes, default=None)
    if largest is None or largest in chosen or largest.sensitivity <= 0 or largest.extra_bytes > room_bytes:
        return [p.node for p in chosen]
    forced = [largest, *greedy_fill([p for p in projections if p is not largest], room_bytes - largest.extra_bytes)]
    best = max((chosen, forced), key=lambda fill: sum(p.sensitivity for p in fill))
    return [p.node for p in best]


def greedy_fill(projections: list[Projection], room_bytes: int) -> list[Projection]:
    chosen, left = [], room_bytes
    for projection in sorted(projections, key=lambda p: -p.value_per_byte):
        if projection.sensitivity > 0 and projection.extra_bytes <= left:
            chosen.append(projection)
            left -= projection.extra_bytes
    return chosen

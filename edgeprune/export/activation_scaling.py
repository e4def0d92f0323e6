"""Activation-aware per-input-channel scales, folded into a decoder's weights before 4-bit rounding (AWQ).

Round-to-nearest int4 in blocks along a MatMul's input dimension spends each block's levels on its largest
weight, and the rounding error of input channel j reaches the output multiplied by that channel's activation
x_j: the few channels whose activations are large in every token carry most of the output error. Multiplying
weight column j by s_j before rounding and its input by 1/s_j (folded into whatever produces that input) leaves
the float function unchanged, while column j's error reaches the output as x_j * e_j / s_j. s = (mean |x|)^alpha,
with alpha per group from a grid: the one whose 4-bit MatMul (ONNX Runtime's own rounding) is closest to the
float one on calibration activations (Lin et al., "AWQ", MLSys 2024). One number per input channel: little to
overfit, where GPTQ's per-weight updates fitted the calibration text and not held-out text
(benchmarks/RESULTS.md, "int4 quality").

Four groups per pre-norm layer, each exact in float: q/k/v inputs (1/s into the attention norm's weight);
gate/up inputs (the FFN norm's); the output projection's inputs (the un-activated FFN input's output rows:
act(gate) * (up / s) * s); the attention output projection's inputs (v's output rows: attention sums rows of V
linearly, so under GQA one scale per KV channel, repeated over the query heads that read it). The token
embedding and a tied lm_head are not touched.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from edgeprune.criteria.activations import record_inputs
from edgeprune.errors import EdgepruneError
from edgeprune.export.bit_allocation import rounding_error
from edgeprune.export.quantize import WEIGHT_ONLY
from edgeprune.models.base import FamilyAdapter

ALPHAS = tuple(step / 10 for step in range(11))  # 0 is round-to-nearest: a group never gets worse on calibration
MIN_MAGNITUDE = 1e-4  # floor on mean |x|: a silent channel's scale must stay finite at any alpha
BITS = 4  # the rounding the scales are chosen for (8-bit MatMuls of int4-fit/int4-mixed are rounded finely anyway)


@dataclass(frozen=True)
class ScaleGroup:
    """Linears reading the same inputs, and the module producing them, which takes the inverse scale.

    `source` is a norm (its `weight` multiplies its output) or a Linear (its output rows); `channels[i]` is the
    source channel input i of the linears reads (an identity but for o_proj under GQA).
    """

    layer: int
    name: str
    source: nn.Module
    linears: tuple[nn.Linear, ...]
    channels: torch.Tensor


@dataclass(frozen=True)
class ChannelStats:
    """A group's calibration inputs, as much as its output error needs: X^T X and sum |x| per channel."""

    gram: torch.Tensor
    magnitude: torch.Tensor
    tokens: int


@dataclass(frozen=True)
class GroupScale:
    """The scale chosen for one group (per source channel), its alpha, and the output error energy per token of
    the group's 4-bit MatMuls on calibration inputs with it and without it (alpha 0)."""

    layer: int
    name: str
    alpha: float
    error: float
    plain_error: float
    scale: torch.Tensor


def kv_channels(adapter: FamilyAdapter, layer: nn.Module) -> torch.Tensor:
    """For each input of the attention output projection, the value-projection row it is a weighted sum of
    (query head h reads KV head h // (heads / kv_heads), as Hugging Face's repeat_kv lays them out)."""
    widths, head_dim = adapter.widths(layer), adapter.head_dim(layer)
    inputs = torch.arange(widths.heads * head_dim)
    kv_head = inputs // head_dim // (widths.heads // widths.kv_heads)
    return kv_head * head_dim + inputs % head_dim


def scale_groups(model: nn.Module, adapter: FamilyAdapter) -> list[ScaleGroup]:
    """Every layer's four groups (qkv, gate/up, down, o), in layer order, from the family adapter."""
    groups = []
    for index, layer in enumerate(adapter.layers(model)):
        norms, plain = adapter.input_norms(layer), adapter.ffn_plain_input(layer)
        if norms is None or plain is None:
            raise EdgepruneError(
                f"activation scaling needs pre-norm layers with a gated FFN; {type(adapter).__name__} has none"
            )
        projections, down = adapter.attention_projections(layer), adapter.ffn_output(layer)
        qkv, ffn = (projections["q"], projections["k"], projections["v"]), tuple(adapter.ffn_inputs(layer))
        groups += [
            ScaleGroup(index, "qkv", norms[0], qkv, torch.arange(qkv[0].in_features)),
            ScaleGroup(index, "gate/up", norms[1], ffn, torch.arange(ffn[0].in_features)),
            ScaleGroup(index, "down", plain, (down,), torch.arange(down.in_features)),
            ScaleGroup(index, "o", projections["v"], (projections["o"],), kv_channels(adapter, layer)),
        ]
    return groups


def channel_statistics(
    model: nn.Module, groups: list[ScaleGroup], windows: torch.Tensor, batch_size: int = 4
) -> list[ChannelStats]:
    """Each group's input statistics over the calibration windows, in one pass of the float model.

    The Gram matrix makes a candidate's output error exact over every calibration token (trace(E G E^T)) without
    keeping the tokens; per-batch products are float32 sums of batch_size * seq_len terms, added up in float64.
    """
    width = [group.linears[0].in_features for group in groups]
    grams = [torch.zeros(n, n, dtype=torch.float64) for n in width]
    magnitudes = [torch.zeros(n, dtype=torch.float64) for n in width]

    def record(index: int, _first_window: int, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, width[index]).float()
        grams[index].add_(x.T @ x)
        magnitudes[index].add_(x.abs().sum(0))

    record_inputs(model, [group.linears[0] for group in groups], windows, batch_size, record)
    tokens = windows.numel()
    return [ChannelStats(g.float(), m.float(), tokens) for g, m in zip(grams, magnitudes, strict=True)]


def output_error(weight: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, block_size: int) -> float:
    """sum over calibration tokens of |x (W - Q(W diag s) diag(1/s))^T|^2: what the 4-bit MatMul of the scaled
    weight, fed x / s, gets wrong (Q: ONNX Runtime's rounding, blocks along the input of each output row)."""
    error = rounding_error(weight * scale, BITS, block_size) / scale
    return float(((error @ gram) * error).sum())


def search_scale(
    group: ScaleGroup, stats: ChannelStats, block_size: int, alphas: tuple[float, ...] = ALPHAS
) -> GroupScale:
    """The alpha (and its scale) whose 4-bit group output is closest to the float one on the calibration inputs.

    A source channel read by several inputs (a KV channel under GQA) takes their mean magnitude. The scale is
    centred (its extreme values' geometric mean is 1), so the folded weights keep their size.
    """
    weight = torch.cat([linear.weight.detach().float() for linear in group.linears])
    sources = int(group.channels.max()) + 1
    readers = torch.zeros(sources).index_add_(0, group.channels, torch.ones(len(group.channels)))
    magnitude = torch.zeros(sources).index_add_(0, group.channels, stats.magnitude / stats.tokens) / readers
    magnitude = magnitude.clamp(min=MIN_MAGNITUDE)

    def tried_at(alpha: float) -> tuple[float, torch.Tensor]:
        scale = magnitude.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()
        return output_error(weight, stats.gram, scale[group.channels], block_size), scale

    tried = {alpha: tried_at(alpha) for alpha in dict.fromkeys((*alphas, 0.0))}  # alpha 0: all ones, plain rounding
    alpha = min(alphas, key=lambda a: tried[a][0])
    error, scale = tried[alpha]
    return GroupScale(group.layer, group.name, alpha, error / stats.tokens, tried[0.0][0] / stats.tokens, scale)


def fold_scale(group: ScaleGroup, scale: torch.Tensor) -> None:
    """Multiply the linears' input columns by the scale and divide the source's outputs by it (in place)."""
    with torch.no_grad():
        for linear in group.linears:
            linear.weight.mul_(scale[group.channels].to(linear.weight.dtype))
        source = scale.to(group.source.weight.dtype)
        if isinstance(group.source, nn.Linear):
            group.source.weight.div_(source[:, None])
            if group.source.bias is not None:
                group.source.bias.div_(source)
        else:
            group.source.weight.div_(source)


def rounded_after_scaling(precision: str) -> bool:
    """Whether a precision's files take the scales: those whose projections are rounded to BITS."""
    recipe = WEIGHT_ONLY.get(precision)
    return recipe is not None and recipe.bits == BITS


def scaling_applies(model: nn.Module, adapter: FamilyAdapter, precision: str) -> bool:
    """Whether `run` folds scales into this model's file at `precision`: a 4-bit file of a family with pre-norm
    layers and a gated FFN (Llama's); others (BERT's post-norm layers) are rounded as they are."""
    layer = adapter.layers(model)[0]
    family_has = adapter.input_norms(layer) is not None and adapter.ffn_plain_input(layer) is not None
    return rounded_after_scaling(precision) and family_has


def choose_scales(
    model: nn.Module, adapter: FamilyAdapter, windows: torch.Tensor, block_size: int, alphas: tuple[float, ...] = ALPHAS
) -> list[GroupScale]:
    """Every group's scale, each chosen on the unscaled weights and activations (a group's search sees the weights
    it will scale, not another group's fold into them)."""
    groups = scale_groups(model, adapter)
    stats = channel_statistics(model, groups, windows)
    return [search_scale(group, stats[i], block_size, alphas) for i, group in enumerate(groups)]


def with_scales(model: nn.Module, adapter: FamilyAdapter, chosen: list[GroupScale]) -> nn.Module:
    """A copy of `model` with the chosen scales folded in; `model` is left as it was."""
    scaled = copy.deepcopy(model)
    for group, choice in zip(scale_groups(scaled, adapter), chosen, strict=True):
        fold_scale(group, choice.scale)
    return scaled


def activation_scaled(
    model: nn.Module, adapter: FamilyAdapter, windows: torch.Tensor, block_size: int, alphas: tuple[float, ...] = ALPHAS
) -> tuple[nn.Module, list[GroupScale]]:
    """A copy of `model` with every group's chosen scale folded in, and the choices."""
    chosen = choose_scales(model, adapter, windows, block_size, alphas)
    return with_scales(model, adapter, chosen), chosen

"""FLAP's fluctuation criterion (An et al., 2024), without gradients.

A channel of the output projection's input (an FFN neuron, or one dimension of a head's
output) whose value barely varies across tokens can be replaced by its mean: removing it
changes the output by about ‖W[:, k]‖² · Var(a_k). That is the score; a head sums it over its
channels. FLAP's bias compensation (the constant part W[:, k]·E[a_k] put back into the bias) edits
weights, so it lives with the least-squares re-fit in `edgeprune.compensate`.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.criteria.activations import ChannelStats, collect_channel_stats
from edgeprune.criteria.base import GroupScores, ScoringInputs, register
from edgeprune.models import FamilyAdapter


def output_input_stats(
    model: nn.Module, adapter: FamilyAdapter, inputs: ScoringInputs
) -> tuple[list[ChannelStats], list[ChannelStats]]:
    """Channel statistics of the FFN output projection's input and of the attention output projection's input."""
    ffn = collect_channel_stats(model, adapter, inputs.calibration, adapter.ffn_output)
    inputs.report("activations", 1, 2)
    heads = collect_channel_stats(model, adapter, inputs.calibration, adapter.head_output)
    inputs.report("activations", 2, 2)
    return ffn, heads


def column_square_norms(linear: nn.Linear) -> torch.Tensor:
    """‖W[:, k]‖² for every input channel k, in float64 like the channel statistics."""
    return linear.weight.detach().double().pow(2).sum(dim=0)


def per_head(channel_scores: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Sum channel scores over each head's contiguous block of channels."""
    return channel_scores.reshape(n_heads, -1).sum(dim=1)


@register("fluctuation", needs_calibration=True)
def score_fluctuation(model: nn.Module, adapter: FamilyAdapter, inputs: ScoringInputs) -> GroupScores:
    ffn_stats, head_stats = output_input_stats(model, adapter, inputs)
    ffn, heads = [], []
    for layer, f, h in zip(adapter.layers(model), ffn_stats, head_stats, strict=True):
        ffn.append((f.variance * column_square_norms(adapter.ffn_output(layer))).float())
        head_channels = h.variance * column_square_norms(adapter.head_output(layer))
        heads.append(per_head(head_channels, adapter.widths(layer).heads).float())
    return GroupScores(ffn=ffn, heads=heads)

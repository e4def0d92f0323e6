"""Global allocation: same sparsity definition as the uniform plan, normalized ranking, min width, protection."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import family_names, tiny_model

from edgeprune.criteria import GroupScores, ScoringInputs, score_groups
from edgeprune.errors import EdgepruneError
from edgeprune.models import adapter_for
from edgeprune.structure import PruneSpec, layer_widths, plan_global_widths, prune_model


def skewed_scores(model, adapter, skewed_layer: int) -> GroupScores:
    """Every layer's scores near 1, except one layer where half its neurons score almost nothing."""
    gen = torch.Generator().manual_seed(0)
    widths = layer_widths(model, adapter)
    ffn = [1.0 + 0.01 * torch.rand(w.ffn, generator=gen) for w in widths]
    ffn[skewed_layer][: widths[skewed_layer].ffn // 2] = 0.01
    heads = [1.0 + 0.01 * torch.rand(w.heads, generator=gen) for w in widths]
    return GroupScores(ffn=ffn, heads=heads)


@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("targets", [("ffn", "heads"), ("ffn",)])
@pytest.mark.parametrize("sparsity", [0.1, 0.3])
def test_global_plan_meets_sparsity(family, targets, sparsity):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    scores = score_groups("magnitude", model, adapter, ScoringInputs())
    summary = prune_model(model, adapter, scores, PruneSpec(sparsity, targets=targets, allocation="global"))
    assert summary.prunable_removed == pytest.approx(sparsity, abs=0.02)
    assert all(w.heads % w.kv_heads == 0 for w in summary.widths)  # GQA groups stay even


def test_global_plan_cuts_where_normalized_scores_are_low(llama):
    adapter = adapter_for(llama.config)
    scores = skewed_scores(llama, adapter, skewed_layer=2)
    plan = plan_global_widths(llama, adapter, scores, PruneSpec(0.2, targets=("ffn",), allocation="global"))
    assert plan[2].ffn < min(plan[i].ffn for i in (0, 1, 3))
    scores.ffn[0] = scores.ffn[0] * 1000.0  # a layer's raw scale must not protect it
    assert plan_global_widths(llama, adapter, scores, PruneSpec(0.2, targets=("ffn",), allocation="global")) == plan


def test_global_plan_honours_protection_and_min_keep(llama):
    adapter = adapter_for(llama.config)
    before = layer_widths(llama, adapter)
    scores = skewed_scores(llama, adapter, skewed_layer=1)
    spec = PruneSpec(0.15, targets=("ffn",), protect_first=1, protect_last=1, allocation="global", min_keep=0.7)
    plan = plan_global_widths(llama, adapter, scores, spec)
    assert plan[0] == before[0] and plan[3] == before[3]
    assert plan[1].ffn == math.ceil(0.7 * before[1].ffn)  # half its neurons are weak, but the floor holds
    assert plan[2].ffn >= math.ceil(0.7 * before[2].ffn)
    with pytest.raises(EdgepruneError, match="cannot be reached while every layer keeps 90%"):
        plan_global_widths(llama, adapter, scores, PruneSpec(0.3, targets=("ffn",), allocation="global", min_keep=0.9))


def test_unknown_allocation_refused():
    with pytest.raises(EdgepruneError, match="unknown allocation 'even'"):
        PruneSpec(0.2, allocation="even")

"""Physical cutting: exactness against zeroing, width plans, GQA coupling, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import family_names, tiny_model
from transformers import GPT2Config

from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.errors import EdgepruneError
from edgeprune.models import CAUSAL_LM, CLASSIFIER, ENCODER, MASKED_LM, adapter_for, model_kind
from edgeprune.structure import LayerKeep, PruneSpec, cut_model, layer_widths, prune_model

ATOL = 1e-5


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def keep_all_but(width: int, drop: list[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(width) if i not in drop], dtype=torch.long)


@pytest.mark.parametrize("family", family_names())
def test_zero_sparsity_keeps_logits_identical(family, token_ids):
    model = tiny_model(family)
    before = logits(model, token_ids)
    adapter = adapter_for(model.config)
    summary = prune_model(model, adapter, score_groups("magnitude", model, adapter, ScoringInputs()), PruneSpec(0.0))
    assert summary.params_after == summary.params_before
    assert torch.equal(logits(model, token_ids), before)


@pytest.mark.parametrize("family", family_names())
def test_cutting_ffn_neuron_equals_zeroing_its_output_column(family, token_ids):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    original = logits(model, token_ids)
    zeroed = copy.deepcopy(model)
    layer = adapter.layers(zeroed)[1]
    with torch.no_grad():
        adapter.ffn_output(layer).weight[:, [3, 7]] = 0.0
    width = adapter.widths(layer).ffn
    keep = [LayerKeep() for _ in adapter.layers(model)]
    keep[1] = LayerKeep(ffn=keep_all_but(width, [3, 7]))
    cut_model(model, adapter, keep)
    assert adapter.widths(adapter.layers(model)[1]).ffn == width - 2
    pruned = logits(model, token_ids)
    torch.testing.assert_close(pruned, logits(zeroed, token_ids), atol=ATOL, rtol=0)
    assert (pruned - original).abs().max() > 1e-3  # the cut really changed the function


@pytest.mark.parametrize("family", family_names())
def test_cutting_head_equals_zeroing_its_output_columns(family, token_ids):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    original = logits(model, token_ids)
    layer = adapter.layers(model)[2]
    hd, heads = adapter.head_dim(layer), adapter.widths(layer).heads
    drop = [1, 5] if family == "llama" else [2]  # llama: one query head from each of the 2 KV groups
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        out = adapter.head_output(adapter.layers(zeroed)[2])
        for h in drop:
            out.weight[:, h * hd : (h + 1) * hd] = 0.0
    keep = [LayerKeep() for _ in adapter.layers(model)]
    keep[2] = LayerKeep(heads=keep_all_but(heads, drop))
    cut_model(model, adapter, keep)
    assert adapter.widths(adapter.layers(model)[2]).heads == heads - len(drop)
    pruned = logits(model, token_ids)
    torch.testing.assert_close(pruned, logits(zeroed, token_ids), atol=ATOL, rtol=0)
    assert (pruned - original).abs().max() > 1e-3  # the cut really changed the function


def test_gqa_heads_pruned_evenly_and_generate_runs(llama, token_ids):
    adapter = adapter_for(llama.config)
    scores = score_groups("random", llama, adapter, ScoringInputs(seed=3))
    prune_model(llama, adapter, scores, PruneSpec(0.5, targets=("heads",)))
    for layer in adapter.layers(llama):
        w = adapter.widths(layer)
        assert (w.heads, w.kv_heads) == (4, 2)
        assert layer.self_attn.num_key_value_groups == 2
    out = llama.generate(token_ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert out.shape == (1, token_ids.shape[1] + 6)


def test_uneven_query_heads_per_kv_group_refused(llama):
    adapter = adapter_for(llama.config)
    keep = [LayerKeep() for _ in adapter.layers(llama)]
    keep[0] = LayerKeep(heads=torch.tensor([0, 1, 2, 4]))  # 3 from group 0, 1 from group 1
    with pytest.raises(EdgepruneError, match="differ"):
        cut_model(llama, adapter, keep)


def test_kv_group_removed_only_when_allowed(llama, token_ids):
    keep = [LayerKeep() for _ in range(4)]
    keep[1] = LayerKeep(heads=torch.tensor([0, 1, 2, 3]))  # every head of KV group 0 only
    with pytest.raises(EdgepruneError, match="KV"):
        cut_model(copy.deepcopy(llama), adapter_for(llama.config), keep)
    adapter = adapter_for(llama.config, prune_kv_heads=True)
    cut_model(llama, adapter, keep)
    assert adapter.widths(adapter.layers(llama)[1]).kv_heads == 1
    assert logits(llama, token_ids).isfinite().all()


@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("targets", [("ffn", "heads"), ("ffn",)])
@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5])
def test_plan_meets_sparsity_of_prunable_parameters(family, targets, sparsity):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    scores = score_groups("magnitude", model, adapter, ScoringInputs())
    summary = prune_model(model, adapter, scores, PruneSpec(sparsity, targets=targets))
    # one FFN neuron of these tiny layers is ~1.5% of a layer's prunable parameters
    assert summary.prunable_removed == pytest.approx(sparsity, abs=0.02)
    assert summary.params_after < summary.params_before


def test_protected_layers_and_rounding(llama, token_ids):
    adapter = adapter_for(llama.config)
    before = layer_widths(llama, adapter)
    scores = score_groups("magnitude", llama, adapter, ScoringInputs())
    prune_model(llama, adapter, scores, PruneSpec(0.3, protect_first=1, protect_last=1, round_to=8))
    after = layer_widths(llama, adapter)
    assert after[0] == before[0] and after[-1] == before[-1]
    assert all(w.ffn % 8 == 0 and w.ffn < before[1].ffn for w in after[1:-1])
    assert llama.config.pruned_layer_widths["intermediate_size"] == [w.ffn for w in after]


def test_refusals():
    with pytest.raises(EdgepruneError, match=r"outside \[0, 1\)"):
        PruneSpec(1.0)
    with pytest.raises(EdgepruneError, match="unknown targets"):
        PruneSpec(0.2, targets=("mlp",))
    with pytest.raises(
        EdgepruneError, match=r"unsupported architecture 'gpt2': edgeprune supports (?=.*\bllama\b)(?=.*\bbert\b)"
    ):
        adapter_for(GPT2Config())


@pytest.mark.parametrize("family", family_names())
def test_model_kind_is_the_family_kind_refined_by_the_head(family):
    from transformers import AutoModelForSequenceClassification

    model = tiny_model(family)
    family_kind = adapter_for(model.config).kind
    assert family_kind in (CAUSAL_LM, ENCODER)
    assert model_kind(model) == (CAUSAL_LM if family_kind == CAUSAL_LM else MASKED_LM)
    assert model_kind(model.base_model) == family_kind  # no head: a decoder stays a decoder, an encoder is bare
    assert model_kind(AutoModelForSequenceClassification.from_config(model.config)) == CLASSIFIER


def test_a_newly_registered_decoder_family_is_a_causal_lm_everywhere(monkeypatch):
    """The kind comes from the adapter: registering a family is all it takes for export and recovery to
    treat its models as decoders (the old check was "is a Llama")."""
    from transformers import GPT2LMHeadModel

    from edgeprune.export import resolve_task
    from edgeprune.models import base
    from edgeprune.models.llama import LlamaAdapter

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(EdgepruneError, match="unsupported architecture 'gpt2'"):
        model_kind(gpt2)
    monkeypatch.setattr(base, "FAMILIES", list(base.FAMILIES))
    base.register_family(type("Gpt2Family", (LlamaAdapter,), {"model_types": ("gpt2",)}))
    assert model_kind(gpt2) == CAUSAL_LM and resolve_task(gpt2, "auto") == "text-generation-with-past"


def test_sparsity_that_would_empty_a_layer_is_refused(llama):
    adapter = adapter_for(llama.config)
    scores = score_groups("magnitude", llama, adapter, ScoringInputs())
    before = layer_widths(llama, adapter)
    with pytest.raises(EdgepruneError, match="every FFN neuron"):
        prune_model(llama, adapter, scores, PruneSpec(0.9, targets=("ffn",)))
    assert layer_widths(llama, adapter) == before  # nothing was cut


def test_scores_for_other_widths_refused(llama, bert):
    adapter = adapter_for(llama.config)
    scores = score_groups("magnitude", bert, adapter_for(bert.config), ScoringInputs())
    with pytest.raises(EdgepruneError, match="do not match"):
        scores.check_matches(llama, adapter)

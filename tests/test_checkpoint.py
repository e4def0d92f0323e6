"""Pruned checkpoints: exact reload with per-layer widths, atomic writes, no overwrites."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import family_names, tiny_model
from transformers import BertForMaskedLM, LlamaForCausalLM

from edgeprune.checkpoint import load_pruned, save_pruned
from edgeprune.errors import EdgepruneError
from edgeprune.models import adapter_for
from edgeprune.structure import LayerKeep, cut_model, layer_widths


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def cut_non_uniform(model, kv_too: bool = False):
    """Different FFN widths and head counts per layer."""
    adapter = adapter_for(model.config, prune_kv_heads=kv_too)
    keep = []
    for i, layer in enumerate(adapter.layers(model)):
        w = adapter.widths(layer)
        ffn = torch.arange(0, w.ffn, i + 2)  # every 2nd, 3rd, ... neuron
        heads = None
        if i == 1:
            heads = torch.tensor([0, 1, 4, 5]) if w.kv_heads == 2 else torch.tensor([0, 3])
        if i == 2 and kv_too:
            heads = torch.tensor([4, 6])  # KV group 1 only
        keep.append(LayerKeep(ffn=ffn, heads=heads))
    cut_model(model, adapter, keep)
    return adapter


@pytest.mark.parametrize("family", family_names())
def test_save_load_bit_identical_with_non_uniform_widths(family, tokenizer, token_ids, tmp_path):
    model = tiny_model(family)
    adapter = cut_non_uniform(model)
    widths = layer_widths(model, adapter)
    assert len({w.ffn for w in widths}) == len(widths)  # really non-uniform
    save_pruned(model, tokenizer, tmp_path / "out", {"source": "tiny"})
    loaded, loaded_tok = load_pruned(tmp_path / "out")
    assert type(loaded) is (LlamaForCausalLM if family == "llama" else BertForMaskedLM)
    assert layer_widths(loaded, adapter_for(loaded.config)) == widths
    assert torch.equal(logits(loaded, token_ids), logits(model, token_ids))
    assert loaded_tok("w1 w2")["input_ids"] == tokenizer("w1 w2")["input_ids"]
    assert not list((tmp_path / "out").glob("*.bin")) and not list((tmp_path / "out").glob("*.pt"))


def test_kv_pruned_checkpoint_reloads(llama, tokenizer, token_ids, tmp_path):
    cut_non_uniform(llama, kv_too=True)
    save_pruned(llama, tokenizer, tmp_path / "out", {"source": "tiny"})
    loaded, _ = load_pruned(tmp_path / "out")
    assert loaded.config.pruned_layer_widths["num_key_value_heads"] == [2, 2, 1, 2]
    assert torch.equal(logits(loaded, token_ids), logits(llama, token_ids))


def test_provenance_file(llama, tokenizer, tmp_path):
    cut_non_uniform(llama)
    save_pruned(llama, tokenizer, tmp_path / "out", {"source": "tiny", "criterion": "magnitude"})
    record = json.loads((tmp_path / "out" / "edgeprune.json").read_text())
    assert record["source"] == "tiny" and record["criterion"] == "magnitude"
    assert record["layer_widths"]["intermediate_size"] == [48, 32, 24, 20]
    assert {"torch", "transformers", "edgeprune"} <= set(record["versions"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["pruned_layer_widths"]["num_attention_heads"] == [8, 4, 8, 8]


def test_existing_output_is_refused_and_untouched(llama, tokenizer, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # --overwrite replaces only a folder edgeprune wrote
        with pytest.raises(EdgepruneError, match="not written by edgeprune"):
            save_pruned(llama, tokenizer, out, {}, overwrite=overwrite)
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    ours = tmp_path / "ours"
    save_pruned(llama, tokenizer, ours, {"v": 1})
    with pytest.raises(EdgepruneError, match="already exists.*--overwrite"):
        save_pruned(llama, tokenizer, ours, {"v": 2})
    save_pruned(llama, tokenizer, ours, {"v": 2}, overwrite=True)
    assert json.loads((ours / "edgeprune.json").read_text())["v"] == 2


def test_output_equal_to_input_is_refused(llama, tokenizer, saved_llama):
    before = {p.name: p.stat().st_mtime_ns for p in saved_llama.iterdir()}
    with pytest.raises(EdgepruneError, match="is the input"):
        save_pruned(llama, tokenizer, saved_llama, {}, overwrite=True, protect=saved_llama)
    assert {p.name: p.stat().st_mtime_ns for p in saved_llama.iterdir()} == before


def test_failed_save_leaves_nothing(llama, tmp_path):
    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_pruned(llama, BrokenTokenizer(), tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_load_from_non_model_folder_is_refused(tmp_path):
    with pytest.raises(EdgepruneError, match="not a pruned model folder"):
        load_pruned(tmp_path)

"""Whole-layer removal: a removed layer is a skipped layer, the checkpoint reloads, the measures rank sensibly."""

from __future__ import annotations

import pytest
import torch

from edgeprune.layers import (
    block_influence,
    block_information,
    layer_importance,
    layers_to_remove,
    remove_layers,
)
from edgeprune.models import adapter_for
from tests.conftest import VOCAB, family_names, tiny_model


def ids(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(7, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


def skipped_logits(model, adapter, skip: set[int], tokens: torch.Tensor) -> torch.Tensor:
    """Logits with the given layers replaced by the identity (their input passed on unchanged)."""

    def identity(_module, args, _kwargs, output):
        return (args[0], *output[1:]) if isinstance(output, tuple) else args[0]

    handles = [
        layer.register_forward_hook(identity, with_kwargs=True)
        for i, layer in enumerate(adapter.layers(model))
        if i in skip
    ]
    try:
        with torch.no_grad():
            return model(input_ids=tokens).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("family", family_names())
def test_removing_a_layer_equals_skipping_it(family, tokenizer, tmp_path):
    from edgeprune.checkpoint import load_pruned, save_pruned

    model = tiny_model(family)
    adapter = adapter_for(model.config)
    tokens = ids()
    n_layers = len(adapter.layers(model))
    expected = skipped_logits(model, adapter, {1}, tokens)
    remove_layers(model, adapter, [1])
    assert len(adapter.layers(model)) == n_layers - 1 == model.config.num_hidden_layers
    assert model.config.removed_layers == [1]
    with torch.no_grad():
        got = model(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    remove_layers(model, adapter, [1])  # original layer 2: the record keeps original indices
    assert model.config.removed_layers == [1, 2]
    save_pruned(model, tokenizer, tmp_path / "out", {"criterion": "block-influence"})
    reloaded, _ = load_pruned(tmp_path / "out")
    assert reloaded.config.removed_layers == [1, 2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_a_decoder_without_a_layer_still_generates_with_its_cache(llama):
    adapter = adapter_for(llama.config)
    remove_layers(llama, adapter, [0, 2])
    out = llama.generate(ids(1, 5), max_new_tokens=4, do_sample=False)
    with torch.no_grad():  # greedy decoding with the cache equals decoding without it
        again = llama.generate(ids(1, 5), max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(out, again)


def test_layer_measures_rank_an_identity_block_lowest():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    unchanged, rotated = x.clone(), x @ torch.linalg.qr(torch.randn(16, 16, generator=gen))[0]
    assert block_influence(x, unchanged) < 1e-6 < block_influence(x, rotated)
    noisy = x + 2 * torch.randn(256, 16, generator=gen)  # output with information the input does not hold
    assert block_information(x, unchanged) < block_information(x, noisy)


@pytest.mark.parametrize("measure", ["block-influence", "block-information"])
def test_layer_importance_and_choice(measure, llama):
    adapter = adapter_for(llama.config)
    importance = layer_importance(llama, adapter, ids(), measure)
    assert importance.shape == (4,) and torch.isfinite(importance).all()
    chosen = layers_to_remove(importance, 2, protect_first=1, protect_last=1)
    assert chosen == [1, 2]


def test_prune_cli_removes_whole_layers(saved_llama, tmp_path):
    from click.testing import CliRunner

    from edgeprune.checkpoint import load_pruned, read_provenance
    from edgeprune.cli import main

    args = ["prune", str(saved_llama), "--targets", "layers", "--sparsity", "0.5", "--calib-samples", "2"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model, _ = load_pruned(tmp_path / "out")
    assert model.config.num_hidden_layers == 3 and len(model.config.removed_layers) == 1
    assert 1 <= model.config.removed_layers[0] <= 2  # first and last layers protected by default
    assert read_provenance(tmp_path / "out")["removed_layers"] == model.config.removed_layers

"""Budget-search probes sliced out of the dense ONNX graph equal a real cut of the PyTorch model."""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from conftest import family_names, tiny_model

from edgeprune.errors import EdgepruneError
from edgeprune.export import export_model, verify_onnx
from edgeprune.export.exporter import FP32_ATOL
from edgeprune.export.sliced import ffn_initializer_names, slice_ffn
from edgeprune.models import adapter_for
from edgeprune.structure import LayerKeep, cut_model


def with_ffn_biases(family: str) -> torch.nn.Module:
    """The family's tiny model with random, distinct biases on its FFN linears (switched on where optional)."""
    flag = type(adapter_for(tiny_model(family).config)).bias_flags.get("ffn")
    model = tiny_model(family, **({flag: True} if flag else {}))
    adapter = adapter_for(model.config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter.layers(model):
            for linear in [*adapter.ffn_inputs(layer), adapter.ffn_output(layer)]:
                linear.bias.copy_(0.2 * torch.randn(linear.bias.shape, generator=gen))
    return model


@pytest.mark.parametrize("biases", ["as built", "random"])  # BERT's built biases are equal zeros, shared at export
@pytest.mark.parametrize("family", family_names())
def test_sliced_ffn_probe_matches_cut_model(family, biases, tokenizer, tmp_path):
    model = tiny_model(family) if biases == "as built" else with_ffn_biases(family)
    export_model(model, tokenizer, tmp_path / "dense")
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    names = ffn_initializer_names(model, adapter, onnx.load(str(tmp_path / "dense" / "model.onnx")).graph)
    n_linears = len(adapter.ffn_inputs(layers[0])) + 1
    assert len({n for layer in names for n in [*layer["inputs"], layer["output"]]}) == n_linears * len(layers)
    width = adapter.widths(layers[0]).ffn
    gen = torch.Generator().manual_seed(0)
    keep = [
        LayerKeep(ffn=torch.randperm(width, generator=gen)[: 30 + 10 * i].sort().values) for i in range(len(layers))
    ]
    cut = copy.deepcopy(model)
    cut_model(cut, adapter, keep)
    sliced = slice_ffn(tmp_path / "dense" / "model.onnx", tmp_path / "probe" / "model.onnx", names, keep)
    check = verify_onnx(cut, tokenizer, sliced)
    assert check.max_abs_diff < FP32_ATOL * max(1.0, check.max_abs_logit)
    assert check.top1_agreement == 1.0
    dense_check = verify_onnx(model, tokenizer, sliced)
    assert dense_check.max_abs_diff > 1e-2  # the slice really changed the graph
    graph = onnx.load(str(sliced)).graph
    read = {name for node in graph.node for name in node.input}
    assert [init.name for init in graph.initializer if init.name not in read] == []  # replaced biases dropped


def test_head_cuts_are_refused(llama, tokenizer, tmp_path):
    keep = [LayerKeep(heads=torch.tensor([0, 1, 4, 5]))] + [LayerKeep()] * 3
    with pytest.raises(EdgepruneError, match="export the probe in full"):
        slice_ffn(tmp_path / "missing.onnx", tmp_path / "out.onnx", [], keep)

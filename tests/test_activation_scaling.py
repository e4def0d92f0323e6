"""Activation-aware scaling (export/activation_scaling.py): exact in float, and it lowers ONNX Runtime's int4
rounding error where an input channel's activations are large."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_llama
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.export.activation_scaling import (
    ChannelStats,
    ScaleGroup,
    activation_scaled,
    fold_scale,
    scaling_applies,
    search_scale,
)
from edgeprune.export.bit_allocation import rounding_error
from edgeprune.models import adapter_for


@pytest.mark.parametrize("biases", [False, True])
def test_scaled_llama_computes_the_same_function(biases):
    """Logits of the scaled copy against the unscaled model run in float64: off by no more than float32 itself is
    (the unscaled model in float32, x2 for the scaled weights' own rounding, 2^-24 relative each). alpha 1 forces
    scales far from 1 (0.4..2.6 here) in all four groups, GQA's o_proj included (8 query heads on 2 KV heads):
    a scale folded into the wrong channel moves logits by O(1). With biases (as Qwen2's q/k/v), v's and up's
    biases take the inverse scale too."""
    model = tiny_llama(attention_bias=biases, mlp_bias=biases)
    if biases:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.normal_()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    ids = torch.randint(4, 90, (8, 32), generator=torch.Generator().manual_seed(0))
    scaled, chosen = activation_scaled(model, adapter_for(model.config), ids, block_size=32, alphas=(1.0,))
    assert {c.name for c in chosen} == {"qkv", "gate/up", "down", "o"} and len(chosen) == 4 * 4
    assert all(float(c.scale.max() / c.scale.min()) > 1.5 for c in chosen)
    with torch.no_grad():
        dense32, scaled32 = model(ids).logits, scaled(ids).logits
        dense64 = model.double()(ids).logits
    floor = float((dense32 - dense64).abs().max())
    assert float((scaled32 - dense64).abs().max()) <= 2 * floor
    assert not torch.equal(scaled.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)


def test_scaling_lowers_int4_error_of_an_outlier_channel():
    """A Linear whose input channel 5 is 30x the others (a block of 32 along the input holds it): with the chosen
    scale folded into the Linear and the norm before it, the 4-bit MatMul (ONNX Runtime's rounding, measured
    here on the folded weights, not by the search) is at most half as far from the float one as round-to-nearest
    (measured: alpha 0.4, 0.16 of its squared error)."""
    generator = torch.Generator().manual_seed(0)
    linear, norm = nn.Linear(64, 48, bias=False), nn.RMSNorm(64)
    with torch.no_grad():
        linear.weight.normal_(generator=generator)
    x = torch.randn(512, 64, generator=generator)
    x[:, 5] *= 30
    group = ScaleGroup(0, "qkv", norm, (linear,), torch.arange(64))
    stats = ChannelStats(x.T @ x, x.abs().sum(0), len(x))
    choice = search_scale(group, stats, block_size=32)
    weight = linear.weight.detach().clone()
    float_out = x @ weight.T
    plain = (x @ (weight - rounding_error(weight, 4, 32)).T - float_out).square().sum()
    fold_scale(group, choice.scale)
    folded = linear.weight.detach()
    scaled = ((x * norm.weight.detach()) @ (folded - rounding_error(folded, 4, 32)).T - float_out).square().sum()
    assert choice.alpha > 0 and float(scaled) < 0.5 * float(plain)
    assert choice.error == pytest.approx(float(scaled) / len(x), rel=1e-3)


def test_post_norm_family_is_refused():
    model = tiny_bert()
    with pytest.raises(EdgepruneError, match="pre-norm"):
        activation_scaled(model, adapter_for(model.config), torch.zeros(1, 8, dtype=torch.long), block_size=32)


def test_run_ships_the_scaled_int4_file_its_probe_measured(tmp_path):
    """--activation-scaling in `run`: every int4 probe (unpruned and cut) is quantized from the scaled export, and
    the shipped file is made the same way from the same cut: its divergence is the probe's, and its norms carry
    the folded scales (the dense model's are ones)."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (export --fused needs it)")
    import onnx
    from onnx import numpy_helper

    from edgeprune.budget import Budget
    from tests.conftest import make_tokenizer
    from tests.test_fused import fusable_llama
    from tests.test_run_candidates import run

    folder = tmp_path / "fusable"
    fusable_llama(cut=False).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    calibration = tmp_path / "calib.txt"
    calibration.write_text(" ".join(f"w{(i * 7919) % 40}" for i in range(6000)))
    result = run(folder, calibration, tmp_path / "run", [Budget("params", 100_000)], precision="int4",
                 activation_scaling=True)  # fmt: skip
    probes = [p for p in result.probes if p["precision"] == "int4"]
    assert probes and all("activation scaling" in p["extra"]["method"] for p in probes)
    shipped = next(p for p in probes if p["sparsity"] == result.final["sparsity"])
    assert result.final["sparsity"] > 0 and result.final["divergence"] == pytest.approx(shipped["divergence"])
    graph = onnx.load(str(tmp_path / "run" / "onnx" / "model.onnx")).graph
    norm = next(i for i in graph.initializer if i.name == "model.layers.0.input_layernorm.weight")
    assert not torch.allclose(torch.from_numpy(numpy_helper.to_array(norm).copy()).float(), torch.ones(64))


def test_run_scales_only_four_bit_files_of_families_with_pre_norm_layers():
    """On by default in `run`, so it must pass over what it cannot scale instead of refusing the run: 8-bit files
    and BERT's post-norm layers are rounded as they are."""
    llama, bert = tiny_llama(), tiny_bert()
    assert scaling_applies(llama, adapter_for(llama.config), "int4")
    assert scaling_applies(llama, adapter_for(llama.config), "int4-fit")
    assert not scaling_applies(llama, adapter_for(llama.config), "int8")
    assert not scaling_applies(bert, adapter_for(bert.config), "int4")

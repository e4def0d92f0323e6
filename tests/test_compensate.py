"""Least-squares compensation and OBS selection (edgeprune.compensate) on constructed data and tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from edgeprune.compensate import (
    CompensateOptions,
    Fit,
    Gram,
    checked_refit,
    cut_and_compensate,
    cut_by_obs,
    obs_removal,
    output_error,
    refit,
)
from edgeprune.models import adapter_for
from edgeprune.structure import LayerKeep, cut_model, layer_widths
from tests.conftest import VOCAB, family_names, tiny_model


def calibration(n: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(7, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def random_gram(rows: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, width, generator=gen, dtype=torch.float64)
    gram = Gram.empty(width)
    gram.add(a)
    return a, gram.xtx


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_refit_removing_nothing_is_the_identity():
    _, gram = random_gram(64, 10)
    weight = torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for damping in (0.0, 1e-4, 0.1):
        torch.testing.assert_close(refit(gram, weight, torch.arange(10), damping), weight, rtol=1e-12, atol=1e-12)


def test_refit_is_the_least_squares_solution():
    a, gram = random_gram(64, 10)
    weight = torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    keep = torch.tensor([0, 2, 3, 7, 9])
    expected = torch.linalg.lstsq(a[:, keep], a @ weight.T).solution.T
    torch.testing.assert_close(refit(gram, weight, keep, 0.0), expected, rtol=1e-9, atol=1e-9)


def make_neuron_a_multiple(model, adapter, layer: int, copy_of: int, removed: int) -> None:
    """FFN neuron `removed` of `layer` becomes exactly 2 × (Llama) or 1 × (BERT) neuron `copy_of`."""
    block = adapter.layers(model)[layer]
    with torch.no_grad():
        inputs = adapter.ffn_inputs(block)
        for linear in inputs:
            linear.weight[removed] = linear.weight[copy_of]
            if linear.bias is not None:
                linear.bias[removed] = linear.bias[copy_of]
        if len(inputs) == 2:  # SwiGLU act(gate) * up: doubling the up row doubles the activation
            inputs[1].weight[removed] *= 2


def gram_of(a: torch.Tensor) -> torch.Tensor:
    gram = Gram.empty(a.shape[1])
    gram.add(a)
    return gram.xtx


def test_check_keeps_the_plain_cut_when_the_refit_does_worse_on_held_out_windows():
    """On the fitted tokens column 2 copies column 0, so the re-fit moves column 2's weight onto column 0;
    on the check tokens they are independent, where that move doubles the error: the plain cut wins."""
    gen = torch.Generator().manual_seed(0)
    fit, check = (torch.randn(400, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    fit[:, 2] = fit[:, 0]
    weight = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    keep = torch.tensor([0, 1])
    new, damping, error, plain, _ = checked_refit(Fit(gram_of(fit)), Fit(gram_of(check)), weight, keep, (1e-4, 1e-2))
    assert damping is None and error == plain
    torch.testing.assert_close(new, weight[:, keep])
    energy = output_error(gram_of(check), weight, torch.tensor([], dtype=torch.long), None)  # all columns removed
    assert plain == pytest.approx(output_error(gram_of(check), weight, keep, None) / energy, rel=1e-12)
    for d in (1e-4, 1e-2):  # what the guard refused: larger on the check tokens
        assert output_error(gram_of(check), weight, keep, refit(gram_of(fit), weight, keep, d)) / energy > plain


def test_check_takes_the_refit_where_it_holds_on_held_out_windows_and_refits_on_all():
    """Column 2 = column 0 on every token: the re-fit wins the check and is redone on fit + check."""
    gen = torch.Generator().manual_seed(1)
    fit, check = (torch.randn(400, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    fit[:, 2], check[:, 2] = fit[:, 0], check[:, 0]
    weight = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    keep = torch.tensor([0, 1])
    new, damping, error, plain, _ = checked_refit(Fit(gram_of(fit)), Fit(gram_of(check)), weight, keep, (1e-1, 1e-6))
    assert damping == 1e-6 and error < 1e-9 < plain
    torch.testing.assert_close(new, refit(gram_of(fit) + gram_of(check), weight, keep, 1e-6))


def test_a_target_equal_to_the_projections_own_output_gives_the_same_refit_and_errors():
    """C = AᵀT with T = A Wᵀ is G Wᵀ: the explicit-target path must reproduce the own-output path."""
    a, _ = random_gram(80, 10)
    weight = torch.randn(5, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gram = Gram.empty(10)
    gram.add(a, a @ weight.T)
    own, target = Fit(gram.xtx), gram.fit(with_ones=False)
    keep = torch.tensor([0, 2, 3, 7, 9])
    torch.testing.assert_close(target.refit(weight, keep, 1e-2), own.refit(weight, keep, 1e-2), rtol=1e-9, atol=1e-9)
    new = own.refit(weight, keep, 1e-2)
    scale = own.target_energy(weight)
    assert target.target_energy(weight) == pytest.approx(scale, rel=1e-12)
    for candidate in (None, new):  # expanded ‖A_K W'ᵀ − T‖² against the difference form, to rounding of the scale
        expected = own.error(weight, keep, candidate)
        assert target.error(weight, keep, candidate) == pytest.approx(expected, abs=1e-10 * scale)


def test_under_a_dense_target_the_own_output_refit_wins_where_the_target_is_noise_on_few_windows():
    """T = A Wᵀ + noise independent of A: on 30 fitted rows of width 20 the dense-target fit chases the noise;
    on the check rows it does worse than the re-fit to the projection's own output, which the check then takes."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    fit, check = Gram.empty(20), Gram.empty(20)
    for gram, rows in ((fit, 30), (check, 400)):
        a = torch.randn(rows, 20, generator=gen, dtype=torch.float64)
        a[:, 19] = a[:, 0] + 0.1 * a[:, 1]  # the removed column is rebuilt from kept ones
        gram.add(a, a @ weight.T + 3.0 * torch.randn(rows, 4, generator=gen, dtype=torch.float64))
    keep = torch.arange(19)
    target_fit, target_check = fit.fit(with_ones=False), check.fit(with_ones=False)
    new, damping, _, plain, target = checked_refit(target_fit, target_check, weight, keep, (1e-6,), layer_too=True)
    assert target == "layer" and damping == 1e-6
    torch.testing.assert_close(new, refit(fit.xtx + check.xtx, weight, keep, 1e-6))
    alone = checked_refit(target_fit, target_check, weight, keep, (1e-6,))  # without the competitor
    assert alone[4] != "layer" and alone[2] > checked_refit(target_fit, target_check, weight, keep, (1e-6,), True)[2]


@pytest.mark.parametrize("family", family_names())
def test_auto_takes_the_stream_target_from_enough_windows_in_pre_norm_families_only(family):
    from edgeprune.compensate import STREAM_MIN_WINDOWS, resolved_target

    model = tiny_model(family)
    adapter = adapter_for(model.config)
    first = adapter.layers(model)[0]
    pre_norm = adapter.input_norms(first) is not None
    assert resolved_target("auto", STREAM_MIN_WINDOWS - 1, adapter, first) == "layer"
    assert resolved_target("auto", STREAM_MIN_WINDOWS, adapter, first) == ("stream" if pre_norm else "layer")
    assert resolved_target("stream", 1, adapter, first) == ("stream" if pre_norm else "layer")
    assert resolved_target("layer", 10 * STREAM_MIN_WINDOWS, adapter, first) == "layer"


def stream_after(model, adapter, layer: int, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]


def test_stream_target_brings_the_stream_closer_to_the_dense_model_than_the_layer_target():
    """FFN cuts in layers 0 and 1. Layer 0 sees no drift, so both targets fit the same weights there; at layer 1
    the dense target is the least-squares fit of exactly the stream error it is scored on (no ridge, no check),
    so its stream after layer 1 is closer to the dense model's, on the fitted tokens, than the layer target's."""
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    ids = calibration()
    width = adapter.widths(adapter.layers(model)[0]).ffn
    keep = [LayerKeep() for _ in adapter.layers(model)]
    keep[0].ffn, keep[1].ffn = torch.arange(0, width, 2), torch.arange(1, width, 3)
    cut = {}
    for target in ("layer", "stream"):
        cut[target] = copy.deepcopy(model)
        options = CompensateOptions(dampings=(0.0,), check_fraction=0.0, target=target)
        cut_and_compensate(cut[target], adapter, keep, ids, options)
    first = [adapter.ffn_output(adapter.layers(cut[t])[0]).weight for t in ("layer", "stream")]
    torch.testing.assert_close(first[0], first[1], rtol=1e-4, atol=1e-5 * float(first[0].abs().max()))
    dense = stream_after(model, adapter, 1, ids)
    error = {t: float((stream_after(cut[t], adapter, 1, ids) - dense).square().sum()) for t in cut}
    assert error["stream"] < error["layer"]


@pytest.mark.parametrize("family", family_names())
def test_removed_neuron_that_is_a_multiple_of_a_kept_one_is_rebuilt(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    make_neuron_a_multiple(model, adapter, layer=1, copy_of=3, removed=10)
    ids = calibration()
    dense = logits(model, ids)
    width = adapter.widths(adapter.layers(model)[1]).ffn
    keep = [LayerKeep() for _ in adapter.layers(model)]
    keep[1].ffn = torch.tensor([i for i in range(width) if i != 10])
    plain = copy.deepcopy(model)
    cut_model(plain, adapter, keep)
    cut_and_compensate(model, adapter, keep, ids, CompensateOptions(dampings=(0.0,)))
    assert adapter.widths(adapter.layers(model)[1]).ffn == width - 1
    scale = dense.abs().max()
    assert (logits(model, ids) - dense).abs().max() < 1e-4 * scale
    assert (logits(plain, ids) - dense).abs().max() > 1e-2 * scale  # the neuron did matter


@pytest.mark.parametrize("kind", ["ffn", "heads"])
@pytest.mark.parametrize("family", family_names())
def test_refit_lowers_the_cut_projection_error_on_calibration_tokens(family, kind):
    """The kept weights are one candidate of the least-squares fit, so the fit can only be closer."""
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    projection = adapter.ffn_output if kind == "ffn" else adapter.head_output
    ids = calibration()
    block = adapter.layers(model)[1]
    now = adapter.widths(block)
    keep = [LayerKeep() for _ in adapter.layers(model)]
    if kind == "ffn":
        keep[1].ffn = torch.arange(0, now.ffn, 2)
    else:  # one query head per KV group goes (Llama: 8 heads in 2 groups; BERT: head 0 of 4)
        group = now.heads // now.kv_heads
        keep[1].heads = torch.tensor([h for h in range(now.heads) if h % group != 0 or (group == 1 and h > 0)])
    outputs = {}
    for name in ("dense", "plain", "refit"):
        m = copy.deepcopy(model)
        if name == "plain":
            cut_model(m, adapter, keep)
        elif name == "refit":  # fitted on all windows, none held back to check
            cut_and_compensate(m, adapter, keep, ids, CompensateOptions(dampings=(1e-4,), check_fraction=0.0))
        seen = []
        hook = projection(adapter.layers(m)[1]).register_forward_hook(lambda _m, _a, out, s=seen: s.append(out))
        logits(m, ids)
        hook.remove()
        outputs[name] = seen[0]
    error = {name: (outputs[name] - outputs["dense"]).pow(2).sum() for name in ("plain", "refit")}
    assert error["refit"] < 0.9 * error["plain"]


def test_obs_removes_a_redundant_unit_first():
    """Column 5 = column 0 + column 1: any of the three is rebuilt exactly from the others, so OBS drops one
    of them first, though the variance × norm ranking (FLAP's) would drop the quiet column 2."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    a[:, 2] *= 0.3
    a[:, 5] = a[:, 0] + a[:, 1]
    gram = Gram.empty(6)
    gram.add(a)
    weight = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    weight /= weight.norm(dim=0)
    fluctuation = a.var(0) * weight.pow(2).sum(0)
    assert int(fluctuation.argmin()) == 2
    first, _ = obs_removal(gram.xtx, weight, torch.arange(6)[:, None], 1, damping=1e-8)
    assert int(first[0]) in (0, 1, 5)
    keep = torch.tensor([i for i in range(6) if i != int(first[0])])
    rebuilt = a[:, keep] @ refit(gram.xtx, weight, keep, 0.0).T
    torch.testing.assert_close(rebuilt, a @ weight.T, rtol=1e-8, atol=1e-8)


def test_obs_keeps_equal_heads_per_kv_group_and_drops_a_duplicated_head():
    """Head 1's output duplicates head 0's (both in KV group 0): one of them goes, and every group keeps two."""
    gen = torch.Generator().manual_seed(0)
    hd, n_heads = 4, 6
    a = torch.randn(300, n_heads * hd, generator=gen, dtype=torch.float64)
    a[:, hd : 2 * hd] = a[:, :hd]
    gram = Gram.empty(n_heads * hd)
    gram.add(a)
    weight = torch.randn(8, n_heads * hd, generator=gen, dtype=torch.float64)
    units = torch.arange(n_heads * hd).reshape(n_heads, hd)
    groups = torch.arange(n_heads) // 3
    order, _ = obs_removal(gram.xtx, weight, units, 2, 1, 1e-8, groups, per_group_keep=2)
    assert int(order[0]) in (0, 1)
    assert sorted(int(groups[h]) for h in order) == [0, 1]


@pytest.mark.parametrize("family", family_names())
def test_obs_cut_reaches_the_planned_widths(family):
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    plan = layer_widths(model, adapter)
    for i in (1, 2):
        w = plan[i]
        heads = w.heads - (w.kv_heads if family == "llama" else 1)  # BERT: every head is its own KV head
        plan[i] = type(w)(ffn=w.ffn - 30, heads=heads, kv_heads=w.kv_heads if family == "llama" else heads)
    keep = cut_by_obs(model, adapter, plan, calibration()).keep
    assert layer_widths(model, adapter) == plan
    assert keep[0].ffn is None and keep[1].ffn is not None and len(keep[1].ffn) == plan[1].ffn
    assert torch.isfinite(logits(model, calibration())).all()


def test_prune_cli_compensates_by_default_and_selects_by_obs(saved_llama, tmp_path):
    from click.testing import CliRunner

    from edgeprune.checkpoint import load_pruned, read_provenance
    from edgeprune.cli import main

    def prune(*args: str):
        return CliRunner().invoke(main, ["prune", str(saved_llama), "--sparsity", "0.3", "--calib-samples", "4", *args])

    result = prune("--selection", "obs", "-o", str(tmp_path / "obs"))
    assert result.exit_code == 0, result.output
    # the packaged text gives fewer re-fit windows than the stream target needs: auto re-fits each layer's output
    compensation = read_provenance(tmp_path / "obs")["compensation"]
    assert compensation["selection"] == "obs" and compensation["target"] == "layer" and compensation["windows"] < 128
    model, _ = load_pruned(tmp_path / "obs")
    widths = model.config.pruned_layer_widths["intermediate_size"]
    assert widths[0] == widths[-1] == 96 and min(widths) < 96  # first and last layers kept whole by default
    result = prune("--refit-target", "stream", "--refit-windows", "4", "-o", str(tmp_path / "stream"))
    assert result.exit_code == 0, result.output
    expected = {"selection": "scores", "target": "stream", "windows": 4}
    assert read_provenance(tmp_path / "stream")["compensation"] == expected
    result = prune("--selection", "obs", "--no-compensate", "-o", str(tmp_path / "no"))
    assert result.exit_code == 1 and "drop --no-compensate" in result.output
    for allocation in ("errors", "uniform"):
        result = prune("--allocation", allocation, "--targets", "ffn", "-o", str(tmp_path / allocation))
        assert result.exit_code == 0, result.output
    errors, uniform = (
        load_pruned(tmp_path / name)[0].config.pruned_layer_widths["intermediate_size"]
        for name in ("errors", "uniform")
    )
    assert errors[0] == errors[-1] == 96 and sum(errors) == sum(uniform)  # the same neurons, placed by error


@pytest.mark.parametrize("family", family_names())
def test_dense_graph_with_the_refit_ffn_written_in_matches_the_compensated_model(family, tokenizer, tmp_path):
    """run's cheap probes: the dense ONNX graph with the cut model's own (re-fit) FFN tensors written in."""
    import onnx

    from edgeprune.export import export_model, verify_onnx
    from edgeprune.export.sliced import ffn_bias_names, ffn_initializer_names, write_ffn

    model = tiny_model(family)
    adapter = adapter_for(model.config)
    export_model(model, tokenizer, tmp_path / "dense")
    graph = onnx.load(str(tmp_path / "dense" / "model.onnx")).graph
    names = ffn_initializer_names(model, adapter, graph)
    biases = ffn_bias_names(names, graph)
    gen = torch.Generator().manual_seed(0)
    keep = [LayerKeep(ffn=torch.randperm(96, generator=gen)[: 30 + 10 * i].sort().values) for i in range(2)]
    keep += [LayerKeep() for _ in adapter.layers(model)[2:]]
    cut = copy.deepcopy(model)
    cut_and_compensate(cut, adapter, keep, calibration(length=16))
    written = write_ffn(
        tmp_path / "dense" / "model.onnx", tmp_path / "probe" / "model.onnx", names, biases, cut, adapter
    )
    check = verify_onnx(cut, tokenizer, written)
    assert check.max_abs_diff < 1e-4 * max(1.0, check.max_abs_logit)
    plain = copy.deepcopy(model)
    cut_model(plain, adapter, keep)
    assert verify_onnx(plain, tokenizer, written).max_abs_diff > 1e-3  # the re-fit values are in the graph


def test_error_allocation_takes_more_from_the_layer_that_rebuilds_itself(llama):
    """Layer 2's neurons 48..95 copy neurons 0..47 (same gate, doubled up rows): half its FFN can go for
    no error after the re-fit, so the error allocation removes more there than the uniform plan does."""
    from edgeprune.compensate import allocate_by_errors

    adapter = adapter_for(llama.config)
    for j in range(48):
        make_neuron_a_multiple(llama, adapter, layer=2, copy_of=j, removed=48 + j)
    plan = layer_widths(llama, adapter)
    plan = [
        type(w)(ffn=w.ffn - 24 if i in (1, 2) else w.ffn, heads=w.heads, kv_heads=w.kv_heads)
        for i, w in enumerate(plan)
    ]
    allocated = allocate_by_errors(llama, adapter, calibration(), plan, options=CompensateOptions(allocation_batch=4))
    assert sum(w.ffn for w in allocated) == sum(w.ffn for w in plan)
    assert allocated[2].ffn <= 96 - 40 and allocated[1].ffn > plan[1].ffn
    assert allocated[0].ffn == allocated[3].ffn == 96

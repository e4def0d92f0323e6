"""The mutual-information criterion: estimator identities, redundancy behaviour, shapes, determinism."""

from __future__ import annotations

import pytest
import torch

from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.criteria.base import parse_options
from edgeprune.criteria.mi import (
    MIOptions,
    cluster_mi,
    entropy_and_mi,
    exact_entropies,
    exact_mi,
    ffn_output_info,
    kernel_widths,
    position_pairs,
    redundancy_order,
    renyi2_entropy,
    renyi2_sums,
)
from edgeprune.errors import EdgepruneError
from edgeprune.models import adapter_for
from tests.conftest import VOCAB


def random_layer(n: int = 40, m: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_alpha2_identity_matches_eigenvalues():
    z = random_layer()
    sigma = kernel_widths(z, "silverman", "neuron", 1.0)
    s, _ = renyi2_sums(z, sigma, pairs=False)
    assert torch.allclose(renyi2_entropy(s, z.shape[0]), exact_entropies(z, sigma, 2.0), atol=1e-6, rtol=0)
    fast = cluster_mi(z, sigma, 2.0)
    iu, ju = torch.triu_indices(6, 6, 1)
    exact = exact_mi(z, sigma, 2.0, torch.stack([iu, ju], 1))
    assert (fast[iu, ju] - exact).abs().max() < 1e-6


def test_clustered_mi_is_the_full_matrix_within_clusters():
    z = random_layer(32, 8)
    sigma = kernel_widths(z, "median", "layer", 1.0)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
    ent, mi = entropy_and_mi(z, sigma, 2.0, True, labels)
    full = cluster_mi(z, sigma, 2.0)
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(8, dtype=torch.bool)
    assert torch.allclose(mi[same], full[same]) and torch.isinf(mi[~same]).all()
    assert torch.allclose(ent, exact_entropies(z, sigma, 2.0), atol=1e-9)


def test_sampled_pairs_estimate_the_full_sums():
    z = torch.randn(512, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sigma = kernel_widths(z, "median", "layer", 1.0)
    full, _ = renyi2_sums(z, sigma, pairs=False)
    sample = position_pairs(512, 20_000, torch.Generator().manual_seed(0))
    assert len(sample[0]) == 20_000
    estimate, _ = renyi2_sums(z, sigma, pairs=False, sample=sample)
    # 20,000 of 130,816 pairs: entropies within 3% of the all-pairs value (measured at most 1.5%)
    assert torch.allclose(renyi2_entropy(estimate, 512), renyi2_entropy(full, 512), rtol=0.03)


def test_output_info_fast_path_matches_eigenvalues():
    z, w = random_layer(30, 5), random_layer(4, 5, seed=1).T.reshape(4, 5)
    fast = ffn_output_info(z, w, MIOptions())
    exact = ffn_output_info(z, w, MIOptions(alpha=2.0 + 1e-12))  # any α != 2 takes the eigenvalue path
    assert (fast - exact).abs().max() < 1e-6


def test_identical_neurons_have_maximal_mi_and_one_goes_first():
    z = random_layer(48, 5)
    z[:, 3] = z[:, 1]
    sigma = kernel_widths(z, "median", "layer", 1.0)
    mi = cluster_mi(z, sigma, 2.0).fill_diagonal_(-torch.inf)
    assert mi.reshape(-1).argmax() in (1 * 5 + 3, 3 * 5 + 1)
    s, _ = renyi2_sums(z, sigma, pairs=False)
    first = int(redundancy_order(mi, renyi2_entropy(s, 48))[0])
    assert first in (1, 3)


def test_independent_neurons_have_mi_near_zero():
    z = torch.randn(256, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = kernel_widths(z, "median", "neuron", 1.0)
    s, _ = renyi2_sums(z, sigma, pairs=False)
    mi = cluster_mi(z, sigma, 2.0).fill_diagonal_(0)
    entropy = renyi2_entropy(s, 256)
    # tolerance: the estimator's bias at n=256 stays under 5% of a neuron's entropy (measured 2.2%);
    # an identical pair scores about 30% of it (the Hadamard square is the Gram at width σ/√2)
    assert mi.abs().max() < 0.05 * entropy.min()
    twin = torch.cat([z[:, :1], z[:, :1]], 1)
    assert cluster_mi(twin, sigma[:2], 2.0)[0, 1] > 0.2 * entropy.min()


def calibration(n_seq: int = 4, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(7, VOCAB, (n_seq, seq_len), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("selection", ["output-info", "conditional", "entropy", "mrmr", "redundancy", "paper"])
def test_one_finite_score_per_group_on_tiny_llama(llama, selection):
    adapter = adapter_for(llama.config)
    options = {"selection": selection, "n_positions": 48, "seeds": 2, "clusters": 2}
    scores = score_groups("mi", llama, adapter, ScoringInputs(calibration=calibration(), options=options))
    assert [len(s) for s in scores.ffn] == [96] * 4
    assert [len(s) for s in scores.heads] == [8] * 4
    assert all(torch.isfinite(s).all() for s in scores.ffn + scores.heads)


def test_one_finite_score_per_group_on_tiny_bert(bert):
    adapter = adapter_for(bert.config)
    inputs = ScoringInputs(calibration=calibration(), options={"n_positions": 48})
    scores = score_groups("mi", bert, adapter, inputs)
    assert [len(s) for s in scores.ffn] == [96] * 3
    assert [len(s) for s in scores.heads] == [4] * 3
    assert all(torch.isfinite(s).all() for s in scores.ffn + scores.heads)


def test_same_seed_same_scores(llama):
    adapter = adapter_for(llama.config)
    options = {"selection": "paper", "n_positions": 40, "seeds": 2}

    def run(seed: int):
        return score_groups("mi", llama, adapter, ScoringInputs(calibration=calibration(), seed=seed, options=options))

    a, b = run(0), run(0)
    assert all(torch.equal(x, y) for x, y in zip(a.ffn + a.heads, b.ffn + b.heads, strict=True))


def test_bad_option_is_a_user_error():
    with pytest.raises(EdgepruneError, match="unknown mi option"):
        parse_options("mi", {"widht_rule": "median"})
    with pytest.raises(EdgepruneError, match="width_rule"):
        parse_options("mi", {"width_rule": "scott"})


def test_conditional_information_scores_a_rebuildable_neuron_lowest():
    """Neuron 4 = neuron 0 + neuron 1 carries the most output on its own, but the kept ones rebuild it:
    plain output information keeps it, conditional information (what the re-fit cannot rebuild) does not."""
    from edgeprune.compensate import Gram
    from edgeprune.criteria.mi import conditional_residuals

    z = random_layer(256, 5, seed=2)
    z[:, 2:4] *= 0.5  # quiet, independent neurons: what a contribution ranking drops first
    z[:, 4] = z[:, 0] + z[:, 1]
    gram = Gram.empty(5)
    gram.add(z)
    w = torch.ones(3, 5, dtype=torch.float64)
    opts = MIOptions(gamma=1.0)
    # S(y | y) is not 0 for the matrix-based estimator (K∘K is the Gram at a narrower width): that is the floor
    floor = float(ffn_output_info(z, w, opts, removed=torch.zeros_like(z))[0])
    plain = ffn_output_info(z, w, opts) - floor
    conditional = ffn_output_info(z, w, opts, removed=conditional_residuals(z, gram.xtx, damping=1e-8)) - floor
    assert int(plain.argmin()) in (2, 3) and int(plain.argmax()) == 4
    assert int(conditional.argmin()) in (0, 1, 4) and float(conditional.min()) < 1e-3 * float(plain.min())


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([torch.argsort(torch.argsort(x)).double() for x in (a, b)])
    return float(torch.corrcoef(ranks)[0, 1])


def test_conditional_scores_rank_like_the_residual_contribution_at_layer_size():
    """With a few hundred neurons each residual moves the output kernel (nearly flat at the default γ = 16)
    by parts per billion: in float32 the pair sums round that away and the scores are noise (rank correlation
    with ‖w_k‖²·Var(r_k), what they approximate, about -0.1 here); computed in float64 they follow it."""
    from edgeprune.compensate import Gram
    from edgeprune.criteria.mi import conditional_residuals, ffn_layer_orders

    z = random_layer(1024, 256, seed=3).relu()
    gram = Gram.empty(256)
    gram.add(z)
    w = 0.02 * random_layer(64, 256, seed=6)
    scores = ffn_layer_orders(z, w, MIOptions(selection="conditional"), torch.Generator().manual_seed(0), gram.xtx)[0]
    contribution = conditional_residuals(z, gram.xtx).var(0) * w.square().sum(0)
    assert rank_correlation(scores, contribution) > 0.4

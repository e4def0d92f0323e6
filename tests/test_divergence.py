"""Held-out divergence of an exported candidate from the dense model (what the budget search ranks by)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from edgeprune.evaluate import perplexity
from edgeprune.evaluate.divergence import heldout_divergence
from edgeprune.export import export_model
from tests.conftest import VOCAB, make_tokenizer, tiny_bert, tiny_llama

SEQ = 16


@pytest.fixture(scope="module")
def heldout() -> torch.Tensor:
    return torch.randint(7, VOCAB, (6 * SEQ + 5,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny Llama and a perturbed copy (every weight jittered), each exported; and the tiny BERT."""
    root = tmp_path_factory.mktemp("divergence")
    dense = tiny_llama()
    perturbed = copy.deepcopy(dense)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bert = tiny_bert()
    files = {}
    for name, model in (("dense", dense), ("perturbed", perturbed), ("bert", bert)):
        files[name] = export_model(model, make_tokenizer(), root / name).path / "model.onnx"
    return dense, perturbed, bert, files


def test_the_dense_export_does_not_diverge_from_itself(exports, heldout):
    dense, _, _, files = exports
    result = heldout_divergence(files["dense"], dense, heldout, seq_len=SEQ)
    assert result.windows == 6 and result.tokens == 6 * SEQ and result.measure == "kl"
    # ORT's and PyTorch's float32 logits differ by ~1e-6 (reduction order); KL grows with the square of such a
    # change (~1e-12) and is summed in float64, so |mean| stays far below 1e-6; a real difference is orders of
    # magnitude larger (below)
    assert abs(result.mean) < 1e-6
    assert result.top1_agreement == 1.0
    assert result.perplexity == pytest.approx(perplexity(dense, heldout[: 6 * SEQ], seq_len=SEQ), rel=1e-5)
    assert result.dense_perplexity == pytest.approx(result.perplexity, rel=1e-5)


def test_divergence_of_a_changed_model_is_its_kl_from_dense(exports, heldout):
    dense, perturbed, _, files = exports
    result = heldout_divergence(files["perturbed"], dense, heldout, seq_len=SEQ, batch_size=4)
    windows = heldout[: 6 * SEQ].view(6, SEQ)
    with torch.no_grad():
        log_p = F.log_softmax(dense(input_ids=windows).logits[:, :-1], -1)
        log_q = F.log_softmax(perturbed(input_ids=windows).logits[:, :-1], -1)
    per_window = (log_p.exp() * (log_p - log_q)).sum(-1).mean(1)
    assert result.mean == pytest.approx(float(per_window.mean()), rel=1e-4)
    assert result.stderr == pytest.approx(float(per_window.std() / math.sqrt(6)), rel=1e-3)
    assert result.mean > 10 * result.stderr > 0
    assert result.perplexity == pytest.approx(perplexity(perturbed, heldout[: 6 * SEQ], seq_len=SEQ), rel=1e-5)


def test_encoder_divergence_is_one_minus_cosine(exports, heldout):
    _, _, bert, files = exports
    same = heldout_divergence(files["bert"], bert, heldout, seq_len=SEQ)
    assert same.measure == "1-cosine" and same.perplexity is None
    assert abs(same.mean) < 1e-6

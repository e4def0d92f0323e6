"""How far an exported candidate is from the dense model, on held-out text, through ONNX Runtime.

The budget search ranks candidates that differ by a few percent of perplexity; perplexity on
the packaged text's ~1,700 held-out tokens is too noisy for that (its own spread between
windows is larger than the differences). The divergence of each candidate's next-token
distribution from the dense model's, on the same tokens, is paired: both models see the same
windows, so the text's own difficulty cancels. Reported per token as a mean with the
standard error across windows (windows, not tokens, are the independent units).

Decoders: KL(dense || candidate) in nats per predicted token, plus the candidate's perplexity
and top-1 agreement from the same logits. Encoders (hidden states): 1 - cosine similarity
of each token's output vector, averaged the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgeprune.evaluate.perplexity import window_starts
from edgeprune.runtime import OnnxModel


@dataclass(frozen=True)
class Divergence:
    """A candidate file against the dense PyTorch model on held-out windows."""

    mean: float  # KL nats/token (decoders) or 1 - cosine (encoders); 0 for an identical model
    stderr: float  # standard error of `mean` across windows
    measure: str  # "kl" or "1-cosine"
    perplexity: float | None  # the candidate's own, on the same predictions (decoders)
    dense_perplexity: float | None
    top1_agreement: float | None  # next-token argmax equal to dense's (decoders)
    windows: int
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def windows_of(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping full windows [n, seq_len] of a 1-D token stream."""
    starts = window_starts(len(tokens), seq_len, seq_len)
    if not starts:
        raise ValueError(f"need at least {seq_len} held-out tokens for one window, got {len(tokens)}")
    return torch.stack([tokens[s : s + seq_len] for s in starts])


def dense_output(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, else the last hidden state (what the exported graph's first output is)."""
    with torch.no_grad():
        out = model(input_ids=batch, attention_mask=torch.ones_like(batch))
    found = getattr(out, "logits", None)
    return (found if found is not None else out.last_hidden_state).float()


def candidate_output(onnx: OnnxModel, batch: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(onnx.forward(batch.numpy()))).float()


def decoder_window_stats(dense: torch.Tensor, cand: torch.Tensor, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per window: mean KL over predicted positions, the candidate's and dense's NLL sums, top-1 matches."""
    log_p = F.log_softmax(dense[:, :-1], dim=-1)
    log_q = F.log_softmax(cand[:, :-1], dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [windows, positions]
    targets = batch[:, 1:]
    return {
        "divergence": kl.mean(1),
        "nll": -log_q.gather(-1, targets[..., None]).squeeze(-1).sum(1),
        "dense_nll": -log_p.gather(-1, targets[..., None]).squeeze(-1).sum(1),
        "agree": (log_p.argmax(-1) == log_q.argmax(-1)).float().mean(1),
    }


def encoder_window_stats(dense: torch.Tensor, cand: torch.Tensor) -> dict[str, torch.Tensor]:
    distance = 1 - F.cosine_similarity(dense, cand, dim=-1)  # [windows, positions]
    return {"divergence": distance.mean(1)}


def heldout_divergence(
    onnx_path: Path,
    dense: nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 128,
    batch_size: int = 4,
    threads: int | None = None,
) -> Divergence:
    """Divergence of the ONNX file at `onnx_path` from `dense` on `tokens` cut into `seq_len` windows."""
    onnx = OnnxModel(onnx_path, threads)
    windows = windows_of(tokens, seq_len)
    per_window: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        reference, cand = dense_output(dense, batch), candidate_output(onnx, batch)
        if onnx.is_decoder:
            stats = decoder_window_stats(reference, cand, batch)
        else:
            stats = encoder_window_stats(reference, cand)
        for key, value in stats.items():
            per_window.setdefault(key, []).append(value)
    merged = {key: torch.cat(values).double() for key, values in per_window.items()}
    values = merged["divergence"]
    n = len(values)
    stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    predicted = n * (seq_len - 1)
    is_decoder = "nll" in merged
    return Divergence(
        mean=float(values.mean()),
        stderr=stderr,
        measure="kl" if is_decoder else "1-cosine",
        perplexity=math.exp(float(merged["nll"].sum()) / predicted) if is_decoder else None,
        dense_perplexity=math.exp(float(merged["dense_nll"].sum()) / predicted) if is_decoder else None,
        top1_agreement=float(merged["agree"].mean()) if is_decoder else None,
        windows=n,
        tokens=n * seq_len,
    )

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

from edgeprune.evaluate.perplexity import window_starts
from edgeprune.runtime import OnnxModel
from edgeprune.window_stats import window_stats


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


def dense_output(model: nn.Module, batch: torch.Tensor) -> np.ndarray:
    """Logits of a causal LM, else the last hidden state (what the exported graph's first output is)."""
    with torch.no_grad():
        out = model(input_ids=batch, attention_mask=torch.ones_like(batch))
    found = getattr(out, "logits", None)
    return (found if found is not None else out.last_hidden_state).float().numpy()


def summarize(per_window: dict[str, np.ndarray], seq_len: int) -> Divergence:
    """The per-window statistics (edgeprune.window_stats, here or from a board) as one Divergence."""
    merged = {key: np.asarray(values, dtype=np.float64) for key, values in per_window.items()}
    values = merged["divergence"]
    n = len(values)
    stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
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


def heldout_divergence(
    onnx_path: Path,
    dense: nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 128,
    batch_size: int = 4,
    threads: int | None = None,
) -> Divergence:
    """Divergence of the ONNX file at `onnx_path` from `dense` on `tokens` cut into `seq_len` windows."""
    onnx = OnnxModel(onnx_path, threads, prepacked=False)  # quality reads the file; a copy computes the same
    windows = windows_of(tokens, seq_len)
    per_window: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        ids = batch.numpy()
        stats = window_stats(dense_output(dense, batch), onnx.forward(ids), ids, onnx.is_decoder)
        for key, value in stats.items():
            per_window.setdefault(key, []).append(value)
    return summarize({key: np.concatenate(values) for key, values in per_window.items()}, seq_len)

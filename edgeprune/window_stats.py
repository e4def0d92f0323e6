"""Per-window statistics of a candidate model's outputs against a reference's, on the same token windows.

numpy only (no torch): the held-out divergence on this machine (evaluate/divergence.py, reference = the
dense PyTorch model) and on a board (the runner's `divergence` task, reference = the dense ONNX file run
there) are the same arithmetic. Each window is reduced in float64, one at a time, so a 49k-word vocabulary
costs tens of MB, not a batch's worth.
"""

from __future__ import annotations

import numpy as np

COSINE_EPS = 1e-8  # norms below this are clamped, as torch's cosine_similarity does


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def decoder_window_stats(reference: np.ndarray, candidate: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per window ([windows, positions, vocab] logits, [windows, positions] ids): mean KL(reference || candidate)
    over the predicted positions, the candidate's and the reference's NLL sums, and the top-1 agreement."""
    stats: dict[str, list[float]] = {"divergence": [], "nll": [], "dense_nll": [], "agree": []}
    for ref, cand, row in zip(reference, candidate, ids, strict=True):
        log_p, log_q = log_softmax(ref[:-1]), log_softmax(cand[:-1])
        targets, positions = row[1:], np.arange(len(row) - 1)
        stats["divergence"].append(float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean()))
        stats["nll"].append(float(-log_q[positions, targets].sum()))
        stats["dense_nll"].append(float(-log_p[positions, targets].sum()))
        stats["agree"].append(float((log_p.argmax(-1) == log_q.argmax(-1)).mean()))
    return {key: np.asarray(values) for key, values in stats.items()}


def encoder_window_stats(reference: np.ndarray, candidate: np.ndarray) -> dict[str, np.ndarray]:
    """Per window ([windows, positions, hidden]): the mean over positions of 1 - cosine similarity."""
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    norms = np.maximum(np.linalg.norm(ref, axis=-1), COSINE_EPS) * np.maximum(np.linalg.norm(cand, axis=-1), COSINE_EPS)
    return {"divergence": (1 - (ref * cand).sum(-1) / norms).mean(1)}


def window_stats(reference: np.ndarray, candidate: np.ndarray, ids: np.ndarray, decoder: bool) -> dict[str, np.ndarray]:
    return decoder_window_stats(reference, candidate, ids) if decoder else encoder_window_stats(reference, candidate)

"""ONNX Runtime against PyTorch on real tokenized text: max abs logit difference and top-1 agreement.

Decoders are checked the way they are deployed: the whole text through the graph with an
empty cache, and the last tokens again one at a time through the KV cache. A model saved
without a tokenizer is checked on seeded random token ids: the graph computes the same
function whatever the ids mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgeprune.errors import EdgepruneError
from edgeprune.runtime import CacheDecoder, OnnxModel

VERIFY_TEXT = (
    "Structured pruning removes whole neurons and attention heads, so the pruned network is a smaller "
    "dense network. The capital of France is Paris, and the river that runs through it is the Seine. "
    "On a Raspberry Pi, every megabyte of weights and every millisecond of latency counts."
)
MAX_TOKENS = 64
CACHE_STEPS = 8


@dataclass
class Verification:
    """How closely an ONNX file reproduces the PyTorch model on the verification text."""

    onnx_file: str
    max_abs_diff: float
    top1_agreement: float
    positions: int
    max_abs_logit: float
    cache_steps: int

    def as_dict(self) -> dict:
        return asdict(self)


def reference_output(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
    """The PyTorch output the ONNX graph's first output corresponds to (logits, else last hidden state)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    tensor = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return tensor.float().numpy()


def verification_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, text: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of `text`, or seeded random ids when there is no tokenizer."""
    if tokenizer is not None:
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_TOKENS)
        return encoded["input_ids"], encoded["attention_mask"]
    length = min(MAX_TOKENS, getattr(model.config, "max_position_embeddings", None) or MAX_TOKENS)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def decoder_outputs(onnx: OnnxModel, ids: np.ndarray, steps: int) -> np.ndarray:
    """Full-sequence logits, then the last `steps` positions again as generation computes them (`CacheDecoder`).

    The prefix is prefilled asking for its last logits only, then tokens go one at a time
    through the KV cache; the result is [full positions..., positions L-steps-1 .. L-2].
    """
    full = onnx.forward(ids)
    prefix = ids.shape[1] - steps
    decoder = CacheDecoder(onnx, ids.shape[0], ids.shape[1])  # the cache path `generate` and the profiler take
    stepped = [decoder.feed(ids[:, :prefix])]
    stepped += [decoder.feed(ids[:, pos : pos + 1]) for pos in range(prefix, ids.shape[1] - 1)]
    return np.concatenate([full, *stepped], axis=1)


def verify_onnx(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    onnx_path: Path,
    text: str = VERIFY_TEXT,
    threads: int | None = None,
) -> Verification:
    """Compare ORT with PyTorch on `text` (random ids without a tokenizer; the cache path too, for decoders)."""
    onnx = OnnxModel(onnx_path, threads=threads, prepacked=False)  # the file itself is what is verified
    ids, mask = verification_ids(model, tokenizer, text)
    reference = reference_output(model, ids, mask)
    if onnx.is_decoder:
        steps = min(CACHE_STEPS, ids.shape[1] - 1)
        got = decoder_outputs(onnx, ids.numpy(), steps)
        reference = np.concatenate([reference, reference[:, ids.shape[1] - steps - 1 : -1]], axis=1)
    else:
        steps = 0
        got = onnx.forward(ids.numpy(), mask.numpy())
    if got.shape != reference.shape:
        raise EdgepruneError(f"{onnx_path} outputs shape {got.shape}, PyTorch {reference.shape}: re-export the model")
    return Verification(
        onnx_file=Path(onnx_path).name,
        max_abs_diff=float(np.abs(got - reference).max()),
        top1_agreement=float((got.argmax(-1) == reference.argmax(-1)).mean()),
        positions=int(got.shape[0] * got.shape[1]),
        max_abs_logit=float(np.abs(reference).max()),
        cache_steps=steps,
    )

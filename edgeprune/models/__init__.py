"""Model-family adapters: one file per family, registered by `config.model_type`.

`adapter_for` finds a model's adapter through the registry; `model_kind` is the one answer to
"what kind of model is this" (its loss, its export task, whether it is recovered by distillation).
"""

from __future__ import annotations

from transformers import PretrainedConfig

from edgeprune.models import bert, llama  # noqa: F401  (registration)
from edgeprune.models.base import CAUSAL_LM, ENCODER, FAMILIES, FamilyAdapter, LayerWidths, family_for

MASKED_LM = "masked-lm"
CLASSIFIER = "sequence-classifier"
KINDS = (CAUSAL_LM, MASKED_LM, CLASSIFIER, ENCODER)
IGNORE = -100  # the label transformers' losses skip: prompt and padding tokens, positions a masked LM keeps
MASK_FRACTION = 0.15  # of the tokens a masked-LM loss hides and predicts (BERT's)


def adapter_for(config: PretrainedConfig, prune_kv_heads: bool = False) -> FamilyAdapter:
    """The adapter for a model's family, or a clear refusal naming what is supported."""
    return family_for(config)(prune_kv_heads=prune_kv_heads)


def model_kind(model) -> str:
    """One of KINDS: a `...ForSequenceClassification` of any family (its loss needs task labels), else its
    family's kind when that is a causal LM, else the encoder's head: masked LM or none (a bare encoder)."""
    if type(model).__name__.endswith("ForSequenceClassification"):
        return CLASSIFIER
    if family_for(model.config).kind == CAUSAL_LM:
        return CAUSAL_LM
    return MASKED_LM if model.get_output_embeddings() is not None else ENCODER


__all__ = [
    "CAUSAL_LM",
    "CLASSIFIER",
    "ENCODER",
    "FAMILIES",
    "IGNORE",
    "KINDS",
    "MASK_FRACTION",
    "MASKED_LM",
    "FamilyAdapter",
    "LayerWidths",
    "adapter_for",
    "model_kind",
]

"""Model-family adapters: one file per family, chosen by `config.model_type`."""

from __future__ import annotations

from transformers import PretrainedConfig

from edgeprune.errors import EdgepruneError
from edgeprune.models.base import FamilyAdapter, LayerWidths
from edgeprune.models.bert import BertAdapter
from edgeprune.models.llama import LlamaAdapter

FAMILIES: tuple[type[FamilyAdapter], ...] = (LlamaAdapter, BertAdapter)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for fam in FAMILIES for t in fam.model_types)


def adapter_for(config: PretrainedConfig, prune_kv_heads: bool = False) -> FamilyAdapter:
    """The adapter for a model's family, or a clear refusal naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type in LlamaAdapter.model_types:
        return LlamaAdapter(prune_kv_heads=prune_kv_heads)
    if model_type in BertAdapter.model_types:
        return BertAdapter()
    raise EdgepruneError(
        f"unsupported architecture '{model_type}': edgeprune supports {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def is_decoder(config: PretrainedConfig) -> bool:
    return config.model_type in LlamaAdapter.model_types


def is_sequence_classifier(model) -> bool:
    """A `...ForSequenceClassification` model: its loss needs task labels, not text alone."""
    return type(model).__name__.endswith("ForSequenceClassification")


__all__ = [
    "FamilyAdapter",
    "LayerWidths",
    "SUPPORTED_MODEL_TYPES",
    "adapter_for",
    "is_decoder",
    "is_sequence_classifier",
]

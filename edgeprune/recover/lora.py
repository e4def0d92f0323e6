"""LoRA setup: adapters on every projection (each its pruned layer's own shape), merged back after training."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    PreTrainedModel,
)

from edgeprune.errors import EdgepruneError
from edgeprune.models import CLASSIFIER, adapter_for, model_kind
from edgeprune.recover.config import RecoveryConfig


def auto_targets(model: nn.Module) -> list[str]:
    """Full module names of every FFN and attention projection, found by the family adapter.

    Full names avoid suffix collisions (BERT's `attention.output.dense` vs `output.dense`).
    """
    adapter = adapter_for(model.config)
    wanted = set()
    for layer in adapter.layers(model):
        linears = [
            *adapter.ffn_inputs(layer),
            adapter.ffn_output(layer),
            *adapter.attention_projections(layer).values(),
        ]
        wanted |= {id(lin) for lin in linears}
    return [name for name, module in model.named_modules() if id(module) in wanted]


def lora_config(model: nn.Module, config: RecoveryConfig) -> LoraConfig:
    """`auto`: every projection; `all-linear`: peft's rule; else comma-separated module-name suffixes."""
    if config.targets == "auto":
        targets: list[str] | str = auto_targets(model)
    elif config.targets == "all-linear":
        targets = "all-linear"
    else:
        targets = [t.strip() for t in config.targets.split(",") if t.strip()]
    task = "SEQ_CLS" if model_kind(model) == CLASSIFIER else None  # head in full
    return LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, task_type=task
    )


def attach_lora(model: PreTrainedModel, config: RecoveryConfig) -> PeftModel:
    """The model wrapped by peft with trainable LoRA adapters; each wrap takes its layer's own (pruned) shape."""
    try:
        return get_peft_model(model, lora_config(model, config))
    except ValueError as err:
        raise EdgepruneError(f"--targets {config.targets}: {str(err).splitlines()[0]}") from None


def merge(peft_model: PeftModel) -> PreTrainedModel:
    """The base model with the adapter folded into its weights (no adapter overhead at inference)."""
    return peft_model.merge_and_unload()

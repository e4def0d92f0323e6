"""What training updates: LoRA adapters (merged at the end) or every parameter of the model.

Both expose the same three operations the loop and the checkpoints need: the trainable weights
as CPU tensors (snapshots of the best step, checkpoints), loading them back, and the finished
plain transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import PreTrainedModel

from edgeprune.recover.config import RecoveryConfig
from edgeprune.recover.lora import attach_lora, merge


def cpu_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


@dataclass
class LoraWeights:
    """peft adapters on every projection; `finish` folds them into the weights."""

    module: PeftModel

    def state(self) -> dict[str, torch.Tensor]:
        return cpu_copies(get_peft_model_state_dict(self.module))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        set_peft_model_state_dict(self.module, state)

    def finish(self) -> PreTrainedModel:
        return merge(self.module)


@dataclass
class FullWeights:
    """Every parameter trained (tied weights once, as `named_parameters` lists them)."""

    module: PreTrainedModel

    def state(self) -> dict[str, torch.Tensor]:
        return cpu_copies(dict(self.module.named_parameters()))

    def load(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                param.copy_(state[name])

    def finish(self) -> PreTrainedModel:
        return self.module


def trainable_weights(model: PreTrainedModel, config: RecoveryConfig) -> LoraWeights | FullWeights:
    """The model prepared for `config.method`, in float32 (CPU training)."""
    model = model.float()
    if config.method == "full":
        model.requires_grad_(True)
        return FullWeights(model)
    return LoraWeights(attach_lora(model, config))


def parameters_to_train(weights: LoraWeights | FullWeights) -> list[nn.Parameter]:
    return [p for p in weights.module.parameters() if p.requires_grad]

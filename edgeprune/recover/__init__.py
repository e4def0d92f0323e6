"""Recovery of a pruned model: LoRA (merged back into plain pruned weights) or full-parameter training,
on the LM loss or distilled from the dense teacher.

Flow: `load_recovery_data` (tokenized train / held-out examples, `data`; without user data the
teacher writes the text, `selftext`) -> `recover` (LoRA on every linear projection or every
parameter (`trainable`, `lora`), the LM loss or the KL to the teacher (`teacher`), trained
under `accelerate` (`processes`, `train`), evaluated on the held-out split every K steps, the
best step restored and merged) -> an ordinary transformers model with the same per-layer
widths, saved by `recover_folder` (`folders`) with `checkpoint.save_pruned`; interrupted runs
resume from `checkpoints`. Settings: `config`.
"""

from edgeprune.recover.config import RecoveryConfig
from edgeprune.recover.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE,
    RecoveryData,
    encode_instructions,
    fixed_val_batches,
    load_recovery_data,
)
from edgeprune.recover.folders import recover_folder, work_dir_for
from edgeprune.recover.lora import attach_lora, merge
from edgeprune.recover.processes import process_state
from edgeprune.recover.selftext import SelfTextConfig
from edgeprune.recover.train import RecoveryRecord, RecoveryResult, StepReport, recover, recover_model

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "IGNORE",
    "RecoveryConfig",
    "RecoveryData",
    "RecoveryRecord",
    "RecoveryResult",
    "SelfTextConfig",
    "StepReport",
    "attach_lora",
    "encode_instructions",
    "fixed_val_batches",
    "load_recovery_data",
    "merge",
    "process_state",
    "recover",
    "recover_folder",
    "recover_model",
    "work_dir_for",
]

"""Recovery of a pruned model: LoRA with peft, merged back into plain (pruned) weights.

Flow: `load_recovery_data` (tokenized train / held-out examples, `data`) -> `recover` (attach
LoRA to every linear projection (`lora`), train under `accelerate` (`processes`, `train`),
evaluate on the held-out split every K steps, restore the best step's adapter,
`merge_and_unload`) -> an ordinary transformers model with the same per-layer widths, saved by
`recover_folder` (`folders`) with `checkpoint.save_pruned`; interrupted runs resume from
`checkpoints`.
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
from edgeprune.recover.train import RecoveryResult, recover, recover_model

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "IGNORE",
    "RecoveryConfig",
    "RecoveryData",
    "RecoveryResult",
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

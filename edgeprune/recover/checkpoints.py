"""Resumable checkpoints of a recovery run.

Every `save_every` steps the trained weights (LoRA adapters, or every parameter), the best
step's, the optimizer state, each process's torch RNG state and the step counters are written
to the work folder. Weights and RNG
states are safetensors, counters JSON; the optimizer state dict is a `torch.save` file (tensors
and numbers only, read back with `weights_only=True`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from edgeprune.errors import EdgepruneError
from edgeprune.recover.trainable import FullWeights, LoraWeights

CHECKPOINT, PREVIOUS = "checkpoint", "checkpoint.previous"


@dataclass
class TrainState:
    """Counters that make a run resumable (saved as JSON)."""

    step: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of the (main) training process
    tokens: int = 0  # training tokens over all processes
    best_step: int = 0
    best_loss: float = math.inf
    val_losses: list[list[float]] = field(default_factory=list)
    train_losses: list[list[float]] = field(default_factory=list)


def rng_states() -> dict[str, torch.Tensor]:
    """This process's torch generators (CPU, and the current GPU's when there is one)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def save_checkpoint(
    work: Path, weights: LoraWeights | FullWeights, optimizer, state: TrainState, best: dict, accelerator: Accelerator
) -> None:
    """Trained weights, the best step's, optimizer, per-process RNG and counters; replaced in one rename."""
    ckpt, tmp, previous = work / CHECKPOINT, work / "checkpoint.tmp", work / PREVIOUS
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(rng_states(), tmp / f"rng-{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        save_file(weights.state(), tmp / "weights.safetensors")
        save_file(best, tmp / "best_weights.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # a kill between the renames leaves the last checkpoint at `previous`
        if ckpt.exists():  # else `previous` is the last complete checkpoint: kept until `tmp` takes its place
            shutil.rmtree(previous, ignore_errors=True)
            ckpt.replace(previous)
        tmp.replace(ckpt)
        shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoint_dir(work: Path) -> Path:
    """The newest complete checkpoint in `work` (it may exist or not)."""
    ckpt = work / CHECKPOINT
    return work / PREVIOUS if not ckpt.exists() and (work / PREVIOUS).exists() else ckpt


def load_checkpoint(
    work: Path, weights: LoraWeights | FullWeights, optimizer, accelerator: Accelerator
) -> tuple[TrainState, dict]:
    """Restore what `save_checkpoint` wrote; returns the counters and the best step's weights."""
    ckpt = checkpoint_dir(work)
    rng = ckpt / f"rng-{accelerator.process_index}.safetensors"
    if not rng.is_file():
        raise EdgepruneError(f"{ckpt} was written by a different number of processes: resume with the same launch")
    weights.load(load_file(ckpt / "weights.safetensors"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    states = load_file(rng)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    state = TrainState(**json.loads((ckpt / "state.json").read_text()))
    return state, load_file(ckpt / "best_weights.safetensors")

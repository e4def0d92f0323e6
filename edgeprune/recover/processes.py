"""Processes: the accelerate state and accelerator, with the CPU (gloo) rule for multi-process launches."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState

from edgeprune.recover.config import RecoveryConfig


def cpu_processes() -> bool:
    """True when launched as several processes on a machine without CUDA.

    accelerate picks the gloo CPU backend only when told `cpu=True`; otherwise torchrun /
    `accelerate launch --multi_gpu` on CPUs silently gives N independent single-process runs.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def process_state() -> PartialState:
    """The shared distributed state (create it through here so the CPU rule above applies)."""
    return PartialState(cpu=cpu_processes())


def make_accelerator(config: RecoveryConfig) -> Accelerator:
    return Accelerator(gradient_accumulation_steps=config.grad_accum, cpu=cpu_processes())

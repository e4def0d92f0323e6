"""What a recovery run is asked to do: what is trained, with which loss, for how long; checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgeprune.errors import EdgepruneError

METHODS = ("lora", "full")
SCHEDULES = ("constant", "linear")  # linear: warm up, then decay to zero at the end of the budget
PRECISIONS = ("auto", "float32", "bfloat16")  # auto: bfloat16 where the CPU has bf16 matmuls, else float32
DEFAULT_STEPS = 100  # when neither steps, epochs nor minutes are given


@dataclass
class RecoveryConfig:
    """Training settings; defaults are LLM-Pruner's LoRA (r=8, alpha=16, lr 1e-4) sized for a CPU.

    Budget: `steps` or `epochs` fix the number of optimizer steps, `minutes` caps wall time,
    `cpu_minutes` the CPU time of the training process (all its threads; on a shared machine
    it is nearly independent of the load); training stops at whichever is reached first
    (DEFAULT_STEPS when none is given).
    `method`: `lora` trains adapters that are merged afterwards, `full` every parameter.
    With a teacher the loss is the KL divergence between the teacher's and the student's
    next-token distributions at `temperature` (over the full vocabulary, or the teacher's
    `top_k` tokens with the rest lumped into one), plus `lm_weight` times the LM loss.
    `schedule`: the learning rate is constant, or (`linear`) rises over `warmup_steps` and then falls
    linearly to zero as the budget runs out: the fraction of the steps done or of the minutes spent,
    whichever is ahead (Li et al., "Budgeted Training", ICLR 2020: decay to zero fitted to the budget).
    `precision`: the matmuls of training steps (student forward/backward under autocast, the
    teacher as a copy in that dtype); weights, LoRA parameters, optimizer, losses and held-out
    evaluation stay float32. float32 by default: on `run`'s 6.7% cut bfloat16 steps (1.4x the tokens per
    second) reached a lower held-out KL but left the held-out perplexity where it was (40.7, float32: 40.3;
    benchmarks/RESULTS.md, bench_recover_bf16.py); at a 25% cut bfloat16 was better on both.
    """

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 1e-4
    targets: str = "auto"
    seq_len: int = 256
    batch_size: int = 2
    grad_accum: int = 4
    steps: int | None = None
    epochs: float | None = None
    minutes: float | None = None
    cpu_minutes: float | None = None
    eval_every: int = 25
    save_every: int = 25
    val_size: int = 32
    seed: int = 0
    method: str = "lora"
    temperature: float = 1.0
    top_k: int | None = None
    lm_weight: float = 0.0
    precision: str = "float32"
    schedule: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise EdgepruneError("give either --steps or --epochs, not both (--minutes can cap either)")
        positive = {"rank": self.rank, "seq-len": self.seq_len, "batch-size": self.batch_size}
        positive |= {"grad-accum": self.grad_accum, "eval-every": self.eval_every, "save-every": self.save_every}
        positive |= {"val-size": self.val_size, "steps": self.steps or 1, "epochs": self.epochs or 1}
        positive |= {"minutes": self.minutes or 1, "cpu-minutes": self.cpu_minutes or 1, "lr": self.lr}
        positive |= {"temperature": self.temperature}
        positive |= {"top-k": self.top_k or 1}
        if self.lm_weight < 0:
            raise EdgepruneError("--lm-weight must be zero or positive")
        if self.precision not in PRECISIONS:
            raise EdgepruneError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise EdgepruneError(f"--schedule {self.schedule}: choose one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise EdgepruneError("--warmup-steps must be zero or positive")
        if self.method not in METHODS:
            raise EdgepruneError(f"--method {self.method}: choose one of {', '.join(METHODS)}")
        bad = [name for name, value in positive.items() if value <= 0]
        if bad:
            raise EdgepruneError(f"--{bad[0]} must be positive")

    def examples_per_step(self, num_processes: int) -> int:
        return self.batch_size * self.grad_accum * num_processes

    def total_steps(self, n_train: int, num_processes: int) -> int | None:
        """Optimizer steps to run; None when only a time cap ends training."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n_train / self.examples_per_step(num_processes)))
        if self.steps is None and (self.minutes is not None or self.cpu_minutes is not None):
            return None
        return self.steps or DEFAULT_STEPS

    def budget_spent(self, step: int, seconds: float, cpu_seconds: float, total: int | None) -> float:
        """Fraction of the budget used after `step` optimizer steps: steps, wall or CPU time, whichever is ahead."""
        spent = [step / total] if total else []
        spent += [seconds / (60 * self.minutes)] if self.minutes is not None else []
        spent += [cpu_seconds / (60 * self.cpu_minutes)] if self.cpu_minutes is not None else []
        return min(1.0, max(spent, default=0.0))

    def learning_rate(self, step: int, spent: float) -> float:
        """The learning rate of optimizer step `step` (0-based) when `spent` of the budget is used."""
        if self.schedule == "constant":
            return self.lr
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.lr * warm * (1.0 - spent)

"""The training objective: the LM loss alone, or distillation from a teacher (KL, optional LM loss).

Distillation matches the student's next-token distribution to the teacher's on every position
that carries a label: KL(p_teacher || p_student) at temperature T, times T² so gradients keep
their scale across temperatures (Hinton et al.). With `top_k` only the teacher's k most likely
tokens are compared one by one and the rest of the vocabulary is lumped into one outcome on
both sides, which is all a cache of the teacher's top-k would hold.

Training steps may run their matmuls in bfloat16 (`training_dtype`): the student under autocast
over its float32 weights, the teacher as a bfloat16 copy; logits are cast to float32 before any
softmax, and held-out evaluation runs wholly in float32 with the float32 teacher.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.models import CAUSAL_LM, model_kind
from edgeprune.recover.config import RecoveryConfig
from edgeprune.recover.data import IGNORE
from edgeprune.recover.selftext import sampling_dtype

LUMP_MAX_LOG_MASS = -1e-6  # log of the top-k mass is kept below 0 so log(1 - mass) stays finite


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per position over the whole vocabulary: [N, V] -> [N]."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def kl_top_k(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, k: int) -> torch.Tensor:
    """KL per position over the teacher's top-k tokens plus one lumped 'any other token': [N, V] -> [N]."""
    t_top, index = F.log_softmax(teacher_logits.float() / temperature, dim=-1).topk(k, dim=-1)
    s_top = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, index)
    t_rest = log1mexp(t_top.logsumexp(-1).clamp(max=LUMP_MAX_LOG_MASS))
    s_rest = log1mexp(s_top.logsumexp(-1).clamp(max=LUMP_MAX_LOG_MASS))
    return (t_top.exp() * (t_top - s_top)).sum(-1) + t_rest.exp() * (t_rest - s_rest)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Mean T²-scaled KL over the positions that predict a labelled token (causal: position t predicts t+1)."""
    scored = labels[:, 1:].ne(IGNORE)
    student, teacher = student_logits[:, :-1][scored], teacher_logits[:, :-1][scored]
    kl = kl_full(student, teacher, temperature) if top_k is None else kl_top_k(student, teacher, temperature, top_k)
    return kl.mean() * temperature**2


def training_dtype(config: RecoveryConfig, device: torch.device) -> torch.dtype:
    """The matmul dtype of training steps: `config.precision`, `auto` deciding by the hardware."""
    if config.precision == "auto":
        return sampling_dtype(device)
    return getattr(torch, config.precision)


@dataclass
class Objective:
    """The loss of one batch: the model's own LM loss, or distillation from `teacher` (no gradient into it).

    Training batches (`train=True`) run in `dtype`: autocast for the student, `low_teacher` (the
    teacher in `dtype`) for the targets; evaluation batches in float32 with `teacher`.
    """

    teacher: nn.Module | None = None
    temperature: float = 1.0
    top_k: int | None = None
    lm_weight: float = 0.0
    teacher_seconds: float = 0.0  # time spent in the teacher's forward passes of training steps, for the record
    dtype: torch.dtype = torch.float32
    low_teacher: nn.Module | None = None

    def precision(self, device: torch.device, train: bool) -> contextlib.AbstractContextManager:
        """Autocast to `dtype` for a training batch, nothing otherwise."""
        if not train or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], train: bool = True) -> torch.Tensor:
        with self.precision(batch["input_ids"].device, train):
            if self.teacher is None:
                return model(**batch).loss.float()
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            output = model(**inputs, labels=batch["labels"]) if self.lm_weight else model(**inputs)
            teacher = self.low_teacher if train and self.low_teacher is not None else self.teacher
            started = time.perf_counter()
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
            if train:
                self.teacher_seconds += time.perf_counter() - started
        loss = distill_loss(output.logits, teacher_logits, batch["labels"], self.temperature, self.top_k)
        return loss + self.lm_weight * output.loss.float() if self.lm_weight else loss


def objective_for(
    student: nn.Module, teacher: nn.Module | None, config: RecoveryConfig, device: torch.device
) -> Objective:
    """The objective `config` asks for; a teacher must be a decoder with the student's vocabulary."""
    dtype = training_dtype(config, device)
    if teacher is None:
        return Objective(dtype=dtype)
    if not model_kind(student) == model_kind(teacher) == CAUSAL_LM:
        raise EdgepruneError("distillation (--teacher) needs a decoder student and teacher: recover encoders with LoRA")
    vocab = (student.get_output_embeddings().out_features, teacher.get_output_embeddings().out_features)
    if vocab[0] != vocab[1]:
        raise EdgepruneError(
            f"teacher vocabulary {vocab[1]} differs from the student's {vocab[0]}: give the dense model"
        )
    if config.top_k is not None and config.top_k >= vocab[0]:
        raise EdgepruneError(f"--top-k {config.top_k} is not below the vocabulary size {vocab[0]}: omit it for all")
    teacher.float().eval().requires_grad_(False).to(device)
    low_teacher = copy.deepcopy(teacher).to(dtype) if dtype != torch.float32 else None
    return Objective(teacher, config.temperature, config.top_k, config.lm_weight, dtype=dtype, low_teacher=low_teacher)

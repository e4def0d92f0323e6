"""The training loop under `accelerate`: held-out objective every K steps, the best step kept (and merged).

The order of training examples is a pure function of the seed and the step, so a resumed run
sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from edgeprune.errors import EdgepruneError
from edgeprune.evaluate import perplexity
from edgeprune.models import CAUSAL_LM, model_kind
from edgeprune.recover.checkpoints import TrainState, checkpoint_dir, load_checkpoint, save_checkpoint
from edgeprune.recover.config import RecoveryConfig
from edgeprune.recover.data import IGNORE, RecoveryData, fixed_val_batches, load_recovery_data, make_collate
from edgeprune.recover.processes import make_accelerator
from edgeprune.recover.selftext import SelfTextConfig, default_data
from edgeprune.recover.teacher import Objective, objective_for
from edgeprune.recover.trainable import parameters_to_train, trainable_weights


@dataclass
class StepReport:
    """What the main process is told after every optimizer step."""

    step: int
    total: int | None
    train_loss: float
    val_loss: float | None
    tokens_per_s: float  # this process's training tokens per second so far in this session


@dataclass
class RecoveryRecord:
    """What training did: the `recovery` record of the provenance (`as_dict`) and of the run's report.

    Validation losses are the training objective on the held-out examples (the KL to the teacher
    when distilling). `heldout_ppl_before` / `_after` are perplexities on text the caller holds
    out (the run's calibration tail), when it gives one. `data_seconds` is the time spent writing
    the recovery text in this call (0 when reused).
    """

    data: str
    data_kind: str
    train_examples: int
    val_examples: int
    config: dict
    processes: int
    teacher: str | None
    steps: int
    epochs: float
    best_step: int
    val_losses: list[tuple[int, float]]
    seconds: float
    cpu_seconds: float  # CPU time of the (main) training process, all its threads
    tokens: int  # training tokens seen, over all processes
    resumed_from_step: int
    tokens_per_s_per_process: list[float]
    teacher_share: float | None  # fraction of training time spent in the teacher's forward passes
    dtype: str  # of the training steps' matmuls (weights, optimizer and evaluation are float32)
    data_seconds: float = 0.0
    heldout_ppl_before: float | None = None
    heldout_ppl_after: float | None = None

    @property
    def val_loss_before(self) -> float:
        return self.val_losses[0][1]

    @property
    def val_loss_best(self) -> float:
        return min(v for _, v in self.val_losses)

    @property
    def minutes(self) -> float:
        """Wall time of this recovery: writing its text and training."""
        return (self.data_seconds + self.seconds) / 60

    def as_dict(self) -> dict:
        record = asdict(self)
        record["val_losses"] = [list(pair) for pair in self.val_losses]
        return record | {"val_loss_before": self.val_loss_before, "val_loss_best": self.val_loss_best}


@dataclass
class RecoveryResult:
    """The finished (merged) model and what training did."""

    model: PreTrainedModel
    record: RecoveryRecord
    train_losses: list[tuple[int, float]] = field(default_factory=list)


def step_indices(n: int, step: int, micro: int, rank: int, config: RecoveryConfig, num_processes: int) -> list[int]:
    """Training examples of one micro-batch: a seeded permutation per epoch, read as one endless stream."""
    per_step = config.examples_per_step(num_processes)
    start = step * per_step + (micro * num_processes + rank) * config.batch_size
    out = []
    for position in range(start, start + config.batch_size):
        epoch, offset = divmod(position, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
        out.append(int(perm[offset]))
    return out


def out_of_budget(config: RecoveryConfig, state: TrainState) -> bool:
    """Whether the wall-time or CPU-time cap is reached (checked after each optimizer step)."""
    wall = config.minutes is not None and state.seconds >= 60 * config.minutes
    return wall or (config.cpu_minutes is not None and state.cpu_seconds >= 60 * config.cpu_minutes)


def count_targets(labels: torch.Tensor, causal: bool) -> int:
    """How many tokens a batch's mean loss averages over (causal LMs predict labels shifted by one)."""
    return int((labels[:, 1:] if causal else labels).ne(IGNORE).sum())


def evaluate_loss(
    model: nn.Module, batches: list, accelerator: Accelerator, causal: bool, objective: Objective
) -> float:
    """Token-weighted mean of the objective over the held-out batches, split across processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad(), accelerator.split_between_processes(batches) as mine:
        for batch in mine:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            n = count_targets(batch["labels"], causal)
            if n:
                loss = objective(model, batch, train=False).item()
                total += torch.tensor([loss * n, n], dtype=torch.float64, device=total.device)
    model.train()
    total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1])


def recover(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: RecoveryData,
    config: RecoveryConfig,
    work_dir: Path | None = None,
    resume: bool = False,
    on_step: Callable[[StepReport], None] | None = None,
    teacher: PreTrainedModel | None = None,
    teacher_id: str | None = None,
) -> RecoveryResult:
    """Train on `data` (LoRA or every parameter; LM loss or distillation from `teacher`), keep the best held-out step.

    `model` is modified in place (LoRA injected, then merged) and returned as `result.model`.
    Runs under `accelerate launch` as it runs alone; each process holds its own copy of the
    teacher. `work_dir` receives periodic checkpoints (None: none are written); `resume`
    continues from the checkpoint there. `on_step` is called on the main process after every
    optimizer step.
    """
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    causal = model_kind(model) == CAUSAL_LM
    objective = objective_for(model, teacher, config, accelerator.device)
    weights = trainable_weights(model, config)
    optimizer = torch.optim.AdamW(parameters_to_train(weights), lr=config.lr)
    wrapped, optimizer = accelerator.prepare(weights.module, optimizer)
    state, best = TrainState(), weights.state()
    if resume:  # after `prepare`, so optimizer state lands on the parameters' device
        if work_dir is None or not (checkpoint_dir(work_dir) / "state.json").is_file():
            raise EdgepruneError(f"nothing to resume in {work_dir}: run without --resume")
        state, best = load_checkpoint(work_dir, weights, optimizer, accelerator)
    resumed_from = state.step
    wrapped.train()
    val_batches = fixed_val_batches(data, tokenizer, config.batch_size, config.seed)
    collate = make_collate(data.kind, tokenizer)
    total = config.total_steps(len(data.train), accelerator.num_processes)
    if not state.val_losses:
        state.best_loss = evaluate_loss(wrapped, val_batches, accelerator, causal, objective)
        state.val_losses.append([0, state.best_loss])
    started, cpu_started = time.monotonic() - state.seconds, time.process_time() - state.cpu_seconds
    session_start, session_tokens, teacher_before = time.monotonic(), 0, objective.teacher_seconds
    while total is None or state.step < total:
        spent = config.budget_spent(state.step, state.seconds, state.cpu_seconds, total)
        if config.schedule != "constant":  # every process steps at one rate: the clocks differ, take the latest
            spent = float(accelerator.reduce(torch.tensor(spent, device=accelerator.device), "max"))
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate(state.step, spent)
        losses, step_tokens = [], 0
        for micro in range(config.grad_accum):
            index = step_indices(
                len(data.train), state.step, micro, accelerator.process_index, config, accelerator.num_processes
            )
            batch = {k: v.to(accelerator.device) for k, v in collate([data.train[i] for i in index]).items()}
            step_tokens += (
                int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            )
            with accelerator.accumulate(wrapped):
                loss = objective(wrapped, batch)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
        state.step += 1
        session_tokens += step_tokens
        state.tokens += int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum"))
        train_loss = float(accelerator.reduce(torch.stack(losses).mean(), "mean"))
        state.train_losses.append([state.step, train_loss])
        state.seconds, state.cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
        tokens_per_s = session_tokens / max(time.monotonic() - session_start, 1e-9)
        if out_of_budget(config, state) and accelerator.is_main_process:
            accelerator.set_trigger()
        out_of_time = accelerator.check_trigger()
        last = out_of_time or state.step == total
        val_loss = None
        if state.step % config.eval_every == 0 or last:
            val_loss = evaluate_loss(wrapped, val_batches, accelerator, causal, objective)
            state.val_losses.append([state.step, val_loss])
            if val_loss < state.best_loss:
                state.best_step, state.best_loss, best = state.step, val_loss, weights.state()
        if work_dir is not None and (state.step % config.save_every == 0 or last):
            save_checkpoint(work_dir, weights, optimizer, state, best, accelerator)
        if on_step is not None and accelerator.is_main_process:
            on_step(StepReport(state.step, total, train_loss, val_loss, tokens_per_s))
        if out_of_time:
            break
    session_seconds = max(time.monotonic() - session_start, 1e-9)
    rates = accelerator.gather(torch.tensor([session_tokens / session_seconds], device=accelerator.device))
    weights.load(best)
    record = RecoveryRecord(
        data=data.source,
        data_kind=data.kind,
        train_examples=len(data.train),
        val_examples=len(data.val),
        config=asdict(config),
        processes=accelerator.num_processes,
        teacher=teacher_id if teacher is not None else None,
        steps=state.step,
        epochs=round(state.step * config.examples_per_step(accelerator.num_processes) / len(data.train), 4),
        best_step=state.best_step,
        val_losses=[(int(s), v) for s, v in state.val_losses],
        seconds=round(state.seconds, 1),
        cpu_seconds=round(state.cpu_seconds, 1),
        tokens=state.tokens,
        resumed_from_step=resumed_from,
        tokens_per_s_per_process=[round(float(r), 1) for r in rates],
        teacher_share=round((objective.teacher_seconds - teacher_before) / session_seconds, 3) if teacher else None,
        dtype=str(objective.dtype).removeprefix("torch."),
    )
    train_losses = [(int(s), v) for s, v in state.train_losses]
    return RecoveryResult(model=weights.finish().eval(), record=record, train_losses=train_losses)


def heldout_perplexity(model: PreTrainedModel, heldout: torch.Tensor | None, seq_len: int) -> float | None:
    """Perplexity of a decoder on held-out tokens (None when there are none, too few, or no decoder)."""
    if heldout is None or len(heldout) < seq_len or model_kind(model) != CAUSAL_LM:
        return None
    return perplexity(model, heldout, seq_len=seq_len)


def recover_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: RecoveryConfig,
    work: Path,
    prompt_text: str,
    data: str | Path | None = None,
    teacher: PreTrainedModel | None = None,
    teacher_id: str = "",
    heldout: torch.Tensor | None = None,
    eval_seq_len: int = 128,
    self_text: SelfTextConfig | None = None,
    teacher_hash: str = "",
) -> RecoveryResult:
    """One call for `edgeprune run`: recover `model` in place, with held-out perplexity before and after.

    Without `data`, `selftext.default_data` decides what to train on (text `teacher` writes from
    `prompt_text`, which must hold none of `heldout`); written under `work` and reused on rerun.
    """
    started = time.monotonic()
    if data is None:
        data = default_data(tokenizer, prompt_text, work, teacher, teacher_hash, self_text)
    data_seconds = time.monotonic() - started
    before = heldout_perplexity(model, heldout, eval_seq_len)
    result = recover(
        model,
        tokenizer,
        load_recovery_data(data, tokenizer, model, config),
        config,
        teacher=teacher,
        teacher_id=teacher_id or None,
    )
    result.record.data_seconds = round(data_seconds, 1)
    result.record.heldout_ppl_before = before
    result.record.heldout_ppl_after = heldout_perplexity(result.model, heldout, eval_seq_len)
    return result

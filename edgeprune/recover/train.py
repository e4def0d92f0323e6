"""The training loop: LoRA under `accelerate`, held-out loss every K steps, the best step merged.

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
from peft import set_peft_model_state_dict
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from edgeprune.calibration import PACKAGED_TEXT
from edgeprune.errors import EdgepruneError
from edgeprune.models import is_decoder
from edgeprune.recover.checkpoints import TrainState, adapter_snapshot, load_checkpoint, save_checkpoint
from edgeprune.recover.config import RecoveryConfig
from edgeprune.recover.data import IGNORE, RecoveryData, fixed_val_batches, load_recovery_data, make_collate
from edgeprune.recover.lora import attach_lora, merge
from edgeprune.recover.processes import make_accelerator


@dataclass
class RecoveryResult:
    """The merged model and what training did (the `recovery` record of the provenance)."""

    model: PreTrainedModel
    steps: int
    best_step: int
    val_losses: list[tuple[int, float]]
    train_losses: list[tuple[int, float]]
    seconds: float
    resumed_from: int = 0
    record: dict = field(default_factory=dict)


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


def count_targets(labels: torch.Tensor, causal: bool) -> int:
    """How many tokens a batch's mean loss averages over (causal LMs predict labels shifted by one)."""
    return int((labels[:, 1:] if causal else labels).ne(IGNORE).sum())


def evaluate_loss(model: nn.Module, batches: list, accelerator: Accelerator, causal: bool) -> float:
    """Token-weighted mean loss over the held-out batches, split across processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad(), accelerator.split_between_processes(batches) as mine:
        for batch in mine:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            n = count_targets(batch["labels"], causal)
            if n:
                total += torch.tensor([model(**batch).loss.item() * n, n], dtype=torch.float64, device=total.device)
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
    on_step: Callable[[int, int | None, float, float | None], None] | None = None,
) -> RecoveryResult:
    """Train LoRA on `data`, keep the best held-out step, and return the merged model.

    `model` is modified in place (LoRA injected, then merged) and returned as `result.model`.
    Runs under `accelerate launch` as it runs alone. `work_dir` receives periodic checkpoints
    (None: none are written); `resume` continues from the checkpoint there. `on_step(step,
    total, train_loss, val_loss)` is called on the main process after every optimizer step.
    """
    accelerator = make_accelerator(config)
    set_seed(config.seed)
    causal = is_decoder(model.config)
    model = model.float()
    peft_model = attach_lora(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.lr)
    wrapped, optimizer = accelerator.prepare(peft_model, optimizer)
    state, best = TrainState(), adapter_snapshot(peft_model)
    if resume:  # after `prepare`, so optimizer state lands on the parameters' device
        if work_dir is None or not (work_dir / "checkpoint" / "state.json").is_file():
            raise EdgepruneError(f"nothing to resume in {work_dir}: run without --resume")
        state, best = load_checkpoint(work_dir, peft_model, optimizer, accelerator)
    resumed_from = state.step
    wrapped.train()
    val_batches = fixed_val_batches(data, tokenizer, config.batch_size, config.seed)
    collate = make_collate(data.kind, tokenizer)
    total = config.total_steps(len(data.train), accelerator.num_processes)
    if not state.val_losses:
        state.best_loss = evaluate_loss(wrapped, val_batches, accelerator, causal)
        state.val_losses.append([0, state.best_loss])
    started = time.monotonic() - state.seconds
    while total is None or state.step < total:
        losses = []
        for micro in range(config.grad_accum):
            index = step_indices(
                len(data.train), state.step, micro, accelerator.process_index, config, accelerator.num_processes
            )
            batch = {k: v.to(accelerator.device) for k, v in collate([data.train[i] for i in index]).items()}
            with accelerator.accumulate(wrapped):
                loss = wrapped(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(loss.detach())
        state.step += 1
        train_loss = float(accelerator.reduce(torch.stack(losses).mean(), "mean"))
        state.train_losses.append([state.step, train_loss])
        state.seconds = time.monotonic() - started
        if config.minutes is not None and state.seconds >= 60 * config.minutes and accelerator.is_main_process:
            accelerator.set_trigger()
        out_of_time = accelerator.check_trigger()
        last = out_of_time or state.step == total
        val_loss = None
        if state.step % config.eval_every == 0 or last:
            val_loss = evaluate_loss(wrapped, val_batches, accelerator, causal)
            state.val_losses.append([state.step, val_loss])
            if val_loss < state.best_loss:
                state.best_step, state.best_loss, best = state.step, val_loss, adapter_snapshot(peft_model)
        if work_dir is not None and (state.step % config.save_every == 0 or last):
            save_checkpoint(work_dir, peft_model, optimizer, state, best, accelerator)
        if on_step is not None and accelerator.is_main_process:
            on_step(state.step, total, train_loss, val_loss)
        if out_of_time:
            break
    set_peft_model_state_dict(peft_model, best)
    merged = merge(peft_model).eval()
    result = RecoveryResult(
        model=merged,
        steps=state.step,
        best_step=state.best_step,
        val_losses=[(int(s), v) for s, v in state.val_losses],
        train_losses=[(int(s), v) for s, v in state.train_losses],
        seconds=state.seconds,
        resumed_from=resumed_from,
    )
    result.record = recovery_record(result, data, config, accelerator.num_processes)
    return result


def recovery_record(result: RecoveryResult, data: RecoveryData, config: RecoveryConfig, processes: int) -> dict:
    """What goes into `edgeprune.json` under `recovery`."""
    return {
        "data": data.source,
        "data_kind": data.kind,
        "train_examples": len(data.train),
        "val_examples": len(data.val),
        "config": asdict(config),
        "processes": processes,
        "steps": result.steps,
        "epochs": round(result.steps * config.examples_per_step(processes) / len(data.train), 4),
        "best_step": result.best_step,
        "val_loss_before": result.val_losses[0][1],
        "val_loss_best": min(v for _, v in result.val_losses),
        "val_losses": [list(pair) for pair in result.val_losses],
        "seconds": round(result.seconds, 1),
        "resumed_from_step": result.resumed_from,
    }


def recover_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: str | Path | None = None, **settings
) -> dict:
    """One call for the budget loop (`edgeprune run --recover`): recover `model` in place, return the record.

    `settings` are `RecoveryConfig` fields. Without `data` the packaged calibration text is used
    (offline but small, so 128-token windows with 8 held out unless `settings` say otherwise).
    """
    if data is None:
        data, settings = PACKAGED_TEXT, {"seq_len": 128, "val_size": 8, **settings}
    config = RecoveryConfig(**settings)
    result = recover(model, tokenizer, load_recovery_data(data, tokenizer, model, config), config)
    return result.record

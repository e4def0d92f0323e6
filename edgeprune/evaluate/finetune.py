"""Give an encoder (pruned or not) a sequence-classification head and fine-tune it on a GLUE task.

The encoder's own modules (with their per-layer widths) become the classifier's base model; only
the pooler (if the encoder has none) and the head are new. Every weight is trained. Save the
result with `edgeprune.checkpoint.save_pruned` so it reloads as `<Family>ForSequenceClassification`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase
from transformers.optimization import get_linear_schedule_with_warmup

from edgeprune.errors import EdgepruneError
from edgeprune.evaluate.glue import GlueExample, encode, glue_spec, glue_split
from edgeprune.models import CAUSAL_LM, model_kind

HEAD_STEPS = 300


def build_classifier(model: PreTrainedModel, task: str, seed: int = 0) -> PreTrainedModel:
    """A sequence classifier for `task` around `model`'s base encoder, with a freshly initialized head."""
    if model_kind(model) == CAUSAL_LM:
        raise EdgepruneError("finetune-head is for encoders (BERT family): evaluate decoders with zero-shot tasks")
    spec = glue_spec(task)
    config = copy.deepcopy(model.config)
    config.num_labels = spec.num_labels
    config.finetuning_task = task
    config.problem_type = "regression" if spec.labels is None else "single_label_classification"
    if spec.labels:
        config.id2label = dict(enumerate(spec.labels))
        config.label2id = {label: i for i, label in enumerate(spec.labels)}
    torch.manual_seed(seed)
    classifier = AutoModelForSequenceClassification.from_config(config)
    encoder, fresh = model.base_model, getattr(classifier, classifier.base_model_prefix)
    if getattr(fresh, "pooler", None) is not None and getattr(encoder, "pooler", None) is None:
        encoder.pooler = fresh.pooler  # MLM checkpoints (e.g. BertForMaskedLM) have no pooler
    setattr(classifier, classifier.base_model_prefix, encoder)
    return classifier


def training_steps(n_examples: int, batch_size: int, steps: int | None, epochs: float | None) -> int:
    """`steps`, else `epochs` passes over the data, else HEAD_STEPS."""
    if steps is not None and epochs is not None:
        raise EdgepruneError("give --steps or --epochs, not both")
    if epochs is not None:
        return max(1, math.ceil(epochs * n_examples / batch_size))
    return steps if steps is not None else HEAD_STEPS


def batches(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of example indices from seeded reshuffled passes over the data."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n_examples, generator=generator).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train_classifier(
    classifier: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[GlueExample],
    steps: int,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 128,
    seed: int = 0,
) -> list[float]:
    """AdamW with linear warm-up (10%) and decay; returns the loss of every step."""
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    regression = classifier.config.problem_type == "regression"
    losses = []
    classifier.train()
    progress = tqdm(batches(len(examples), batch_size, steps, seed), desc="fine-tuning", leave=False, disable=None)
    for index in progress:
        chunk = [examples[i] for i in index]
        labels = torch.tensor([e.label for e in chunk], dtype=torch.float if regression else torch.long)
        loss = classifier(**encode(tokenizer, chunk, max_length), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(classifier.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.3f}")
    classifier.eval()
    return losses


def finetune_head(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data_dir: str | Path | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_train: int | None = None,
    max_length: int = 128,
    seed: int = 0,
) -> tuple[PreTrainedModel, dict]:
    """A fine-tuned classifier for `task` and a record of how it was trained (for provenance)."""
    examples, split = glue_split(task, data_dir, "train")
    if max_train is not None:
        picked = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:max_train]
        examples = [examples[i] for i in sorted(picked.tolist())]
    n_steps = training_steps(len(examples), batch_size, steps, epochs)
    classifier = build_classifier(model, task, seed)
    losses = train_classifier(classifier, tokenizer, examples, n_steps, lr, batch_size, max_length, seed)
    tail = losses[-max(1, len(losses) // 10) :]
    record = {
        "task": task,
        "train_split": split,
        "n_train": len(examples),
        "steps": n_steps,
        "lr": lr,
        "batch_size": batch_size,
        "max_length": max_length,
        "seed": seed,
        "final_loss": sum(tail) / len(tail),
    }
    return classifier, record

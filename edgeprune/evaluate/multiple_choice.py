"""Zero-shot multiple choice by log-likelihood, with lm-eval's prompts and metrics.

Each option is a (context, continuation) pair; its score is the summed log-probability of
the continuation tokens after the context. acc takes the best sum; acc_norm divides each sum
by the option's length in characters first (lm-eval's `acc_norm`). Tokenization follows
lm-eval: trailing spaces of the context move to the continuation, the pair is tokenized
whole, and the continuation is the tokens after those of the context alone.

Prompts (lm-eval's task configs):
- boolq: "{passage}\\nQuestion: {question}?\\nAnswer:" then " no" / " yes".
- piqa: "Question: {goal}\\nAnswer:" then " {sol1}" / " {sol2}".
- arc_easy, arc_challenge: "Question: {stem}\\nAnswer:" then " {choice text}" (3-5 choices, letter or numeric labels).
- winogrande: partial scoring: the sentence up to the blank filled with each option is the context,
  " {rest of the sentence}" the shared continuation, so acc_norm equals acc.
- generic JSONL: {"question", "choices", "gold"}: "{question}" then " {choice}" (gold: 0-based index).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from edgeprune.errors import EdgepruneError
from edgeprune.evaluate.data import data_file, read_jsonl, read_lines

MC_FILES = {
    "boolq": ("commonsense/boolq/val.jsonl",),
    "piqa": ("commonsense/piqa/valid.jsonl", "commonsense/piqa/valid-labels.lst"),
    "winogrande": ("commonsense/winogrande/winogrande_dev.mosaicml.jsonl",),
    "arc_easy": ("commonsense/arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("commonsense/arc/ARC-Challenge-Test.jsonl",),
}
DELIMITER = " "


@dataclass(frozen=True)
class MCItem:
    """One question: option i is scored as `DELIMITER + choices[i]` after `contexts[i]`."""

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int


def field(row: dict, key: str, path: Path, number: int):
    if key not in row:
        raise EdgepruneError(f"{path} item {number} has no '{key}' field: check the file format (see SOURCES.md)")
    return row[key]


def same_context(context: str, choices: list[str], gold: int) -> MCItem:
    return MCItem((context,) * len(choices), tuple(choices), gold)


def boolean_label(value, path: Path, number: int) -> int:
    """BoolQ labels are JSON booleans in SuperGLUE and the strings "true"/"false" in some copies."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return int(value.lower() == "true")
    raise EdgepruneError(f"{path} item {number}: label {value!r} is neither true nor false")


def load_boolq(path: Path) -> list[MCItem]:
    items = []
    for i, row in enumerate(read_jsonl(path), start=1):
        context = f"{field(row, 'passage', path, i)}\nQuestion: {field(row, 'question', path, i)}?\nAnswer:"
        items.append(same_context(context, ["no", "yes"], boolean_label(field(row, "label", path, i), path, i)))
    return items


def load_piqa(path: Path, labels_path: Path) -> list[MCItem]:
    rows, labels = read_jsonl(path), read_lines(labels_path)
    if len(rows) != len(labels):
        raise EdgepruneError(f"{path} has {len(rows)} items but {labels_path} {len(labels)} labels: use matching files")
    return [
        same_context(
            f"Question: {field(row, 'goal', path, i)}\nAnswer:",
            [field(row, "sol1", path, i), field(row, "sol2", path, i)],
            int(label),
        )
        for i, (row, label) in enumerate(zip(rows, labels, strict=True), start=1)
    ]


def load_winogrande(path: Path) -> list[MCItem]:
    """MosaicML layout: context_options (sentence up to the blank, per option), continuation, gold."""
    items = []
    for i, row in enumerate(read_jsonl(path), start=1):
        contexts = tuple(field(row, "context_options", path, i))
        continuation = field(row, "continuation", path, i).strip()
        items.append(MCItem(contexts, (continuation,) * len(contexts), int(field(row, "gold", path, i))))
    return items


def load_arc(path: Path) -> list[MCItem]:
    """AI2 ARC jsonl: question.stem, question.choices[{text, label}], answerKey (a letter or a digit)."""
    items = []
    for i, row in enumerate(read_jsonl(path), start=1):
        question = field(row, "question", path, i)
        choices = field(question, "choices", path, i)
        labels = [c["label"] for c in choices]
        key = field(row, "answerKey", path, i)
        if key not in labels:
            raise EdgepruneError(f"{path} item {i}: answerKey {key!r} is not one of the labels {labels}")
        context = f"Question: {field(question, 'stem', path, i)}\nAnswer:"
        items.append(same_context(context, [c["text"] for c in choices], labels.index(key)))
    return items


def load_mc_jsonl(path: Path) -> list[MCItem]:
    """The generic user format: {"question": str, "choices": [str, ...], "gold": 0-based index}."""
    items = []
    for i, row in enumerate(read_jsonl(path), start=1):
        choices, gold = field(row, "choices", path, i), field(row, "gold", path, i)
        if not isinstance(choices, list) or len(choices) < 2 or not isinstance(gold, int):
            raise EdgepruneError(f"{path} item {i}: 'choices' must be a list of 2+ strings and 'gold' an index")
        if not 0 <= gold < len(choices):
            raise EdgepruneError(f"{path} item {i}: gold {gold} is outside 0..{len(choices) - 1}")
        items.append(same_context(str(field(row, "question", path, i)), [str(c) for c in choices], gold))
    return items


def load_mc_task(task: str, data_dir: str | Path | None) -> list[MCItem]:
    """The items of a named zero-shot task, read from the data folder."""
    paths = [data_file(data_dir, relative) for relative in MC_FILES[task]]
    loader = {"boolq": load_boolq, "piqa": load_piqa, "winogrande": load_winogrande}.get(task, load_arc)
    return loader(*paths)


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids the way lm-eval splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    if not context_ids:
        raise EdgepruneError("an empty context cannot be scored: give every question some text")
    return context_ids, whole[len(context_ids) :]


def supports_logits_to_keep(model) -> bool:
    """transformers causal LMs can skip the vocabulary projection of positions nobody reads."""
    forward = getattr(model, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


def last_logprobs(model, inputs: list[list[int]], keep: int) -> torch.Tensor:
    """Log-probabilities [B, keep, V] at the last `keep` positions of each input, left-padded into one batch."""
    length = max(len(x) for x in inputs)
    ids = torch.zeros(len(inputs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, x in enumerate(inputs):
        ids[row, length - len(x) :] = torch.tensor(x)
        mask[row, length - len(x) :] = 1
    extra = {"logits_to_keep": keep} if supports_logits_to_keep(model) else {}
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **extra).logits
    return F.log_softmax(logits[:, -keep:].float(), dim=-1)


def loglikelihoods(
    model, pairs: list[tuple[list[int], list[int]]], max_length: int, batch_size: int = 8
) -> list[float]:
    """Summed log-probability of each continuation after its context (context truncated on the left).

    Pairs with the same model input (e.g. BoolQ's one-token " no"/" yes") share one forward pass.
    Each continuation is scored as soon as its batch is computed: only [batch, keep, vocab]
    log-probabilities are ever held, however many items there are.
    """
    readers: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # model input -> (pair, continuation)
    for index, (context, continuation) in enumerate(pairs):
        if len(continuation) > max_length:
            raise EdgepruneError(f"an option of {len(continuation)} tokens exceeds the context of {max_length} tokens")
        key = tuple((context + continuation)[-(max_length + 1) : -1])
        readers.setdefault(key, []).append((index, continuation))
    order = sorted(readers, key=len, reverse=True)
    scores = [0.0] * len(pairs)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch_size), desc="log-likelihoods", leave=False, disable=None):
            chunk = order[start : start + batch_size]
            keep = max(len(c) for key in chunk for _, c in readers[key])
            logprobs = last_logprobs(model, [list(k) for k in chunk], keep)
            for row, key in enumerate(chunk):
                for index, continuation in readers[key]:
                    rows = logprobs[row, keep - len(continuation) :]
                    scores[index] = rows.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
    return scores


def predictions(lls: list[float], choices: tuple[str, ...]) -> tuple[int, int]:
    """The chosen option by log-likelihood, and by log-likelihood per character (lm-eval's acc_norm)."""
    normed = [ll / max(1, len(choice)) for ll, choice in zip(lls, choices, strict=True)]
    return max(range(len(lls)), key=lls.__getitem__), max(range(len(normed)), key=normed.__getitem__)


def item_hits(scores: list[list[float]], items: list[MCItem]) -> tuple[list[bool], list[bool]]:
    """Per item: is the acc prediction right, is the acc_norm prediction right."""
    hits, hits_norm = [], []
    for item, lls in zip(items, scores, strict=True):
        raw, per_char = predictions(lls, item.choices)
        hits.append(raw == item.gold)
        hits_norm.append(per_char == item.gold)
    return hits, hits_norm


def mc_metrics(scores: list[list[float]], items: list[MCItem]) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per character of the option), with binomial standard errors."""
    hits, hits_norm = item_hits(scores, items)
    n = len(items)
    metrics = {}
    for name, values in (("acc", hits), ("acc_norm", hits_norm)):
        p = sum(values) / n
        metrics[name] = p
        metrics[f"{name}_stderr"] = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    return metrics


def score_items(
    model, tokenizer: PreTrainedTokenizerBase, items: list[MCItem], max_length: int, batch_size: int = 8
) -> list[list[float]]:
    """Log-likelihood of every option of every item."""
    pairs = [
        encode_pair(tokenizer, context, DELIMITER + choice)
        for item in items
        for context, choice in zip(item.contexts, item.choices, strict=True)
    ]
    flat = iter(loglikelihoods(model, pairs, max_length, batch_size))
    return [[next(flat) for _ in item.choices] for item in items]


def evaluate_multiple_choice(
    model, tokenizer: PreTrainedTokenizerBase, items: list[MCItem], max_length: int, batch_size: int = 8
) -> dict[str, float]:
    """acc, acc_norm and their standard errors of `model` on `items`."""
    if not items:
        raise EdgepruneError("no multiple-choice items to score: check the file and --limit")
    return mc_metrics(score_items(model, tokenizer, items, max_length, batch_size), items)

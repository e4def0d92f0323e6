"""Recovery data: files and datasets read into tokenized train / held-out examples, and batches.

What each family learns from:
- decoders, instruction JSON/JSONL in Alpaca format (`instruction`, optional `input`,
  `output`): prompts use the Stanford Alpaca template (`ALPACA_PROMPT` /
  `ALPACA_PROMPT_NO_INPUT`); the loss covers the response tokens and the EOS token only.
- decoders, plain text (or JSON/JSONL rows with a `text` field): tokenized once without
  special tokens, cut into non-overlapping windows of `seq_len`, causal-LM loss on every token.
- encoders with an MLM head (`*ForMaskedLM`), plain text: windows wrapped in CLS/SEP, 15% of
  tokens masked (transformers' `DataCollatorForLanguageModeling`); the held-out windows are
  masked once with the seed so their loss is comparable between steps.
- encoder classifiers (`*ForSequenceClassification`), labelled rows: JSON/JSONL with `text`
  (optional `text_pair`) and an integer `label`, or a TSV with a header holding `label` and
  `sentence` (optional `sentence2`), as GLUE's SST-2 files; cross-entropy on the label. The
  classifier head is trained in full (peft's `modules_to_save`) alongside the LoRA adapters.
- a `datasets` name `name[:config[:split]]` whose rows are Alpaca-style or have a text column.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from edgeprune.calibration import tokenize_text
from edgeprune.errors import EdgepruneError
from edgeprune.models import CAUSAL_LM, CLASSIFIER, ENCODER, IGNORE, MASK_FRACTION, MASKED_LM, model_kind
from edgeprune.recover.config import RecoveryConfig

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


FIRST_TEXT, SECOND_TEXT = ("text", "sentence", "sentence1"), ("text_pair", "sentence2")


@dataclass
class RecoveryData:
    """Tokenized examples (dicts of `input_ids` and, unless masked later, `labels`) and how they were made."""

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    kind: str  # "instruct", "text", "mlm" or "classify"
    source: str


def read_records(path: Path) -> list | str:
    """JSON / JSONL rows (a list of dicts), or the file's text for anything else."""
    if not path.is_file():
        raise EdgepruneError(f"data file {path} not found: give an Alpaca JSON, a text file, or a datasets name")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgepruneError(f"{path} is not UTF-8 text: give an Alpaca JSON or a text file") from None
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise EdgepruneError(f"{path} is not valid JSONL ({err}): one JSON object per line expected") from None
    if path.suffix == ".tsv":
        lines = [line.split("\t") for line in text.splitlines() if line.strip()]
        return [dict(zip(lines[0], row, strict=False)) for row in lines[1:]] if lines else []
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise EdgepruneError(f"{path} is not valid JSON ({err}): fix the file or give a text file") from None
        if not isinstance(rows, list):
            raise EdgepruneError(f"{path} holds a JSON {type(rows).__name__}, not a list of examples")
        return rows
    return text


def load_dataset_rows(name: str) -> list | str:
    """Rows of a `datasets` name `name[:config[:split]]` (default split `train`)."""
    parts = (name.split(":") + ["", ""])[:3]
    try:
        import datasets
    except ImportError:
        raise EdgepruneError(f"'{name}' is not a file; dataset names need `pip install datasets`") from None
    try:
        rows = datasets.load_dataset(parts[0], parts[1] or None, split=parts[2] or "train")
    except Exception as err:  # the hub's errors vary by cause; all mean "not available here"
        raise EdgepruneError(
            f"cannot load dataset '{name}' ({type(err).__name__}; hub unreachable?): give a local file instead"
        ) from None
    if {"instruction", "output"} <= set(rows.column_names):
        return [dict(row) for row in rows]
    column = "text" if "text" in rows.column_names else rows.column_names[0]
    return "\n".join(str(t) for t in rows[column])


def load_source(source: str | Path) -> list | str:
    """A file's rows or text, or a dataset's; paths that look like files must exist."""
    path = Path(source).expanduser()
    if path.exists() or path.suffix or str(source).startswith((".", "/", "~")):
        return read_records(path)
    return load_dataset_rows(str(source))


def alpaca_prompt(row: dict) -> str:
    template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"], input=row.get("input", ""))


def masked_example(prompt: list[int], response: list[int], seq_len: int) -> dict[str, list[int]] | None:
    """Prompt + response truncated to `seq_len`, labels IGNORE on the prompt; None if no response token is left."""
    ids = (prompt + response)[:seq_len]
    if len(ids) <= len(prompt):
        return None
    return {"input_ids": ids, "labels": [IGNORE] * len(prompt) + ids[len(prompt) :]}


def encode_instructions(rows: list[dict], tokenizer: PreTrainedTokenizerBase, seq_len: int) -> list[dict]:
    """Alpaca rows as prompt + response + EOS, loss on the response and EOS only.

    Prompts and responses are tokenized separately (in two batches) so the mask boundary is
    exact; examples whose prompt alone fills `seq_len` are dropped.
    """
    prompts = tokenizer([alpaca_prompt(r) for r in rows])["input_ids"]
    responses = tokenizer([str(r["output"]) for r in rows], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    encoded = (masked_example(p, r + eos, seq_len) for p, r in zip(prompts, responses, strict=True))
    return [e for e in encoded if e is not None]


def text_windows(tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, mlm: bool) -> list[dict]:
    """Non-overlapping windows of the token stream; MLM windows are wrapped in CLS ... SEP."""
    tokens = tokenize_text(tokenizer, text).tolist()
    if mlm:
        width = seq_len - 2
        chunks = [tokens[i : i + width] for i in range(0, len(tokens) - width + 1, width)]
        return [{"input_ids": tokenizer.build_inputs_with_special_tokens(chunk)} for chunk in chunks]
    return [{"input_ids": w, "labels": w} for w in (tokens[i : i + seq_len] for i in range(0, len(tokens), seq_len))]


def is_instruction_rows(rows: list) -> bool:
    return bool(rows) and all(isinstance(r, dict) and "instruction" in r and "output" in r for r in rows)


def is_labelled_rows(rows: list) -> bool:
    return bool(rows) and all(isinstance(r, dict) and "label" in r for r in rows)


def encode_labelled(rows: list[dict], tokenizer: PreTrainedTokenizerBase, seq_len: int, num_labels: int, source: str):
    """Tokenized (pairs of) texts with an integer `labels` each, for a sequence classifier."""
    first = next((k for k in FIRST_TEXT if k in rows[0]), None)
    if first is None:
        raise EdgepruneError(f"{source} rows have a label but no text column: name it one of {', '.join(FIRST_TEXT)}")
    second = next((k for k in SECOND_TEXT if k in rows[0]), None)
    examples = []
    for row in rows:
        try:
            label = int(row["label"])
        except (TypeError, ValueError):
            label = -1
        if not 0 <= label < num_labels:
            raise EdgepruneError(f"{source}: label {row['label']!r} is not an integer in [0, {num_labels})")
        pair = row[second] if second else None
        encoded = tokenizer(str(row[first]), pair, truncation=True, max_length=seq_len)
        examples.append({**encoded, "labels": label})
    return examples


def encode_examples(
    rows: list | str, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, seq_len: int, source: str
):
    """(kind, examples): instruction rows or text for decoders, text (MLM) or labelled rows for encoders."""
    family = model_kind(model)
    if family == ENCODER:
        raise EdgepruneError(
            f"{type(model).__name__} has no head to train: recover a *ForMaskedLM or *ForSequenceClassification encoder"
        )
    wanted = {CAUSAL_LM: "Alpaca rows or text", MASKED_LM: "a text file", CLASSIFIER: "labelled rows (text, label)"}
    labelled = isinstance(rows, list) and is_labelled_rows(rows)
    instruction = isinstance(rows, list) and is_instruction_rows(rows)
    if (family == CLASSIFIER) != labelled or (instruction and family != CAUSAL_LM):
        raise EdgepruneError(f"{source} does not fit a {type(model).__name__}: give it {wanted[family]}")
    if labelled:
        return "classify", encode_labelled(rows, tokenizer, seq_len, model.config.num_labels, source)
    if instruction:
        return "instruct", encode_instructions(rows, tokenizer, seq_len)
    if isinstance(rows, list):
        if not all(isinstance(r, dict) and isinstance(r.get("text"), str) for r in rows):
            raise EdgepruneError(
                f"{source} rows need `instruction` and `output` (Alpaca), a `text` field, or a `label`: fix the file"
            )
        rows = "\n\n".join(r["text"] for r in rows)
    mlm = family == MASKED_LM
    windows = text_windows(tokenizer, rows, seq_len, mlm)
    return ("mlm" if mlm else "text"), [w for w in windows if len(w["input_ids"]) > 1]


def load_recovery_data(
    source: str | Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, config: RecoveryConfig
) -> RecoveryData:
    """Tokenized examples with a seeded held-out split of `config.val_size` examples."""
    kind, examples = encode_examples(load_source(source), tokenizer, model, config.seq_len, str(source))
    if len(examples) < 2 * config.val_size:
        raise EdgepruneError(
            f"{source} gives only {len(examples)} training examples of up to {config.seq_len} tokens: "
            f"need at least {2 * config.val_size} (more data, or a smaller --val-size / --seq-len)"
        )
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    val = [examples[i] for i in sorted(order[: config.val_size])]
    train = [examples[i] for i in sorted(order[config.val_size :])]
    return RecoveryData(train=train, val=val, kind=kind, source=str(source))


def pad_batch(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (IGNORE on padding)."""
    width = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(e["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        batch["labels"].append(e["labels"] + [IGNORE] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def make_collate(kind: str, tokenizer: PreTrainedTokenizerBase) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Batches for the loss of `kind`: MLM masking from transformers, else padding with given labels."""
    if kind == "mlm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=MASK_FRACTION)
    if kind == "classify":
        return DataCollatorWithPadding(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return lambda examples: pad_batch(examples, pad_id)


def fixed_val_batches(data: RecoveryData, tokenizer: PreTrainedTokenizerBase, batch_size: int, seed: int) -> list:
    """Held-out batches built once (MLM masks drawn from `seed`), so every evaluation scores the same targets."""
    collate = make_collate(data.kind, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [collate(data.val[i : i + batch_size]) for i in range(0, len(data.val), batch_size)]

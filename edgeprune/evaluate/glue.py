"""GLUE dev for encoder classifiers: readers for the official TSV layout, metrics, evaluation.

Reading: split on tabs only (the files hold unbalanced quotes: QUOTE_NONE), strip MRPC's BOM,
and give CoLA (no header) its column names. Labels as in HF `glue`: entailment = 0.

Splits: SST-2 trains on train.tsv and is evaluated on the whole dev.tsv. The other tasks have
only dev here, so `finetune-head` trains on dev rows 0, 2, 4, ... and evaluation always reports
on the odd rows 1, 3, 5, ... (every result says so in `split`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from edgeprune.errors import EdgepruneError
from edgeprune.evaluate.data import data_file, subsample
from edgeprune.models import CLASSIFIER, model_kind


@dataclass(frozen=True)
class GlueTask:
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None  # None: a regression score
    columns: tuple[str, ...] | None = None  # for files without a header row

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1


@dataclass(frozen=True)
class GlueExample:
    text_a: str
    text_b: str | None
    label: float


GLUE_TASKS = {
    "sst2": GlueTask("SST-2", ("sentence",), "label", ("0", "1")),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", ("0", "1")),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment")),
    "cola": GlueTask("CoLA", ("sentence",), "label", ("0", "1"), ("source", "label", "original_label", "sentence")),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", ("entailment", "not_entailment")),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", None),
}


def read_tsv(path: Path, columns: tuple[str, ...] | None = None) -> list[dict[str, str]]:
    """Rows of a GLUE TSV split on tabs only; `columns` names a headerless file's fields."""
    lines = [line.rstrip("\r") for line in path.read_text(encoding="utf-8-sig").split("\n")]
    lines = [line for line in lines if line]
    header = list(columns) if columns else lines.pop(0).split("\t")
    rows = []
    for number, line in enumerate(lines, start=1 if columns else 2):
        fields = line.split("\t")
        if len(fields) != len(header):
            raise EdgepruneError(f"{path} line {number} has {len(fields)} fields, expected {len(header)} ({header})")
        rows.append(dict(zip(header, fields, strict=True)))
    return rows


def to_example(row: dict[str, str], spec: GlueTask, path: Path) -> GlueExample:
    missing = [c for c in (*spec.text_columns, spec.label_column) if c not in row]
    if missing:
        raise EdgepruneError(f"{path} has no column {missing[0]!r}: expected the official GLUE layout")
    raw = row[spec.label_column]
    if spec.labels is None:
        label = float(raw)
    elif raw in spec.labels:
        label = float(spec.labels.index(raw))
    else:
        raise EdgepruneError(f"{path}: label {raw!r} is not one of {spec.labels}")
    texts = [row[c] for c in spec.text_columns]
    return GlueExample(texts[0], texts[1] if len(texts) > 1 else None, label)


def read_glue(task: str, data_dir: str | Path | None, file: str) -> list[GlueExample]:
    """Every example of `glue/<TASK>/<file>`."""
    spec = glue_spec(task)
    path = data_file(data_dir, f"glue/{spec.folder}/{file}")
    return [to_example(row, spec, path) for row in read_tsv(path, spec.columns)]


def glue_spec(task: str) -> GlueTask:
    if task not in GLUE_TASKS:
        raise EdgepruneError(f"unknown GLUE task '{task}': choose one of {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[task]


def glue_split(task: str, data_dir: str | Path | None, part: str) -> tuple[list[GlueExample], str]:
    """The examples for `part` ("train" or "eval") and a sentence saying which they are."""
    if task == "sst2":
        file = "train.tsv" if part == "train" else "dev.tsv"
        return read_glue(task, data_dir, file), f"SST-2 {file} (all rows)"
    dev = read_glue(task, data_dir, "dev.tsv")
    if part == "train":
        return dev[0::2], "dev.tsv even rows 0,2,4,... (no train split here; odd rows are the evaluation)"
    return dev[1::2], "dev.tsv odd rows 1,3,5,... (even rows are for finetune-head)"


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold))


def f1_binary(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (gold == 1)))
    denominator = float(np.sum(pred == 1) + np.sum(gold == 1))
    return 2 * tp / denominator if denominator else 0.0


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation of binary labels; 0 when a row or column of the confusion matrix is empty."""
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denominator) if denominator else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(x, float), np.asarray(y, float))[0, 1])


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def glue_metrics(task: str, outputs: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """GLUE's metrics for `task` from model outputs ([N, labels] logits, or [N] scores for STS-B)."""
    if task == "stsb":
        return {"pearson": pearson(outputs, gold), "spearman": spearman(outputs, gold)}
    pred = outputs.argmax(-1)
    metrics = {"acc": accuracy(pred, gold)}
    if task == "mrpc":
        metrics["f1"] = f1_binary(pred, gold)
    if task == "cola":
        metrics["mcc"] = matthews(pred, gold)
    return metrics


def encode(tokenizer: PreTrainedTokenizerBase, examples: list[GlueExample], max_length: int) -> dict:
    """A padded batch of single sentences or sentence pairs."""
    second = [e.text_b for e in examples] if examples[0].text_b is not None else None
    return tokenizer(
        [e.text_a for e in examples], second, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )


def predict(
    model, tokenizer: PreTrainedTokenizerBase, examples: list[GlueExample], batch_size: int = 32, max_length: int = 128
) -> np.ndarray:
    """Classifier logits [N, labels] (or scores [N] for one label), in the order of `examples`."""
    outputs = []
    with torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc="classifying", leave=False, disable=None):
            outputs.append(model(**encode(tokenizer, examples[start : start + batch_size], max_length)).logits.float())
    logits = torch.cat(outputs).numpy()
    return logits[:, 0] if logits.shape[1] == 1 else logits


def check_classifier(model, task: str) -> None:
    """A sequence classifier with the right number of outputs, trained for this task if it says so."""
    spec = glue_spec(task)
    if model_kind(model) != CLASSIFIER:
        raise EdgepruneError(
            f"{task} needs a sequence classifier, and {type(model).__name__} has no classification head: "
            f"run `edgeprune finetune-head MODEL --task {task} -o OUT` and evaluate OUT"
        )
    trained_for = getattr(model.config, "finetuning_task", None)
    if trained_for and trained_for != task:
        raise EdgepruneError(f"this head was fine-tuned for {trained_for}, not {task}: evaluate it on {trained_for}")
    if model.config.num_labels != spec.num_labels:
        raise EdgepruneError(f"{task} needs {spec.num_labels} outputs, the model has {model.config.num_labels}")


def evaluate_glue(
    model,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    max_length: int = 128,
) -> dict:
    """GLUE metrics of a sequence classifier on the task's evaluation split (see the module notes)."""
    check_classifier(model, task)
    examples, split = glue_split(task, data_dir, "eval")
    examples = [examples[i] for i in subsample(len(examples), limit, seed)]
    outputs = predict(model, tokenizer, examples, batch_size, max_length)
    gold = np.array([e.label for e in examples])
    return {"metrics": glue_metrics(task, outputs, gold), "n": len(examples), "split": split}

"""Quality measurements of (pruned, exported) models: perplexity, zero-shot multiple choice, GLUE.

Tasks (`EVAL_TASKS`; files are read from the data folder, see `data.resolve_data_dir`):
- perplexity: `wikitext2` (wikitext-2-raw/wiki.test.raw, LLM-Pruner's text), any plain text file
  (scored as it is), or a `datasets` name `name:config:split` (needs the `datasets` package and the hub).
- zero-shot multiple choice (acc, acc_norm): `boolq`, `piqa`, `winogrande`, `arc_easy`, `arc_challenge`,
  or any `.jsonl` file of {"question", "choices", "gold"}.
- GLUE dev for sequence classifiers: `sst2`, `mrpc`, `rte`, `cola`, `qnli`, `stsb` (see `glue` for splits).

Library API:
- `evaluate_task(model, tokenizer, task, data_dir=None, limit=None, seq_len=128, stride=None, seed=0)
  -> {"task", "kind", "metrics": {name: value}, "n", "detail"}`: one task, any kind. `limit` is the
  number of windows (perplexity, the first ones) or items (a seeded random subset, the same for
  every model with the same seed).
- `load_for_eval(spec, threads, tokenizer) -> (model, tokenizer, source)`: a hub id, alias, folder, pruned folder, or
  an ONNX export folder (run by onnxruntime through `OnnxCausalLM`).
- `perplexity(model, tokens, seq_len, max_tokens, batch_size, stride) -> float` on a token stream;
  `wikitext2_text(path)`.
- `evaluate_multiple_choice(model, tokenizer, items, max_length) -> metrics`, with `load_mc_task(task,
  data_dir)` / `load_mc_jsonl(path)` giving the items.
- `evaluate_glue(model, tokenizer, task, data_dir, limit) -> result`; `finetune_head(encoder,
  tokenizer, task, data_dir, steps=..., ...) -> (classifier, record)`.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from edgeprune.calibration import load_text, tokenize_text
from edgeprune.errors import EdgepruneError
from edgeprune.evaluate.data import data_file, resolve_data_dir, subsample
from edgeprune.evaluate.finetune import build_classifier, finetune_head
from edgeprune.evaluate.glue import GLUE_TASKS, evaluate_glue
from edgeprune.evaluate.multiple_choice import (
    MC_FILES,
    MCItem,
    evaluate_multiple_choice,
    load_mc_jsonl,
    load_mc_task,
)
from edgeprune.evaluate.onnx_model import OnnxCausalLM, load_onnx_folder
from edgeprune.evaluate.perplexity import WIKITEXT2_TEST, perplexity, wikitext2_text, window_starts
from edgeprune.models import CAUSAL_LM, model_kind
from edgeprune.runtime import model_file

EVAL_TASKS = ("wikitext2", *MC_FILES, *GLUE_TASKS)
MC_MAX_LENGTH = 2048  # lm-eval's default context for log-likelihood tasks
PPL_BATCH_TOKENS = 2048  # tokens per perplexity batch: bounds the [batch, seq, vocab] logits


def task_kind(task: str) -> str:
    """'perplexity', 'multiple_choice' or 'glue' for a task name, a file, or a datasets name."""
    if task == "wikitext2":
        return "perplexity"
    if task in MC_FILES:
        return "multiple_choice"
    if task in GLUE_TASKS:
        return "glue"
    path = Path(task).expanduser()
    if path.is_file():
        return "multiple_choice" if path.suffix == ".jsonl" else "perplexity"
    if path.suffix in (".jsonl", ".txt", ".raw"):
        raise EdgepruneError(f"task file {path} not found: check the path")
    if task.count(":") == 2:
        return "perplexity"
    raise EdgepruneError(
        f"unknown task '{task}': choose one of {', '.join(EVAL_TASKS)}, a text file (perplexity), "
        "a .jsonl file of question/choices/gold, or a datasets name name:config:split"
    )


def load_for_eval(
    spec: str | None, threads: int | None = None, tokenizer: str | None = None
) -> tuple[object, PreTrainedTokenizerBase, str]:
    """A PyTorch model via `edgeprune.loading.load_model`, or an ONNX export folder run by onnxruntime.

    `tokenizer` (--tokenizer) serves a model saved without one; evaluation always reads text.
    """
    from edgeprune.loading import load_model, require_tokenizer

    if spec and is_onnx_export(spec):
        model, text = load_onnx_folder(Path(spec).expanduser(), threads, tokenizer)
        return model, text, spec
    loaded = load_model(spec, tokenizer)
    return loaded.model, require_tokenizer(loaded.tokenizer, loaded.source, "evaluation"), loaded.source


def is_onnx_export(spec: str) -> bool:
    """Whether `spec` names an .onnx file or a folder holding one (else it is a PyTorch model)."""
    try:
        model_file(spec)
    except EdgepruneError:
        return False
    return True


def max_positions(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or MC_MAX_LENGTH)


def require_causal_lm(model, task: str) -> None:
    """Perplexity and multiple choice score next tokens: an exported decoder, or a PyTorch model of a causal family."""
    if not (isinstance(model, OnnxCausalLM) or (hasattr(model, "config") and model_kind(model) == CAUSAL_LM)):
        raise EdgepruneError(f"task {task} needs a causal language model, got {type(model).__name__}")


def evaluate_perplexity(
    model,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data_dir: str | Path | None,
    limit: int | None,
    seq_len: int,
    stride: int | None,
) -> dict:
    """Perplexity on a task's text in windows of `seq_len` (the first `limit` windows if given)."""
    if seq_len > max_positions(model):
        raise EdgepruneError(f"--seq-len {seq_len} exceeds the model's {max_positions(model)} positions")
    text = wikitext2_text(data_file(data_dir, WIKITEXT2_TEST)) if task == "wikitext2" else load_text(task)
    tokens = tokenize_text(tokenizer, text)
    stride = stride or seq_len
    if len(tokens) < seq_len:
        raise EdgepruneError(f"{task} has {len(tokens)} tokens, fewer than one window: lower --seq-len")
    if not 0 < stride <= seq_len:
        raise EdgepruneError(f"--stride {stride} must be between 1 and --seq-len {seq_len}")
    if limit is not None:
        tokens = tokens[: (limit - 1) * stride + seq_len]
    n_windows = len(window_starts(len(tokens), seq_len, stride))
    ppl = perplexity(model, tokens, seq_len, batch_size=max(1, PPL_BATCH_TOKENS // seq_len), stride=stride)
    overlap = "non-overlapping" if stride == seq_len else f"sliding, stride {stride}"
    return {"metrics": {"ppl": ppl}, "n": n_windows, "detail": f"{n_windows} windows of {seq_len} tokens, {overlap}"}


def evaluate_task(
    model,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seq_len: int = 128,
    stride: int | None = None,
    seed: int = 0,
) -> dict:
    """One evaluation task on a loaded model: {"task", "kind", "metrics", "n", "detail"}."""
    kind = task_kind(task)
    if limit is not None and limit <= 0:
        raise EdgepruneError(f"--limit must be positive, got {limit}")
    if kind == "perplexity":
        require_causal_lm(model, task)
        result = evaluate_perplexity(model, tokenizer, task, data_dir, limit, seq_len, stride)
    elif kind == "multiple_choice":
        require_causal_lm(model, task)
        items = load_mc_task(task, data_dir) if task in MC_FILES else load_mc_jsonl(Path(task).expanduser())
        picked = subsample(len(items), limit, seed)
        max_length = min(max_positions(model), MC_MAX_LENGTH)
        metrics = evaluate_multiple_choice(model, tokenizer, [items[i] for i in picked], max_length)
        detail = f"{len(picked)} of {len(items)} items" + (f" (seed {seed})" if len(picked) < len(items) else "")
        result = {"metrics": metrics, "n": len(picked), "detail": detail}
    else:
        glue = evaluate_glue(model, tokenizer, task, data_dir, limit, seed, max_length=seq_len)
        result = {"metrics": glue["metrics"], "n": glue["n"], "detail": glue["split"]}
    return {"task": task, "kind": kind, **result}


__all__ = [
    "EVAL_TASKS",
    "MCItem",
    "OnnxCausalLM",
    "build_classifier",
    "evaluate_glue",
    "evaluate_multiple_choice",
    "evaluate_task",
    "finetune_head",
    "load_for_eval",
    "load_mc_jsonl",
    "load_mc_task",
    "perplexity",
    "resolve_data_dir",
    "task_kind",
    "wikitext2_text",
]

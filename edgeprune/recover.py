"""LoRA recovery of a pruned model with peft, merged back into plain (pruned) weights.

Flow: `load_recovery_data` (tokenized train / held-out examples) -> `recover` (attach LoRA to
every linear projection, train under `accelerate`, evaluate on the held-out split every K
steps, restore the best step's adapter, `merge_and_unload`) -> an ordinary transformers model
with the same per-layer widths, saved by `recover_folder` with `checkpoint.save_pruned`.

Data (what each family learns from):
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

Resuming: every `save_every` steps the LoRA weights, the best adapter so far, the optimizer
state, each process's torch RNG state and the step counters are written to a work folder
beside the output (`.OUT.recover/`). Weights and RNG states are safetensors, counters JSON;
the optimizer state dict is a `torch.save` file (tensors and numbers only, read back with
`weights_only=True`). The order of training examples is a pure function of the seed and the
step, so a resumed run sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from edgeprune.calibration import PACKAGED_TEXT, tokenize_text
from edgeprune.errors import EdgepruneError
from edgeprune.models import adapter_for, is_decoder, is_sequence_classifier

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100  # label of tokens that carry no loss (prompt, padding), as transformers expects
MLM_PROBABILITY = 0.15
FIRST_TEXT, SECOND_TEXT = ("text", "sentence", "sentence1"), ("text_pair", "sentence2")


@dataclass
class RecoveryConfig:
    """LoRA and training settings; defaults are LLM-Pruner's LoRA (r=8, alpha=16, lr 1e-4) sized for a CPU.

    Budget: `steps` or `epochs` fix the number of optimizer steps, `minutes` caps wall time;
    training stops at whichever is reached first (100 steps when none is given).
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
    eval_every: int = 25
    save_every: int = 25
    val_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise EdgepruneError("give either --steps or --epochs, not both (--minutes can cap either)")
        positive = {"rank": self.rank, "seq-len": self.seq_len, "batch-size": self.batch_size}
        positive |= {"grad-accum": self.grad_accum, "eval-every": self.eval_every, "save-every": self.save_every}
        positive |= {"val-size": self.val_size, "steps": self.steps or 1, "epochs": self.epochs or 1}
        positive |= {"minutes": self.minutes or 1, "lr": self.lr}
        bad = [name for name, value in positive.items() if value <= 0]
        if bad:
            raise EdgepruneError(f"--{bad[0]} must be positive")

    def examples_per_step(self, num_processes: int) -> int:
        return self.batch_size * self.grad_accum * num_processes

    def total_steps(self, n_train: int, num_processes: int) -> int | None:
        """Optimizer steps to run; None when only the minutes cap ends training."""
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * n_train / self.examples_per_step(num_processes)))
        if self.steps is None and self.minutes is not None:
            return None
        return self.steps or 100


@dataclass
class RecoveryData:
    """Tokenized examples (dicts of `input_ids` and, unless masked later, `labels`) and how they were made."""

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    kind: str  # "instruct", "text", "mlm" or "classify"
    source: str


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


# -- data ---------------------------------------------------------------------------------------


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


def model_kind(model: PreTrainedModel) -> str:
    """Which loss the model can train with: causal LM, masked LM or sequence classification."""
    if is_decoder(model.config):
        return "decoder"
    if is_sequence_classifier(model):
        return "classifier"
    if model.get_output_embeddings() is not None:
        return "mlm"
    raise EdgepruneError(
        f"{type(model).__name__} has no head to train: recover a *ForMaskedLM or *ForSequenceClassification encoder"
    )


def encode_examples(
    rows: list | str, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, seq_len: int, source: str
):
    """(kind, examples): instruction rows or text for decoders, text (MLM) or labelled rows for encoders."""
    family = model_kind(model)
    wanted = {"decoder": "Alpaca rows or text", "mlm": "a text file", "classifier": "labelled rows (text, label)"}
    labelled = isinstance(rows, list) and is_labelled_rows(rows)
    instruction = isinstance(rows, list) and is_instruction_rows(rows)
    if (family == "classifier") != labelled or (instruction and family != "decoder"):
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
    mlm = family == "mlm"
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
        return DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=MLM_PROBABILITY)
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


# -- LoRA ---------------------------------------------------------------------------------------


def auto_targets(model: nn.Module) -> list[str]:
    """Full module names of every FFN and attention projection, found by the family adapter.

    Full names avoid suffix collisions (BERT's `attention.output.dense` vs `output.dense`).
    """
    adapter = adapter_for(model.config)
    wanted = set()
    for layer in adapter.layers(model):
        linears = [
            *adapter.ffn_inputs(layer),
            adapter.ffn_output(layer),
            *adapter.attention_projections(layer).values(),
        ]
        wanted |= {id(lin) for lin in linears}
    return [name for name, module in model.named_modules() if id(module) in wanted]


def lora_config(model: nn.Module, config: RecoveryConfig) -> LoraConfig:
    """`auto`: every projection; `all-linear`: peft's rule; else comma-separated module-name suffixes."""
    if config.targets == "auto":
        targets: list[str] | str = auto_targets(model)
    elif config.targets == "all-linear":
        targets = "all-linear"
    else:
        targets = [t.strip() for t in config.targets.split(",") if t.strip()]
    task = "SEQ_CLS" if is_sequence_classifier(model) else None  # head in full
    return LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, task_type=task
    )


def attach_lora(model: PreTrainedModel, config: RecoveryConfig) -> PeftModel:
    """The model wrapped by peft with trainable LoRA adapters; each wrap takes its layer's own (pruned) shape."""
    try:
        return get_peft_model(model, lora_config(model, config))
    except ValueError as err:
        raise EdgepruneError(f"--targets {config.targets}: {str(err).splitlines()[0]}") from None


def merge(peft_model: PeftModel) -> PreTrainedModel:
    """The base model with the adapter folded into its weights (no adapter overhead at inference)."""
    return peft_model.merge_and_unload()


# -- processes ----------------------------------------------------------------------------------


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


# -- training -----------------------------------------------------------------------------------


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


@dataclass
class TrainState:
    """Counters that make a run resumable (saved as JSON)."""

    step: int = 0
    seconds: float = 0.0
    best_step: int = 0
    best_loss: float = math.inf
    val_losses: list[list[float]] = field(default_factory=list)
    train_losses: list[list[float]] = field(default_factory=list)


def rng_states() -> dict[str, torch.Tensor]:
    """This process's torch generators (CPU, and the current GPU's when there is one)."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def save_checkpoint(
    work: Path, peft_model: PeftModel, optimizer, state: TrainState, best: dict, accelerator: Accelerator
) -> None:
    """Adapter, best adapter, optimizer, per-process RNG and counters; replaced in one rename."""
    ckpt, tmp = work / "checkpoint", work / "checkpoint.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file(rng_states(), tmp / f"rng-{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        save_file(get_peft_model_state_dict(peft_model), tmp / "adapter.safetensors")
        save_file(best, tmp / "best_adapter.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.replace(ckpt)
    accelerator.wait_for_everyone()


def load_checkpoint(work: Path, peft_model: PeftModel, optimizer, accelerator: Accelerator) -> tuple[TrainState, dict]:
    """Restore what `save_checkpoint` wrote; returns the counters and the best adapter."""
    ckpt = work / "checkpoint"
    rng = ckpt / f"rng-{accelerator.process_index}.safetensors"
    if not rng.is_file():
        raise EdgepruneError(f"{ckpt} was written by a different number of processes: resume with the same launch")
    set_peft_model_state_dict(peft_model, load_file(ckpt / "adapter.safetensors"))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    states = load_file(rng)
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    state = TrainState(**json.loads((ckpt / "state.json").read_text()))
    return state, load_file(ckpt / "best_adapter.safetensors")


def adapter_snapshot(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


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


# -- folders ------------------------------------------------------------------------------------


def work_dir_for(out: Path) -> Path:
    """Where an unfinished run's checkpoints live: beside OUT, so `--resume` finds them."""
    out = out.expanduser().absolute()
    return out.with_name(f".{out.name}.recover")


def run_signature(source_hash: str, data: str, config: RecoveryConfig, processes: int) -> dict:
    """What a resumed run must share with the interrupted one (budgets and schedules may change)."""
    free = ("steps", "epochs", "minutes", "eval_every", "save_every")
    fixed = {k: v for k, v in asdict(config).items() if k not in free}
    return {"input_sha256": source_hash, "data": data, "processes": processes, **fixed}


def prepare_work_dir(work: Path, signature: dict, resume: bool, overwrite: bool, accelerator: Accelerator) -> None:
    """Check or (re)create the work folder; refuses to silently discard an interrupted run."""
    run_file = work / "run.json"
    if resume:
        if not run_file.is_file():
            raise EdgepruneError(f"nothing to resume: {work} has no checkpoint; run without --resume")
        saved = json.loads(run_file.read_text())
        changed = [k for k in signature if saved.get(k) != signature[k]]
        if changed:
            key = changed[0]
            raise EdgepruneError(
                f"--resume with a different {key} ({saved.get(key)} before, {signature[key]} now): "
                "use the interrupted run's settings, or drop --resume and pass --overwrite"
            )
        return
    if (work / "checkpoint").exists() and not overwrite:
        raise EdgepruneError(
            f"an interrupted recovery is in {work}: pass --resume to continue or --overwrite to restart"
        )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        run_file.write_text(json.dumps(signature, indent=1) + "\n")
    accelerator.wait_for_everyone()


def recover_folder(
    model_spec: str,
    data_source: str,
    out: Path,
    config: RecoveryConfig,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable[[int, int | None, float, float | None], None] | None = None,
) -> RecoveryResult:
    """Recover a pruned folder (or any model) and save it as a pruned folder at `out`, atomically.

    The input is never written; `out` is refused if it exists unless `overwrite`. Only the main
    process writes the output; the work folder is removed once the output is in place.
    """
    from edgeprune.checkpoint import read_provenance, save_pruned
    from edgeprune.loading import load_model, require_tokenizer
    from edgeprune.outputs import check_output, local_inputs

    out = check_output(out, overwrite, local_inputs(model_spec, data_source))
    loaded = load_model(model_spec)
    require_tokenizer(loaded.tokenizer, loaded.source, "recovery", "prune with --tokenizer PATH_OR_ID so it keeps one")
    data = load_recovery_data(data_source, loaded.tokenizer, loaded.model, config)
    accelerator = make_accelerator(config)
    work = work_dir_for(out)
    signature = run_signature(loaded.source_hash, data.source, config, accelerator.num_processes)
    prepare_work_dir(work, signature, resume, overwrite, accelerator)
    try:
        result = recover(loaded.model, loaded.tokenizer, data, config, work_dir=work, resume=resume, on_step=on_step)
    except BaseException:
        if accelerator.is_main_process and not (work / "checkpoint").exists():
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume: leave no trace
        raise
    if accelerator.is_main_process:
        previous = read_provenance(loaded.folder) if loaded.folder is not None else {}
        provenance = {**previous, "recovered_from": loaded.source, "recovered_from_sha256": loaded.source_hash}
        provenance.setdefault("source", loaded.source)
        provenance["recovery"] = result.record
        provenance = {k: v for k, v in provenance.items() if k not in ("layer_widths", "versions", "created")}
        save_pruned(result.model, loaded.tokenizer, out, provenance, overwrite=overwrite, protect=loaded.folder)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return result


__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "RecoveryConfig",
    "RecoveryData",
    "RecoveryResult",
    "attach_lora",
    "load_recovery_data",
    "merge",
    "recover",
    "recover_folder",
    "recover_model",
]

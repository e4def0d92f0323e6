"""Recovery text when the user gives none: the dense model writes it, or the calibration text is used.

`default_data` is the one place that decides what recovery trains on without `--data`:
with a teacher, `write_self_text` samples the teacher's continuations (temperature, top-p,
seeded per batch, batched with the KV cache) of prompts drawn from the calibration text minus
its held-out tail and of packaged short instructions (`data/instructions.txt`, through the
tokenizer's chat template when it has one); without one, the calibration text minus its tail.
Either is written once into a work folder as JSONL rows (`prompt`, `text`) or text and reused
when the same settings and teacher ask for it again; self-written text is also kept in the shared
cache ($EDGEPRUNE_CACHE/self_text), keyed by the teacher's hash, the settings and the prompt text.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgeprune.calibration import PACKAGED_TEXT, heldout_start, tokenize_text
from edgeprune.errors import EdgepruneError
from edgeprune.outputs import cache_dir, write_atomic
from edgeprune.recover.data import alpaca_prompt

INSTRUCTIONS = Path(__file__).resolve().parents[1] / "data" / "instructions.txt"
SELF_TEXT_FILE, SELF_TEXT_META = "self_text.jsonl", "self_text.json"
HEAD_TEXT_FILE = "recovery.txt"


@dataclass
class SelfTextConfig:
    """How much text the teacher writes and how it samples; about 16k tokens fill 5 minutes of CPU training."""

    samples: int = 128
    instruction_share: float = 0.5
    prompt_tokens: int = 32
    new_tokens: int = 96
    temperature: float = 1.0  # the teacher's own distribution: what the student is asked to match
    top_p: float = 0.95
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.samples, self.prompt_tokens, self.new_tokens, self.batch_size) <= 0 or self.temperature <= 0:
            raise EdgepruneError("self-generated text needs positive samples, token counts, batch size and temperature")
        if not (0 < self.top_p <= 1 and 0 <= self.instruction_share <= 1):
            raise EdgepruneError("self-generated text needs top_p in (0, 1] and instruction_share in [0, 1]")


def instruction_prompts() -> list[str]:
    """The packaged instructions, one a line."""
    return [line.strip() for line in INSTRUCTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]


def as_prompt(instruction: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """An instruction as the model expects it: its chat template, else the Alpaca prompt."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return alpaca_prompt({"instruction": instruction})


def draw_prompts(prompt_text: str, tokenizer: PreTrainedTokenizerBase, config: SelfTextConfig) -> list[str]:
    """Seeded prompts: windows of `prompt_text` (never anything beyond it) and packaged instructions, shuffled."""
    rng = random.Random(config.seed)
    n_instructions = round(config.samples * config.instruction_share)
    instructions = rng.sample(instruction_prompts(), len(instruction_prompts()))
    prompts = [as_prompt(instructions[i % len(instructions)], tokenizer) for i in range(n_instructions)]
    tokens = tokenize_text(tokenizer, prompt_text).tolist()
    n_windows = config.samples - n_instructions
    if n_windows and len(tokens) < config.prompt_tokens:
        raise EdgepruneError(
            f"the prompt text has {len(tokens)} tokens, fewer than one prompt of {config.prompt_tokens}: give more text"
        )
    for _ in range(n_windows):
        start = rng.randrange(len(tokens) - config.prompt_tokens + 1)
        prompts.append(tokenizer.decode(tokens[start : start + config.prompt_tokens]))
    rng.shuffle(prompts)
    return prompts


def cut_at_eos(ids: list[int], eos: int | None) -> list[int]:
    """Generated ids up to and including the first EOS (what follows is padding)."""
    return ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids


def sample_continuations(
    teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: SelfTextConfig
) -> list[str]:
    """The teacher's sampled continuation of each prompt, batched (left-padded) with the KV cache.

    Each batch draws from its own seed, so the text depends on the seed and the settings only.
    """
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    continuations = []
    try:
        for number, start in enumerate(range(0, len(prompts), config.batch_size)):
            encoded = tokenizer(
                prompts[start : start + config.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            batch = {k: encoded[k].to(teacher.device) for k in ("input_ids", "attention_mask")}
            torch.manual_seed(config.seed * 1_000_003 + number)
            with torch.no_grad():
                out = teacher.generate(
                    **batch,
                    do_sample=True,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    top_k=0,
                    max_new_tokens=config.new_tokens,
                    pad_token_id=pad,
                    use_cache=True,
                )
            for ids in out[:, batch["input_ids"].shape[1] :].tolist():
                continuations.append(tokenizer.decode(cut_at_eos(ids, tokenizer.eos_token_id)))
    finally:
        tokenizer.padding_side = side
    return continuations


def written_for(folder: Path, meta: dict) -> bool:
    """Whether `folder` holds self-written text made with exactly these settings."""
    meta_path = folder / SELF_TEXT_META
    return (
        (folder / SELF_TEXT_FILE).is_file()
        and meta_path.is_file()
        and json.loads(meta_path.read_text()).get("settings") == meta
    )


def shared_folder(meta: dict) -> Path:
    """Where text written for these settings is kept for every later run on this machine (EDGEPRUNE_CACHE)."""
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "self_text" / key


def copy_text(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in (SELF_TEXT_FILE, SELF_TEXT_META):
        write_atomic(target / name, (source / name).read_text(encoding="utf-8"))


def write_self_text(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    work: Path,
    config: SelfTextConfig,
    teacher_hash: str,
) -> Path:
    """`work/self_text.jsonl`, generated unless the same teacher and settings already wrote it.

    With the teacher's content hash, text written is also kept in the shared cache, so the next run
    on this machine (another budget, another output folder) skips writing it.
    """
    path = work / SELF_TEXT_FILE
    text_sha = hashlib.sha256(prompt_text.encode()).hexdigest()
    meta = {"teacher": teacher_hash, **asdict(config), "prompt_text_sha256": text_sha}
    if written_for(work, meta):
        return path
    shared = shared_folder(meta) if teacher_hash else None
    if shared is not None and written_for(shared, meta):
        copy_text(shared, work)
        return path
    prompts = draw_prompts(prompt_text, tokenizer, config)
    started = time.monotonic()
    continuations = sample_continuations(teacher.eval(), tokenizer, prompts, config)
    seconds = time.monotonic() - started
    rows = [{"prompt": p, "text": p + c} for p, c in zip(prompts, continuations, strict=True)]
    work.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    write_atomic(work / SELF_TEXT_META, json.dumps({"settings": meta, "seconds": round(seconds, 1)}, indent=1) + "\n")
    if shared is not None:
        copy_text(work, shared)
    return path


def packaged_head_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The packaged calibration text minus the tail `run` holds out for perplexity."""
    tokens = tokenize_text(tokenizer, PACKAGED_TEXT.read_text(encoding="utf-8"))
    return tokenizer.decode(tokens[: heldout_start(len(tokens))].tolist())


def default_data(
    tokenizer: PreTrainedTokenizerBase,
    prompt_text: str,
    work: Path,
    teacher: PreTrainedModel | None = None,
    teacher_hash: str = "",
    config: SelfTextConfig | None = None,
) -> Path:
    """What recovery trains on when the user gives no data (see the module docstring)."""
    if teacher is not None:
        return write_self_text(teacher, tokenizer, prompt_text, work, config or SelfTextConfig(), teacher_hash)
    work.mkdir(parents=True, exist_ok=True)
    path = work / HEAD_TEXT_FILE
    write_atomic(path, prompt_text)
    return path

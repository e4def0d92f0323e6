"""Recovery text when the user gives none: the dense model writes it, or the calibration text is used.

`default_data` is the one place that decides what recovery trains on without `--data`:
with a teacher, `write_self_text` samples the teacher's continuations (temperature, exact top-p,
seeded per batch, in a loop over the model and its KV cache, bf16 where the CPU has it) of prompts
drawn from the calibration text minus its held-out tail and of packaged short instructions
(`data/instructions.txt`, through the tokenizer's chat template when it has one); without one,
the calibration text minus its tail. Either is written once into a work folder as JSONL rows
(`prompt`, `text`) or text and reused when the same settings and teacher ask for it again;
self-written text is also kept in the shared cache ($EDGEPRUNE_CACHE/self_text), keyed by the
teacher's hash, the settings, the sampler and the prompt text.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from edgeprune.calibration import PACKAGED_TEXT, heldout_start, tokenize_text
from edgeprune.errors import EdgepruneError
from edgeprune.outputs import cache_dir, write_atomic
from edgeprune.recover.data import alpaca_prompt

INSTRUCTIONS = Path(__file__).resolve().parents[1] / "data" / "instructions.txt"
SELF_TEXT_FILE, SELF_TEXT_META = "self_text.jsonl", "self_text.json"
HEAD_TEXT_FILE = "recovery.txt"
SAMPLER = "nucleus-loop-v2"  # in the cache key: text written by another sampler is not reused as equal


@dataclass
class SelfTextConfig:
    """How much text the teacher writes and how it samples; about 16k tokens fill 5 minutes of CPU training."""

    samples: int = 128
    instruction_share: float = 0.5
    prompt_tokens: int = 32
    new_tokens: int = 96
    temperature: float = 1.0  # the teacher's own distribution: what the student is asked to match
    top_p: float = 0.95
    batch_size: int = 64  # rows that stop leave the batch, so a wide batch wastes nothing
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


def sampling_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the CPU has bf16 matmuls (oneDNN), else float32."""
    return torch.bfloat16 if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def sampling_model(teacher: PreTrainedModel) -> PreTrainedModel:
    """The teacher as `sample_continuations` runs it: a copy in bfloat16 where the CPU has bf16 matmuls.

    bf16 matmuls run about twice as fast (benchmarks/bench_selftext.py: the float32 teacher's NLL of
    the text unchanged, KL(float32 || bf16) about 0.001 nats/token); eager attention because a decode
    step has one query per row, where SDPA's CPU kernel costs more than the product it computes.
    """
    model = copy.deepcopy(teacher).to(sampling_dtype(teacher.device))
    model.set_attn_implementation("eager")
    return model.eval()


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to its top-p nucleus (exact).

    The nucleus is the smallest set of most likely tokens whose mass reaches `top_p` (as HF's
    TopPLogitsWarper keeps it). Sorting a 49k vocabulary per row costs more than the model's step,
    so candidates come from `topk`, 64 first and 8 times more for the rows whose candidates hold
    less than `top_p`: a row is sampled only once its whole nucleus is among its candidates.
    """
    probs = (logits.float() / temperature).softmax(-1)
    vocab = probs.shape[-1]
    if top_p >= 1:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    tokens = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    rows, k = torch.arange(len(probs), device=probs.device), 64
    while len(rows):
        k = min(k, vocab)
        top, index = probs[rows].topk(k, dim=-1)
        whole = (top.sum(-1) >= top_p) | (k == vocab)
        top, index = top[whole], index[whole]
        weights = top.masked_fill(top.cumsum(-1) - top >= top_p, 0)  # mass before a token reached top_p: out
        tokens[rows[whole]] = index.gather(-1, torch.multinomial(weights, 1, generator=generator)).squeeze(-1)
        rows, k = rows[~whole], k * 8
    return tokens


def sample_batch(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, config: SelfTextConfig, stop: int | None, seed: int
) -> list[list[int]]:
    """The sampled continuation ids of a left-padded batch, each up to `stop` or `config.new_tokens`.

    A hand-written loop over the model and its KV cache: rows that reached `stop` leave the batch.
    """
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    written: list[list[int]] = [[] for _ in range(len(ids))]
    alive = torch.arange(len(ids), device=ids.device)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache, logits_to_keep=1
    ).logits[:, -1]
    for _ in range(config.new_tokens):
        tokens = sample_top_p(logits, config.temperature, config.top_p, generator)
        for row, token in zip(alive.tolist(), tokens.tolist(), strict=True):
            written[row].append(token)
        going = tokens != stop if stop is not None else torch.ones_like(tokens, dtype=torch.bool)
        if not going.all():
            if not going.any():
                break
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, tokens, mask, position = alive[keep], tokens[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=-1)
        position = position[:, -1:] + 1
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=position, past_key_values=cache
        ).logits[:, -1]
    return written


def sample_continuations(
    teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], config: SelfTextConfig
) -> list[str]:
    """The teacher's sampled continuation of each prompt, batched (left-padded) with the KV cache.

    Prompts are batched by token length (less padding to compute), each batch from its own seed,
    so the text depends on the seed and the settings only.
    """
    model = sampling_model(teacher)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    continuations: dict[int, str] = {}
    with torch.inference_mode():
        for number, start in enumerate(range(0, len(order), config.batch_size)):
            batch = order[start : start + config.batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch], device=teacher.device)
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch])
            seed = config.seed * 1_000_003 + number
            written = sample_batch(model, ids, mask.to(teacher.device), config, tokenizer.eos_token_id, seed)
            for i, new in zip(batch, written, strict=True):
                continuations[i] = tokenizer.decode(new)
    return [continuations[i] for i in range(len(prompts))]


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
    sampler = f"{SAMPLER}-{str(sampling_dtype(teacher.device)).removeprefix('torch.')}"
    meta = {"teacher": teacher_hash, **asdict(config), "prompt_text_sha256": text_sha, "sampler": sampler}
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

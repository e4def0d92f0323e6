"""The dense teacher writing its own recovery text: HF `generate` (the sampler before) against edgeprune's loop.

    PYTHONPATH=$PWD python benchmarks/bench_selftext.py [--samples 128] [--threads 2] [--methods ...]

Default decoder (SmolLM2-135M-Instruct), `SelfTextConfig` prompts (packaged calibration text minus its
held-out tail, and packaged instructions), 96 new tokens, temperature 1.0, top-p 0.95. Per method and batch:
seconds, new tokens/s, and two checks that the sampling distribution is unchanged: the float32 teacher's
NLL per token of the written continuations (what the student will be asked to match; sampling from the
teacher's own distribution gives its entropy), and the mean KL(float32 teacher || sampler) per continuation
token over the same text (0 for a float32 sampler), both on the first `--check-samples` rows.
Appends to benchmarks/out/bench_selftext.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_common import append_result

from edgeprune.loading import load_model
from edgeprune.recover import selftext
from edgeprune.recover.selftext import SelfTextConfig, draw_prompts, packaged_head_text, sampling_model

OUT = Path(__file__).parent / "out" / "bench_selftext.json"


def hf_generate(teacher, tokenizer, prompts: list[str], config: SelfTextConfig) -> list[str]:
    """The sampler before (edgeprune 411cf3b): float32 `generate`, SDPA, left-padded batches, top-p by sorting."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    continuations = []
    try:
        for number, start in enumerate(range(0, len(prompts), config.batch_size)):
            batch = tokenizer(
                prompts[start : start + config.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            torch.manual_seed(config.seed * 1_000_003 + number)
            with torch.no_grad():
                out = teacher.generate(
                    **batch,
                    do_sample=True,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    top_k=0,
                    max_new_tokens=config.new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
            for ids in out[:, batch["input_ids"].shape[1] :].tolist():
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ids else ids
                continuations.append(tokenizer.decode(ids))
    finally:
        tokenizer.padding_side = side
    return continuations


def text_checks(teacher, sampler, tokenizer, prompts: list[str], continuations: list[str]) -> tuple[float, float]:
    """(teacher NLL per continuation token, mean KL(teacher || sampler) per token)."""
    nll, kl, count = 0.0, 0.0, 0
    with torch.inference_mode():
        for prompt, new in zip(prompts, continuations, strict=True):
            head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            tail = tokenizer(new, add_special_tokens=False)["input_ids"]
            if not tail:
                continue
            ids = torch.tensor([head + tail])
            logp = teacher(input_ids=ids).logits[0, len(head) - 1 : -1].float().log_softmax(-1)
            logq = sampler(input_ids=ids).logits[0, len(head) - 1 : -1].float().log_softmax(-1)
            nll -= logp.gather(-1, ids[0, len(head) :, None]).sum().item()
            kl += (logp.exp() * (logp - logq)).sum().item()
            count += len(tail)
    return nll / count, kl / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-samples", type=int, default=48, help="the first N written rows the checks score")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["loop-bfloat16:64", "loop-bfloat16:128", "loop-float32:64", "hf-generate:16"],
        help="method:batch, method in hf-generate, loop-float32, loop-bfloat16",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(None, None)
    teacher, tokenizer = loaded.model.eval(), loaded.tokenizer
    base = SelfTextConfig(samples=args.samples)
    prompts = draw_prompts(packaged_head_text(tokenizer), tokenizer, base)
    rows = []
    for spec in args.methods:
        method, batch = spec.split(":")
        config = replace(base, batch_size=int(batch))
        dtype = torch.bfloat16 if method == "loop-bfloat16" else torch.float32
        selftext.sampling_dtype = lambda device, dtype=dtype: dtype  # the benchmark picks what the CPU check would
        started, cpu = time.perf_counter(), time.process_time()
        if method == "hf-generate":
            continuations = hf_generate(teacher, tokenizer, prompts, config)
        else:
            continuations = selftext.sample_continuations(teacher, tokenizer, prompts, config)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
        n = args.check_samples
        new_tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations)
        nll, kl = text_checks(teacher, sampling_model(teacher), tokenizer, prompts[:n], continuations[:n])
        row = {
            "method": method,
            "batch": config.batch_size,
            "samples": len(prompts),
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "new_tokens": new_tokens,
            "tokens_per_s": round(new_tokens / seconds, 1),
            "check_samples": min(n, len(prompts)),
            "teacher_nll": round(nll, 3),
            "kl_teacher_sampler": round(kl, 5) + 0.0,  # + 0.0: no -0.0 from rounding
        }
        rows.append(append_result(OUT, row))
        print(row, flush=True)
    header = "method | batch | seconds | CPU s | new tokens | tokens/s | teacher NLL | KL(teacher‖sampler) | load"
    print(f"\n| {header} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['batch']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['new_tokens']} | "
            f"{r['tokens_per_s']:.0f} | {r['teacher_nll']:.3f} | {r['kl_teacher_sampler']:.4f} | "
            f"{r['load_average_1m']} |"
        )


if __name__ == "__main__":
    main()

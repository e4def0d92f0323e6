"""`run`'s recovery in float32 against bfloat16 matmuls, for the same wall minutes, on `run`'s own cuts.

The default decoder is cut as `run` cuts it (`run.RunConfig()`: fluctuation scores on its
calibration windows, FFN neurons of layers 1..28, re-fit on its windows; `probes.pruned_copy`) at each
`--cuts` fraction, then recovered by `run`'s recovery (`run.run_recovery`: LoRA distillation from the
dense model, 128-token windows, held-out KL every 5 steps, best step kept) for `--minutes` wall
minutes with `precision=float32` and `precision=bfloat16` (the order alternates between cuts).
Each row: optimizer steps, training tokens per second, the held-out KL to the dense model (float32
evaluation) before and at the best step, `run`'s held-out perplexity (the packaged text's tail)
before and after, and the held-out KL of both precisions at the steps both reached (equal-step
quality). Timing needs a quiet machine: `--threads` (2) torch threads, the load is recorded.

    python benchmarks/bench_recover_bf16.py --minutes 3 --cuts 0.067,0.25
Writes benchmarks/out/bench_recover_bf16.json (one entry per row, appended).
"""

from __future__ import annotations

import argparse
import copy
import os
from dataclasses import replace
from pathlib import Path

import torch
from bench_common import append_result
from rich.console import Console
from rich.table import Table

from edgeprune.loading import load_model, require_tokenizer
from edgeprune.models import adapter_for
from edgeprune.probes import pruned_copy
from edgeprune.recover import recover_model
from edgeprune.recover.train import heldout_perplexity
from edgeprune.run import RunConfig, load_or_score, run_calibration, run_recovery

OUT = Path(__file__).parent / "out"
PRECISIONS = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--cuts", default="0.067,0.25")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=OUT / "recover_bf16")
    parser.add_argument("--out", type=Path, default=OUT / "bench_recover_bf16.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig()
    loaded = load_model(None, None)
    tokenizer = require_tokenizer(loaded.tokenizer, loaded.source, "the run's calibration")
    adapter = adapter_for(loaded.model.config)
    calib = run_calibration(tokenizer, cfg)
    scores = load_or_score(args.work / "scores.safetensors", loaded, adapter, cfg, calib)
    dense_ppl = heldout_perplexity(loaded.model, calib.heldout, cfg.eval_seq_len)
    prompt_text = tokenizer.decode(calib.head.tolist())
    rows = []
    for i, sparsity in enumerate(float(c) for c in args.cuts.split(",")):
        cut, _ = pruned_copy(loaded.model, adapter, scores, cfg.spec(sparsity), calib.refit)
        results = {}
        for precision in PRECISIONS if i % 2 == 0 else PRECISIONS[::-1]:
            config = replace(run_recovery(), minutes=args.minutes, precision=precision)
            record = recover_model(
                copy.deepcopy(cut),
                tokenizer,
                config,
                work=args.work,
                prompt_text=prompt_text,
                teacher=loaded.model,
                teacher_id=loaded.source,
                teacher_hash=loaded.source_hash,
                heldout=calib.heldout,
                eval_seq_len=cfg.eval_seq_len,
            ).record
            results[precision] = record
            print(f"cut {sparsity}: {precision} done, {record.steps} steps, load {os.getloadavg()[0]:.2f}", flush=True)
        val = {p: dict(r.val_losses) for p, r in results.items()}
        common = sorted(set(val["float32"]) & set(val["bfloat16"]))
        for precision, record in results.items():
            row = {
                "cut": sparsity,
                "precision": precision,
                "dtype": record.dtype,
                "minutes": args.minutes,
                "steps": record.steps,
                "tokens": record.tokens,
                "tokens_per_s": round(record.tokens / record.seconds, 1),
                "teacher_share": record.teacher_share,
                "val_kl_before": round(record.val_loss_before, 4),
                "val_kl_best": round(record.val_loss_best, 4),
                "best_step": record.best_step,
                "val_kl_at_common_steps": {s: round(val[precision][s], 4) for s in common},
                "ppl_dense": round(dense_ppl, 2),
                "ppl_before": round(record.heldout_ppl_before, 2),
                "ppl_after": round(record.heldout_ppl_after, 2),
                "recovery_seconds": record.seconds,
                "cpu_seconds": record.cpu_seconds,
            }
            rows.append(append_result(args.out, row))
    table = Table(title=f"run's recovery, {args.minutes:g} wall minutes, {args.threads} threads")
    for column in ("cut", "dtype", "steps", "tok/s", "KL before", "KL best", "PPL dense", "PPL before", "PPL after"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            *map(str, (r["cut"], r["dtype"], r["steps"], r["tokens_per_s"], r["val_kl_before"], r["val_kl_best"])),
            *map(str, (r["ppl_dense"], r["ppl_before"], r["ppl_after"])),
        )
    Console(width=160).print(table)
    for r in rows:
        equal = r["val_kl_at_common_steps"]
        print(f"cut {r['cut']} {r['dtype']}: KL at equal steps {equal} (load {r['load_average_1m']})")


if __name__ == "__main__":
    main()

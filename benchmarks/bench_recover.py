"""LoRA recovery on the default decoder (SmolLM2-135M) pruned 20%: WikiText-2 perplexity before and after.

Protocol: prune with --criterion at --sparsity (layers 3..26, FFN neurons and query heads, as
bench_criteria.py), then `edgeprune.recover.recover` on Alpaca-cleaned (first 5,000) with the
CLI's defaults (r=8, alpha=16, lr 1e-4, seq 256, batch 2 x 4 accumulation, 32 held-out
examples, evaluation every 25 steps) for --minutes of wall time. Perplexity: WikiText-2 raw
test tokenized once without BOS, first --max-tokens tokens, non-overlapping windows of 128.

    /work/venv/bin/python benchmarks/bench_recover.py --criterion taylor --minutes 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from bench_common import data_dir, wikitext_test_tokens

from edgeprune.calibration import calibration_batch
from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.evaluate import perplexity
from edgeprune.loading import load_model
from edgeprune.models import adapter_for
from edgeprune.recover import RecoveryConfig, StepReport, load_recovery_data, recover
from edgeprune.structure import PruneSpec, prune_model

PROTECT = 3  # first and last layers kept whole, as in bench_criteria.py
TAYLOR_SAMPLES = 10  # LLM-Pruner's calibration size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criterion", default="taylor")
    parser.add_argument("--sparsity", type=float, default=0.2)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "bench_recover.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter_for(model.config)
    wiki = data_dir() / "wikitext-2-raw"
    eval_tokens = wikitext_test_tokens(tokenizer, args.max_tokens)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "load_average_start": os.getloadavg(),
        "eval_tokens": len(eval_tokens),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    record["dense_ppl128"] = perplexity(model, eval_tokens, seq_len=128)
    print(f"dense PPL@128 {record['dense_ppl128']:.2f}", flush=True)

    n_calib = TAYLOR_SAMPLES if args.criterion == "taylor" else 32
    calib = calibration_batch(tokenizer, wiki / "wiki.valid.raw", n_calib, 128, args.seed)
    scores = score_groups(args.criterion, model, adapter, ScoringInputs(calibration=calib, seed=args.seed))
    spec = PruneSpec(args.sparsity, protect_first=PROTECT, protect_last=PROTECT)
    summary = prune_model(model, adapter, scores, spec)
    record["total_removed"] = summary.total_removed
    record["pruned_ppl128"] = perplexity(model, eval_tokens, seq_len=128)
    print(f"pruned ({args.criterion} {args.sparsity:.0%}) PPL@128 {record['pruned_ppl128']:.2f}", flush=True)

    config = RecoveryConfig(minutes=args.minutes, lr=args.lr, seq_len=args.seq_len, seed=args.seed)
    data = load_recovery_data(data_dir() / "instruct" / "alpaca_data_cleaned.first5000.json", tokenizer, model, config)

    def on_step(report: StepReport) -> None:
        if report.val_loss is not None or report.step % 5 == 0:
            note = f" val {report.val_loss:.4f}" if report.val_loss is not None else ""
            print(f"  step {report.step} loss {report.train_loss:.3f}{note}", flush=True)

    start, cpu_start = time.perf_counter(), time.process_time()
    result = recover(model, tokenizer, data, config, on_step=on_step)
    record["recover_wall_seconds"] = time.perf_counter() - start
    record["recover_cpu_seconds"] = time.process_time() - cpu_start  # the machine is shared: wall time is not ours
    record["recovery"] = result.record.as_dict()
    record["recovered_ppl128"] = perplexity(result.model, eval_tokens, seq_len=128)
    record["load_average_end"] = os.getloadavg()
    print(f"recovered PPL@128 {record['recovered_ppl128']:.2f} after {result.record.steps} steps", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    r = record["recovery"]
    print(
        f"\n| {args.criterion} {args.sparsity:.0%} | {args.minutes:g} min, lr {args.lr:g} | {r['steps']} "
        f"({r['epochs']:.3f} ep) | {r['best_step']} | {r['val_loss_before']:.3f} -> {r['val_loss_best']:.3f} | "
        f"{record['dense_ppl128']:.2f} | {record['pruned_ppl128']:.2f} | {record['recovered_ppl128']:.2f} |"
    )


if __name__ == "__main__":
    main()

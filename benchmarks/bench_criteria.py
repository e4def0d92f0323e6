"""Every registered criterion on the default decoder (SmolLM2-135M): perplexity after the cut, scoring cost.

Protocol (../shared/notes/CRITERIA.md): WikiText-2 raw test tokenized once as one string without
BOS, the first --max-tokens tokens (65,536 in the note; fewer here to fit a shared 2-core
machine), non-overlapping windows of 128, each scored on its own. No recovery.
Calibration: windows of 128 tokens from wiki.valid.raw, seed 0 (10 for taylor as LLM-Pruner,
--calib-samples for the others).
Cuts: `note` = the note's exact cut (FFN only, layers 3..26, each keeps 1128 of 1536 neurons);
`10`..`50` = that share of the prunable (FFN + attention) parameters of layers 3..26 removed,
FFN neurons and query heads, uniform per layer (--allocation global for the global plan).
Scoring cost: wall time and peak resident memory of the process while scoring (model included).

    /work/venv/bin/python benchmarks/bench_criteria.py --max-tokens 16384
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch
from bench_common import data_dir, wikitext_test_tokens

from edgeprune.calibration import calibration_batch
from edgeprune.compensate import compensate_bias, output_means
from edgeprune.criteria import CRITERIA, GroupScores, ScoringInputs, score_groups
from edgeprune.evaluate import perplexity
from edgeprune.loading import load_model
from edgeprune.models import LayerWidths, adapter_for
from edgeprune.structure import PruneSpec, count_parameters, cut_model, prune_model, select_keep

PROTECT = 3  # first and last layers kept whole, as in the note
NOTE_FFN_WIDTH = 1128
EXTRA_VARIANTS = {"taylor-second": ("taylor", {"taylor": "second"})}
TAYLOR_SAMPLES = 10
LEADING = ("fluctuation", "taylor", "mi", "random", "magnitude")  # scored first, in case a run is cut short


class PeakRSS:
    """Samples this process's resident memory every 20 ms while scoring runs."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.running = psutil.Process(), True
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def note_keep(model, adapter, scores: GroupScores) -> list:
    """CRITERIA.md's cut: FFN only, layers 3..26 keep NOTE_FFN_WIDTH neurons each."""
    layers = adapter.layers(model)
    plan = [adapter.widths(layer) for layer in layers]
    for i in range(PROTECT, len(layers) - PROTECT):
        plan[i] = LayerWidths(ffn=NOTE_FFN_WIDTH, heads=plan[i].heads, kv_heads=plan[i].kv_heads)
    return select_keep(model, adapter, scores, plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=16384, help="evaluation tokens (the note used 65,536)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--sparsities", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--criteria", default="all", help="comma list of registry names/variants, or all")
    parser.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "bench_criteria.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = {name: (name, {}) for name in sorted(CRITERIA)} | EXTRA_VARIANTS
    variants = dict(sorted(variants.items(), key=lambda item: item[0] not in LEADING))  # key rows first
    if args.criteria != "all":
        variants = {name: variants[name] for name in args.criteria.split(",")}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    loaded = load_model(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter_for(model.config)
    wiki = data_dir() / "wikitext-2-raw"
    eval_tokens = wikitext_test_tokens(tokenizer, args.max_tokens)
    valid = wiki / "wiki.valid.raw"

    def ppl(m) -> float:
        return perplexity(m, eval_tokens, seq_len=128)

    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "load_average_start": os.getloadavg(),
        "eval_tokens": len(eval_tokens),
        "params_dense": count_parameters(model),
        "dense_ppl128": ppl(model),
        "rows": [],
    }
    print(f"dense PPL@128 {record['dense_ppl128']:.2f} on {len(eval_tokens)} tokens", flush=True)
    for name, (criterion, options) in variants.items():
        n_samples = TAYLOR_SAMPLES if criterion == "taylor" else args.calib_samples
        calib = calibration_batch(tokenizer, valid, n_samples, 128, args.seed)
        inputs = ScoringInputs(calibration=calib, seed=args.seed, options=options)
        start = time.perf_counter()
        with PeakRSS() as rss:
            scores = score_groups(criterion, model, adapter, inputs)
        row = {
            "criterion": name,
            "calibration": f"{n_samples}x128",
            "score_seconds": time.perf_counter() - start,
            "peak_rss_mb": rss.peak / 1e6,
            "rss_increase_mb": (rss.peak - rss.start) / 1e6,
            "ppl128": {},
        }
        cuts = [("note", None)] + [(f"{s:.0%}", s) for s in sparsities]
        for label, sparsity in cuts:
            pruned = copy.deepcopy(model)
            if sparsity is None:
                cut_model(pruned, adapter, note_keep(pruned, adapter, scores))
            else:
                spec = PruneSpec(sparsity, protect_first=PROTECT, protect_last=PROTECT, allocation=args.allocation)
                prune_model(pruned, adapter, scores, spec)
            row["ppl128"][label] = ppl(pruned)
            if label == "note" and criterion == "fluctuation":  # FLAP's bias compensation at the note's cut
                compensated = copy.deepcopy(model)
                means = output_means(compensated, adapter, calib)
                keep = note_keep(compensated, adapter, scores)
                compensate_bias(compensated, adapter, keep, means)
                cut_model(compensated, adapter, keep)
                row["ppl128"]["note+bias"] = ppl(compensated)
            del pruned
        record["rows"].append(row)
        cells = "  ".join(f"{k} {v:.2f}" for k, v in row["ppl128"].items())
        print(f"{name:14s} {row['score_seconds']:7.1f} s {row['peak_rss_mb']:7.0f} MB  {cells}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")  # partial results survive an interruption
    record["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    labels = list(record["rows"][0]["ppl128"]) if record["rows"] else []
    print("\n| criterion | calibration | score s | peak RSS MB (+ while scoring) | " + " | ".join(labels) + " |")
    print("|" + "---|" * (4 + len(labels)))
    print(f"| dense | – | – | – | {record['dense_ppl128']:.2f} |")
    for row in record["rows"]:
        cells = " | ".join(f"{row['ppl128'][k]:.2f}" if k in row["ppl128"] else "–" for k in labels)
        print(
            f"| {row['criterion']} | {row['calibration']} | {row['score_seconds']:.1f} | "
            f"{row['peak_rss_mb']:.0f} (+{row['rss_increase_mb']:.0f}) | {cells} |"
        )
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()

"""Which layers should `edgeprune run` keep whole? Held-out perplexity at one parameter count.

The README's first command (fluctuation scores on the packaged calibration text, FFN only)
ended at sparsity 0.445 of every layer. Here the same number of FFN neurons is removed but
spread over the layers left after keeping the first A and last B whole (sparsity 0.445 x 30 /
(30 - A - B)), and over all layers with global allocation; held-out perplexity is measured as
`run` measures it (the calibration text's last 20%, 8,192 tokens, windows of 128).

    .venv/bin/python benchmarks/bench_protect.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from edgeprune.criteria import score_groups, scoring_inputs
from edgeprune.evaluate import perplexity
from edgeprune.loading import load_model
from edgeprune.models import adapter_for
from edgeprune.run import RunConfig, run_calibration
from edgeprune.structure import PruneSpec, prune_model

PROTECTIONS = ((0, 0), (1, 1), (2, 1), (1, 2), (2, 2), (3, 3), (4, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.445, help="sparsity if every layer were cut")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "bench_protect.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    model, adapter = loaded.model, adapter_for(loaded.model.config)
    cfg = RunConfig(budgets=[])
    calib = run_calibration(loaded.tokenizer, cfg)
    inputs = scoring_inputs(cfg.criterion, loaded, cfg.calibration_settings, cfg.criterion_options, calib)
    scores = score_groups(cfg.criterion, model, adapter, inputs)

    def held_out_perplexity(model: torch.nn.Module) -> float:
        return perplexity(model, calib.heldout, seq_len=cfg.eval_seq_len)

    n_layers = len(adapter.layers(model))
    rows = [{"cut": "dense", "params": sum(p.numel() for p in model.parameters()), "ppl": None}]
    rows[0]["ppl"] = held_out_perplexity(model)
    specs = [
        (f"keep first {a}, last {b}", PruneSpec(args.sparsity * n_layers / (n_layers - a - b), ("ffn",), a, b))
        for a, b in PROTECTIONS
    ]
    specs.append(("global allocation", PruneSpec(args.sparsity, ("ffn",), allocation="global")))
    for name, spec in specs:
        pruned = copy.deepcopy(model)
        summary = prune_model(pruned, adapter, scores, spec)
        rows.append({"cut": name, "params": summary.params_after, "ppl": held_out_perplexity(pruned)})
        print(f"| {name} | {summary.params_after:,} | {rows[-1]['ppl']:.2f} |", flush=True)
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "load_average_1m": round(os.getloadavg()[0], 2),
        "criterion": cfg.criterion,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"dense: {rows[0]['ppl']:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()

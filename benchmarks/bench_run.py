"""`edgeprune run` on the default decoder under several budgets: probes, wall time, final speedup, perplexity.

Usage: python benchmarks/bench_run.py [--budgets speedup=1.25,speedup=1.5,memory_mb=400] [--quantize int8]
Writes benchmarks/out/run_<budget>/ (each a complete run folder) and benchmarks/out/bench_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeprune.budget import Budget, UnreachableBudget
from edgeprune.run import RunConfig, run_job

OUT = Path(__file__).parent / "out"


def parse_budgets(text: str) -> list[Budget]:
    return [Budget(kind, float(limit)) for kind, limit in (part.split("=") for part in text.split(","))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="speedup=1.25,speedup=1.5,memory_mb=400")
    parser.add_argument("--quantize", choices=["int8", "int4", "dynamic-int8"], default=None)
    parser.add_argument("--criterion", default="fluctuation")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    console = Console()
    rows, scores = [], None
    for budget in parse_budgets(args.budgets):
        name = f"run_{budget.kind}_{budget.limit:g}" + (f"_{args.quantize}" if args.quantize else "")
        out = OUT / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if scores is not None:  # one scoring serves every budget, as in one run's search
            shutil.copy(scores, out / "scores.safetensors")
        cfg = RunConfig(budgets=[budget], criterion=args.criterion, quantize=args.quantize, runs=args.runs)
        start = time.perf_counter()
        try:
            record = run_job(cfg, out, say=console.log)
        except UnreachableBudget as err:  # a result too: the search says how close it got
            label = f"{budget.kind} {budget.limit:g}"
            rows.append({"budget": label, "quantize": args.quantize, "unreachable": str(err)})
            continue
        finally:
            scores = out / "scores.safetensors"
        wall = time.perf_counter() - start
        final, dense = record["final"], record["dense"]
        rows.append(
            {
                "budget": f"{budget.kind} {budget.limit:g}",
                "quantize": args.quantize,
                "probes": record["probes_measured"],
                "wall_s": round(wall, 1),
                "sparsity": final["sparsity"],
                "params": final["params"],
                "onnx_mb": round(final["onnx_mb"], 1),
                "speedup_alternating": round(final["speedup_alternating"], 3),
                "met": all(b["met"] for b in record["budgets"]),
                "ppl_dense": round(dense["perplexity"], 2),
                "ppl_final": round(final["perplexity"], 2),
                "load_avg_1m": os.getloadavg()[0],
            }
        )
    table = Table(title="edgeprune run on SmolLM2-135M, --device local")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for key in columns:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(str(row.get(key, "")) for key in columns))
    console.print(table)
    suffix = f"_{args.quantize}" if args.quantize else ""
    (OUT / f"bench_run{suffix}.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""`edgeprune run` on the default decoder under several budgets, each shipped model beside its baselines.

Usage: python benchmarks/bench_run.py [--budgets speedup=1.3,speedup=1.5,speedup=2.0,memory_mb=120]
Each budget is one complete job in its own run folder (benchmarks/out/run_<budget>/, replaced on a rerun).
The table gives, per budget, what a user could have had without the tool (dense, and each
quantization-only candidate the run measured, with its paired speedup and divergence) beside what
the run shipped and how long the whole job took. Writes benchmarks/out/bench_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeprune.budget import Budget, UnreachableBudget
from edgeprune.outputs import write_atomic
from edgeprune.run import RunConfig, RunResult, run_job

OUT = Path(__file__).parent / "out"


def parse_budgets(text: str) -> list[Budget]:
    return [Budget(kind, float(limit)) for kind, limit in (part.split("=") for part in text.split(","))]


def candidate_row(budget: str, label: str, point: dict, speedup: float | None, wall_s: float | None = None) -> dict:
    """One table row: a model's size, paired speedup and quality against dense."""
    return {
        "budget": budget,
        "model": label,
        "file_mb": round(point["onnx_mb"], 1),
        "speedup": None if speedup is None else round(speedup, 3),
        "kl_nats": None if point.get("divergence") is None else round(point["divergence"], 4),
        "ppl": None if point.get("perplexity") is None else round(point["perplexity"], 2),
        "wall_min": None if wall_s is None else round(wall_s / 60, 1),
    }


def budget_rows(label: str, result: RunResult, wall_s: float) -> list[dict]:
    """Dense, every quantization-only candidate the search measured, then the shipped model."""
    rows = [candidate_row(label, "dense fp32", result.dense, 1.0)]
    for probe in result.probes:
        if probe["sparsity"] == 0 and probe["precision"] != "fp32":
            rows.append(candidate_row(label, f"{probe['precision']} alone", probe | probe["extra"], probe["speedup"]))
    final = result.final
    shipped = f"shipped: {final['precision']}, {final['sparsity']:.1%} cut"
    if result.recovery:  # training plus writing its text
        shipped += f", recovered {(result.recovery['seconds'] + result.recovery['data_seconds']) / 60:.1f} min"
    met = "met" if result.met else "MISSED"
    rows.append(candidate_row(label, f"{shipped} ({met})", final, final["speedup_alternating"], wall_s))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="speedup=1.3,speedup=1.5,speedup=2.0,memory_mb=120")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-recover", action="store_true", help="skip distillation (faster; quality before recovery)")
    args = parser.parse_args()
    console = Console()
    rows = []
    for budget in parse_budgets(args.budgets):
        label = f"{budget.kind} {budget.limit:g}"
        out = OUT / f"run_{budget.kind}_{budget.limit:g}"
        cfg = RunConfig(budgets=[budget], runs=args.runs, recover=not args.no_recover)
        start = time.perf_counter()
        try:  # each budget is a whole job, scoring included (seconds), in a fresh run folder
            result = run_job(cfg, out, say=console.log, overwrite=True)
        except UnreachableBudget as err:  # a result too: the search says how close it got
            rows.append({"budget": label, "model": f"unreachable: {err}"})
            continue
        wall = time.perf_counter() - start
        rows.extend({**row, "load_avg_1m": round(os.getloadavg()[0], 1)} for row in budget_rows(label, result, wall))
        write_atomic(OUT / "bench_run.json", json.dumps(rows, indent=2) + "\n")  # each finished budget kept
    table = Table(title="edgeprune run on SmolLM2-135M, --device local (speedups paired against dense fused fp32)")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    for key in columns:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*("" if row.get(key) is None else str(row.get(key)) for key in columns))
    console.print(table)


if __name__ == "__main__":
    main()

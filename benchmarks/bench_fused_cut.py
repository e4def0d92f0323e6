"""Cut efficiency on the fused graph: how much of a cut's ideal (FLOP) saving ONNX Runtime turns into time.

    PYTHONPATH=$PWD python benchmarks/bench_fused_cut.py [--sparsities 0.2,0.5] [--precisions fp32,int4] [--runs 15]
        [--round-to 1,64]

FFN neurons of layers 1..28 of the default decoder are cut (magnitude scores: timing does not depend on
which neurons go) and written into the dense fused graph as `run`'s probes are; each file is profiled
alternating with the dense graph of its precision (prefill 128 + decode 32, 2 threads, paired medians).
Ideal speedup: 1 / (1 - the removed share of the matmul weights), s x the prunable share when the widths are
not rounded: what the budget search assumes first. `--round-to M` rounds every cut layer's FFN width to a
multiple of M (`run --round-to`): kernels work in vectors and blocks, and a width off their multiple pays for
the padding. Efficiency = measured time saved / ideal time saved. Writes benchmarks/out/bench_fused_cut.json.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from itertools import product
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.devices.profiler import LocalProfiler
from edgeprune.devices.profiles import get_device
from edgeprune.export import export_model, quantize_model
from edgeprune.export.fused import write_fused_probe
from edgeprune.loading import load_model
from edgeprune.models import adapter_for
from edgeprune.probes import pruned_copy
from edgeprune.run import RunConfig, ideal_latency_slope, matmul_params
from edgeprune.runtime import MODEL_FILE, onnx_bytes

OUT = Path(__file__).parent / "out" / "fused_cut"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.2,0.5")
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--round-to", default="1", help="comma-separated width multiples, each measured")
    args = parser.parse_args()
    console = Console()
    loaded = load_model(None)
    model, adapter, cfg = loaded.model, adapter_for(loaded.model.config), RunConfig()
    scores = score_groups("magnitude", model, adapter, ScoringInputs(calibration=None))
    slope = ideal_latency_slope(model, adapter, cfg)
    dense_fp32 = OUT / "dense" / MODEL_FILE
    if not dense_fp32.is_file():
        export_model(model, loaded.tokenizer, dense_fp32.parent, overwrite=True, fused=True)
    profiler = LocalProfiler(get_device("local"), runs=args.runs, warmup=2)
    rows = []
    for precision in args.precisions.split(","):
        dense = (
            dense_fp32
            if precision == "fp32"
            else quantize_model(dense_fp32, OUT / f"dense.{precision}.onnx", precision)
        )
        for sparsity, round_to in product(map(float, args.sparsities.split(",")), map(int, args.round_to.split(","))):
            cut, _ = pruned_copy(model, adapter, scores, replace(cfg, round_to=round_to).spec(sparsity))
            file = write_fused_probe(dense_fp32, OUT / f"cut{sparsity:g}-r{round_to}" / MODEL_FILE, cut)
            if precision != "fp32":
                file = quantize_model(file, file.with_name(f"model.{precision}.onnx"), precision)
            console.log(f"{precision} at {sparsity:g}, widths a multiple of {round_to}: profiling against dense")
            comparison = profiler.compare(file, dense, cfg.workload)
            ideal = 1 / (matmul_params(cut) / matmul_params(model))
            measured = comparison.speedup
            rows.append(
                {
                    "precision": precision,
                    "ffn_cut": sparsity,
                    "round_to": round_to,
                    "ffn_widths": sorted({adapter.widths(layer).ffn for layer in adapter.layers(cut)}),
                    "file_mb": round(onnx_bytes(file) / 1e6, 1),
                    "dense_ms": round(comparison.baseline.latency_ms.p50, 1),
                    "cut_ms": round(comparison.model.latency_ms.p50, 1),
                    "speedup": round(measured, 3),
                    "prefill_speedup": round(comparison.prefill_speedup, 3),
                    "decode_speedup": round(comparison.decode_speedup, 3),
                    "ideal_speedup": round(ideal, 3),
                    "efficiency": round((1 - 1 / measured) / (1 - 1 / ideal), 3),
                    "load_avg_1m": round(os.getloadavg()[0], 1),
                }
            )
    table = Table(title=f"Cut efficiency on the fused graph (prunable share of matmul weights {slope:.3f})")
    for key in rows[0]:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*map(str, row.values()))
    console.print(table)
    (OUT.parent / "bench_fused_cut.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()

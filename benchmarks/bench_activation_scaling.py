"""Activation-aware per-channel scaling (AWQ-style, export/activation_scaling.py) before int4, int4-mixed and
int4-fit, against the same precisions rounded to nearest, at equal file size, on the default decoder.

    EDGEPRUNE_DATA=/work/shared/data PYTHONPATH=$PWD:$PWD/benchmarks nice -n 19 \\
        python benchmarks/bench_activation_scaling.py [--budget 120] [--wiki-windows 64] [--threads 1] \\
        [--work benchmarks/out/activation_scaling]

The scales are chosen on the run's calibration windows (`run_calibration` with the default RunConfig: 32 windows
of 128 tokens from the packaged text's head), folded into a copy of the model, which is exported fused to fp32
once and quantized as `run` quantizes (int4-fit's 8-bit list chosen by Fisher sensitivity on the model it
quantizes, the 16 re-fit windows `run` uses, filling the same budget). Quality through ONNX Runtime on the very
file against the dense PyTorch model: KL(dense || file) per token with its standard error, perplexity and top-1
agreement on the packaged text's held-out tail (13 windows of 128), and KL and perplexity on WikiText-2 test
(first `--wiki-windows` windows of 128: text neither the scales nor the sensitivities saw). Rows are appended to
benchmarks/out/bench_activation_scaling.json as measured (a rerun skips the ones there); the scaling's CPU
seconds (process time, 1 thread) are recorded with its row.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import onnx
import torch
from bench_common import append_result, read_results, wikitext_test_tokens

from edgeprune.evaluate.divergence import heldout_divergence
from edgeprune.export import export_model
from edgeprune.export.activation_scaling import GroupScale, activation_scaled
from edgeprune.export.bit_allocation import (
    FIT_FILL,
    FIT_WINDOWS,
    choose_eight_bit,
    graph_projections,
    projection_sensitivity,
)
from edgeprune.export.quantize import BLOCK_SIZE, MIXED_EIGHT_BIT_BLOCK, quantize_model
from edgeprune.loading import DEFAULT_DECODER, load_model
from edgeprune.models import adapter_for
from edgeprune.run import RunConfig, run_calibration
from edgeprune.runtime import MODEL_FILE, onnx_bytes

RESULTS = Path(__file__).parent / "out" / "bench_activation_scaling.json"
PRECISIONS = ("int4", "int4-mixed", "int4-fit")
METHODS = ("round-to-nearest", "AWQ")


def quality(file: Path, dense: torch.nn.Module, heldout: torch.Tensor, wiki: torch.Tensor, threads: int) -> dict:
    packaged = heldout_divergence(file, dense, heldout, seq_len=128, threads=threads)
    unseen = heldout_divergence(file, dense, wiki, seq_len=128, threads=threads)
    return {
        "mb": round(onnx_bytes(file) / 1e6, 2),
        "kl": round(packaged.mean, 4),
        "kl_stderr": round(packaged.stderr, 4),
        "ppl": round(packaged.perplexity, 2),
        "top1": round(packaged.top1_agreement, 4),
        "wiki_kl": round(unseen.mean, 4),
        "wiki_kl_stderr": round(unseen.stderr, 4),
        "wiki_ppl": round(unseen.perplexity, 2),
    }


def scaling_summary(chosen: list[GroupScale]) -> dict:
    """Per group kind: the alphas chosen (how many of each) and the calibration output error left of round-to-
    nearest's (mean ratio)."""
    kinds = defaultdict(list)
    for choice in chosen:
        kinds[choice.name].append(choice)
    return {
        name: {
            "alphas": {f"{a:g}": sum(c.alpha == a for c in group) for a in sorted({c.alpha for c in group})},
            "error_ratio": round(sum(c.error / c.plain_error for c in group) / len(group), 3),
        }
        for name, group in kinds.items()
    }


def fitted(model: torch.nn.Module, fp32: Path, target: Path, budget_mb: float, windows: torch.Tensor) -> Path:
    """int4-fit of `fp32` at the budget, its 8-bit list chosen as a run chooses it (ProbeRunner.fitted_eight_bit),
    by sensitivity measured on `model` (the weights in the file)."""
    all_four = quantize_model(fp32, target.with_suffix(".base.onnx"), "int4-fit", BLOCK_SIZE, ())
    room = int(budget_mb * 1e6 * FIT_FILL) - onnx_bytes(all_four)
    graph = onnx.load(str(fp32), load_external_data=False).graph
    sensitivity = projection_sensitivity(model, windows, BLOCK_SIZE)
    projections = graph_projections(graph, sensitivity, BLOCK_SIZE, MIXED_EIGHT_BIT_BLOCK)
    return quantize_model(fp32, target, "int4-fit", BLOCK_SIZE, tuple(choose_eight_bit(projections, room)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="int4-fit file budget, MB")
    parser.add_argument("--wiki-windows", type=int, default=64, help="WikiText-2 test windows of 128 tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "out" / "activation_scaling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(DEFAULT_DECODER)
    dense = loaded.model
    calib = run_calibration(loaded.tokenizer, RunConfig())
    wiki = wikitext_test_tokens(loaded.tokenizer, args.wiki_windows * 128)
    done = {row["variant"] for row in read_results(RESULTS)}

    def add(variant: str, file: Path, **fields) -> None:
        row = append_result(RESULTS, {"variant": variant, **fields, **quality(file, dense, calib.heldout, wiki, 1)})
        print(row, flush=True)

    began, cpu = time.perf_counter(), time.process_time()
    scaled, chosen = activation_scaled(dense, adapter_for(dense.config), calib.windows, BLOCK_SIZE)
    cost = {"scaling_cpu_s": round(time.process_time() - cpu, 1), "scaling_wall_s": round(time.perf_counter() - began)}
    print(cost, scaling_summary(chosen), flush=True)
    fit_windows = calib.refit[:FIT_WINDOWS]
    for method, model in zip(METHODS, (dense, scaled), strict=True):
        fp32 = args.work / method / MODEL_FILE
        if not fp32.is_file():
            export_model(model, loaded.tokenizer, fp32.parent, overwrite=True, fused=True)
        if method == METHODS[0] and "dense fp32" not in done:
            add("dense fp32", fp32)
        for precision in PRECISIONS:
            variant = f"{precision} {method}" + (f" {args.budget:g} MB" if precision == "int4-fit" else "")
            if variant in done:
                continue
            target = args.work / method / f"{precision}.onnx"
            if precision == "int4-fit":
                file = fitted(model, fp32, target, args.budget, fit_windows)
            else:
                file = quantize_model(fp32, target, precision, BLOCK_SIZE)
            extra = {"scaling": {**cost, **scaling_summary(chosen)}} if method == "AWQ" else {}
            add(variant, file, **extra)
    rows = {row["variant"]: row for row in read_results(RESULTS)}
    print("\n| variant | file MB | KL packaged tail | PPL packaged tail | top-1 | KL WikiText-2 | PPL WikiText-2 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['mb']} | {row['kl']} ± {row['kl_stderr']} | {row['ppl']} | {row['top1']} | "
            f"{row['wiki_kl']} ± {row['wiki_kl_stderr']} | {row['wiki_ppl']} |"
        )


if __name__ == "__main__":
    main()

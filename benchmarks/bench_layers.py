"""Whole-layer removal against FFN width pruning at the same parameter count: quality, and cut efficiency.

    EDGEPRUNE_DATA=/work/shared/data PYTHONPATH=$PWD python benchmarks/bench_layers.py [--quality-only|--timing-only]

SmolLM2-135M-Instruct (30 layers). `layers-k`: the k least important layers removed, chosen as `prune --targets
layers` chooses them (block influence on `run`'s scoring windows of the packaged text, the first and last layer
protected). `width-k`, beside it: FFN neurons of layers 1..28 cut as `run` cuts them (its fluctuation scores,
uniform widths, the checked least-squares re-fit on its re-fit windows), at the smallest sparsity whose parameter
count is at most `layers-k`'s (one neuron per layer finer: within 48k parameters of it).
Quality: KL(dense || cut) and perplexity, every window paired with the dense PyTorch model's, on `pkg` (the
packaged text's held-out tail as `run` measures it) and `wiki` (the first --wiki-tokens of WikiText-2 test);
fp32 in PyTorch, int4 through ONNX Runtime on the int4 fused file (dense int4: the quantization-only baseline).
Timing: each cut's fused graph (onnxruntime-genai's builder), at fp32 and int4, against the dense graph of its
precision, all files of a precision in one alternating run (prefill 128 + decode 32, every core; speedups are
medians of per-round ratios). Ideal: f = 1 - (matmul weights of the cut / of dense), every Linear counted (LM
head included): the removed share of the weights each token multiplies through. For a width cut f is
bench_fused_cut.py's 0.737 x s, so the two benchmarks' efficiencies compare. Ideal speedup 1 / (1 - f);
efficiency = measured time saved / ideal time saved = (1 - 1 / speedup) / f.
Resumable: rows are appended to --out and not measured again (`--retime` times again, e.g. on a quiet machine;
the table reads the latest timing); fused files are kept under --work.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import HeldOut, append_result, read_results, wikitext_test_tokens
from rich.console import Console
from rich.table import Table
from torch import nn

from edgeprune.budget import smallest_sparsity
from edgeprune.devices.profiler import LocalProfiler, paired_speedup
from edgeprune.devices.profiles import get_device
from edgeprune.evaluate.divergence import heldout_divergence
from edgeprune.export.files import move_onnx
from edgeprune.export.fused import build_fused
from edgeprune.export.graph import add_logits_to_keep
from edgeprune.export.quantize import quantize_model
from edgeprune.layers import layer_importance, layers_to_remove, remove_layers
from edgeprune.loading import load_model
from edgeprune.models import adapter_for
from edgeprune.probes import pruned_copy
from edgeprune.run import (
    RunConfig,
    feasible_max_sparsity,
    load_or_score,
    matmul_params,
    parameters_at,
    run_calibration,
)
from edgeprune.runtime import MODEL_FILE, onnx_bytes
from edgeprune.structure import count_parameters

OUT = Path(__file__).parent / "out" / "bench_layers.json"
INT4_FILE = "model.int4.onnx"
PRECISIONS = ("fp32", "int4")
MEASURE = "block-influence"  # `prune --targets layers`'s default


class Cuts:
    """The dense model, and each cut made on demand from `run`'s calibration (layer choice, scores, re-fit)."""

    def __init__(self, work: Path) -> None:
        self.loaded = load_model("smollm2-135m")
        self.model, self.adapter, self.cfg = self.loaded.model, adapter_for(self.loaded.model.config), RunConfig()
        self.calib = run_calibration(self.loaded.tokenizer, self.cfg)
        work.mkdir(parents=True, exist_ok=True)
        self.importance = layer_importance(self.model, self.adapter, self.calib.windows, MEASURE)
        self.scores = load_or_score(work / "scores.safetensors", self.loaded, self.adapter, self.cfg, self.calib)
        self.params_at = parameters_at(self.model, self.adapter, self.scores, self.cfg)
        self.max_sparsity = feasible_max_sparsity(self.model, self.adapter, self.scores, self.cfg)

    def removed(self, k: int) -> list[int]:
        return layers_to_remove(self.importance, k, self.cfg.protect_first, self.cfg.protect_last)

    def width_sparsity(self, k: int) -> float:
        """The smallest `run` sparsity whose cut has at most the parameters of the model without k layers."""
        per_layer = count_parameters(self.adapter.layers(self.model)[0])  # every layer of this decoder is alike
        target = count_parameters(self.model) - k * per_layer
        return smallest_sparsity(lambda s: self.params_at(s) <= target, 0.0, self.max_sparsity, 1e-6)

    def make(self, name: str) -> tuple[nn.Module, dict]:
        """The cut model called `name` (dense, layers-k, width-k) and what describes it."""
        if name == "dense":
            return self.model, {}
        kind, k = name.split("-")
        if kind == "layers":
            cut, removed = copy.deepcopy(self.model), self.removed(int(k))
            remove_layers(cut, self.adapter, removed)
            return cut, {"removed_layers": removed}
        sparsity = self.width_sparsity(int(k))
        cut, _ = pruned_copy(self.model, self.adapter, self.scores, self.cfg.spec(sparsity), self.calib.refit)
        return cut, {"sparsity": sparsity, "ffn_widths": [layer.mlp.up_proj.out_features for layer in cut.model.layers]}


def made_once(file: Path, make: Callable[[Path], Path]) -> Path:
    """`file`, written once through a scratch name and then moved in place, so a killed write is never reused."""
    if not file.is_file():
        scratch = make(file.with_name(f"partial.{file.name}"))
        move_onnx(scratch, file)
    return file


def fused_files(name: str, model: nn.Module | None, work: Path) -> dict[str, Path]:
    """The cut's fused graph at fp32 and int4 as `export --fused` writes it (built once; config.json and
    genai_config.json beside them): with `logits_to_keep`, so prefill computes one row of the vocabulary matrix.
    `model` is read only when the folder is not there yet."""
    folder = work / name
    fp32 = folder / MODEL_FILE
    if not fp32.is_file():
        scratch = work / f"{name}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        build_fused(model, scratch)
        shutil.rmtree(folder, ignore_errors=True)
        scratch.rename(folder)
    if add_logits_to_keep(fp32):  # a folder made before the benchmark added it: its int4 file is made again
        for stale in (folder / INT4_FILE, folder / f"{INT4_FILE}_data"):
            stale.unlink(missing_ok=True)
    int4 = made_once(folder / INT4_FILE, lambda path: quantize_model(fp32, path, "int4"))
    return {"fp32": fp32, "int4": int4}


def quality_row(name: str, cuts: Cuts, texts: list[HeldOut], work: Path, threads: int) -> dict:
    """Parameters, ideal share and quality of one cut: fp32 in PyTorch, int4 through ORT on its fused file."""
    model, described = cuts.make(name)
    row = {"part": "quality", "cut": name, **described}
    row["params"] = count_parameters(model)
    row["ideal_share"] = 1 - matmul_params(model) / matmul_params(cuts.model)
    row["fp32"] = {t.name: t.measure(model) for t in texts}
    int4 = fused_files(name, model, work)["int4"]
    row["int4"] = {}
    for text in texts:
        d = heldout_divergence(int4, cuts.model, text.windows.reshape(-1), seq_len=128, threads=threads)
        row["int4"][text.name] = {
            "kl": d.mean,
            "kl_stderr": d.stderr,
            "ppl": d.perplexity,
            "dense_ppl": d.dense_perplexity,
        }
    return row


def timing_rows(names: list[str], cuts: Cuts | None, work: Path, precision: str, runs: int, paired: bool) -> list[dict]:
    """Every cut of one precision against that precision's dense graph, in one alternating run, or (`paired`)
    each cut alternating with the dense graph in a process of its own, as `run`'s final check times its answer."""
    files = {}
    for name in ["dense", *names]:
        model = None
        if not (work / name / MODEL_FILE).is_file():
            cuts = cuts or Cuts(work)
            model = cuts.make(name)[0]
        files[name] = fused_files(name, model, work)[precision]
    profiler = LocalProfiler(get_device("local"), runs=runs, warmup=2, paired=paired)
    load_before = os.getloadavg()
    comparisons = profiler.compare_all([files[n] for n in names], files["dense"], RunConfig().workload)
    load = {"load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}
    return [
        {
            "part": "timing",
            "precision": precision,
            "cut": name,
            "file_mb": round(onnx_bytes(files[name]) / 1e6, 1),
            "dense_mb": round(onnx_bytes(files["dense"]) / 1e6, 1),
            "dense_ms": c.baseline.latency_ms.p50,
            "cut_ms": c.model.latency_ms.p50,
            "speedup": c.speedup,
            "prefill_speedup": c.prefill_speedup,
            "decode_speedup": c.decode_speedup,
            "runs": runs,
            "paired": paired,
            "threads": c.model.threads,
            "latency_ms_samples": c.model.samples["latency_ms"],  # round by round: any two cuts pair up later
            "dense_latency_ms_samples": c.baseline.samples["latency_ms"],
            **load,
        }
        for name, c in zip(names, comparisons, strict=True)
    ]


def latest(rows: list[dict], **key) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in key.items())]
    return found[-1] if found else None


def layers_against_width(rows: list[dict], precision: str, name: str) -> float | None:
    """For `layers-k`: median per-round ratio width-k / layers-k from one alternating run (> 1: layers faster)."""
    if not name.startswith("layers-"):
        return None
    ours = latest(rows, part="timing", precision=precision, cut=name)
    theirs = latest(rows, part="timing", precision=precision, cut=name.replace("layers", "width"))
    if not ours or not theirs or ours["date"] != theirs["date"] or "latency_ms_samples" not in ours:
        return None
    return paired_speedup(ours["latency_ms_samples"], theirs["latency_ms_samples"])


def show(rows: list[dict], names: list[str], console: Console) -> None:
    """One row per cut and precision: quality on both texts, the paired speedups, the ideal and the efficiency."""
    table = Table(title="Whole-layer removal against width pruning (SmolLM2-135M-Instruct)")
    columns = ("cut", "params M", "prec", "KL pkg", "PPL pkg", "KL wiki", "PPL wiki", "speedup", "vs width", "ideal")
    for column in (*columns, "eff"):
        table.add_column(column, justify="right")
    for name in ["dense", *names]:
        quality = latest(rows, part="quality", cut=name)
        if quality is None:
            continue
        share = quality["ideal_share"]
        for precision in PRECISIONS:
            q, timing = quality[precision], latest(rows, part="timing", precision=precision, cut=name)
            speedup, against = timing["speedup"] if timing else None, layers_against_width(rows, precision, name)
            efficiency = (1 - 1 / speedup) / share if speedup and share else None
            table.add_row(
                name,
                f"{quality['params'] / 1e6:.2f}",
                precision,
                *(f"{q[text]['kl']:.3f} ± {q[text]['kl_stderr']:.3f}" for text in ("pkg",)),
                f"{q['pkg']['ppl']:.2f}",
                f"{q['wiki']['kl']:.3f} ± {q['wiki']['kl_stderr']:.3f}",
                f"{q['wiki']['ppl']:.2f}",
                f"{speedup:.3f}" if speedup else "-",
                f"{against:.3f}" if against else "-",
                f"{1 / (1 - share):.3f}",
                f"{efficiency:.2f}" if efficiency is not None else "-",
            )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--removals", default="2,4,6", help="layers removed (k), each beside width pruning")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--runs", type=int, default=15, help="alternating timing rounds")
    parser.add_argument("--wiki-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT threads for the quality part")
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgeprune-bench-layers"))
    parser.add_argument("--out", type=Path, default=OUT)
    part = parser.add_mutually_exclusive_group()
    part.add_argument("--quality-only", action="store_true")
    part.add_argument("--timing-only", action="store_true")
    parser.add_argument("--retime", action="store_true", help="time again even where timing rows exist")
    parser.add_argument("--paired", action="store_true", help="time each cut with dense alone, not all in one run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)  # the whole table also when written to a file
    precisions = args.precisions.split(",")
    if set(precisions) - set(PRECISIONS):
        raise SystemExit(f"--precisions: choose from {', '.join(PRECISIONS)}")
    removals = [int(k) for k in args.removals.split(",")]
    names = [f"{kind}-{k}" for k in removals for kind in ("layers", "width")]
    rows = read_results(args.out)
    cuts = None
    if not args.timing_only:
        cuts = Cuts(args.work)
        texts = [
            HeldOut("pkg", cuts.calib.heldout, cuts.model, args.work),
            HeldOut("wiki", wikitext_test_tokens(cuts.loaded.tokenizer, args.wiki_tokens), cuts.model, args.work),
        ]
        for name in ["dense", *names]:
            if latest(rows, part="quality", cut=name) is None:
                console.log(f"quality of {name}")
                rows.append(append_result(args.out, quality_row(name, cuts, texts, args.work, args.threads)))
    if not args.quality_only:
        for precision in precisions:
            if args.retime or any(latest(rows, part="timing", precision=precision, cut=n) is None for n in names):
                console.log(f"timing {precision}: {len(names)} cuts against dense {precision}")
                for row in timing_rows(names, cuts, args.work, precision, args.runs, args.paired):
                    rows.append(append_result(args.out, row))
    show(rows, names, console)


if __name__ == "__main__":
    main()

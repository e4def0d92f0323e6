"""Export + ONNX Runtime latency of the default decoder and encoder: dense vs 20% vs 50% magnitude-pruned, fp32/int8.

    /work/venv/bin/python benchmarks/bench_export.py [--runs 8] [--warmup 2] [--reuse]

Per variant: export time, verification (max |ORT - PyTorch|, top-1), file size, session RSS,
latency (decoder: prefill 128 + decode 32; encoder: 1 x 128), tokens/s, and the speedup over
dense measured in ONE alternating run of all variants, beside the ideal ratio from FLOPs
(cut efficiency = measured saving / ideal saving). Then ORT per-op profiles of a 128-token
prefill show where the time goes, with the lm_head on every position or only the last.
Writes benchmarks/out/bench_export.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.devices.profiler import LocalProfiler, Workload
from edgeprune.devices.profiles import get_device
from edgeprune.export import export_model, verify_onnx
from edgeprune.export.quantize import quantize_int8
from edgeprune.loading import DEFAULT_DECODER, DEFAULT_ENCODER, load_model
from edgeprune.models import CAUSAL_LM, adapter_for, model_kind
from edgeprune.runtime import OnnxModel, session_options
from edgeprune.structure import PruneSpec, prune_model

OUT = Path(__file__).parent / "out"
INT8_FILE = "model.dynamic-int8.onnx"  # beside the fp32 model.onnx, measured against it
SPARSITIES = (0.0, 0.2, 0.5)
WORKLOAD = Workload(batch=1, sequence=128, prefill=128, decode=32)


def linear_macs(model: nn.Module) -> tuple[int, int]:
    """(MACs per token of the transformer body's linears, MACs per token of the output head)."""
    head = model.get_output_embeddings()
    body = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    return body, (head.in_features * head.out_features if head is not None else 0)


def attention_macs(model: nn.Module, queries: int, keys: int) -> int:
    """QK^T and AV over every layer's kept heads (ORT computes the full masked square in prefill)."""
    adapter = adapter_for(model.config)
    return sum(
        2 * queries * keys * adapter.widths(layer).heads * adapter.head_dim(layer) for layer in adapter.layers(model)
    )


def workload_flops(model: nn.Module, w: Workload) -> dict[str, float]:
    """FLOPs (2 x MACs) of the profiled workload: prefill keeps only the last position's logits."""
    body, head = linear_macs(model)
    if model_kind(model) != CAUSAL_LM:
        return {"total": 2.0 * (w.batch * w.sequence * body + w.batch * attention_macs(model, w.sequence, w.sequence))}
    prefill = w.prefill * body + head + attention_macs(model, w.prefill, w.prefill)
    decode = sum(body + head + attention_macs(model, 1, w.prefill + t + 1) for t in range(w.decode))
    prefill_all_logits = prefill + (w.prefill - 1) * head
    return {
        "total": 2.0 * (prefill + decode),
        "prefill": 2.0 * prefill,
        "decode": 2.0 * decode,
        "prefill_all_logits": 2.0 * prefill_all_logits,
    }


def build_variant(spec: str, sparsity: float):
    loaded = load_model(spec)
    if sparsity:
        adapter = adapter_for(loaded.model.config)
        scores = score_groups("magnitude", loaded.model, adapter, ScoringInputs())
        prune_model(loaded.model, adapter, scores, PruneSpec(sparsity))
    return loaded


def export_variants(name: str, spec: str, reuse: bool) -> list[dict]:
    """Export every sparsity (fp32 + int8); with --reuse, keep folders already exported."""
    rows = []
    for sparsity in SPARSITIES:
        folder = OUT / f"{name}-s{int(sparsity * 100):02d}"
        loaded = build_variant(spec, sparsity)
        flops = workload_flops(loaded.model, WORKLOAD)
        params = sum(p.numel() for p in loaded.model.parameters())
        record_file = folder / "edgeprune.json"
        if not (reuse and record_file.is_file()):
            start = time.perf_counter()
            export_model(loaded.model, loaded.tokenizer, folder, overwrite=True)
            # int8 agreement is reported, not enforced: latency and size are measured for every variant
            int8 = verify_onnx(loaded.model, loaded.tokenizer, quantize_int8(folder / "model.onnx", folder / INT8_FILE))
            record = json.loads(record_file.read_text())
            record["verification"]["int8"] = int8.as_dict()
            record_file.write_text(json.dumps(record, indent=2) + "\n")
            print(f"{folder.name}: exported + verified + quantized in {time.perf_counter() - start:.0f} s", flush=True)
        record = json.loads(record_file.read_text())
        rows.append({"name": folder.name, "sparsity": sparsity, "params": params, "flops": flops, "export": record})
        del loaded
    return rows


def lm_head_node(path: Path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    return next(n.name for n in graph.node if "logits" in n.output)


def op_profile(path: Path, threads: int, prefill: int, keep: int, runs: int = 3) -> dict[str, float]:
    """ORT's per-node profile of `runs` prefills: mean ms per run by op type, lm_head separately."""
    options = session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(OUT / f"ortprof-{path.parent.name}-{keep}")
    model = OnnxModel(path, options=options)
    session = model.session
    ids = np.random.default_rng(0).integers(0, 49152, (1, prefill), dtype=np.int64)
    for _ in range(runs + 1):  # the first run is warm-up, dropped below
        model.step(ids, model.empty_cache(1), keep=keep)
    events = json.loads(Path(session.end_profiling()).read_text())
    head = lm_head_node(path)
    runs_seen: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        key = "lm_head MatMul" if node == head else event["args"]["op_name"]
        runs_seen[key].append(event["dur"] / 1e3)
    per_run = {key: sum(durs) * (runs / (runs + 1)) / runs for key, durs in runs_seen.items()}
    return dict(sorted(per_run.items(), key=lambda kv: -kv[1]))


def prefill_logits_ab(paths: list[Path], threads: int, rounds: int) -> dict[str, dict[str, float]]:
    """Alternating 128-token prefills with logits for every position vs only the last, per model."""
    models = [OnnxModel(p, threads) for p in paths]
    ids = np.random.default_rng(0).integers(0, 49152, (1, WORKLOAD.prefill), dtype=np.int64)
    times: dict[tuple[int, bool], list[float]] = defaultdict(list)
    for model in models:  # warm-up
        for last in (False, True):
            model.step(ids, model.empty_cache(1), keep=int(last))
    for _ in range(rounds):
        for i, model in enumerate(models):
            for last in (False, True):
                start = time.perf_counter()
                model.step(ids, model.empty_cache(1), keep=int(last))
                times[(i, last)].append((time.perf_counter() - start) * 1e3)
    return {
        paths[i].parent.name: {
            "all_logits_ms": statistics.median(times[(i, False)]),
            "last_logit_ms": statistics.median(times[(i, True)]),
            "all_logits_samples": times[(i, False)],
            "last_logit_samples": times[(i, True)],
        }
        for i in range(len(models))
    }


def paired(model: list[float], baseline: list[float]) -> float:
    return statistics.median(b / m for m, b in zip(model, baseline, strict=True))


def efficiency(speedup: float, ideal: float) -> float:
    return (1 - 1 / speedup) / (1 - 1 / ideal) if ideal != 1 else float("nan")


def profile_family(rows: list[dict], runs: int, warmup: int) -> None:
    """One alternating run of all six variants (fp32 and int8); speedups against dense fp32 and dense int8."""
    device = get_device("local")
    files = [OUT / r["name"] / "model.onnx" for r in rows] + [OUT / r["name"] / INT8_FILE for r in rows]
    results = LocalProfiler(device, runs, warmup).run(files, WORKLOAD)
    n = len(rows)
    for i, row in enumerate(rows):
        for label, result, base in (("fp32", results[i], results[0]), ("int8", results[n + i], results[n])):
            ideal = row["flops"]["total"] and rows[0]["flops"]["total"] / row["flops"]["total"]
            entry = {
                "result": {k: v for k, v in result.as_dict().items() if k != "samples"},
                "speedup_vs_dense_same_precision": paired(result.samples["latency_ms"], base.samples["latency_ms"]),
                "speedup_vs_dense_fp32": paired(result.samples["latency_ms"], results[0].samples["latency_ms"]),
                "ideal_speedup": ideal,
            }
            if result.prefill_ms is not None:
                for phase, key in (("prefill", "prefill_ms"), ("decode", "decode_ms_per_token")):
                    entry[f"{phase}_speedup"] = paired(result.samples[key], base.samples[key])
                    entry[f"{phase}_ideal"] = rows[0]["flops"][phase] / row["flops"][phase]
            entry["cut_efficiency"] = efficiency(entry["speedup_vs_dense_same_precision"], ideal) if i else None
            row[label] = entry


def fmt_table(rows: list[dict], decoder: bool) -> str:
    head = (
        "| variant | params | export s | max abs diff / top-1 (fp32) | top-1 (int8) | precision | file MB "
        "| session RSS MB | latency p50 ms | tokens/s | speedup (alternating) | ideal (FLOPs) | cut efficiency |"
    )
    if decoder:
        head = head.replace("| tokens/s |", "| prefill tok/s | decode tok/s |")
        head = head.replace("| speedup (alternating) |", "| speedup total / prefill / decode |")
        head = head.replace("| ideal (FLOPs) |", "| ideal total / prefill / decode |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        v = row["export"]["verification"]
        for label in ("fp32", "int8"):
            e, r = row[label], row[label]["result"]
            if decoder:
                rate = f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f}"
                speeds = (e["speedup_vs_dense_same_precision"], e["prefill_speedup"], e["decode_speedup"])
                speed = " / ".join(f"{x:.3f}" for x in speeds)
                ideal = f"{e['ideal_speedup']:.3f} / {e['prefill_ideal']:.3f} / {e['decode_ideal']:.3f}"
            else:
                rate = f"{r['tokens_per_s']:.0f}"
                speed, ideal = f"{e['speedup_vs_dense_same_precision']:.3f}", f"{e['ideal_speedup']:.3f}"
            eff = "" if e["cut_efficiency"] is None else f"{e['cut_efficiency']:.0%}"
            lines.append(
                f"| {row['name']} | {row['params'] / 1e6:.1f} M | {row['export']['export_seconds']:.0f} "
                f"| {v['fp32']['max_abs_diff']:.1e} / {v['fp32']['top1_agreement']:.0%} "
                f"| {v['int8']['top1_agreement']:.0%} | {label} | {r['file_size_mb']:.0f} | {r['session_rss_mb']:.0f} "
                f"| {r['latency_ms']['p50']:.1f} | {rate} | {speed} | {ideal} | {eff} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="keep exports already in benchmarks/out")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    started = time.time()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report: dict = {"machine": platform.platform(), "cpu_count": os.cpu_count(), "uptime_before": load_before}
    threads = get_device("local").threads
    for name, spec in (("decoder", DEFAULT_DECODER), ("encoder", DEFAULT_ENCODER)):
        rows = export_variants(name, spec, args.reuse)
        profile_family(rows, args.runs, args.warmup)
        report[name] = rows
        print(fmt_table(rows, name == "decoder"), flush=True)
    dense, p20 = (OUT / f"decoder-s{s}" / "model.onnx" for s in ("00", "20"))
    report["lm_head"] = {
        "ops_dense_all_logits": op_profile(dense, threads, WORKLOAD.prefill, keep=0),
        "ops_dense_last_logit": op_profile(dense, threads, WORKLOAD.prefill, keep=1),
        "ops_s20_all_logits": op_profile(p20, threads, WORKLOAD.prefill, keep=0),
        "ops_s20_last_logit": op_profile(p20, threads, WORKLOAD.prefill, keep=1),
        "prefill_ab": prefill_logits_ab([dense, p20], threads, rounds=8),
    }
    report["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    report["seconds"] = time.time() - started
    (OUT / "bench_export.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report["lm_head"], indent=1, default=lambda x: None)[:4000])
    print(f"{report['uptime_before']} -> {report['uptime_after']}; {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()

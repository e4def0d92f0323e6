"""Precision levers of the default decoder's fused graph: weight-only int8/int4 variants, their MatMulNBits
accuracy level, block size and mixed precision, against dense fp32 (issue 11's search candidates, issue 12's bound).

    EDGEPRUNE_DATA=/work/shared/data PYTHONPATH=$PWD:$PWD/benchmarks \\
        python benchmarks/bench_precision.py [--runs 10] [--wiki-windows 24] [--reuse]

Per variant: file MB, paired speedup over the dense fused fp32 graph (prefill 128 + decode 32, 2 intra-op
threads, all variants alternating in ONE runner process), prefill ms and decode ms/token with their own paired
ratios, and KL(dense || variant) / perplexity / top-1 agreement through ONNX Runtime on the very file, on the
packaged text's held-out tail (as `edgeprune run` measures it) and on WikiText-2 test. A second alternating run
compares MatMulNBits accuracy levels (4: int8 activations; 1: fp32 compute, which for 8-bit weights means
dequantizing the whole matrix at every call). Last, the int4 decode bound: MatMulNBits weight bytes read per
token over the measured memory bandwidth. Writes benchmarks/out/bench_precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from bench_common import wikitext_test_tokens
from bench_fused import memory_bandwidth_gbs

from edgeprune.calibration import heldout_start, load_text, tokenize_text
from edgeprune.devices.profiler import LocalProfiler, Workload, paired_speedup
from edgeprune.devices.profiles import get_device
from edgeprune.evaluate.divergence import heldout_divergence
from edgeprune.export import export_model
from edgeprune.export.files import save_onnx
from edgeprune.export.quantize import quantize_model, quantize_weight_only
from edgeprune.loading import DEFAULT_DECODER, load_model
from edgeprune.runtime import MODEL_FILE, CacheDecoder, OnnxModel, onnx_bytes

OUT = Path(__file__).parent / "out" / "precision"
WORKLOAD = Workload(batch=1, sequence=128, prefill=128, decode=32)
THREADS = 2  # as the product times; everything else runs on 1
SHIPPED = ("int8", "int8-b64", "int8-b128", "int4-mixed", "int4")  # precisions `run` searches
# variants measured beside them and not shipped: (name, quantize_weight_only keywords)
EXTRA = {"int4 asymmetric": {"bits": 4, "symmetric": False}, "int4 block 64": {"bits": 4, "block_size": 64}}


def build(reuse: bool) -> tuple[dict[str, Path], object]:
    """The dense fused fp32 folder and every variant's .onnx file (reused when --reuse finds them)."""
    loaded = load_model(DEFAULT_DECODER)
    dense = OUT / "dense"
    if not (reuse and (dense / MODEL_FILE).is_file()):
        export_model(loaded.model, loaded.tokenizer, dense, overwrite=True, fused=True)
    files = {"fp32": dense / MODEL_FILE}
    makers = {name: (lambda f, p=name: quantize_model(files["fp32"], f, p)) for name in SHIPPED}
    makers |= {name: (lambda f, kw=kw: quantize_weight_only(files["fp32"], f, **kw)) for name, kw in EXTRA.items()}
    for name, make in makers.items():
        file = OUT / f"{name.replace(' ', '-')}.onnx"
        if not (reuse and file.is_file()):
            make(file)
        files[name] = file
    return files, loaded


def with_accuracy_level(source: Path, target: Path, level: int, bits: int | None = None) -> Path:
    """A copy of a MatMulNBits file whose nodes (of `bits` only, if given) run at another accuracy level."""
    model = onnx.load(str(source))
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMulNBits" and (bits is None or attrs["bits"].i == bits):
            attrs["accuracy_level"].i = level
    return save_onnx(model, target)


def timed(files: dict[str, Path], runs: int) -> dict[str, dict]:
    """One alternating runner process over all files; ratios are paired medians against the first (dense)."""
    device = replace(get_device("local"), threads=THREADS)
    load = os.getloadavg()
    results = LocalProfiler(device, runs, warmup=2, timeout=7200).run(list(files.values()), WORKLOAD)
    base = results[0]
    rows = {}
    for name, result in zip(files, results, strict=True):
        rows[name] = {
            "speedup": paired_speedup(result.samples["latency_ms"], base.samples["latency_ms"]),
            "prefill_speedup": paired_speedup(result.samples["prefill_ms"], base.samples["prefill_ms"]),
            "decode_speedup": paired_speedup(
                result.samples["decode_ms_per_token"], base.samples["decode_ms_per_token"]
            ),
            "latency_ms": result.latency_ms.p50,
            "prefill_ms": result.prefill_ms.p50,
            "decode_ms_per_token": result.decode_ms_per_token.p50,
            "session_rss_mb": result.session_rss_mb,
        }
    after = os.getloadavg()
    return {"rows": rows, "load_before": load, "load_after": after, "runs": runs}


def quality(files: dict[str, Path], model, tokenizer, wiki_windows: int) -> dict[str, dict]:
    """KL / PPL / top-1 of each file against the dense PyTorch model, on the two held-out texts."""
    packaged = tokenize_text(tokenizer, load_text(None))
    texts = {
        "packaged held-out": packaged[heldout_start(len(packaged)) :][:8192],
        "wikitext-2 test": wikitext_test_tokens(tokenizer, wiki_windows * 128),
    }
    rows = {}
    for name, file in files.items():
        rows[name] = {}
        for text, tokens in texts.items():
            rows[name][text] = heldout_divergence(file, model, tokens, seq_len=128, threads=1).as_dict()
        print(f"{name}: " + ", ".join(f"{t} KL {r['mean']:.4f}" for t, r in rows[name].items()), flush=True)
    return rows


def read_bandwidth_gbs(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """Best of `repeats` reads of a buffer far larger than the caches, split over `threads` (numpy sums release
    the GIL), GB/s: the rate decode can stream weights at with that many threads."""
    if threads == 1:
        return memory_bandwidth_gbs(mb, repeats)
    buffer = np.ones(mb * 2**20 // 8, dtype=np.float64)
    parts = np.array_split(buffer, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=part.sum) for part in parts]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best / 1e9


def decode_weight_mb(file: Path) -> float:
    """Bytes every decoded token reads: all MatMulNBits inputs stored in the file (packed weights, scales,
    zero points; the tied head's blocks count once), plus float MatMul weights. The embedding reads one row."""
    graph = onnx.load(str(file)).graph
    sizes = {init.name: len(init.raw_data) for init in graph.initializer}
    read = {name for n in graph.node if n.op_type in ("MatMulNBits", "MatMul") for name in n.input[1:] if name in sizes}
    return sum(sizes[name] for name in read) / 1e6


def fastest_decode_ms(file: Path, tokens: int = 256, share: bool = True) -> dict[str, float]:
    """Per-token decode times of one session (2 threads), each token timed alone after a 128-token prompt: on a
    shared machine the fastest tokens are the ones that ran uncontended. `share`: the cache in place (what
    `generate` and the profiler do on the fused graph), else copied in and out every token (before)."""
    decoder = CacheDecoder(OnnxModel(file, threads=THREADS), 1, 128 + tokens, share)
    logits = decoder.feed(np.arange(1, 129, dtype=np.int64)[None])
    times = []
    for _ in range(tokens):
        token = logits[:, -1].argmax(-1).reshape(1, 1).astype(np.int64)
        start = time.perf_counter()
        logits = decoder.feed(token)
        times.append((time.perf_counter() - start) * 1e3)
    return {"min": float(np.min(times)), "p10": float(np.percentile(times, 10)), "p50": float(np.median(times))}


def decode_bound(file: Path, measured_p50_ms: float) -> dict:
    """The weight-bytes / read-bandwidth bound of one decoded token beside the measured decode times."""
    bandwidth = {threads: read_bandwidth_gbs(threads) for threads in (1, THREADS)}
    weights = decode_weight_mb(file)
    return {
        "read_bandwidth_gbs": bandwidth,
        "int4_decode_weight_mb": weights,
        "bound_ms": weights / 1e3 / max(bandwidth.values()) * 1e3,
        "measured_ms": measured_p50_ms,
        "per_token_ms": fastest_decode_ms(file),
        "per_token_ms_cache_copied": fastest_decode_ms(file, share=False),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="alternating rounds per timing run (>= 10)")
    parser.add_argument("--wiki-windows", type=int, default=24, help="WikiText-2 test windows of 128 tokens")
    parser.add_argument("--reuse", action="store_true", help="keep files already built in benchmarks/out/precision")
    parser.add_argument(
        "--bound-only", action="store_true", help="with --reuse: redo only the decode bound, into the JSON written"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    files, loaded = build(args.reuse)
    result_file = OUT.parent / "bench_precision.json"
    if args.bound_only:
        record = json.loads(result_file.read_text())
        record["decode_bound"] = decode_bound(files["int4"], record["timing"]["rows"]["int4"]["decode_ms_per_token"])
        result_file.write_text(json.dumps(record, indent=2) + "\n")
        print_tables(record)
        return
    record = {"workload": WORKLOAD.__dict__, "threads": THREADS, "date": time.strftime("%Y-%m-%d %H:%M UTC")}
    record["sizes_mb"] = {name: onnx_bytes(file) / 1e6 for name, file in files.items()}
    record["timing"] = timed(files, args.runs)
    print(json.dumps(record["timing"]["rows"], indent=1), flush=True)
    levels = {
        "fp32": files["fp32"],
        "int8 (level 4)": files["int8"],
        "int8 (level 1)": with_accuracy_level(files["int8"], OUT / "int8-level1.onnx", 1),
        "int4 (level 4)": files["int4"],
        "int4 (4-bit MatMuls at level 1)": with_accuracy_level(files["int4"], OUT / "int4-level1.onnx", 1, bits=4),
    }
    record["levels"] = timed(levels, args.runs)
    print(json.dumps(record["levels"]["rows"], indent=1), flush=True)
    record["decode_bound"] = decode_bound(files["int4"], record["timing"]["rows"]["int4"]["decode_ms_per_token"])
    record["quality"] = quality(files, loaded.model, loaded.tokenizer, args.wiki_windows)
    result_file.write_text(json.dumps(record, indent=2) + "\n")
    print_tables(record)


def ppl_cell(divergence: dict) -> str:
    return f"{divergence['perplexity']:.2f} ({divergence['perplexity'] / divergence['dense_perplexity'] - 1:+.1%})"


def print_tables(record: dict) -> None:
    timing, quality_rows = record["timing"], record["quality"]
    print(f"\nload average {timing['load_before'][0]:.1f} -> {timing['load_after'][0]:.1f}, {timing['runs']} rounds")
    print(
        "| variant | MB | speedup (prefill / decode) | prefill ms | decode ms/token | "
        "KL packaged | PPL packaged | KL WikiText-2 | PPL WikiText-2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in timing["rows"].items():
        q = quality_rows[name]
        pack, wiki = q["packaged held-out"], q["wikitext-2 test"]
        print(
            f"| {name} | {record['sizes_mb'][name]:.0f} | {row['speedup']:.2f} ({row['prefill_speedup']:.2f} / "
            f"{row['decode_speedup']:.2f}) | {row['prefill_ms']:.0f} | {row['decode_ms_per_token']:.1f} | "
            f"{pack['mean']:.4f} | {ppl_cell(pack)} | {wiki['mean']:.4f} | {ppl_cell(wiki)} |"
        )
    levels = record["levels"]
    print(f"\naccuracy levels (load {levels['load_before'][0]:.1f} -> {levels['load_after'][0]:.1f})")
    print("| variant | speedup (prefill / decode) | prefill ms | decode ms/token |")
    print("|---|---|---|---|")
    for name, row in levels["rows"].items():
        print(
            f"| {name} | {row['speedup']:.2f} ({row['prefill_speedup']:.2f} / {row['decode_speedup']:.2f}) | "
            f"{row['prefill_ms']:.0f} | {row['decode_ms_per_token']:.1f} |"
        )
    bound = record["decode_bound"]
    fastest = bound["per_token_ms"]
    print(
        f"\nread bandwidth {bound['read_bandwidth_gbs']}; int4 reads {bound['int4_decode_weight_mb']:.0f} MB per "
        f"token: bound {bound['bound_ms']:.1f} ms; measured p50 {bound['measured_ms']:.1f} ms "
        f"({bound['measured_ms'] / bound['bound_ms']:.1f}x); tokens timed alone: min {fastest['min']:.1f} ms "
        f"({fastest['min'] / bound['bound_ms']:.1f}x), p10 {fastest['p10']:.1f}, p50 {fastest['p50']:.1f} "
        f"(load {bound['load_average'][0]:.1f})"
    )
    copied = bound.get("per_token_ms_cache_copied")
    if copied:
        print(f"the cache copied every token instead: min {copied['min']:.1f}, p50 {copied['p50']:.1f} ms")


if __name__ == "__main__":
    main()

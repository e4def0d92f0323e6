"""The default decoder's graphs side by side: Optimum export (fp32 / weight-only int8 / int4), the fused graph
(fp32 / int4), and onnxruntime-genai's own builder int4, in ONE alternating profiler run.

    PYTHONPATH=$PWD python benchmarks/bench_fused.py [--runs 6] [--warmup 2] [--windows 32] [--reuse]

Per graph: file MB, workload speedup over the Optimum fp32 export (prefill 128 + decode 32, 2 threads,
paired medians), prefill ms, decode ms/token beside the bound weight bytes / measured memory bandwidth,
held-out perplexity on WikiText-2 test (first `--windows` windows of 128 tokens, via ONNX Runtime on the
very file), and top-1 agreement / max logit diff against PyTorch. Writes benchmarks/out/bench_fused.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from bench_common import data_dir

from edgeprune.devices.profiler import LocalProfiler, Workload, paired_speedup
from edgeprune.devices.profiles import get_device
from edgeprune.evaluate import evaluate_task, load_for_eval
from edgeprune.export import export_model, quantize_model, verify_onnx
from edgeprune.loading import DEFAULT_DECODER, load_model
from edgeprune.outputs import cache_dir
from edgeprune.runtime import MODEL_FILE, onnx_bytes

OUT = Path(__file__).parent / "out" / "fused"
WORKLOAD = Workload(batch=1, sequence=128, prefill=128, decode=32)
THREADS = 2


def quantized_copy(source: Path, target: Path, precision: str) -> float:
    """A copy of an export folder whose model.onnx is `precision`; returns quantization seconds."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data"), dirs_exist_ok=True)
    start = time.perf_counter()
    quantize_model(source / MODEL_FILE, target / MODEL_FILE, precision)
    return time.perf_counter() - start


def genai_builder_int4(hf_folder: Path, target: Path) -> float:
    """onnxruntime-genai's own builder on the dense Hugging Face folder, as a user would run it."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(target)]
    subprocess.run(
        [*command, "-p", "int4", "-e", "cpu", "-c", str(OUT / "genai-cache")], check=True, capture_output=True
    )
    shutil.copy(hf_folder / "config.json", target / "config.json")  # for perplexity through OnnxCausalLM
    return time.perf_counter() - start


def build_variants(reuse: bool) -> dict[str, dict]:
    """Every graph's folder and how it was made (export / quantize seconds)."""
    loaded = load_model(DEFAULT_DECODER)
    made: dict[str, dict] = {}
    plan = [
        ("optimum fp32", lambda f: export_model(loaded.model, loaded.tokenizer, f, overwrite=True).export_seconds),
        ("optimum int8", lambda f: quantized_copy(OUT / "optimum-fp32", f, "int8")),
        ("optimum int4", lambda f: quantized_copy(OUT / "optimum-fp32", f, "int4")),
        (
            "fused fp32",
            lambda f: export_model(loaded.model, loaded.tokenizer, f, overwrite=True, fused=True).export_seconds,
        ),
        ("fused int8", lambda f: quantized_copy(OUT / "fused-fp32", f, "int8")),
        ("fused int4", lambda f: quantized_copy(OUT / "fused-fp32", f, "int4")),
        ("genai builder int4", lambda f: genai_builder_int4(loaded.folder or cache_dir() / "smollm2-135m-instruct", f)),
    ]
    for name, make in plan:
        folder = OUT / name.replace(" ", "-")
        record_file = folder / "bench.json"
        if reuse and record_file.is_file():
            made[name] = json.loads(record_file.read_text())
            continue
        if not (reuse and (folder / MODEL_FILE).is_file()):
            shutil.rmtree(folder, ignore_errors=True)
            seconds = make(folder)
            (folder / "bench_seconds.txt").write_text(f"{seconds:.1f}\n")
        check = verify_onnx(loaded.model, loaded.tokenizer, folder / MODEL_FILE)
        made[name] = {
            "folder": str(folder),
            "seconds": float((folder / "bench_seconds.txt").read_text()),
            "file_mb": onnx_bytes(folder / MODEL_FILE) / 1e6,
            "top1_agreement": check.top1_agreement,
            "max_abs_diff": check.max_abs_diff,
        }
        record_file.write_text(json.dumps(made[name], indent=2) + "\n")
        print(
            f"{name}: {made[name]['file_mb']:.0f} MB in {made[name]['seconds']:.0f} s, top-1 {check.top1_agreement:.0%}"
        )
    return made


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Best of `repeats` single-threaded reads of a buffer far larger than the caches (numpy sum), GB/s."""
    buffer = np.ones(mb * 2**20 // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--windows", type=int, default=32, help="WikiText-2 test windows of 128 tokens")
    parser.add_argument("--reuse", action="store_true", help="keep graphs already built in benchmarks/out/fused")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    variants = build_variants(args.reuse)
    names = list(variants)
    device = replace(get_device("local"), threads=THREADS)
    results = LocalProfiler(device, args.runs, args.warmup).run([Path(variants[n]["folder"]) for n in names], WORKLOAD)
    bandwidth = memory_bandwidth_gbs()
    base = results[0]
    for name, result in zip(names, results, strict=True):
        variants[name] |= {
            "speedup": paired_speedup(result.samples["latency_ms"], base.samples["latency_ms"]),
            "prefill_ms": result.prefill_ms.p50,
            "decode_ms_per_token": result.decode_ms_per_token.p50,
            "decode_bound_ms": variants[name]["file_mb"] / 1e3 / bandwidth * 1e3,
            "session_rss_mb": result.session_rss_mb,
        }
    (OUT.parent / "bench_fused.json").write_text(json.dumps({"bandwidth_gbs": bandwidth, "variants": variants}) + "\n")
    for name in names:
        model, tokenizer, _ = load_for_eval(variants[name]["folder"], threads=THREADS)
        ppl = evaluate_task(model, tokenizer, "wikitext2", data_dir(), limit=args.windows, seq_len=128)
        variants[name]["ppl"] = ppl["metrics"]["ppl"]
        print(f"{name}: PPL {variants[name]['ppl']:.2f}", flush=True)
    dense_ppl = variants[names[0]]["ppl"]
    print(f"\nmemory bandwidth (numpy sum of 512 MB, 1 thread, best of 5): {bandwidth:.1f} GB/s")
    print(
        "| graph | made in s | file MB | speedup vs Optimum fp32 | prefill ms | decode ms/token | "
        "decode bound ms | held-out PPL (x dense) | top-1 / max diff vs PyTorch |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        v = variants[name]
        print(
            f"| {name} | {v['seconds']:.0f} | {v['file_mb']:.0f} | {v['speedup']:.2f} | {v['prefill_ms']:.0f} | "
            f"{v['decode_ms_per_token']:.1f} | {v['decode_bound_ms']:.1f} | {v['ppl']:.2f} "
            f"({v['ppl'] / dense_ppl:.3f}) | {v['top1_agreement']:.0%} / {v['max_abs_diff']:.2g} |"
        )
    record = {
        "workload": WORKLOAD.__dict__,
        "threads": THREADS,
        "runs": args.runs,
        "windows": args.windows,
        "bandwidth_gbs": bandwidth,
        "variants": variants,
    }
    (OUT.parent / "bench_fused.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()

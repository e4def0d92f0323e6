"""Session memory of ONNX Runtime on the default decoder: dense fp32, weight-only int8 and int4 (MatMulNBits),
with the weights inside model.onnx ("single") or in a model.onnx_data file beside it ("external",
memory-mapped), under `edgeprune.runtime.session_options` ("before") and under those plus no CPU arena and
exact initializer allocation ("after", the candidate settings).

    edgeprune export smollm2-135m -o /tmp/dense
    python benchmarks/bench_memory.py /tmp/dense [--work /tmp/bench_memory] [--rounds 3] [--threads 2]

Each (file, settings) is measured in a fresh process: its RSS before the session, after loading (and the
peak while loading), and after one workload (prefill 128 + decode 32); "session MB" is the peak over the
process before the session, what the profiler reports as session_rss_mb. Latency: sessions of one model
(in-file weights, external weights, external weights with the "after" settings) alternate in one process,
the order reversed every other round; ratios are medians of per-round ratios, so machine drift cancels.
Writes benchmarks/out/bench_memory.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeprune.devices.runner import file_size_mb, rss_mb
from edgeprune.runtime import OnnxModel, session_options

OUT = Path(__file__).parent / "out"
PREFILL, DECODE = 128, 32
BITS = {"int8": 8, "int4": 4}


def options_for(settings: str, threads: int) -> ort.SessionOptions:
    """`before`: what edgeprune opens sessions with; `after`: without the CPU arena and with initializers
    allocated exactly instead of through it."""
    options = session_options(threads)
    if settings == "after":
        options.enable_cpu_mem_arena = False
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    return options


def run_workload(model: OnnxModel, ids: np.ndarray) -> float:
    """Prefill, then greedy decode steps through the KV cache; milliseconds."""
    start = time.perf_counter()
    logits, cache = model.step(ids, model.empty_cache(1), keep=1)
    for _ in range(DECODE):
        logits, cache = model.step(logits[:, -1].argmax(-1).reshape(1, 1), cache, keep=1)
    return (time.perf_counter() - start) * 1e3


def measure_memory(path: Path, settings: str, threads: int) -> dict:
    """In this (fresh) process: RSS before, after loading, at the loading peak and after one workload."""
    base = rss_mb("VmRSS")
    model = OnnxModel(path, options=options_for(settings, threads))
    loaded, load_peak = rss_mb("VmRSS"), rss_mb("VmHWM")
    run_workload(model, np.random.default_rng(0).integers(0, 1000, (1, PREFILL)))
    return {
        "base_mb": base,
        "loaded_mb": loaded - base,
        "load_peak_mb": load_peak - base,
        "after_run_mb": rss_mb("VmRSS") - base,
        "session_mb": rss_mb("VmHWM") - base,
    }


def measure_in_child(path: Path, settings: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", str(path), settings, "--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternating_latency(sessions: dict[str, tuple[Path, str]], threads: int, rounds: int) -> dict:
    """Sessions of one model (label -> file, settings) run in turn, the order reversed every other round;
    each one's latency over the first's as a median of per-round ratios, so machine drift cancels."""
    models = {
        label: OnnxModel(path, options=options_for(settings, threads)) for label, (path, settings) in sessions.items()
    }
    ids = np.random.default_rng(0).integers(0, 1000, (1, PREFILL))
    for model in models.values():
        run_workload(model, ids)  # warm-up
    samples: dict[str, list[float]] = {label: [] for label in models}
    for round_ in range(rounds):
        for label in list(models) if round_ % 2 == 0 else list(models)[::-1]:
            samples[label].append(run_workload(models[label], ids))
    first = samples[next(iter(samples))]
    return {
        label: {
            "median_ms": statistics.median(values),
            "over_first": statistics.median(v / f for v, f in zip(values, first, strict=True)),
        }
        for label, values in samples.items()
    }


def quantized(dense: Path, bits: int, target: Path) -> Path:
    """ONNX Runtime's weight-only quantizer: block 32, symmetric, accuracy_level 4 (int8 dot products)."""
    if not target.is_file():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        target.parent.mkdir(parents=True, exist_ok=True)
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(dense)), bits=bits, block_size=32, is_symmetric=True, accuracy_level=4
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    return target


def external(single: Path, target: Path) -> Path:
    """The same graph with every initializer over 1 KB in model.onnx_data beside it."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(
            onnx.load(str(single)),
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=target.name + "_data",
            size_threshold=1024,
        )
    return target


def variants(dense_folder: Path, work: Path) -> dict[str, dict[str, Path]]:
    dense = dense_folder / "model.onnx"
    files = {"fp32": dense} | {name: quantized(dense, bits, work / name / "model.onnx") for name, bits in BITS.items()}
    return {
        name: {"single": f, "external": external(f, work / f"{name}-external" / "model.onnx")}
        for name, f in files.items()
    }


def table(rows: list[dict]) -> str:
    header = "| model | layout | settings | file MB | loaded | load peak | after run | session MB | session/file |"
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['settings']} | {r['file_mb']:.0f} | {r['loaded_mb']:.0f} | "
            f"{r['load_peak_mb']:.0f} | {r['after_run_mb']:.0f} | {r['session_mb']:.0f} | "
            f"{r['session_mb'] / r['file_mb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dense", type=Path, nargs="?", help="folder of `edgeprune export smollm2-135m`")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_memory"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("FILE", "SETTINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_memory(Path(args.child[0]), args.child[1], args.threads)))
        return
    rows, latency = [], {}
    for name, layouts in variants(args.dense, args.work).items():
        for layout, path in layouts.items():
            for settings in ("before", "after"):
                row = {"model": name, "layout": layout, "settings": settings, "file_mb": file_size_mb(path)}
                rows.append(row | measure_in_child(path, settings, args.threads))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        sessions = {
            "single, before": (layouts["single"], "before"),
            "external, before": (layouts["external"], "before"),
            "external, after": (layouts["external"], "after"),
        }
        latency[name] = alternating_latency(sessions, args.threads, args.rounds)
        print(name, "latency", latency[name], flush=True)
    OUT.mkdir(exist_ok=True)
    record = {"rows": rows, "latency": latency, "threads": args.threads, "ort_version": ort.__version__}
    (OUT / "bench_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    print(table(rows))
    labels = list(next(iter(latency.values())))
    print("\n| model | " + " | ".join(f"{label} ms (x {labels[0]})" for label in labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for name, per_label in latency.items():
        cells = [f"{v['median_ms']:.0f} ({v['over_first']:.3f})" for v in per_label.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

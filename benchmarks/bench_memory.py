"""Session memory of ONNX Runtime on what `edgeprune export` ships: the weights in model.onnx_data beside the
graph (memory-mapped, "external") against the same graph with its weights inside model.onnx ("single", what
edgeprune wrote before), under `edgeprune.runtime.session_options` ("default") and with ONNX Runtime's weight
pre-packing off ("no-prepack": what the pre-packed copies of the MatMul weights cost, and save), and
"prepacked-external": the graph ONNX Runtime optimizes and saves with its pre-packed weights in the weights
file (`session.save_external_prepacked_constant_initializers`; what EDGEPRUNE_PREPACKED=1 opens, made by
`runtime.write_prepacked` once per file in --work), so a session on it memory-maps the packed layout
instead of packing a second copy on the heap.

    edgeprune export smollm2-135m --fused -o /tmp/mem/fp32
    edgeprune export smollm2-135m --fused --quantize int8 -o /tmp/mem/int8      # and int4
    python benchmarks/bench_memory.py /tmp/mem/fp32 /tmp/mem/int8 /tmp/mem/int4 [--rounds 3] [--threads 2] \
        [--variants external/default prepacked-external/default]

Each (file, settings) is measured in a fresh process: its RSS before the session, after loading (and the
peak while loading), and after one workload (prefill 128 + decode 32); "session MB" is the peak over the
process before the session, what the profiler reports as session_rss_mb. After the run, the resident memory
over the process before is split into anonymous pages (RssAnon: heap, what the kernel cannot drop) and
file pages (RssFile: clean mapped weights, dropped under memory pressure and read again when touched).
The KV cache of the workload is printed beside it. The prompt's ids matter to the file pages: each embedding
row a prompt reads maps its pages (and the kernel's fault-around neighbours) of the memory-mapped weights, so
`--ids low` (ids below 1,000, what this script used first), `random` (uniform over the vocabulary, what
`edgeprune profile` feeds: the worst case) and `text:FILE` (the first 128 tokens of FILE, through the shipped
folder's tokenizer.json: what a user's prompt reads) are told apart. Latency: the sessions of one model alternate in one
process, the order reversed every other round; each is a median of per-round ratios to the shipped layout
("external/default"), so machine drift cancels.
Writes --out (benchmarks/out/bench_memory.json) and prints Markdown tables.
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

from edgeprune.devices.runner import rss_mb
from edgeprune.outputs import PROVENANCE
from edgeprune.runtime import MODEL_FILE, OnnxModel, onnx_bytes, session_options, write_prepacked

OUT = Path(__file__).parent / "out"
PREFILL, DECODE = 128, 32
# layout/settings measured; the first is what ships, and every latency is a ratio to it
VARIANTS = ("external/default", "single/default", "external/no-prepack", "prepacked-external/default")


def options_for(settings: str, threads: int) -> ort.SessionOptions:
    """`default`: what edgeprune opens sessions with; `no-prepack`: without ORT's pre-packed weight copies."""
    options = session_options(threads)
    if settings == "no-prepack":
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def run_workload(model: OnnxModel, ids: np.ndarray) -> float:
    """Prefill, then greedy decode steps through the KV cache; milliseconds."""
    start = time.perf_counter()
    logits, cache = model.step(ids, model.empty_cache(1), keep=1)
    for _ in range(DECODE):
        logits, cache = model.step(logits[:, -1].argmax(-1).reshape(1, 1), cache, keep=1)
    return (time.perf_counter() - start) * 1e3


def resident() -> dict[str, float]:
    """This process's resident MB: in total, anonymous and file-backed (Linux /proc)."""
    return {field: rss_mb(field) for field in ("VmRSS", "RssAnon", "RssFile")}


def prompt_ids(folder: Path, spec: str, vocab: int) -> list[int]:
    """The workload's prompt: `low`, `random` or `text:FILE` (see the module docstring)."""
    rng = np.random.default_rng(0)
    if spec == "low":
        return rng.integers(0, 1000, PREFILL).tolist()
    if spec == "random":
        return rng.integers(0, vocab, PREFILL).tolist()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    return tokenizer.encode(Path(spec.removeprefix("text:")).read_text()[: 50 * PREFILL]).ids[:PREFILL]


def measure_memory(path: Path, settings: str, threads: int, ids: list[int]) -> dict:
    """In this (fresh) process: RSS before, after loading, at the loading peak and after one workload, and
    what of the RSS after the workload is anonymous or file pages."""
    base = resident()
    model = OnnxModel(path, options=options_for(settings, threads))
    loaded, load_peak = rss_mb("VmRSS"), rss_mb("VmHWM")
    run_workload(model, np.asarray([ids], dtype=np.int64))
    after = resident()
    return {
        "base_mb": base["VmRSS"],
        "loaded_mb": loaded - base["VmRSS"],
        "load_peak_mb": load_peak - base["VmRSS"],
        "after_run_mb": after["VmRSS"] - base["VmRSS"],
        "anon_mb": after["RssAnon"] - base["RssAnon"],
        "file_pages_mb": after["RssFile"] - base["RssFile"],
        "session_mb": rss_mb("VmHWM") - base["VmRSS"],
    }


def measure_in_child(path: Path, settings: str, threads: int, ids: list[int]) -> dict:
    command = [sys.executable, __file__, "--child", str(path), settings, "--threads", str(threads)]
    command += ["--child-ids", json.dumps(ids)]
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternating_latency(sessions: dict[str, tuple[Path, str]], threads: int, rounds: int, ids: list[int]) -> dict:
    """Sessions of one model (label -> file, settings) run in turn, the order reversed every other round;
    each one's latency over the first's as a median of per-round ratios, so machine drift cancels."""
    models = {
        label: OnnxModel(path, options=options_for(settings, threads)) for label, (path, settings) in sessions.items()
    }
    ids = np.asarray([ids], dtype=np.int64)
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


def inline(shipped: Path, target: Path) -> Path:
    """The shipped graph with every weight inside model.onnx (no weights file): the layout before."""
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(onnx.load(str(shipped)), str(target))
    return target


def layout_file(shipped: Path, layout: str, work: Path, threads: int) -> Path:
    """The file of one layout of a shipped model; the copies are made once in `work`, beside the measurement."""
    if layout == "external":
        return shipped
    if layout == "single":
        return inline(shipped, work / layout / MODEL_FILE)
    if not (work / layout / PROVENANCE).is_file():  # what EDGEPRUNE_PREPACKED=1 makes, here beside the others
        write_prepacked(shipped, work / layout, threads)
    return work / layout / MODEL_FILE


def kv_cache_mb(model: OnnxModel) -> float:
    """K and V of every layer for the workload's positions, from the graph's cache inputs."""
    caches = model.caches
    return sum(c.heads * c.head_dim * (PREFILL + DECODE) * np.dtype(c.dtype).itemsize for c in caches) / 1e6


def table(rows: list[dict]) -> str:
    """MB over the process before the session; anon and file pages are the RSS after the run split by kind."""
    header = (
        "| model | layout | settings | file MB | loaded | load peak | after run | anon | file pages | session MB "
        "| session/shipped file |"
    )
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['settings']} | {r['file_mb']:.0f} | {r['loaded_mb']:.0f} | "
            f"{r['load_peak_mb']:.0f} | {r['after_run_mb']:.0f} | {r['anon_mb']:.0f} | {r['file_pages_mb']:.0f} | "
            f"{r['session_mb']:.0f} | {r['session_mb'] / r['shipped_mb']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="*", help="folders `edgeprune export --fused [--quantize]` wrote")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_memory"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="layout/settings")
    parser.add_argument("--out", type=Path, default=OUT / "bench_memory.json")
    parser.add_argument("--ids", default="low", help="the prompt: low, random or text:FILE (module docstring)")
    parser.add_argument("--child", nargs=2, metavar=("FILE", "SETTINGS"), help=argparse.SUPPRESS)
    parser.add_argument("--child-ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ids = json.loads(args.child_ids)
        print(json.dumps(measure_memory(Path(args.child[0]), args.child[1], args.threads, ids)))
        return
    rows, latency = [], {}
    for folder in args.folders:
        name = json.loads((folder / "edgeprune.json").read_text())["precision"]
        shipped = folder / "model.onnx"
        graph = OnnxModel(shipped, prepacked=False)
        print(name, f"KV cache of the workload: {kv_cache_mb(graph):.1f} MB", flush=True)
        ids = prompt_ids(folder, args.ids, graph.vocab_size or 1000)
        del graph  # each measured session runs in its own process
        sessions = {}
        for variant in args.variants:
            layout, settings = variant.split("/")
            path = layout_file(shipped, layout, args.work / name, args.threads)
            sessions[variant] = (path, settings)
            row = {"model": name, "layout": layout, "settings": settings, "file_mb": onnx_bytes(path) / 1e6}
            row["shipped_mb"] = onnx_bytes(shipped) / 1e6
            rows.append(row | {"ids": args.ids} | measure_in_child(path, settings, args.threads, ids))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        latency[name] = alternating_latency(sessions, args.threads, args.rounds, ids)
        print(name, "latency", latency[name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "latency": latency, "threads": args.threads, "ort_version": ort.__version__}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(rows))
    labels = list(next(iter(latency.values())))
    print("\n| model | " + " | ".join(f"{label} ms (x {labels[0]})" for label in labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for name, per_label in latency.items():
        cells = [f"{v['median_ms']:.0f} ({v['over_first']:.3f})" for v in per_label.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""The process that runs models on a device: reads a JSON spec on stdin, prints one JSON object.

The same code runs locally (a subprocess, so peak RSS is the session's own process) and on
a board (shipped as a zip app with `edgeprune.runtime`), so it imports only numpy,
onnxruntime, the standard library and edgeprune's torch-free modules.

Every spec has "models": [path, ...], "threads": T, "providers": [...], "prepacked": true/false/null (whether
CPU sessions map a pre-packed copy, edgeprune.runtime; null: the default), and a "task":
- "profile" (the default): "workload": {"batch", "sequence", "prefill", "decode"}, "runs": N,
  "warmup": W, "seed": S. With two models, runs alternate A B B A ... so slow drift hits both.
- "outputs": "inputs": [[id, ...], ...] (logits of one forward, returned as packed float32 arrays)
  and, for decoders, "prompt_ids", "max_new_tokens", "eos_ids" (greedy tokens): what the same files
  must reproduce on another CPU.
- "divergence": "windows": [[id, ...], ...], "batch_size": B; models = [reference, candidate, ...]:
  per-window statistics (edgeprune.window_stats) of each candidate against the reference, all run here.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeprune.errors import EdgepruneError
from edgeprune.runtime import (
    CacheDecoder,
    OnnxModel,
    greedy_generate,
    model_file,
    onnx_bytes,
    prepacked_file,
    prepacked_wanted,
)
from edgeprune.window_stats import window_stats

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
ANY_VOCAB = 32  # ids below this exist in every tokenizer, for graphs whose outputs do not show the vocabulary


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) from /proc; elsewhere the lifetime peak from getrusage."""
    if PROC_STATUS.is_file():
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux), so a second model's peak is its own."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def prepack(spec: dict) -> dict:
    """Each model's pre-packed copy, made (the "prepack" task: what `measure` runs in a child process)."""
    threads = int(spec.get("threads") or 0)
    for path in spec["models"]:
        prepacked_file(model_file(path), threads)
    return {"results": [], "host": host(threads)}


def prepack_before_measuring(spec: dict) -> None:
    """Make the copies in a child process where one starts (this runner again), else here: the heap that
    making a copy uses and frees would sit under the measured session, which then reads low (164 MB for a
    session of 196 MB on the default job's answer). A copy the child could not make is made (or its error
    raised) when the session opens."""
    try:
        subprocess.run(
            [sys.executable, sys.argv[0]],
            input=json.dumps({**spec, "task": "prepack"}),
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):  # e.g. no exec of the interpreter (an emulator): made here
        prepack(spec)


def stats(samples: list[float]) -> dict[str, float]:
    values = np.asarray(samples, dtype=np.float64)
    return {
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "mean": float(values.mean()),
        "std": float(values.std()),
    }


class Measured:
    """One model under test: its session, fixed random input ids, and the samples taken so far."""

    def __init__(self, path: str, workload: dict, spec: dict):
        self.path = model_file(path)
        baseline = rss_mb("VmRSS")
        self.model = open_model(path, spec)
        vocab = self.model.vocab_size or ANY_VOCAB  # latency does not depend on which ids
        rng = np.random.default_rng(int(spec.get("seed", 0)))
        length = workload["prefill"] if self.model.is_decoder else workload["sequence"]
        self.ids = rng.integers(0, vocab, (workload["batch"], length), dtype=np.int64)
        self.decode = workload["decode"]
        self.samples: dict[str, list[float]] = {"latency_ms": [], "prefill_ms": [], "decode_ms_per_token": []}
        self.baseline_mb = baseline

    def run_once(self) -> None:
        start = time.perf_counter()
        if not self.model.is_decoder:
            self.model.forward(self.ids)
            self.samples["latency_ms"].append((time.perf_counter() - start) * 1e3)
            return
        decoder = CacheDecoder(self.model, self.ids.shape[0], self.ids.shape[1] + self.decode)
        logits = decoder.feed(self.ids)
        prefilled = time.perf_counter()
        for _ in range(self.decode):
            logits = decoder.feed(logits[:, -1].argmax(-1).reshape(-1, 1).astype(np.int64))
        end = time.perf_counter()
        self.samples["prefill_ms"].append((prefilled - start) * 1e3)
        self.samples["decode_ms_per_token"].append((end - prefilled) * 1e3 / max(1, self.decode))
        self.samples["latency_ms"].append((end - start) * 1e3)

    def warm_up(self, warmup: int) -> None:
        try:
            self.run_once()
        except Exception as err:  # ORT's pybind errors: usually a workload the graph cannot take
            reason = str(err).strip().splitlines()[0][:160]
            raise EdgepruneError(
                f"{self.path.name} failed on inputs of shape {list(self.ids.shape)} ({reason}): shorten --workload "
                "(the model may have fewer positions)"
            ) from None
        for _ in range(warmup - 1):
            self.run_once()
        self.samples = {key: [] for key in self.samples}
        self.resident_share_mb = rss_mb("VmRSS") - self.baseline_mb  # read first: the peak read later covers it
        self.peak_rss_mb = rss_mb("VmHWM")
        self.session_rss_mb = self.peak_rss_mb - self.baseline_mb

    def report(self, process_mb: float, alone: bool) -> dict:
        """Alone, the process's own numbers. Beside another model the process holds both sessions, so a model's
        peak and resident memory are its own share on top of the process before any model (`process_mb`):
        what a process serving only this model would use (before, each showed the sum of both)."""
        batch, length = self.ids.shape
        resident = rss_mb("VmRSS") if alone else process_mb + self.resident_share_mb
        result = {
            "model": str(self.path),
            "kind": "decoder" if self.model.is_decoder else "encoder",
            "file_size_mb": onnx_bytes(self.path) / 1e6,
            "providers": self.model.session.get_providers(),
            "peak_rss_mb": max(self.peak_rss_mb, resident) if alone else process_mb + self.session_rss_mb,
            "session_rss_mb": self.session_rss_mb,
            "rss_mb": resident,
            "latency_ms": stats(self.samples["latency_ms"]),
            "samples": self.samples,
        }
        if self.model.is_decoder:
            prefill, per_token = stats(self.samples["prefill_ms"]), stats(self.samples["decode_ms_per_token"])
            result |= {
                "prefill_ms": prefill,
                "decode_ms_per_token": per_token,
                "prefill_tokens_per_s": batch * length / (prefill["p50"] / 1e3),
                "decode_tokens_per_s": batch / (per_token["p50"] / 1e3) if self.decode else None,
                "tokens_per_s": None,
            }
        else:
            result |= {"prefill_ms": None, "decode_ms_per_token": None, "prefill_tokens_per_s": None}
            result |= {
                "decode_tokens_per_s": None,
                "tokens_per_s": batch * length / (result["latency_ms"]["p50"] / 1e3),
            }
        return result


def alternating_order(n_models: int, runs: int) -> list[int]:
    """A B B A A B ...: each model runs first in half of the rounds."""
    order = []
    for round_ in range(runs):
        indices = list(range(n_models))
        order += indices if round_ % 2 == 0 else indices[::-1]
    return order


def host(threads: int) -> dict:
    return {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "ort_version": ort.__version__,
        "cpu_count": os.cpu_count(),
        "threads": threads,
    }


def measure(spec: dict) -> dict:
    threads = int(spec.get("threads") or 0)
    if prepacked_wanted(spec.get("providers"), None, spec.get("prepacked")):  # before any baseline: peaks are sessions'
        prepack_before_measuring(spec)
        reset_peak()
    process_mb = rss_mb("VmRSS")
    models = []
    for i, path in enumerate(spec["models"]):
        if i:
            reset_peak()
        measured = Measured(path, spec["workload"], spec)
        measured.warm_up(int(spec.get("warmup", 1)))
        models.append(measured)
    for index in alternating_order(len(models), int(spec["runs"])):
        models[index].run_once()
    if len(models) == 1:  # the peak was never reset: it covers the timed runs too
        models[0].peak_rss_mb = rss_mb("VmHWM")
        models[0].session_rss_mb = models[0].peak_rss_mb - models[0].baseline_mb
    return {"results": [m.report(process_mb, alone=len(models) == 1) for m in models], "host": host(threads)}


def pack_array(array: np.ndarray) -> str:
    """An array as text for the JSON answer (.npy bytes in base64: exact floats, a third of decimal's size)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def unpack_array(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def open_model(path: str, spec: dict) -> OnnxModel:
    """A session as the spec asks: threads, providers, and whether it maps a pre-packed copy (None: the default)."""
    threads = int(spec.get("threads") or 0)
    return OnnxModel(path, threads=threads, providers=spec.get("providers"), prepacked=spec.get("prepacked"))


def outputs(spec: dict) -> dict:
    """Per model: the logits (or hidden states) of one forward over `inputs`, and greedy tokens after the prompt."""
    inputs = np.asarray(spec["inputs"], dtype=np.int64)
    results = []
    for path in spec["models"]:
        model = open_model(path, spec)
        result = {"model": path, "outputs": pack_array(model.forward(inputs))}
        if model.is_decoder and spec.get("prompt_ids"):
            eos = set(spec.get("eos_ids", []))
            result["tokens"] = greedy_generate(model, spec["prompt_ids"], int(spec["max_new_tokens"]), eos)
        results.append(result)
    return {"results": results, "host": host(int(spec.get("threads") or 0))}


def divergence(spec: dict) -> dict:
    """Each candidate (models[1:]) against the reference (models[0]) on `windows`, all run on this device;
    the reference runs once per batch, whatever the number of candidates."""
    reference, *candidates = (open_model(path, spec) for path in spec["models"])
    windows = np.asarray(spec["windows"], dtype=np.int64)
    size = int(spec.get("batch_size", 1))
    per_window: list[dict[str, list[float]]] = [{} for _ in candidates]
    for i in range(0, len(windows), size):
        batch = windows[i : i + size]
        expected = reference.forward(batch)
        for model, found in zip(candidates, per_window, strict=True):
            for key, values in window_stats(expected, model.forward(batch), batch, reference.is_decoder).items():
                found.setdefault(key, []).extend(float(v) for v in values)
    results = [{"model": path, "windows": found} for path, found in zip(spec["models"][1:], per_window, strict=True)]
    return {"results": results, "host": host(int(spec.get("threads") or 0))}


RUNNER_TASKS = {"profile": measure, "outputs": outputs, "divergence": divergence, "prepack": prepack}


def main() -> None:
    """Errors a user can fix come back as {"error": ...}; anything else is a traceback on stderr."""
    try:
        spec = json.loads(sys.stdin.read())
        output = RUNNER_TASKS[spec.get("task", "profile")](spec)
    except EdgepruneError as err:
        output = {"error": str(err)}
    print(json.dumps(output))


if __name__ == "__main__":
    main()

"""Profile an exported model on a device: the API the budget loop calls, and the local implementation.

`Profiler` is a protocol so the budget search can be tested with a fake. `LocalProfiler`
runs `edgeprune.devices.runner` in a subprocess (peak RSS is then the session's own
process); `profiler_for` picks the SSH profiler for devices reached over SSH. Every runner
call has a deadline (`probe_timeout`, or --timeout), so a hung board stops the run in one line.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from edgeprune.devices.profiles import DeviceProfile
from edgeprune.errors import EdgepruneError
from edgeprune.runtime import model_file, onnx_files

TIMEOUT_FLOOR_S = 120.0  # interpreter start, imports and session creation on a slow board
TIMEOUT_SLACK = 3.0  # times the slow-board estimate before a runner call counts as hung
# weight bytes x tokens per second on a slow board: each decoded token reads every weight (SmolLM2 fp32 decodes
# at 1.9 GB/s on the shared 2-core EPYC dev machine, 10.9 s per default-workload run; this assumes 1 GB/s)
SLOW_BOARD_BYTES_PER_S = 1e9
SLOW_DISK_BYTES_PER_S = 20e6  # reading the model from an SD card


@dataclass(frozen=True)
class Workload:
    """Encoders: batch x sequence forward. Decoders: prefill `prefill` tokens, then `decode` cached steps."""

    batch: int = 1
    sequence: int = 128
    prefill: int = 128
    decode: int = 32

    @classmethod
    def parse(cls, text: str | None) -> Workload:
        """`prefill=128,decode=32` or `batch=1,sequence=128` (`seq` works too); unset keys keep defaults."""
        if not text:
            return cls()
        values = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            key = {"seq": "sequence"}.get(key.strip(), key.strip())
            if key not in {f.name for f in fields(cls)} or not value.strip().isdigit():
                raise EdgepruneError(
                    f"bad workload part '{part}': use key=N with keys batch, sequence, prefill, decode"
                )
            values[key] = int(value)
        workload = cls(**values)
        if min(workload.batch, workload.sequence, workload.prefill) < 1 or workload.decode < 0:
            raise EdgepruneError("workload sizes must be >= 1 (decode >= 0)")
        return workload


@dataclass(frozen=True)
class Stats:
    p50: float
    p90: float
    mean: float
    std: float


@dataclass
class ProfileResult:
    """One model on one device. `latency_ms` is the whole workload (encoder forward; prefill + decode)."""

    model: str
    kind: str
    device: str
    workload: Workload
    runs: int
    warmup: int
    threads: int
    providers: list[str]
    ort_version: str
    machine: str
    file_size_mb: float
    peak_rss_mb: float  # the process's peak, reached while the session loads (about 1.5x the file for fp32)
    session_rss_mb: float  # that peak minus the process before loading: the model's share
    rss_mb: float  # resident after the timed runs: steady-state memory, what stays in use while serving
    latency_ms: Stats
    prefill_ms: Stats | None
    decode_ms_per_token: Stats | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    tokens_per_s: float | None
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)
    created: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Comparison:
    """`model` against `baseline` in one alternating run. speedup > 1: `model` is faster.

    Speedups are medians of per-round ratios baseline/model, robust to drift between rounds.
    """

    model: ProfileResult
    baseline: ProfileResult
    speedup: float
    prefill_speedup: float | None
    decode_speedup: float | None

    def as_dict(self) -> dict:
        return asdict(self)


class Profiler(Protocol):
    def profile(self, onnx: Path, workload: Workload) -> ProfileResult: ...

    def compare(self, onnx: Path, baseline: Path, workload: Workload) -> Comparison: ...


def paired_speedup(model: list[float], baseline: list[float]) -> float | None:
    if not model:
        return None
    return statistics.median(b / m for m, b in zip(model, baseline, strict=True))


def stats_or_none(value: dict | None) -> Stats | None:
    return Stats(**value) if value else None


def to_result(raw: dict, host: dict, device: DeviceProfile, workload: Workload, runs: int, warmup: int):
    """A runner's per-model JSON as a ProfileResult."""
    return ProfileResult(
        model=raw["model"],
        kind=raw["kind"],
        device=device.name,
        workload=workload,
        runs=runs,
        warmup=warmup,
        threads=host["threads"],
        providers=raw["providers"],
        ort_version=host["ort_version"],
        machine=host["machine"],
        file_size_mb=raw["file_size_mb"],
        peak_rss_mb=raw["peak_rss_mb"],
        session_rss_mb=raw["session_rss_mb"],
        rss_mb=raw["rss_mb"],
        latency_ms=Stats(**raw["latency_ms"]),
        prefill_ms=stats_or_none(raw["prefill_ms"]),
        decode_ms_per_token=stats_or_none(raw["decode_ms_per_token"]),
        prefill_tokens_per_s=raw["prefill_tokens_per_s"],
        decode_tokens_per_s=raw["decode_tokens_per_s"],
        tokens_per_s=raw["tokens_per_s"],
        samples=raw["samples"],
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def compare_results(model: ProfileResult, baseline: ProfileResult) -> Comparison:
    if model.kind != baseline.kind:
        raise EdgepruneError(f"cannot compare a {model.kind} with a {baseline.kind}: give two exports of one model")
    s_m, s_b = model.samples, baseline.samples
    return Comparison(
        model=model,
        baseline=baseline,
        speedup=paired_speedup(s_m["latency_ms"], s_b["latency_ms"]),
        prefill_speedup=paired_speedup(s_m["prefill_ms"], s_b["prefill_ms"]),
        decode_speedup=paired_speedup(s_m["decode_ms_per_token"], s_b["decode_ms_per_token"]),
    )


def probe_timeout(models: list[Path], workload: Workload, runs: int, warmup: int) -> float:
    """Seconds one runner call may take: a generous multiple of what a slow board needs, never below a floor.

    Every token reads every weight byte once (prefill and each decode step alike), so the work is
    about model bytes x tokens x runs; loading is bytes over a slow disk.
    """
    size = sum(f.stat().st_size for m in models for f in onnx_files(m))
    tokens = workload.batch * max(workload.prefill + workload.decode, workload.sequence)
    estimate = size * tokens * (runs + warmup) / SLOW_BOARD_BYTES_PER_S + size / SLOW_DISK_BYTES_PER_S
    return max(TIMEOUT_FLOOR_S, TIMEOUT_SLACK * estimate)


def timed_out(where: str, seconds: float) -> EdgepruneError:
    return EdgepruneError(
        f"profiling on {where} did not finish within {seconds:.4g} s (a hung or much slower device): "
        "check the device, or raise --timeout"
    )


def runner_spec(models: list[str], workload: Workload, device: DeviceProfile, runs: int, warmup: int) -> dict:
    return {
        "models": models,
        "workload": asdict(workload),
        "runs": runs,
        "warmup": warmup,
        "threads": device.threads,
        "providers": device.execution_providers,
        "seed": 0,
    }


def parse_runner_output(stdout: str, stderr: str, where: str) -> dict:
    """The runner's JSON; its own errors verbatim, a crash as its last stderr line."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        output = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        last = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise EdgepruneError(f"the profiling runner failed on {where}: {last}") from None
    if "error" in output:
        raise EdgepruneError(output["error"])
    return output


class RunnerProfiler:
    """Runs `edgeprune.devices.runner` somewhere (see `execute`) and turns its JSON into results."""

    def __init__(self, device: DeviceProfile, runs: int = 10, warmup: int = 2, timeout: float | None = None):
        if runs < 1 or warmup < 0:
            raise EdgepruneError("--runs must be >= 1 and --warmup >= 0")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise EdgepruneError(f"--timeout {timeout} must be a positive number of seconds")
        self.device, self.runs, self.warmup, self.timeout = device, runs, warmup, timeout

    def seconds_allowed(self, models: list[Path], workload: Workload) -> float:
        """--timeout, else the deadline the workload implies."""
        return self.timeout if self.timeout is not None else probe_timeout(models, workload, self.runs, self.warmup)

    def execute(self, models: list[Path], workload: Workload) -> dict:
        """The runner's parsed output for these .onnx files."""
        raise NotImplementedError

    def run(self, models: list[Path], workload: Workload) -> list[ProfileResult]:
        output = self.execute([model_file(m) for m in models], workload)
        return [to_result(r, output["host"], self.device, workload, self.runs, self.warmup) for r in output["results"]]

    def profile(self, onnx: Path, workload: Workload) -> ProfileResult:
        return self.run([onnx], workload)[0]

    def compare(self, onnx: Path, baseline: Path, workload: Workload) -> Comparison:
        model, base = self.run([onnx, baseline], workload)
        return compare_results(model, base)


class LocalProfiler(RunnerProfiler):
    """Profiles on this machine, in a fresh Python process per call."""

    def execute(self, models: list[Path], workload: Workload) -> dict:
        spec = runner_spec([str(m) for m in models], workload, self.device, self.runs, self.warmup)
        seconds = self.seconds_allowed(models, workload)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "edgeprune.devices.runner"],
                input=json.dumps(spec),
                capture_output=True,
                text=True,
                timeout=seconds,
            )
        except subprocess.TimeoutExpired:  # the runner has been killed
            raise timed_out("this machine", seconds) from None
        return parse_runner_output(proc.stdout, proc.stderr, "this machine")


def profiler_for(device: DeviceProfile, runs: int = 10, warmup: int = 2, timeout: float | None = None) -> Profiler:
    """The profiler that reaches `device`: this machine, or the board over SSH (`timeout`: see --timeout)."""
    if device.reach == "local":
        return LocalProfiler(device, runs, warmup, timeout)
    from edgeprune.devices.remote import SSHProfiler

    return SSHProfiler(device, runs, warmup, timeout)

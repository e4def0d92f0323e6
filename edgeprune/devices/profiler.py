"""Profile an exported model on a device: the API the budget loop calls, and the local implementation.

`Profiler` is a protocol so the budget search can be tested with a fake. `LocalProfiler`
runs `edgeprune.devices.runner` in a subprocess (peak RSS is then the session's own
process), as the zip app a board gets, with the device's interpreter (this one, or e.g. an
emulator's); `profiler_for` picks the SSH profiler for devices reached over SSH. Beyond
timing, the same runner returns a model's outputs and its held-out divergence on the device.
Every runner call has a deadline (`probe_timeout`, or --timeout), so a hung board stops the
run in one line.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import subprocess
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np

import edgeprune
from edgeprune.devices.profiles import DeviceProfile, command_words
from edgeprune.devices.runner import unpack_array
from edgeprune.errors import EdgepruneError
from edgeprune.runtime import model_file, onnx_files

PACKAGE_ROOT = Path(edgeprune.__file__).parent
RUNNER_MODULES = (
    "__init__.py",
    "errors.py",
    "outputs.py",
    "runtime.py",
    "window_stats.py",
    "devices/__init__.py",
    "devices/runner.py",
)
RUNNER_NAME = "edgeprune-runner.pyz"

TIMEOUT_FLOOR_S = 120.0  # interpreter start, imports and session creation on a slow board
TIMEOUT_SLACK = 3.0  # times the slow-board estimate before a runner call counts as hung
# weight bytes x tokens per second on a slow board: each decoded token reads every weight (SmolLM2 fp32 decodes
# at 1.9 GB/s on the shared 2-core EPYC dev machine, 10.9 s per default-workload run; this assumes 1 GB/s)
SLOW_BOARD_BYTES_PER_S = 1e9
SLOW_DISK_BYTES_PER_S = 20e6  # reading the model from an SD card
# qemu-aarch64 ran SmolLM2 fp32 at 0.5 GB x tokens/s on the 2-core dev machine at load 6 (half the slow board's
# figure; int4 relatively faster): 10 leaves room for a busier or slower host
EMULATION_SLOWDOWN = 10.0


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
    emulated: bool = False  # measured under an emulator: a functional check, never the board's latency

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

    def compare_all(self, onnx: list[Path], baseline: Path, workload: Workload) -> list[Comparison]: ...


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
        emulated=device.emulated,
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


def runner_zip() -> bytes:
    """A zip app (`python runner.pyz`) with the runner and only the modules it imports: what a board gets."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in RUNNER_MODULES:
            archive.write(PACKAGE_ROOT / name, f"edgeprune/{name}")
        archive.writestr("__main__.py", "from edgeprune.devices.runner import main\n\nmain()\n")
    return buffer.getvalue()


def work_timeout(models: list[Path], token_passes: int, slowdown: float = 1.0) -> float:
    """Seconds a runner call may take: a generous multiple of what a slow board needs, never below a floor.

    Every token reads every weight byte once (prefill and each decode step alike), so the work is
    about model bytes x tokens run; loading is bytes over a slow disk. `slowdown`: an emulated board's factor.
    """
    size = sum(f.stat().st_size for m in models for f in onnx_files(m))
    estimate = size * token_passes / SLOW_BOARD_BYTES_PER_S + size / SLOW_DISK_BYTES_PER_S
    return max(TIMEOUT_FLOOR_S, TIMEOUT_SLACK * slowdown * estimate)


def probe_timeout(models: list[Path], workload: Workload, runs: int, warmup: int, slowdown: float = 1.0) -> float:
    tokens = workload.batch * max(workload.prefill + workload.decode, workload.sequence)
    return work_timeout(models, tokens * (runs + warmup), slowdown)


def timed_out(where: str, seconds: float) -> EdgepruneError:
    return EdgepruneError(
        f"profiling on {where} did not finish within {seconds:.4g} s (a hung or much slower device): "
        "check the device, or raise --timeout"
    )


def task_spec(task: str, device: DeviceProfile, prepacked: bool | None, **fields) -> dict:
    """A runner spec without its "models" (each transport names the files where the runner sees them)."""
    return {
        "task": task,
        "threads": device.threads,
        "providers": device.execution_providers,
        "prepacked": prepacked,
        **fields,
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


@dataclass
class ModelOutputs:
    """One file's answers on a device: its first output on the inputs, and greedy tokens (decoders)."""

    model: str
    outputs: np.ndarray
    tokens: list[int] | None
    machine: str  # the CPU architecture the runner reported (platform.machine() there)


class RunnerProfiler:
    """Runs `edgeprune.devices.runner` somewhere (see `call`) and turns its JSON into results."""

    def __init__(
        self,
        device: DeviceProfile,
        runs: int = 10,
        warmup: int = 2,
        timeout: float | None = None,
        prepacked: bool | None = None,
        paired: bool = False,
    ):
        """`prepacked`: whether the sessions map pre-packed copies (None: as shipped models are opened, see
        edgeprune.runtime); a search's probes pass False unless a --peak-mb budget must be measured as shipped.
        `paired`: `compare_all` runs each model against the baseline in a process of its own, as the final check
        does, so a --peak-mb probe is measured as its answer will be (a model's peak depends on what else its
        process loaded: 251 MB in a six-model process was 265 MB in the final two-model one)."""
        if runs < 1 or warmup < 0:
            raise EdgepruneError("--runs must be >= 1 and --warmup >= 0")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise EdgepruneError(f"--timeout {timeout} must be a positive number of seconds")
        self.device, self.runs, self.warmup, self.timeout = device, runs, warmup, timeout
        self.prepacked, self.paired = prepacked, paired
        self.slowdown = EMULATION_SLOWDOWN if device.emulated else 1.0

    def call(self, spec: dict, models: list[Path], seconds: float) -> dict:
        """The runner's parsed output for `spec` run on these .onnx files, within `seconds`."""
        raise NotImplementedError

    def seconds_for(self, models: list[Path], token_passes: int) -> float:
        """--timeout, else the deadline this much work implies on the device."""
        return self.timeout if self.timeout is not None else work_timeout(models, token_passes, self.slowdown)

    def run(self, models: list[Path], workload: Workload) -> list[ProfileResult]:
        files = [model_file(m) for m in models]
        spec = task_spec(
            "profile",
            self.device,
            self.prepacked,
            workload=asdict(workload),
            runs=self.runs,
            warmup=self.warmup,
            seed=0,
        )
        seconds = self.timeout
        if seconds is None:
            seconds = probe_timeout(files, workload, self.runs, self.warmup, self.slowdown)
        output = self.call(spec, files, seconds)
        return [to_result(r, output["host"], self.device, workload, self.runs, self.warmup) for r in output["results"]]

    def profile(self, onnx: Path, workload: Workload) -> ProfileResult:
        return self.run([onnx], workload)[0]

    def compare(self, onnx: Path, baseline: Path, workload: Workload) -> Comparison:
        return self.compare_all([onnx], baseline, workload)[0]

    def compare_all(self, onnx: list[Path], baseline: Path, workload: Workload) -> list[Comparison]:
        """Each model against `baseline` from one alternating run of all of them (each round times every model),
        or, `paired`, from one run of each model with the baseline."""
        if self.paired and len(onnx) > 1:
            return [comparison for model in onnx for comparison in self.compare_all([model], baseline, workload)]
        *models, base = self.run([*onnx, baseline], workload)
        return [compare_results(model, base) for model in models]

    def outputs(
        self,
        models: list[Path],
        inputs: list[list[int]],
        prompt_ids: list[int] | None = None,
        max_new_tokens: int = 0,
        eos_ids: Iterable[int] = (),
    ) -> list[ModelOutputs]:
        """Each file's first output on `inputs` (one forward) and, for decoders, its greedy tokens after the prompt."""
        files = [model_file(m) for m in models]
        spec = task_spec(
            "outputs",
            self.device,
            False,  # what the file computes: the copy computes the same, at seconds and disk more
            inputs=inputs,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            eos_ids=sorted(eos_ids),
        )
        passes = len(inputs) * len(inputs[0]) + len(prompt_ids or []) + max_new_tokens
        output = self.call(spec, files, self.seconds_for(files, passes))
        machine = output["host"]["machine"]
        return [
            ModelOutputs(r["model"], unpack_array(r["outputs"]), r.get("tokens"), machine) for r in output["results"]
        ]

    def divergence(self, models: list[Path], reference: Path, windows: list[list[int]]) -> list[dict[str, list]]:
        """Per-window statistics (edgeprune.window_stats) of each file against `reference`, all run on the device."""
        files = [model_file(reference), *(model_file(m) for m in models)]
        spec = task_spec("divergence", self.device, False, windows=windows, batch_size=1)
        output = self.call(spec, files, self.seconds_for(files, len(windows) * len(windows[0])))
        return [result["windows"] for result in output["results"]]


class LocalProfiler(RunnerProfiler):
    """Runs on this machine, in a fresh process per call: the device's interpreter (this one unless the profile
    names another, e.g. an emulator) with the runner zip a board would get."""

    def call(self, spec: dict, models: list[Path], seconds: float) -> dict:
        words = [os.path.expanduser(word) for word in command_words(self.device.interpreter)]
        with tempfile.TemporaryDirectory(prefix="edgeprune-runner-") as folder:
            runner = Path(folder) / RUNNER_NAME
            runner.write_bytes(runner_zip())
            try:
                proc = subprocess.run(
                    [*words, str(runner)],
                    input=json.dumps({**spec, "models": [str(m) for m in models]}),
                    capture_output=True,
                    text=True,
                    timeout=seconds,
                )
            except subprocess.TimeoutExpired:  # the runner has been killed
                raise timed_out("this machine", seconds) from None
            except OSError as err:
                raise EdgepruneError(
                    f"cannot start python: '{self.device.interpreter}' of device {self.device.name} "
                    f"({err.strerror or err}): fix python: in the device file"
                ) from None
        where = "this machine" if self.device.python is None else f"{self.device.name} ({words[0]})"
        return parse_runner_output(proc.stdout, proc.stderr, where)


def profiler_for(
    device: DeviceProfile,
    runs: int = 10,
    warmup: int = 2,
    timeout: float | None = None,
    prepacked: bool | None = None,
    paired: bool = False,
) -> Profiler:
    """The profiler that reaches `device`: this machine, or the board over SSH (`timeout`: see --timeout;
    `prepacked` and `paired`: see RunnerProfiler)."""
    if device.reach == "local":
        return LocalProfiler(device, runs, warmup, timeout, prepacked, paired)
    from edgeprune.devices.remote import SSHProfiler

    return SSHProfiler(device, runs, warmup, timeout, prepacked, paired)

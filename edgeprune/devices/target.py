"""Quality of a quantized model measured where it will run: on the ARM board (or its emulation), beside here.

ONNX Runtime's integer kernels differ by CPU: MatMulNBits at accuracy level 4 and dynamic int8 quantize
activations and accumulate in int32 along different paths on x86 (AVX2/VNNI) and aarch64 (NEON SDOT), so the
same file's logits differ far beyond rounding (SmolLM2 int4: up to ~5 on logits of ~28; fp32 agrees to 1e-4).
A quantized model bound for an ARM device therefore has its held-out divergence from the dense model measured
there too, on the same windows, with the same code (edgeprune.window_stats) and the same reference (the dense
fp32 export) as on this machine, so the two figures differ only by the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgeprune.devices.profiler import LocalProfiler, Profiler, RunnerProfiler
from edgeprune.devices.profiles import DeviceProfile, get_device
from edgeprune.evaluate.divergence import Divergence, summarize, windows_of

# Windows measured on an emulated board: under qemu a 128-token window of SmolLM2-135M through the fp32
# reference and a quantized file takes about a minute (floating point is emulated in software), a real
# board well under a second.
EMULATED_WINDOWS = 4
WORSE_SIGMAS = 3.0  # the board's KL exceeds this machine's by more than this many paired standard errors


def checked_on(device: DeviceProfile, precision: str) -> bool:
    """A quantized file (every precision but fp32 has integer kernels) going to an ARM CPU not this process's own."""
    return device.is_arm and device.runs_elsewhere and precision != "fp32"


def paired_difference(target: list[float], here: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-window differences (the windows' own difficulty cancels)."""
    diff = np.asarray(target) - np.asarray(here)
    stderr = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), stderr


def side(result: Divergence) -> dict:
    keys = ("mean", "stderr", "perplexity", "dense_perplexity", "top1_agreement", "windows", "tokens")
    return {key: getattr(result, key) for key in keys}


def measure_on_target(
    profiler: RunnerProfiler, file: Path, reference: Path, heldout: torch.Tensor, seq_len: int
) -> dict:
    """The file's divergence from `reference` on held-out windows, on the device and here, and their difference."""
    device = profiler.device
    windows = windows_of(heldout, seq_len)
    if device.emulated:
        windows = windows[:EMULATED_WINDOWS]
    ids = windows.tolist()
    here_device = dataclasses.replace(get_device("local"), threads=device.threads)
    here_stats = LocalProfiler(here_device, timeout=profiler.timeout).divergence([file], reference, ids)[0]
    target_stats = profiler.divergence([file], reference, ids)[0]
    here, target = summarize(here_stats, seq_len), summarize(target_stats, seq_len)
    difference, stderr = paired_difference(target_stats["divergence"], here_stats["divergence"])
    return {
        "device": device.name,
        "emulated": device.emulated,
        "measure": target.measure,
        "here": side(here) | {"machine": platform.machine()},
        "target": side(target),
        "difference": difference,
        "difference_stderr": stderr,
        "worse_on_target": bool(difference > WORSE_SIGMAS * stderr) if math.isfinite(stderr) else None,
    }


def quality_on_target(
    profiler: Profiler,
    precision: str,
    file: Path,
    reference: Path,
    heldout: torch.Tensor,
    quality: Divergence | None,
    say: Callable[[str], None],
) -> dict | None:
    """`run`'s check before shipping (None when it does not apply): see the module's docstring."""
    if quality is None or not isinstance(profiler, RunnerProfiler) or not checked_on(profiler.device, precision):
        return None
    say(f"measuring the {precision} model's held-out quality on {profiler.device.name} too")
    found = measure_on_target(profiler, file, reference, heldout, quality.tokens // quality.windows)
    if found["worse_on_target"]:
        say(
            f"the {precision} model diverges more on {found['device']} than here: {found['measure']} "
            f"{found['target']['mean']:.4f} vs {found['here']['mean']:.4f} on the same windows"
        )
    return found

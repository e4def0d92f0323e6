"""The torch-free runner on aarch64: the emulated Raspberry Pi 5 (`rpi5-emulated`) against this machine.

Needs the target that scripts/build_aarch64_target.sh builds (in $EDGEPRUNE_AARCH64, default
~/.cache/edgeprune/aarch64); without it these tests skip and say how to build it. The same files run
on both CPUs; what each precision may differ by follows from its arithmetic:
- fp32 and dynamic int8: the same operations in another order (dynamic int8 multiplies exact integers,
  only its scales are float), so the exporter's fp32 tolerance, FP32_ATOL x the largest |logit|.
- MatMulNBits int8/int4: with float activations (accuracy level 0) the weights are dequantized to the
  same floats on both CPUs, so fp32's tolerance again. At the shipped accuracy level 4 the kernels round
  each 32-value block of activations to int8 by their own code (AVX2 on x86, NEON SDOT on aarch64): both
  land within that rounding of the float-activation result, so each CPU's distance from it must be of
  the same size (within 2x of the other's), and greedy tokens agree until the first near-tie.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tokenizer, tiny_llama
from test_cli import assert_one_line_error
from test_devices import SMALL, sshd  # noqa: F401 (fixture: a real sshd on loopback)

from edgeprune.cli import main
from edgeprune.devices.profiler import LocalProfiler, ModelOutputs, profiler_for
from edgeprune.devices.profiles import get_device, load_profile
from edgeprune.devices.target import EMULATED_WINDOWS, measure_on_target
from edgeprune.errors import EdgepruneError
from edgeprune.export import export_model
from edgeprune.export.exporter import FP32_ATOL
from edgeprune.export.quantize import float_activations, quantize_model
from edgeprune.runtime import OnnxModel

TARGET = Path(os.environ.get("EDGEPRUNE_AARCH64", Path.home() / ".cache" / "edgeprune" / "aarch64")).expanduser()
PYTHON = TARGET / "bin" / "python3"
TEXT = " ".join(f"w{(i * 13) % 89}" for i in range(24))
EOS = 3  # the tiny Llama's </s>
PRECISIONS = ("fp32", "int8", "int4", "dynamic-int8")
FLOAT_ACTIVATIONS = "float-activations"  # MatMulNBits files rewritten to accuracy level 0
ACTIVATION_RATIO = 2.0  # one CPU's activation rounding may be at most this many times the other's

pytestmark = pytest.mark.aarch64
needs_target = pytest.mark.skipif(
    not os.access(PYTHON, os.X_OK),
    reason=f"no emulated aarch64 target at {TARGET}: run scripts/build_aarch64_target.sh "
    "(or set EDGEPRUNE_AARCH64 to the folder it built)",
)


def emulated_device():
    """The packaged rpi5-emulated profile, pointed at this target's interpreter."""
    return dataclasses.replace(get_device("rpi5-emulated"), python=str(PYTHON))


def this_machine():
    return dataclasses.replace(get_device("local"), threads=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aarch64")
    fp32 = export_model(tiny_llama(), make_tokenizer(), root / "fp32", text=TEXT).path / "model.onnx"
    found = {"fp32": fp32}
    for precision in PRECISIONS[1:]:
        found[precision] = quantize_model(fp32, root / f"model.{precision}.onnx", precision)
    for precision in ("int8", "int4"):
        found[f"{precision}-{FLOAT_ACTIVATIONS}"] = float_activations(
            found[precision], root / f"model.{precision}.float.onnx"
        )
    return found


@pytest.fixture(scope="module")
def inputs() -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(7, 96, (2, 12)).tolist(), rng.integers(7, 96, 5).tolist()


def outputs_on(device, files: dict[str, Path], inputs) -> dict[str, ModelOutputs]:
    ids, prompt = inputs
    answers = profiler_for(device).outputs(list(files.values()), ids, prompt, max_new_tokens=8, eos_ids={EOS})
    return dict(zip(files, answers, strict=True))


@pytest.fixture(scope="module")
def both(files, inputs) -> tuple[dict[str, ModelOutputs], dict[str, ModelOutputs]]:
    """Every file's outputs and greedy tokens on this machine and on the emulated Pi 5 (one runner call each)."""
    return outputs_on(this_machine(), files, inputs), outputs_on(emulated_device(), files, inputs)


def fp32_tolerance(outputs: np.ndarray) -> float:
    return FP32_ATOL * max(1.0, float(np.abs(outputs).max()))


def max_diff(a: ModelOutputs, b: ModelOutputs) -> float:
    return float(np.abs(a.outputs - b.outputs).max())


@needs_target
def test_it_really_runs_on_aarch64(both):
    here, arm = both
    assert {a.machine for a in here.values()} == {os.uname().machine}
    assert {a.machine for a in arm.values()} == {"aarch64"}


@needs_target
@pytest.mark.parametrize("name", ["fp32", "dynamic-int8", f"int8-{FLOAT_ACTIVATIONS}", f"int4-{FLOAT_ACTIVATIONS}"])
def test_float_arithmetic_agrees_to_fp32_rounding(both, name):
    here, arm = both
    assert max_diff(here[name], arm[name]) <= fp32_tolerance(here[name].outputs), name
    assert here[name].tokens == arm[name].tokens and len(here[name].tokens) > 1


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


@needs_target
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_int8_activations_round_alike_on_both_cpus(both, files, inputs, precision):
    here, arm = both
    exact = f"{precision}-{FLOAT_ACTIVATIONS}"
    rounding_here, rounding_arm = max_diff(here[precision], here[exact]), max_diff(arm[precision], arm[exact])
    assert rounding_here > fp32_tolerance(here[exact].outputs)  # level 4 really rounds the activations
    assert rounding_arm <= ACTIVATION_RATIO * rounding_here and rounding_here <= ACTIVATION_RATIO * rounding_arm
    assert max_diff(here[precision], arm[precision]) <= rounding_here + rounding_arm + fp32_tolerance(
        here[exact].outputs
    )
    # greedy tokens agree up to the first step where this machine's top two are closer than the two CPUs can differ
    ours, theirs = here[precision].tokens, arm[precision].tokens
    split = first_mismatch(ours, theirs)
    if split is not None:
        prompt = inputs[1]
        model = OnnxModel(files[precision], threads=1)
        logits = model.forward(np.asarray([prompt + ours[:split]], dtype=np.int64))[0, -1]
        margin = float(logits[ours[split]] - logits[theirs[split]])
        assert 0 <= margin <= 2 * (rounding_here + rounding_arm), (split, margin)


@needs_target
def test_held_out_quality_is_measured_on_the_device(files):
    heldout = torch.from_numpy(np.random.default_rng(1).integers(7, 96, 16 * (EMULATED_WINDOWS + 2)))
    found = measure_on_target(profiler_for(emulated_device()), files["int4"], files["fp32"], heldout, 16)
    here, target = found["here"], found["target"]
    assert target["windows"] == here["windows"] == EMULATED_WINDOWS  # an emulated board measures the first few
    # the fp32 reference is the same on both CPUs, to float rounding of a log-sum-exp over 96 logits
    assert target["dense_perplexity"] == pytest.approx(here["dense_perplexity"], rel=1e-5)
    assert target["mean"] > 0 and here["mean"] > 0
    assert found["difference"] == pytest.approx(target["mean"] - here["mean"], abs=1e-12)


@needs_target
def test_remote_path_round_trip_against_the_aarch64_python(sshd, files, inputs, both):  # noqa: F811
    """Upload, run, read back over SSH to 127.0.0.1, with the emulated interpreter as the board's python."""
    device = dataclasses.replace(load_profile(sshd), python=str(PYTHON), arch="aarch64", emulated=True)
    chosen = {name: files[name] for name in ("fp32", "int4")}
    remote = outputs_on(device, chosen, inputs)
    for name, answer in remote.items():  # the same emulated CPU, one thread: the same bits as the local run
        assert answer.machine == "aarch64" and answer.model == f"loopback:{files[name]}"
        assert np.array_equal(answer.outputs, both[1][name].outputs) and answer.tokens == both[1][name].tokens
    assert list(Path(device.workdir).iterdir()) == []  # the board's run folder is removed


@needs_target
def test_profile_marks_emulated_timings_functional_only(files, tmp_path):
    board = tmp_path / "rpi5-emulated.yaml"
    board.write_text(yaml_with_python(PYTHON))
    report = tmp_path / "p.json"
    args = ["profile", str(files["int8"]), "--device", "rpi5-emulated", "--device-file", str(board)]
    result = CliRunner().invoke(main, [*args, "--workload", "prefill=8,decode=2", "--runs", "1", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "EMULATED" in result.output and "not the board's" in " ".join(result.output.split())
    record = json.loads(report.read_text())
    assert record["emulated"] is True and record["machine"] == "aarch64"


def yaml_with_python(python: Path) -> str:
    packaged = Path(get_device("rpi5-emulated").source).read_text()
    return "".join(
        f"python: {python}\n" if line.startswith("python:") else line for line in packaged.splitlines(keepends=True)
    )


@needs_target
def test_run_ships_quantized_with_quality_measured_on_the_device(saved_llama, tmp_path):
    board = tmp_path / "rpi5-emulated.yaml"
    board.write_text(yaml_with_python(PYTHON))
    calibration = tmp_path / "calib.txt"
    calibration.write_text(" ".join(f"w{(i * 7919) % 89}" for i in range(6000)))
    out = tmp_path / "run"
    args = [saved_llama, "--device", "rpi5-emulated", "--device-file", board, "--memory-mb", "100"]
    args += ["--precision", "int8", "--criterion", "magnitude", "--calibration", calibration, "--no-recover"]
    args += ["--runs", "1", "--warmup", "1", "--workload", "prefill=8,decode=2", "-o", out]
    result = CliRunner().invoke(main, ["run", *map(str, args)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "report.json").read_text())
    found = record["target_quality"]
    assert record["final"]["precision"] == "int8" and found["device"] == "rpi5-emulated" and found["emulated"]
    assert found["target"]["windows"] == EMULATED_WINDOWS and found["worse_on_target"] in (True, False)
    summary = (out / "report.md").read_text()
    assert "## Quality on rpi5-emulated" in summary and "functional only" in summary


def test_timed_budgets_are_refused_on_an_emulated_device(saved_llama, tmp_path):
    for budget in (["--speedup", "1.5"], ["--latency-ms", "50"], []):  # [] is the default budget, --speedup
        result = CliRunner().invoke(main, ["run", str(saved_llama), "--device", "rpi5-emulated", *budget])
        assert_one_line_error(result, "is emulated")


def test_a_missing_interpreter_is_one_line(tmp_path):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"never read: the interpreter is missing")
    device = dataclasses.replace(get_device("rpi5-emulated"), python=str(tmp_path / "no-such-python"))
    with pytest.raises(EdgepruneError, match="cannot start python") as err:
        LocalProfiler(device).profile(graph, SMALL)
    assert "\n" not in str(err.value)

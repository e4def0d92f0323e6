"""`edgeprune run` end to end on a tiny model with the real exporter and local profiler."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import family_names, make_tokenizer, tiny_model

from edgeprune.budget import AUTO_PRECISIONS, Budget
from edgeprune.checkpoint import load_pruned
from edgeprune.cli import main
from edgeprune.devices.profiler import ProfileResult, Stats, Workload, compare_results
from edgeprune.models import adapter_for
from edgeprune.probes import pruned_copy
from edgeprune.run import RunConfig, parameters_at, run_job
from edgeprune.runtime import OnnxModel, model_file, onnx_bytes
from edgeprune.structure import count_parameters


@pytest.fixture
def calibration_file(tmp_path):
    rng = random.Random(0)
    words = [f"w{rng.randrange(0, 40)}" for _ in range(20000)]
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(words))
    return path


def run(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


def test_run_writes_every_artifact_and_meets_params_budget(saved_llama, calibration_file, tmp_path):
    out = tmp_path / "run"
    args = [saved_llama, "--params", "60000", "--criterion", "magnitude", "--calibration", calibration_file]
    args += ["--targets", "ffn", "--protect-first", "0", "--protect-last", "0"]
    args += ["--runs", "2", "--warmup", "1", "--workload", "prefill=16,decode=4", "--no-recover", "-o", out]
    args += ["--no-activation-scaling"]  # its probes' methods: tests/test_activation_scaling.py
    result = run(*args)
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "pareto.png", "search.jsonl", "scores.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "onnx" / "model.onnx").is_file()
    model, _ = load_pruned(out / "pruned")
    assert sum(p.numel() for p in model.parameters()) <= 60000
    record = json.loads((out / "report.json").read_text())
    assert record["budgets"][0]["met"] and record["final"]["params"] <= 60000
    for row in ("final", "dense"):  # each row reports the median of its own timed runs
        samples = record["profile"][row]["samples"]["latency_ms"]
        assert len(samples) == 2 and record[row]["latency_ms"] == statistics.median(samples)
    final, dense = (record["profile"][row]["samples"]["latency_ms"] for row in ("final", "dense"))
    paired = [d / f for f, d in zip(final, dense, strict=True)]
    assert record["final"]["speedup_alternating"] == pytest.approx(statistics.median(paired), rel=1e-12)
    assert record["final"]["perplexity"] is not None
    # quantization alone cannot meet a parameter budget; each precision is then cut at the same analytic
    # sparsity, and at equal cut fp32 is the closest to dense
    searched = RunConfig(budgets=[Budget("params", 60000)]).precisions  # int4-fit only under a size budget
    assert searched == tuple(p for p in AUTO_PRECISIONS if p != "int4-fit")
    methods = [p["extra"]["method"] for p in record["probes"]]
    assert methods[: len(searched)] == ["dense export", *(f"dense export + {q}" for q in searched[1:])]
    # pruning goes fastest precision first (on this tiny model timing noise decides that order), on every
    # precision whose quantized file passed its check against PyTorch (the random tiny model refuses int4)
    tolerated = [p["precision"] for p in record["probes"][1 : len(searched)] if not p["refused"]]
    assert "int4" not in tolerated and "int8" in tolerated
    assert sorted(methods[len(searched) :]) == sorted(
        ["sliced from dense", *(f"sliced from dense + {q}" for q in tolerated)]
    )
    assert record["final"]["precision"] == "fp32"
    assert "| parameters |" in (out / "report.md").read_text()
    # rerunning the same command reuses every probe
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "report.json").read_text())["probes_measured"] == 0


def test_unreachable_budget_is_a_one_line_error(saved_llama, calibration_file, tmp_path):
    args = [saved_llama, "--params", "10", "--targets", "ffn,heads", "--calibration", calibration_file]
    args += ["--criterion", "magnitude", "--runs", "1", "--warmup", "0", "--workload", "prefill=8,decode=2"]
    result = run(*args, "-o", tmp_path / "run")
    assert result.exit_code == 1
    assert "Error: " in result.output and "parameters" in result.output and "Traceback" not in result.output
    assert (tmp_path / "run" / "search.jsonl").is_file()


def test_run_with_recovery_records_it(saved_llama, calibration_file, tmp_path):
    out = tmp_path / "run"
    args = [saved_llama, "--params", "90000", "--criterion", "magnitude", "--calibration", calibration_file]
    args += ["--runs", "1", "--warmup", "0", "--workload", "prefill=8,decode=2", "--recover-minutes", "0.1", "-o", out]
    # recovery is on by default: distilled from the dense model on text it writes (fp32 only: the precision
    # search is other tests')
    result = run(*args, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "report.json").read_text())
    recovery = record["recovery"]
    assert recovery["steps"] >= 1 and recovery["teacher"] == str(saved_llama) and recovery["data_kind"] == "text"
    assert recovery["heldout_ppl_before"] > 0
    # the report's perplexity is the shipped fp32 file's through ONNX Runtime, recovery's PyTorch's: float32 apart
    assert record["final"]["precision"] == "fp32"
    assert recovery["heldout_ppl_after"] == pytest.approx(record["final"]["perplexity"], rel=1e-4)
    assert recovery["data"] == str(out / "work" / "self_text.jsonl") and recovery["data_seconds"] > 0
    assert json.loads((out / "pruned" / "edgeprune.json").read_text())["recovery"]["steps"] >= 1
    widths = json.loads((out / "pruned" / "edgeprune.json").read_text())["layer_widths"]["intermediate_size"]
    assert widths[0] == widths[-1] == 96 and max(widths[1:-1]) < 96  # by default the first and last layers stay whole


def test_scores_are_reused_only_for_the_same_criterion_settings(llama, tokenizer, calibration_file, tmp_path):
    from edgeprune.criteria import GroupScores
    from edgeprune.loading import LoadedModel
    from edgeprune.models import adapter_for
    from edgeprune.run import RunConfig, load_or_score, run_calibration

    adapter = adapter_for(llama.config)
    path = tmp_path / "scores.safetensors"

    def scores_for(**settings):
        cfg = RunConfig(budgets=[], criterion="mi", calibration=str(calibration_file), calib_samples=4, **settings)
        loaded = LoadedModel(llama, tokenizer, "tiny", "hash")
        return load_or_score(path, loaded, adapter, cfg, run_calibration(tokenizer, cfg))

    first = scores_for(calib_seq_len=16)
    marked = GroupScores([torch.ones_like(f) for f in first.ffn], first.heads, first.criterion, first.settings)
    marked.save(path)  # same settings: the file is read back, not recomputed
    assert all(torch.equal(f, torch.ones_like(f)) for f in scores_for(calib_seq_len=16).ffn)
    first.save(path)
    other = scores_for(calib_seq_len=16, criterion_options={"selection": "entropy"})
    assert other.settings["criterion_options"] == {"selection": "entropy"}
    assert any(not torch.equal(a, b) for a, b in zip(first.ffn, other.ffn, strict=True))
    assert scores_for(calib_seq_len=24).settings["calib_seq_len"] == 24


def test_default_recovery_text_leaves_out_the_held_out_tail(tokenizer, calibration_file, tmp_path):
    from edgeprune.calibration import tokenize_text
    from edgeprune.recover.selftext import default_data
    from edgeprune.run import RunConfig, run_calibration

    cfg = RunConfig(budgets=[], calibration=str(calibration_file), calib_samples=4)
    calib = run_calibration(tokenizer, cfg)
    written = tokenize_text(
        tokenizer, default_data(tokenizer, tokenizer.decode(calib.head.tolist()), tmp_path).read_text()
    )
    everything = tokenize_text(tokenizer, calibration_file.read_text())
    assert torch.equal(written, everything[: len(written)])  # the head of the text, in order
    assert len(written) + len(calib.heldout) <= len(everything)  # and none of the held-out tail


class FileSizeProfiler:
    """Deterministic profiler: runs each file once in ONNX Runtime (it must load and run), and times it as
    1 ms per MB on disk, so a budget search on it is repeatable while every probe file is really used."""

    def __init__(self):
        self.files: list[Path] = []

    def profile(self, onnx: Path, workload: Workload) -> ProfileResult:
        path = model_file(onnx)
        model = OnnxModel(path)
        model.forward(np.arange(7, 7 + 8, dtype=np.int64)[None])
        self.files.append(path)
        ms = onnx_bytes(path) / 1e6
        timing = Stats(ms, ms, ms, 0.0)
        kind = "decoder" if model.is_decoder else "encoder"
        return ProfileResult(
            str(path), kind, "fake", workload, 3, 0, 1, ["CPUExecutionProvider"], "", "", ms, ms, ms, ms, timing,
            None, None, None, None, None, {"latency_ms": [ms] * 3, "prefill_ms": [], "decode_ms_per_token": []},
        )  # fmt: skip

    def compare(self, onnx: Path, baseline: Path, workload: Workload):
        return compare_results(self.profile(onnx, workload), self.profile(baseline, workload))

    def compare_all(self, onnx: list[Path], baseline: Path, workload: Workload):
        return [self.compare(file, baseline, workload) for file in onnx]


# Every probe path of ProbeRunner: FFN-only cuts sliced from the dense graph, head cuts exported in
# full, and sliced probes quantized (weight-only int8, dynamic int8).
PROBE_PATHS = {
    "sliced": ({"targets": ("ffn",), "precision": "fp32"}, "sliced from dense", "model.onnx"),
    "full": ({"targets": ("ffn", "heads"), "precision": "fp32"}, "full export", "model.onnx"),
    "int8": ({"targets": ("ffn",), "precision": "int8"}, "sliced from dense + int8", "model.int8.onnx"),
    "dynamic-int8": (
        {"targets": ("ffn",), "precision": "dynamic-int8"},
        "sliced from dense + dynamic-int8",
        "model.dynamic-int8.onnx",
    ),
}


@pytest.mark.parametrize("path", PROBE_PATHS)
@pytest.mark.parametrize("family", family_names())
def test_run_meets_a_speedup_on_every_family_through_every_probe_path(family, path, calibration_file, tmp_path):
    """`run` on each family (BERT's sliced probes once failed: its FFN bias was left uncut) and probe path."""
    options, method, file_name = PROBE_PATHS[path]
    folder = tmp_path / family
    model = tiny_model(family)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    params_limit = int(0.97 * count_parameters(model))  # quantization alone meets the speedup: make the run cut
    cfg = RunConfig(
        budgets=[Budget("speedup", 1.1), Budget("params", params_limit)],
        model=str(folder),
        criterion="magnitude",
        calibration=str(calibration_file),
        calib_samples=4,
        calib_seq_len=16,
        eval_tokens=256,
        max_probes=4,
        protect_first=0,
        protect_last=0,
        **options,
    )
    cfg.recover = False
    profiler = FileSizeProfiler()
    result = run_job(cfg, tmp_path / "run", profiler=profiler)
    probes = [p for p in result.probes if p["sparsity"] > 0]
    assert result.probes[0]["extra"]["method"] == "dense export"
    assert method in {p["extra"]["method"] for p in probes}  # (small head plans may round to FFN-only)
    # what was timed is the path's own file (and the dense reference)
    assert {p.name for p in profiler.files} == {file_name, "model.onnx"}
    assert result.budgets[0].met and result.final["speedup_alternating"] >= 1.1
    meeting = [p for p in probes if p["speedup"] >= 1.1 * 1.02 and p["params"] <= params_limit and not p["refused"]]
    chosen = min(meeting, key=lambda p: p["sparsity"])
    assert result.final["sparsity"] == chosen["sparsity"] > 0
    pruned, _ = load_pruned(tmp_path / "run" / "pruned")
    assert result.final["params"] == count_parameters(pruned) < count_parameters(model)


@pytest.mark.parametrize("targets", [("ffn",), ("ffn", "heads")])
@pytest.mark.parametrize("family", family_names())
def test_parameters_at_equals_a_real_cut(family, targets):
    """The budget search trusts parameters_at without cutting: it must count what the cut leaves, exactly."""
    from edgeprune.criteria import ScoringInputs, score_groups

    model = tiny_model(family)
    adapter = adapter_for(model.config)
    scores = score_groups("random", model, adapter, ScoringInputs(seed=3))
    cfg = RunConfig(budgets=[], targets=targets, protect_first=1, protect_last=0)
    params = parameters_at(model, adapter, scores, cfg)
    counted = {s: count_parameters(pruned_copy(model, adapter, scores, cfg.spec(s))[0]) for s in (0.0, 0.1, 0.23, 0.4)}
    assert {s: params(s) for s in counted} == counted
    assert len(set(counted.values())) == len(counted)  # every sparsity really cut something different

"""`edgeprune run` end to end on a tiny model with the real exporter and local profiler."""

from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner

from edgeprune.checkpoint import load_pruned
from edgeprune.cli import main


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
    result = run(*args)
    assert result.exit_code == 0, result.output
    for name in ("report.json", "report.md", "pareto.png", "search.jsonl", "scores.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "onnx" / "model.onnx").is_file()
    model, _ = load_pruned(out / "pruned")
    assert sum(p.numel() for p in model.parameters()) <= 60000
    record = json.loads((out / "report.json").read_text())
    assert record["budgets"][0]["met"] and record["final"]["params"] <= 60000
    assert record["final"]["latency_ms"] > 0 and record["dense"]["latency_ms"] > 0
    assert record["final"]["perplexity"] is not None
    # quantization alone cannot meet a parameter budget; each precision is then cut at the same analytic
    # sparsity, and at equal cut fp32 is the closest to dense
    assert [p["extra"]["method"] for p in record["probes"]] == [
        "dense export",
        "dense export + int8",
        "dense export + int4",
        "sliced from dense",
        "sliced from dense + int8",
        "sliced from dense + int4",
    ]
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
    result = run(*args)  # recovery is on by default: distilled from the dense model on text it writes
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
    from edgeprune.models import adapter_for
    from edgeprune.run import RunConfig, load_or_score, split_calibration

    adapter = adapter_for(llama.config)
    path = tmp_path / "scores.safetensors"

    def scores_for(**settings):
        cfg = RunConfig(budgets=[], criterion="mi", calibration=str(calibration_file), calib_samples=4, **settings)
        return load_or_score(path, llama, adapter, cfg, split_calibration(tokenizer, cfg), "hash")

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
    from edgeprune.run import RunConfig, split_calibration

    cfg = RunConfig(budgets=[], calibration=str(calibration_file), calib_samples=4)
    calib = split_calibration(tokenizer, cfg)
    written = tokenize_text(
        tokenizer, default_data(tokenizer, tokenizer.decode(calib.head.tolist()), tmp_path).read_text()
    )
    everything = tokenize_text(tokenizer, calibration_file.read_text())
    assert torch.equal(written, everything[: len(written)])  # the head of the text, in order
    assert len(written) + len(calib.heldout) <= len(everything)  # and none of the held-out tail

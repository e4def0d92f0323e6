"""`edgeprune score` and prune's calibration, allocation and bias-compensation options on tiny saved models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import family_names, save_tiny

from edgeprune.checkpoint import load_pruned, read_provenance
from edgeprune.cli import main
from edgeprune.criteria import CRITERIA, GroupScores


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def word_file(tmp_path: Path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i % 80}" for i in range(600)), encoding="utf-8")
    return path


CALIB = ("--calib-samples", "4", "--calib-seq-len", "16")


@pytest.mark.parametrize("family", family_names())
def test_score_writes_scores_and_prints_a_summary(family, tokenizer, tmp_path):
    source = save_tiny(family, tmp_path / family, tokenizer)
    target = tmp_path / "scores.safetensors"
    result = run("score", source, "--criterion", "taylor", "--calibration", word_file(tmp_path), *CALIB, "-o", target)
    assert result.exit_code == 0, result.output
    assert "FFN median" in result.output and "saved" in result.output
    scores = GroupScores.load(target)
    assert scores.criterion == "taylor" and all(s.isfinite().all() for s in scores.ffn + scores.heads)
    again = tmp_path / "again.safetensors"
    assert run("score", source, "--criterion", "taylor", "--calibration", word_file(tmp_path), *CALIB, "-o", again)
    assert all(torch.equal(a, b) for a, b in zip(scores.ffn, GroupScores.load(again).ffn, strict=True))


def test_scores_reused_by_prune_with_global_allocation(saved_llama, tmp_path):
    target = tmp_path / "scores.safetensors"
    assert run("score", saved_llama, "--criterion", "wanda-sp", *CALIB, "-o", target).exit_code == 0  # packaged text
    out = tmp_path / "pruned"
    result = run("prune", saved_llama, "--scores", target, "--sparsity", "0.3", "--allocation", "global", "-o", out)
    assert result.exit_code == 0, result.output
    provenance = read_provenance(out)
    assert provenance["criterion"] == "wanda-sp" and provenance["spec"]["allocation"] == "global"
    assert provenance["prunable_removed"] == pytest.approx(0.3, abs=0.02)


def test_prune_with_fluctuation_and_bias_compensation(saved_llama, tmp_path):
    out = tmp_path / "pruned"
    args = ["--criterion", "fluctuation", "--sparsity", "0.3", "--bias-compensation", *CALIB]
    result = run("prune", saved_llama, *args, "--calibration", word_file(tmp_path), "-o", out)
    assert result.exit_code == 0, result.output
    model, _ = load_pruned(out)
    down = model.model.layers[1].mlp.down_proj
    assert model.config.mlp_bias and down.bias is not None and down.bias.abs().sum() > 0
    assert read_provenance(out)["bias_compensation"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["--criterion", "nope"], "unknown criterion 'nope'"),
        (["--criterion", "fluctuation", "--calibration", "SHORT", "--calib-seq-len", "4096"], "fewer than one window"),
        (["--criterion", "fluctuation", "--calibration", "no/such/file.txt"], "neither a file nor a dataset"),
    ],
)
def test_score_errors_are_one_line(args, message, saved_llama, tmp_path):
    args = [word_file(tmp_path) if a == "SHORT" else a for a in args]
    result = run("score", saved_llama, *args, "-o", tmp_path / "s.safetensors")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output


def test_score_passes_taylor_flags_to_taylor_only(saved_llama, tmp_path):
    """mi refuses options it does not know, so it scoring with taylor's flags given shows they did not reach
    it; taylor's scores changing with them shows they reached taylor."""
    calib = ("--calib-samples", "4", "--calib-seq-len", "32", "--calibration", word_file(tmp_path))
    flags = ("--taylor", "vector", "--aggregation", "prod")
    mi = run("score", saved_llama, "--criterion", "mi", *flags, *calib, "-o", tmp_path / "mi.safetensors")
    assert mi.exit_code == 0, mi.output
    paths = {name: tmp_path / f"taylor-{name}.safetensors" for name in ("default", "flagged")}
    for name, extra in (("default", ()), ("flagged", flags)):
        result = run("score", saved_llama, "--criterion", "taylor", *extra, *calib, "-o", paths[name])
        assert result.exit_code == 0, result.output
    default, flagged = (GroupScores.load(path) for path in paths.values())
    assert any(not torch.equal(a, b) for a, b in zip(default.ffn, flagged.ffn, strict=True))


def test_criterion_options_reach_the_criterion(saved_llama, tmp_path):
    calib = ("--calib-samples", "4", "--calib-seq-len", "32", "--calibration", word_file(tmp_path))
    paths = {}
    for selection in ("mrmr", "entropy"):
        paths[selection] = tmp_path / f"{selection}.safetensors"
        args = ["--criterion", "mi", "--criterion-option", f"selection={selection}", *calib, "-o", paths[selection]]
        result = run("score", saved_llama, *args)
        assert result.exit_code == 0, result.output
    mrmr, entropy = (GroupScores.load(path) for path in paths.values())
    assert any(not torch.equal(a, b) for a, b in zip(mrmr.ffn, entropy.ffn, strict=True))
    bad = run("score", saved_llama, "--criterion", "mi", "--criterion-option", "oops", *calib, "-o", tmp_path / "x")
    assert bad.exit_code == 1 and "KEY=VALUE" in bad.output


def test_score_a_classifier_with_supervised_taylor_on_glue_sentences(bert, tokenizer, tmp_path, data_dir, monkeypatch):
    from edgeprune.calibration import labelled_batch
    from edgeprune.criteria import ScoringInputs, score_groups
    from edgeprune.evaluate import build_classifier
    from edgeprune.models import adapter_for

    classifier = build_classifier(bert, "sst2").eval()
    folder = tmp_path / "tiny-sst2"
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    monkeypatch.setenv("EDGEPRUNE_DATA", str(data_dir))
    target = tmp_path / "scores.safetensors"
    result = run(
        "score", folder, "--criterion", "taylor", "--calibration", "sst2", "--calib-samples", "8", "-o", target
    )
    assert result.exit_code == 0, result.output
    ids, token_inputs, labels = labelled_batch(tokenizer, "sst2", data_dir, n_samples=8, max_length=128)
    inputs = ScoringInputs(
        ids, options={"taylor": "first", "aggregation": "sum"}, labels=labels, token_inputs=token_inputs
    )
    expected = score_groups("taylor", classifier, adapter_for(classifier.config), inputs)
    torch.testing.assert_close(GroupScores.load(target).ffn, expected.ffn)
    label_free = run(
        "score",
        folder,
        "--criterion",
        "fluctuation",
        "--calibration",
        "sst2",
        "--calib-samples",
        "2",
        "--calib-seq-len",
        "16",
        "-o",
        tmp_path / "fluct.safetensors",
    )
    assert label_free.exit_code == 0, label_free.output


@pytest.mark.parametrize("family", family_names())
@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_score_and_run_score_alike(criterion, family, tokenizer, tmp_path):
    """One builder of scoring inputs: `score` and `run` give the same scores for the same criterion and
    calibration (windows from the text's head, the criterion's own window count, the mask token)."""
    from edgeprune.loading import load_model
    from edgeprune.models import adapter_for
    from edgeprune.run import RunConfig, load_or_score, run_calibration

    source, text = save_tiny(family, tmp_path / family, tokenizer), word_file(tmp_path)
    target = tmp_path / "scores.safetensors"
    result = run("score", source, "--criterion", criterion, "--calibration", text, "--calib-seq-len", 16, "-o", target)
    assert result.exit_code == 0, result.output
    loaded = load_model(str(source))
    cfg = RunConfig(criterion=criterion, calibration=str(text), calib_seq_len=16)
    adapter = adapter_for(loaded.model.config)
    by_run = load_or_score(tmp_path / "run.safetensors", loaded, adapter, cfg, run_calibration(loaded.tokenizer, cfg))
    by_score = GroupScores.load(target)
    assert all(torch.equal(a, b) for a, b in zip(by_score.ffn + by_score.heads, by_run.ffn + by_run.heads, strict=True))


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_every_criterion_refuses_unknown_options_naming_the_valid_ones(criterion, saved_llama, tmp_path):
    args = ["--criterion", criterion, "--criterion-option", "nonsense=1", "--calibration", word_file(tmp_path)]
    result = run("score", saved_llama, *args, "-o", tmp_path / "s.safetensors")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert f"unknown {criterion} option(s) nonsense" in result.output
    assert all(name in result.output for name in CRITERIA[criterion].option_names()) or "takes none" in result.output

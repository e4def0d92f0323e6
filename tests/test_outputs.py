"""Outputs never cost a user's files: no write into, over or around an input or a folder edgeprune
did not create; --overwrite replaces only edgeprune's outputs; SIGTERM and a full disk leave nothing."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import PreTrainedTokenizerBase

from edgeprune.checkpoint import save_pruned
from edgeprune.cli import main
from edgeprune.errors import EdgepruneError

REPO = Path(__file__).resolve().parents[1]
RUN_MARKER = "edgeprune-run.json"


def sibling(out: Path, kind: str, pid: int) -> Path:
    """Where an output is built (`tmp`) or moved aside while replaced (`old`) by process `pid`."""
    return out.with_name(f".{out.name}.{kind}-{pid}")


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was written, moved or deleted."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *patterns: str) -> None:
    """Exit 1 with one `Error: ...` line holding every pattern (after `run`'s progress log, if any)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    for pattern in patterns:
        assert pattern in errors[0], result.output


def dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def user_folder(tmp_path: Path, llama, tokenizer) -> Path:
    """A user's folder holding a pruned model (the input) beside unrelated files."""
    folder = tmp_path / "projects"
    save_pruned(llama, tokenizer, folder / "pruned", {"source": "tiny"})
    (folder / "thesis.txt").write_text("years of work")
    return folder


@pytest.fixture
def calibration_file(tmp_path: Path) -> Path:
    rng = random.Random(0)
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{rng.randrange(0, 40)}" for _ in range(4000)))
    return path


# -- -o around an input, --overwrite of a folder edgeprune did not create ----------------------


def test_export_overwrite_of_the_folder_holding_the_input_is_refused(user_folder):
    before = snapshot(user_folder)
    result = cli("export", user_folder / "pruned", "-o", user_folder, "--overwrite")
    assert_one_line_error(result, "contains the input")
    assert snapshot(user_folder) == before


@pytest.mark.parametrize("where", ["parent", "inside"])
def test_prune_output_around_the_input_is_refused(where, user_folder):
    before = snapshot(user_folder)
    out = user_folder if where == "parent" else user_folder / "pruned" / "sub"
    result = cli("prune", user_folder / "pruned", "--sparsity", "0.2", "-o", out, "--overwrite")
    assert_one_line_error(result, "contains the input" if where == "parent" else "is inside the input")
    assert snapshot(user_folder) == before


def test_prune_overwrite_replaces_only_edgeprune_outputs(saved_llama, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    result = cli("prune", saved_llama, "--sparsity", "0.2", "-o", mine, "--overwrite")
    assert_one_line_error(result, "not written by edgeprune")
    assert snapshot(mine) == {"notes.txt": b"keep"}
    out = tmp_path / "pruned"
    assert cli("prune", saved_llama, "--sparsity", "0.2", "-o", out).exit_code == 0
    assert_one_line_error(cli("prune", saved_llama, "--sparsity", "0.3", "-o", out), "already exists")
    assert cli("prune", saved_llama, "--sparsity", "0.3", "-o", out, "--overwrite").exit_code == 0
    assert json.loads((out / "edgeprune.json").read_text())["spec"]["sparsity"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_prune_output_holding_the_scores_file_is_refused(saved_llama, tmp_path):
    scores = tmp_path / "mine" / "scores.safetensors"
    assert cli("score", saved_llama, "-o", scores).exit_code == 0
    before = snapshot(tmp_path / "mine")
    result = cli("prune", saved_llama, "--scores", scores, "--sparsity", "0.2", "-o", tmp_path / "mine", "--overwrite")
    assert_one_line_error(result, "contains the input")
    assert snapshot(tmp_path / "mine") == before


def test_score_into_the_model_folder_is_refused(saved_llama):
    before = snapshot(saved_llama)
    assert_one_line_error(cli("score", saved_llama, "-o", saved_llama / "model.safetensors"), "is inside the input")
    assert snapshot(saved_llama) == before


def test_score_replaces_only_a_scores_file(saved_llama, tmp_path):
    notes = tmp_path / "notes.safetensors"
    notes.write_text("not scores")
    assert_one_line_error(cli("score", saved_llama, "-o", notes), "not a file edgeprune wrote")
    assert notes.read_text() == "not scores"
    scores = tmp_path / "scores.safetensors"
    assert cli("score", saved_llama, "-o", scores).exit_code == 0
    assert cli("score", saved_llama, "--criterion", "random", "-o", scores).exit_code == 0


def test_finetune_head_overwrite_of_the_folder_holding_the_input_is_refused(saved_bert, data_dir):
    folder = saved_bert.parent
    before = snapshot(folder)
    args = ["finetune-head", saved_bert, "--task", "rte", "--steps", "1", "--max-train", "4", "--batch-size", "2"]
    result = cli(*args, "--max-length", "16", "--data-dir", data_dir, "-o", folder, "--overwrite")
    assert_one_line_error(result, "contains the input")
    assert snapshot(folder) == before


def test_recover_overwrite_of_the_folder_holding_the_input_is_refused(user_folder, calibration_file):
    before = snapshot(user_folder)
    args = ["recover", user_folder / "pruned", "--data", calibration_file, "--steps", "1", "--seq-len", "16"]
    result = cli(*args, "--val-size", "2", "-o", user_folder, "--overwrite")
    assert_one_line_error(result, "contains the input")
    assert snapshot(user_folder) == before
    data_inside = user_folder / "data.txt"
    data_inside.write_text(calibration_file.read_text())
    result = cli("recover", user_folder / "pruned", "--data", data_inside, "-o", user_folder / "data.txt")
    assert_one_line_error(result, "is the input")


# -- run -------------------------------------------------------------------------------------

RUN_ARGS = ["--params", "10", "--targets", "ffn,heads", "--criterion", "magnitude", "--runs", "1", "--warmup", "0"]
RUN_ARGS += ["--workload", "prefill=8,decode=2", "--precision", "fp32"]  # the precision search: test_run*.py


def test_run_never_writes_into_the_model_folder_or_a_user_folder(saved_llama, calibration_file, tmp_path):
    before = snapshot(saved_llama)
    result = cli("run", saved_llama, *RUN_ARGS, "--calibration", calibration_file, "-o", saved_llama)
    assert_one_line_error(result, "is the input")
    assert snapshot(saved_llama) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"]):
        result = cli("run", saved_llama, *RUN_ARGS, "--calibration", calibration_file, "-o", mine, *extra)
        assert_one_line_error(result, "not written by edgeprune")
        assert snapshot(mine) == {"notes.txt": b"keep"}


def test_run_overwrite_keeps_the_run_folder_until_the_inputs_load(saved_llama, calibration_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # an empty folder is adopted, not replaced
    inode = out.stat().st_ino
    args = [*RUN_ARGS, "--calibration", calibration_file, "-o", out]
    result = cli("run", saved_llama, *args)
    assert result.exit_code == 1 and "parameters" in result.output, result.output  # unreachable budget
    assert (out / RUN_MARKER).is_file() and (out / "search.jsonl").is_file()
    assert out.stat().st_ino == inode
    before = snapshot(out)
    assert_one_line_error(cli("run", tmp_path / "missing-model", *args, "--overwrite"), "not found")
    assert snapshot(out) == before
    assert_one_line_error(cli("run", saved_llama, *args, "--seed", "1"), "other settings", "--overwrite")
    assert snapshot(out) == before
    result = cli("run", saved_llama, *args, "--seed", "1", "--overwrite")
    assert result.exit_code == 1 and "parameters" in result.output, result.output
    assert json.loads((out / "search.jsonl").read_text().splitlines()[0])["seed"] == 1
    assert (out / RUN_MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run")] == []


def test_run_overwrite_of_the_folder_holding_a_calibration_file_is_refused(saved_llama, calibration_file, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    calibration = calibration_file.replace(texts / calibration_file.name)
    before = snapshot(texts)
    result = cli("run", saved_llama, *RUN_ARGS, "--calibration", calibration, "-o", texts, "--overwrite")
    assert_one_line_error(result, "contains the input")
    assert snapshot(texts) == before


# -- interrupted and failed writes -------------------------------------------------------------


def test_sigterm_during_export_leaves_no_temp_folder(saved_llama, tmp_path):
    out = tmp_path / "onnx"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeprune.cli", "export", str(saved_llama), "-o", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    tmp = sibling(out, "tmp", process.pid)
    deadline = time.monotonic() + 300
    while not tmp.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tmp.exists(), "the export never started writing"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr.decode()
    assert list(tmp_path.iterdir()) == [saved_llama]


def test_stale_temp_folders_of_dead_processes_are_removed(llama, tokenizer, tmp_path):
    out = tmp_path / "pruned"
    stale, live = sibling(out, "tmp", dead_pid()), sibling(out, "tmp", os.getppid())
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    save_pruned(llama, tokenizer, out, {"source": "tiny"})
    assert not stale.exists() and live.exists()  # a running process's temp folder is its own
    assert (out / "edgeprune.json").is_file()


def test_output_replaced_by_a_killed_process_comes_back(tmp_path):
    from edgeprune.outputs import check_output

    out = tmp_path / "pruned"
    old = sibling(out, "old", dead_pid())  # killed between moving `out` aside and moving the new one in
    old.mkdir()
    (old / "edgeprune.json").write_text("{}")
    with pytest.raises(EdgepruneError, match="already exists"):
        check_output(out)
    assert (out / "edgeprune.json").is_file() and not old.exists()


def raise_disk_full(*args, **kwargs):
    """A write that gets half way, then finds the disk full."""
    path = Path(args[1])  # safe_save_file(tensors, file) / tokenizer.save_pretrained(folder)
    (path / "tokenizer.json" if path.is_dir() else path).write_bytes(b"half")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_save_is_one_line_and_leaves_nothing(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", raise_disk_full)
    out = tmp_path / "out" / "pruned"
    result = cli("prune", saved_llama, "--sparsity", "0.2", "-o", out)
    assert_one_line_error(result, "disk full", str(out), "MB free")
    assert list((tmp_path / "out").iterdir()) == []


def test_disk_full_during_export_is_one_line_and_leaves_nothing(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", raise_disk_full)
    out = tmp_path / "out" / "onnx"
    result = cli("export", saved_llama, "-o", out)
    assert_one_line_error(result, "disk full", str(out), "MB free")
    assert list((tmp_path / "out").iterdir()) == []


def test_disk_full_while_saving_scores_is_one_line_and_leaves_nothing(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setattr("edgeprune.criteria.base.save_file", raise_disk_full)
    out = tmp_path / "out"
    out.mkdir()
    result = cli("score", saved_llama, "-o", out / "scores.safetensors")
    assert_one_line_error(result, "disk full", str(out / "scores.safetensors"), "MB free")
    assert list(out.iterdir()) == []


def test_atomic_output_dir_keeps_the_previous_output_on_failure(tmp_path):
    from edgeprune.outputs import atomic_output_dir

    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "edgeprune.json").write_text('{"v": 1}')
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "edgeprune.json").write_text('{"v": 2}')
        raise RuntimeError("export failed")
    assert (out / "edgeprune.json").read_text() == '{"v": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

"""Common bad input (issue 15): a model without a tokenizer, damaged folders, a torn search log, an SSH port
that is not sshd, a missing path offline, NaN budgets and out-of-range options, hung or misconfigured boards.

Each is either handled (text-free commands work without a tokenizer; a torn last log line is dropped) or
refused in one line that names the fix, never with a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pwd
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, family_names, make_tokenizer, save_tiny
from test_cli import assert_one_line_error, run
from test_devices import SMALL, onnx_dirs, sshd  # noqa: F401 (fixtures: a real sshd on loopback, tiny exports)

from edgeprune.budget import Budget, Probe, ProbeLog
from edgeprune.checkpoint import load_pruned
from edgeprune.criteria import CRITERIA
from edgeprune.devices.profiler import LocalProfiler, Workload, profiler_for
from edgeprune.devices.profiles import get_device, load_profile
from edgeprune.errors import EdgepruneError
from edgeprune.loading import load_model, resolve_source

TEXT = " ".join(f"w{(i * 13) % 89}" for i in range(400))


@pytest.fixture
def bare_llama(tmp_path: Path) -> Path:
    """A plain `save_pretrained` of the model: config and weights, no tokenizer files."""
    return save_tiny("llama", tmp_path / "bare-llama")


@pytest.fixture
def bare_bert(tmp_path: Path) -> Path:
    return save_tiny("bert", tmp_path / "bare-bert")


@pytest.fixture
def tokenizer_folder(tmp_path: Path, tokenizer) -> Path:
    """Only the tokenizer files, as `--tokenizer` receives them."""
    folder = tmp_path / "tok"
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


# -- a model folder without a tokenizer --------------------------------------------------------------


@pytest.mark.parametrize("family", family_names())
def test_inspect_needs_no_tokenizer(family, tmp_path):
    result = run("inspect", save_tiny(family, tmp_path / "bare"), "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["layers"]) in (3, 4)


@pytest.mark.parametrize("criterion", sorted(n for n, spec in CRITERIA.items() if not spec.needs_calibration))
def test_text_free_pruning_needs_no_tokenizer(bare_llama, tmp_path, criterion):
    out = tmp_path / "pruned"
    result = run("prune", bare_llama, "--criterion", criterion, "--sparsity", "0.3", "-o", out)
    assert result.exit_code == 0, result.output
    model, tokenizer = load_pruned(out)
    assert tokenizer is None
    assert model(input_ids=torch.tensor([[7, 8, 9]])).logits.isfinite().all()


@pytest.mark.parametrize("family", family_names())
def test_export_without_tokenizer_verifies_on_random_token_ids(family, tmp_path):
    out, record = tmp_path / "onnx", tmp_path / "export.json"
    result = run("export", save_tiny(family, tmp_path / "bare"), "-o", out, "--json", record)
    assert result.exit_code == 0, result.output
    check = json.loads(record.read_text())["verification"]["fp32"]
    assert check["positions"] >= 32  # ids drawn at random, as many as the text would give
    assert check["max_abs_diff"] <= 1e-4 * max(1.0, check["max_abs_logit"])
    assert (out / "model.onnx").is_file() and not (out / "tokenizer.json").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("prune", "--criterion", "wanda-sp", "--sparsity", "0.3", "-o", "OUT"),
        ("prune", "--bias-compensation", "--sparsity", "0.3", "-o", "OUT"),
        ("score", "--criterion", "taylor", "-o", "OUT.safetensors"),
        ("eval", "--task", "TEXT"),
        ("run", "-o", "OUT"),
    ],
)
def test_commands_that_need_text_name_the_tokenizer_option(bare_llama, tmp_path, text_file, args):
    fill = {"OUT": tmp_path / "out", "OUT.safetensors": tmp_path / "s.safetensors", "TEXT": text_file}
    result = run(args[0], bare_llama, *(fill.get(a, a) for a in args[1:]))
    if args[0] == "run":  # run logs its steps ("loading model") above the error
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.strip().splitlines()[-1].startswith("Error: ") and "--tokenizer" in result.output
    else:
        assert_one_line_error(result, "--tokenizer")
        assert not (tmp_path / "out").exists()


def test_finetune_head_without_tokenizer_names_the_option(bare_bert, tmp_path):
    assert_one_line_error(run("finetune-head", bare_bert, "-o", tmp_path / "out"), "--tokenizer")


def test_recover_of_a_pruned_folder_without_tokenizer_names_the_option(bare_llama, text_file, tmp_path):
    assert (
        run("prune", bare_llama, "--criterion", "magnitude", "--sparsity", "0.3", "-o", tmp_path / "pruned").exit_code
        == 0
    )
    result = run("recover", tmp_path / "pruned", "--data", text_file, "-o", tmp_path / "out")
    assert_one_line_error(result, "--tokenizer")


def test_tokenizer_option_supplies_the_text(bare_llama, tokenizer_folder, text_file, tmp_path):
    out = tmp_path / "pruned"
    args = ["--criterion", "wanda-sp", "--sparsity", "0.3", "--calibration", text_file, "--calib-seq-len", "16"]
    result = run("prune", bare_llama, *args, "--tokenizer", tokenizer_folder, "-o", out)
    assert result.exit_code == 0, result.output
    assert load_pruned(out)[1] is not None  # the pruned folder carries the tokenizer on
    result = run("eval", bare_llama, "--task", text_file, "--seq-len", "32", "--tokenizer", tokenizer_folder)
    assert result.exit_code == 0, result.output
    assert "ppl" in result.output


def test_eval_of_an_onnx_folder_without_tokenizer(bare_llama, tokenizer_folder, text_file, tmp_path):
    assert run("export", bare_llama, "-o", tmp_path / "onnx").exit_code == 0
    args = ["eval", tmp_path / "onnx", "--task", text_file, "--seq-len", "32", "--limit", "2"]
    assert_one_line_error(run(*args), "--tokenizer")
    result = run(*args, "--tokenizer", tokenizer_folder)
    assert result.exit_code == 0, result.output
    assert "ppl" in result.output


def test_bad_tokenizer_option_is_one_line(bare_llama, tmp_path):
    wide = tmp_path / "wide-tok"
    make_tokenizer(VOCAB + 50).save_pretrained(wide)
    args = ["--criterion", "wanda-sp", "--sparsity", "0.3", "-o", tmp_path / "out"]
    for spec, message in [(tmp_path / "none", "not found"), (bare_llama, "no tokenizer files"), (wide, "vocabulary")]:
        result = run("prune", bare_llama, *args, "--tokenizer", spec)
        assert_one_line_error(result, message)


# -- damaged model folders ----------------------------------------------------------------------------


def damage(folder: Path, how: str) -> None:
    weights, config = folder / "model.safetensors", folder / "config.json"
    if how == "no weights":
        weights.unlink()
    elif how == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "truncated header":
        weights.write_bytes(weights.read_bytes()[:5])
    elif how == "invalid json":
        config.write_text(config.read_text()[:40])
    elif how == "not a mapping":
        config.write_text("[1, 2]")
    elif how == "unknown model_type":
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_type": "no-such-family"}))


DAMAGE = [
    ("no weights", "no weights"),
    ("truncated weights", "damaged"),
    ("truncated header", "damaged"),
    ("invalid json", "config.json is not"),
    ("not a mapping", "config.json is not"),
    ("unknown model_type", "config.json is not"),
]


@pytest.mark.parametrize("how,message", DAMAGE)
def test_damaged_plain_folder_is_one_line(saved_llama, how, message):
    damage(saved_llama, how)
    assert_one_line_error(run("inspect", saved_llama), message)


@pytest.mark.parametrize("how,message", DAMAGE)
def test_damaged_pruned_folder_is_one_line(saved_llama, tmp_path, how, message):
    out = tmp_path / "pruned"
    assert run("prune", saved_llama, "--sparsity", "0.3", "-o", out).exit_code == 0
    damage(out, how)
    assert_one_line_error(run("inspect", out), message)


# -- a missing local path is not looked up on the hub -------------------------------------------------


def test_a_path_like_spec_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    for spec in ("out/pruned", "out\\pruned", "pruned/", "a..b/model"):
        start = time.monotonic()
        with pytest.raises(EdgepruneError, match="not found") as err:
            load_model(spec)
        assert time.monotonic() - start < 5 and "\n" not in str(err.value)


def test_offline_any_uncached_spec_fails_at_once(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(EdgepruneError, match="HF_HUB_OFFLINE"):
        resolve_source("someone/missing-model")
    snapshot = tmp_path / "hub" / "models--someone--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--someone--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--cached" / "refs" / "main").write_text("abc123")
    assert resolve_source("someone/cached") == "someone/cached"  # a cached hub model still loads offline


# -- a torn search log --------------------------------------------------------------------------------


def test_torn_last_probe_line_is_dropped_and_the_search_resumes(tmp_path):
    path = tmp_path / "search.jsonl"
    log = ProbeLog(path, {"a": 1})
    log.record(Probe(0.0, 100, latency_ms=5.0))
    log.record(Probe(0.2, 80, latency_ms=4.0))
    path.write_text(path.read_text()[:-12])  # killed while writing the last probe
    log = ProbeLog(path, {"a": 1})
    assert list(log.probes) == [("fp32", 0.0)]
    log.record(Probe(0.2, 80, latency_ms=4.5))
    assert ProbeLog(path, {"a": 1}).probes[("fp32", 0.2)].latency_ms == 4.5
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_torn_header_starts_the_log_afresh(tmp_path):
    path = tmp_path / "search.jsonl"
    path.write_text('{"kind": "sett')
    assert ProbeLog(path, {"a": 1}).probes == {}
    assert json.loads(path.read_text().splitlines()[0]) == {"kind": "settings", "a": 1}


@pytest.mark.parametrize(
    "lines",
    [
        ['{"kind": "settings", "a": 1}', "garbage", '{"kind": "probe", "sparsity": 0.0, "params": 1}'],
        ['{"kind": "settings", "a": 1}', "[1, 2]"],
        ['{"kind": "settings", "a": 1}', '{"kind": "probe", "sparsity": 0.0}'],
        ['{"kind": "probe", "sparsity": 0.0, "params": 1}'],
    ],
)
def test_other_log_corruption_is_one_line(tmp_path, lines):
    path = tmp_path / "search.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EdgepruneError, match="search.jsonl") as err:
        ProbeLog(path, {"a": 1})
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)


# -- an SSH port that is not an SSH server ------------------------------------------------------------


BANNER_CLIENT = """
import sys, threading, paramiko
from edgeprune.devices.profiles import DeviceProfile
from edgeprune.devices.remote import connect
from edgeprune.errors import EdgepruneError
device = DeviceProfile("web", "x86_64", 1, 1, 1, ["CPUExecutionProvider"], ssh="me@127.0.0.1:" + sys.argv[1])
try:
    connect(device)
except EdgepruneError as err:
    print(err)
for thread in threading.enumerate():  # paramiko logs from its transport thread
    if isinstance(thread, paramiko.Transport):
        thread.join(10)
"""


def test_ssh_banner_error_is_one_line_without_traceback():
    """In a fresh process: pytest's own log capture would hide what paramiko prints to a user's terminal."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer_like_http() -> None:
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_like_http, daemon=True).start()
    port = str(server.getsockname()[1])
    client = subprocess.run([sys.executable, "-c", BANNER_CLIENT, port], capture_output=True, text=True, timeout=120)
    server.close()
    assert "SSH" in client.stdout and len(client.stdout.strip().splitlines()) == 1, client.stdout + client.stderr
    assert "Traceback" not in client.stderr, client.stderr


# -- values that must be refused when the options are parsed ------------------------------------------


@pytest.mark.parametrize("limit", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kind", ["latency_ms", "speedup", "memory_mb", "peak_mb", "params"])
def test_non_finite_budgets_are_refused(kind, limit):
    with pytest.raises(EdgepruneError, match="finite"):
        Budget(kind, limit)


@pytest.mark.parametrize(
    "kind,limit,rule",
    [
        ("speedup", 0.5, ">= 1"),
        ("latency_ms", 0, "> 0 ms"),
        ("memory_mb", -1, "> 0 MB"),
        ("peak_mb", 0, "> 0 MB"),
        ("params", 0, "positive"),
        ("params", 2.5, "whole number"),
    ],
)
def test_budget_errors_name_their_own_rule(kind, limit, rule):
    with pytest.raises(EdgepruneError) as err:
        Budget(kind, limit)
    assert rule in str(err.value)
    assert kind == "speedup" or "speedup" not in str(err.value)


@pytest.mark.parametrize(
    "args,option",
    [
        (("run", "./missing", "--speedup", "nan"), "--speedup"),
        (("run", "./missing", "--latency-ms", "inf"), "--latency-ms"),
        (("run", "./missing", "--memory-mb", "-3"), "--memory-mb"),
        (("run", "./missing", "--max-probes", "0"), "--max-probes"),
        (("run", "./missing", "--max-sparsity", "1.5"), "--max-sparsity"),
        (("run", "./missing", "--max-sparsity", "nan"), "--max-sparsity"),
        (("run", "./missing", "--timeout", "0"), "--timeout"),
        (("profile", "./missing.onnx", "--timeout", "-1"), "--timeout"),
        (("generate", "./missing.onnx", "hi", "--max-new-tokens", "-4"), "--max-new-tokens"),
    ],
)
def test_bad_values_are_refused_when_parsed(args, option):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output and "Traceback" not in result.output


# -- timeouts and remote paths ------------------------------------------------------------------------


def test_probe_timeout_grows_with_the_workload_and_has_a_floor(tmp_path):
    from edgeprune.devices.profiler import TIMEOUT_FLOOR_S, probe_timeout

    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    small.write_bytes(b"x" * 1000)
    with big.open("wb") as f:
        f.truncate(40_000_000)  # a 40 MB model (sparse file)
    tiny = probe_timeout([small], Workload(), runs=10, warmup=2)
    assert tiny == TIMEOUT_FLOOR_S
    base = probe_timeout([big], Workload(prefill=2048, decode=512), runs=10, warmup=2)
    assert base > TIMEOUT_FLOOR_S
    assert probe_timeout([big, big], Workload(prefill=2048, decode=512), runs=10, warmup=2) > base
    assert probe_timeout([big], Workload(prefill=2048, decode=512), runs=40, warmup=2) > base


def test_local_runner_that_overruns_its_timeout_is_one_line(tmp_path):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"not really a graph")  # the runner cannot even start in 10 ms
    profiler = LocalProfiler(get_device("local"), runs=1, warmup=1, timeout=0.01)
    with pytest.raises(EdgepruneError, match="did not finish within") as err:
        profiler.profile(graph, Workload())
    assert "--timeout" in str(err.value) and "\n" not in str(err.value)


def test_profile_timeout_option_reaches_the_runner(tmp_path):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"not really a graph")
    assert_one_line_error(run("profile", graph, "--timeout", "0.01"), "did not finish within 0.01 s")


def test_remote_words_expand_home_and_split_arguments():
    from edgeprune.devices.remote import remote_command, remote_path

    assert remote_path("~") == '"$HOME"'
    assert remote_path("~/edge prune") == "\"$HOME\"/'edge prune'"
    assert remote_path("/tmp/x y") == "'/tmp/x y'"
    assert remote_command("/usr/bin/env python3") == "/usr/bin/env python3"
    assert remote_command("~/venv/bin/python -X utf8") == '"$HOME"/venv/bin/python -X utf8'
    with pytest.raises(EdgepruneError, match="python"):
        remote_command("")


@pytest.mark.parametrize(
    "text,free_mb",
    [
        ("/dev/sda1 1024000 512000 409600 56% /tmp\n", 400.0),
        ("Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/x 10 5 2048 50% /\n", 2.0),
    ],
)
def test_df_output_is_parsed(text, free_mb):
    from edgeprune.devices.remote import free_mb_from_df

    assert free_mb_from_df(text, "board") == free_mb


@pytest.mark.parametrize("text", ["", "df: /tmp/x: No such file or directory\n", "a b c lots d\n"])
def test_unparseable_df_output_is_one_line(text):
    from edgeprune.devices.remote import free_mb_from_df

    with pytest.raises(EdgepruneError, match="df") as err:
        free_mb_from_df(text, "board")
    assert "\n" not in str(err.value)


def test_ssh_python_with_arguments_and_a_home_workdir(sshd, onnx_dirs):  # noqa: F811
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)  # the board's $HOME (this machine, over loopback)
    name = f"edgeprune-test-{os.getpid()}"
    python = f"/usr/bin/env {sys.executable}"
    device = dataclasses.replace(load_profile(sshd), python=python, workdir=f"~/{name}")
    try:
        result = profiler_for(device, runs=1, warmup=1).profile(onnx_dirs / "bert", SMALL)
        assert result.latency_ms.p50 > 0
        assert (home / name).is_dir() and list((home / name).iterdir()) == []  # the run folder is removed
    finally:
        shutil.rmtree(home / name, ignore_errors=True)
        shutil.rmtree(home / "~" / name, ignore_errors=True)  # where a quoted ~ would have put it
        if (home / "~").is_dir() and not any((home / "~").iterdir()):
            (home / "~").rmdir()


def test_ssh_runner_that_overruns_its_timeout_is_one_line(sshd, onnx_dirs):  # noqa: F811
    device = load_profile(sshd)
    with pytest.raises(EdgepruneError, match="did not finish within 0.05 s") as err:
        profiler_for(device, runs=1, warmup=1, timeout=0.05).profile(onnx_dirs / "bert", SMALL)
    assert "\n" not in str(err.value)
    assert list(Path(device.workdir).iterdir()) == []  # runner stopped, run folder removed

"""Device profiles, the local profiler's JSON, and the SSH profiler against a real sshd on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import family_class, family_names, make_tokenizer, tiny_bert, tiny_llama
from test_cli import assert_one_line_error

from edgeprune.cli import main
from edgeprune.devices.profiler import LocalProfiler, ProfileResult, Workload, profiler_for
from edgeprune.devices.profiles import PACKAGED_DIR, get_device, load_profile
from edgeprune.errors import EdgepruneError
from edgeprune.export import export_model, quantize_weight_only
from edgeprune.models import CAUSAL_LM

TEXT = " ".join(f"w{(i * 13) % 89}" for i in range(24))
SMALL = Workload(batch=1, sequence=16, prefill=8, decode=3)
SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if Path(p).is_file()), None)


@pytest.fixture(scope="module")
def onnx_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    tok = make_tokenizer()
    export_model(tiny_llama(), tok, root / "llama", text=TEXT)
    quantize_weight_only(root / "llama" / "model.onnx", root / "llama" / "model.int4.onnx", bits=4)
    export_model(tiny_bert().bert, tok, root / "bert", text=TEXT)
    return root


def test_packaged_profiles_are_complete_and_reachable_from_the_repo_root():
    names = {p.stem for p in PACKAGED_DIR.glob("*.yaml")}
    assert {"local", "rpi4", "rpi5", "pixel-class-phone"} <= names
    repo_devices = Path(__file__).resolve().parents[1] / "devices"
    assert {p.stem for p in repo_devices.glob("*.yaml")} == names
    local = get_device("local")
    assert local.reach == "local" and local.threads == os.cpu_count() and local.memory_mb > 0
    rpi4 = get_device("rpi4")
    assert rpi4.reach == "ssh" and rpi4.cores == 4 and rpi4.arch == "aarch64" and "dot-product" in rpi4.notes
    assert get_device("pixel-class-phone").ssh_target()[2] == 8022


def test_devices_cli_lists_and_adds_a_file(tmp_path):
    board = tmp_path / "board.yaml"
    board.write_text(
        "name: myboard\narch: aarch64\ncores: 4\nthreads: 2\nmemory_mb: 2048\n"
        "execution_providers: [CPUExecutionProvider]\nssh: me@board.lan:2222\n"
    )
    result = CliRunner().invoke(main, ["devices", "--json", "--device-file", str(board)])
    assert result.exit_code == 0, result.output
    found = {d["name"]: d for d in json.loads(result.output)}
    assert {"local", "rpi4", "rpi5", "pixel-class-phone", "myboard"} <= set(found)
    assert found["myboard"]["ssh"] == "me@board.lan:2222" and found["myboard"]["threads"] == 2
    assert "rpi5" in CliRunner().invoke(main, ["devices"]).output


def test_bad_device_files_and_names_are_one_line_errors(tmp_path, onnx_dirs):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\narch: arm\n")
    assert_one_line_error(CliRunner().invoke(main, ["devices", "--device-file", str(bad)]), "lacks cores")
    bad.write_text("name: x\narch: a\ncores: 1\nthreads: 1\nmemory_mb: 1\nexecution_providers: []\nssh: nohost\n")
    with pytest.raises(EdgepruneError, match="user@host"):
        load_profile(bad)
    result = CliRunner().invoke(main, ["profile", str(onnx_dirs / "llama"), "--device", "rpi9"])
    assert_one_line_error(result, "unknown device 'rpi9'")


def test_workload_parsing():
    assert Workload.parse("prefill=64,decode=8") == Workload(prefill=64, decode=8)
    assert Workload.parse("batch=2,seq=32") == Workload(batch=2, sequence=32)
    with pytest.raises(EdgepruneError, match="bad workload"):
        Workload.parse("tokens=5")


def assert_complete(result: dict, kind: str) -> None:
    """Every ProfileResult field is present, and those that apply to the model's kind are measured."""
    assert set(result) == {f.name for f in dataclasses.fields(ProfileResult)}
    assert result["kind"] == kind and result["ort_version"] and result["providers"] == ["CPUExecutionProvider"]
    assert result["threads"] == get_device("local").threads
    assert result["file_size_mb"] > 0 and result["peak_rss_mb"] > result["session_rss_mb"] > 0
    assert 0 < result["rss_mb"] <= result["peak_rss_mb"]
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p90"]
    per_kind = {
        "decoder": ("prefill_ms", "decode_ms_per_token", "prefill_tokens_per_s", "decode_tokens_per_s"),
        "encoder": ("tokens_per_s",),
    }[kind]
    for key in per_kind:
        assert result[key], key
    assert len(result["samples"]["latency_ms"]) == result["runs"]


@pytest.mark.parametrize("family", family_names())
def test_profile_json_has_every_field(onnx_dirs, tmp_path, family):
    kind = "decoder" if family_class(family).kind == CAUSAL_LM else "encoder"
    report = tmp_path / "p.json"
    args = ["profile", str(onnx_dirs / family), "--workload", "prefill=8,decode=3,seq=16", "--runs", "3"]
    result = CliRunner().invoke(main, [*args, "--warmup", "1", "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert_complete(json.loads(report.read_text()), kind)


def test_against_alternates_and_reports_speedups(onnx_dirs):
    profiler = LocalProfiler(get_device("local"), runs=4, warmup=1)
    comparison = profiler.compare(onnx_dirs / "llama" / "model.int4.onnx", onnx_dirs / "llama", SMALL)
    assert comparison.model.model.endswith("model.int4.onnx") and comparison.baseline.model.endswith("model.onnx")
    assert comparison.speedup > 0 and comparison.prefill_speedup > 0 and comparison.decode_speedup > 0
    assert comparison.model.file_size_mb < comparison.baseline.file_size_mb
    with pytest.raises(EdgepruneError, match="cannot compare a decoder with a encoder"):
        profiler.compare(onnx_dirs / "llama", onnx_dirs / "bert", SMALL)


def test_several_models_compared_in_one_alternating_run_share_the_baselines_rounds(onnx_dirs):
    """Each model's speedup is the median of its per-round ratios to the same rounds' baseline runs."""
    from edgeprune.devices.profiler import paired_speedup

    profiler = LocalProfiler(get_device("local"), runs=3, warmup=1)
    llama = onnx_dirs / "llama"
    first, second = profiler.compare_all([llama / "model.int4.onnx", llama], llama, SMALL)
    assert first.baseline == second.baseline and len(first.baseline.samples["latency_ms"]) == 3
    for comparison in (first, second):
        latency = comparison.model.samples["latency_ms"], comparison.baseline.samples["latency_ms"]
        assert comparison.speedup == paired_speedup(*latency)
    assert first.model.model.endswith("model.int4.onnx") and second.model.model.endswith("model.onnx")


def test_paired_comparisons_give_each_model_a_process_with_only_the_baseline(onnx_dirs):
    """How a --peak-mb search measures its probes: as the final check measures the answer."""

    class Recording(LocalProfiler):
        def __init__(self):
            super().__init__(get_device("local"), runs=2, warmup=1, paired=True)
            self.processes: list[list[str]] = []

        def call(self, spec, models, seconds):
            self.processes.append([Path(m).name for m in models])
            return super().call(spec, models, seconds)

    profiler = Recording()
    llama = onnx_dirs / "llama"
    first, second = profiler.compare_all([llama / "model.int4.onnx", llama], llama, SMALL)
    assert profiler.processes == [["model.int4.onnx", "model.onnx"], ["model.onnx", "model.onnx"]]
    assert first.model.model.endswith("model.int4.onnx") and second.model.model.endswith("model.onnx")
    assert first.baseline != second.baseline  # each run timed the baseline itself


# -- SSH, against a real OpenSSH server on loopback ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """sshd -D on 127.0.0.1 with a throwaway host key and user key; yields a device file that reaches it."""
    if SSHD is None:
        pytest.skip("OpenSSH server (sshd) not installed: apt-get install openssh-server")
    root = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)], check=True)
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    port = free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\n"
    )
    host_key = (root / "host_key.pub").read_text().split()[:2]
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation folder sshd insists on as root
    log = (root / "sshd.log").open("w")
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"sshd exited: {(root / 'sshd.log').read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    device = root / "loopback.yaml"
    device.write_text(
        f"name: loopback\narch: {os.uname().machine}\ncores: 1\nthreads: 1\nmemory_mb: 1024\n"
        f"execution_providers: [CPUExecutionProvider]\nssh: {getpass.getuser()}@127.0.0.1:{port}\n"
        f"python: {os.sys.executable}\nworkdir: {root / 'board'}\n"
        f"known_hosts: {root / 'known_hosts'}\nidentity_file: {root / 'user_key'}\n"
    )
    yield device
    server.terminate()
    server.wait(timeout=10)
    log.close()


def test_ssh_round_trip(sshd, onnx_dirs, tmp_path):
    device = load_profile(sshd)
    comparison = profiler_for(device, runs=2, warmup=1).compare(
        onnx_dirs / "llama" / "model.int4.onnx", onnx_dirs / "llama", SMALL
    )
    remote = comparison.baseline.as_dict()
    assert_complete({**remote, "threads": get_device("local").threads}, "decoder")
    assert remote["device"] == "loopback" and remote["threads"] == 1
    assert remote["model"] == f"loopback:{onnx_dirs / 'llama' / 'model.onnx'}"
    assert comparison.speedup > 0
    assert list((Path(device.workdir)).iterdir()) == []  # the board's run folder is removed
    report = tmp_path / "r.json"
    args = ["profile", str(onnx_dirs / "bert"), "--device", "loopback", "--device-file", str(sshd), "--runs", "2"]
    too_long = CliRunner().invoke(main, [*args, "--workload", "seq=100"])  # the tiny BERT has 64 positions
    assert_one_line_error(too_long, "shorten --workload")
    args += ["--workload", "seq=16"]
    result = CliRunner().invoke(main, [*args, "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["kind"] == "encoder"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"ssh": "PORT+1"}, "cannot reach"),
        ({"identity_file": "host_key"}, "authentication failed"),
        ({"known_hosts": None}, "not in known_hosts"),
        ({"python": "/nonexistent/python3"}, "cannot import onnxruntime"),
    ],
)
def test_ssh_failures_are_one_line_errors(sshd, onnx_dirs, change, message):
    device = load_profile(sshd)
    user, host, port = device.ssh_target()
    fix = {
        "PORT+1": f"{user}@{host}:{free_port()}",
        "host_key": str(sshd.parent / "host_key"),
    }
    changed = {key: fix.get(value, value) for key, value in change.items()}
    if changed.get("known_hosts", "") is None and Path("~/.ssh/known_hosts").expanduser().is_file():
        known = Path("~/.ssh/known_hosts").expanduser().read_text()
        if f"[127.0.0.1]:{port}" in known:
            pytest.skip("this user's known_hosts already trusts the test server's port")
    with pytest.raises(EdgepruneError, match=message) as err:
        profiler_for(dataclasses.replace(device, **changed), runs=1, warmup=1).profile(onnx_dirs / "bert", SMALL)
    assert "\n" not in str(err.value)


def test_ssh_out_of_disk_is_a_clear_error(sshd, onnx_dirs, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill up ({mounted.stderr.decode().strip()})")
    try:
        device = dataclasses.replace(load_profile(sshd), workdir=str(small))
        with pytest.raises(EdgepruneError, match="MB free in"):
            profiler_for(device, runs=1, warmup=1).profile(onnx_dirs / "llama", SMALL)
    finally:
        subprocess.run(["umount", str(small)], check=False)

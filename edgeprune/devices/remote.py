"""Profile on a board over SSH (paramiko): upload the model and a zip-app runner, run, read JSON back.

The runner zip holds `edgeprune.devices.runner` and the torch-free modules it imports, so
the board needs only Python with numpy and onnxruntime. Host keys are checked against
~/.ssh/known_hosts (and the profile's `known_hosts`); unknown hosts are refused. Every
remote command has a deadline, so a hung board ends the run with one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shlex
from pathlib import Path

import paramiko

from edgeprune.devices.profiler import (
    RUNNER_NAME,
    RunnerProfiler,
    parse_runner_output,
    runner_zip,
    timed_out,
)
from edgeprune.devices.profiles import DeviceProfile, command_words
from edgeprune.errors import EdgepruneError
from edgeprune.runtime import onnx_files

CONNECT_TIMEOUT = 15.0
COMMAND_TIMEOUT = 120.0  # seconds of silence before a setup command (python check, mkdir, df, upload) counts as hung
DISK_MARGIN = 1.1  # the upload plus 10%

# paramiko logs its transport thread's failures (e.g. "Error reading SSH protocol banner") with a traceback
# through logging's last-resort handler; the exception it raises is what the user sees, as one line.
logging.getLogger("paramiko").addHandler(logging.NullHandler())


def remote_path(path: str) -> str:
    """A shell word for a path on the board: a leading ~ is the remote $HOME (quoted, it names a folder `~`)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def remote_command(command: str) -> str:
    """The device file's `python:` as one shell command line on the board (~ is the board's $HOME)."""
    return " ".join(remote_path(word) for word in command_words(command))


def free_mb_from_df(text: str, where: str) -> float:
    """Available MB from the last line of `df -Pk DIR` (POSIX: the 4th column, in KiB)."""
    lines = text.strip().splitlines()
    fields = lines[-1].split() if lines else []
    if len(fields) < 6 or not fields[3].isdigit():
        shown = (lines[-1] if lines else "nothing")[:80]
        raise EdgepruneError(
            f"cannot read the free disk space on {where}: `df -Pk` printed '{shown}': check that df works there"
        )
    return int(fields[3]) / 1024


def connect(device: DeviceProfile) -> paramiko.SSHClient:
    """An authenticated client, or one line saying which of reachability, host key or auth failed."""
    user, host, port = device.ssh_target()
    where = f"{user}@{host}:{port}"
    client = paramiko.SSHClient()
    client.load_system_host_keys()
    if device.known_hosts:
        client.load_host_keys(str(Path(device.known_hosts).expanduser()))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key = str(Path(device.identity_file).expanduser()) if device.identity_file else None
    try:
        client.connect(
            host,
            port=port,
            username=user,
            key_filename=key,
            timeout=CONNECT_TIMEOUT,
            banner_timeout=CONNECT_TIMEOUT,
            auth_timeout=CONNECT_TIMEOUT,
        )
    except paramiko.BadHostKeyException:
        raise EdgepruneError(
            f"the host key of {host}:{port} differs from known_hosts: if the board was reinstalled, "
            "remove its old entry (ssh-keygen -R) and connect once with ssh"
        ) from None
    except paramiko.AuthenticationException:
        raise EdgepruneError(
            f"authentication failed for {where}: install your public key there (ssh-copy-id) "
            "or set identity_file in the device file"
        ) from None
    except paramiko.SSHException as err:
        if "known_hosts" in str(err):
            raise EdgepruneError(
                f"{host}:{port} is not in known_hosts: connect once with `ssh -p {port} {user}@{host}` to check "
                "and accept its key, or set known_hosts in the device file"
            ) from None
        raise EdgepruneError(f"SSH to {where} failed ({err}): check that sshd runs there") from None
    except OSError as err:  # refused, unresolvable, timed out
        raise EdgepruneError(
            f"cannot reach {where} ({err.strerror or err}): check the address and that sshd runs"
        ) from None
    return client


def run_remote(
    client: paramiko.SSHClient, command: str, stdin: str = "", timeout: float = COMMAND_TIMEOUT
) -> tuple[int, str, str]:
    """(status, stdout, stderr); TimeoutError when the command prints nothing for `timeout` seconds."""
    channel_in, channel_out, channel_err = client.exec_command(command, timeout=timeout)
    try:
        if stdin:
            channel_in.write(stdin)
        channel_in.channel.shutdown_write()
        out, err = channel_out.read().decode(), channel_err.read().decode()
    except TimeoutError:
        channel_out.channel.close()
        raise
    return channel_out.channel.recv_exit_status(), out, err


def clean_up(client: paramiko.SSHClient, workdir: str) -> None:
    """Best effort: stop a runner left behind and remove the run folder (the connection may be gone)."""
    runner = shlex.quote(f"{workdir}/[{RUNNER_NAME[0]}]{RUNNER_NAME[1:]}")  # [e]dgeprune: never matches pkill's shell
    with contextlib.suppress(TimeoutError, paramiko.SSHException, OSError):
        run_remote(client, f"pkill -KILL -f {runner}; rm -rf {shlex.quote(workdir)}", timeout=CONNECT_TIMEOUT)


class SSHProfiler(RunnerProfiler):
    """Runs on the board named by the device profile's `ssh: user@host[:port]`: upload, run, read the answer back."""

    def call(self, spec: dict, models: list[Path], seconds: float) -> dict:
        client = connect(self.device)
        try:
            workdir = self.prepare(client, models)
            try:
                names = [f"m{i}/{m.name}" for i, m in enumerate(models)]
                runner = shlex.quote(f"{workdir}/{RUNNER_NAME}")  # its full path, so clean_up can find it
                command = f"cd {shlex.quote(workdir)} && {remote_command(self.device.interpreter)} {runner}"
                try:
                    _, out, err = run_remote(client, command, json.dumps({**spec, "models": names}), timeout=seconds)
                except TimeoutError:
                    raise timed_out(self.device.name, seconds) from None
                output = parse_runner_output(out, err, self.device.name)
                local = dict(zip(names, models, strict=True))
                for result in output["results"]:  # the board's relative names back to this machine's paths
                    result["model"] = f"{self.device.name}:{local.get(result['model'], result['model'])}"
                return output
            finally:
                clean_up(client, workdir)
        except TimeoutError:
            raise EdgepruneError(
                f"{self.device.name} stopped answering for {COMMAND_TIMEOUT:.0f} s while preparing the run: "
                "check the board and its network"
            ) from None
        finally:
            client.close()

    def prepare(self, client: paramiko.SSHClient, models: list[Path]) -> str:
        """Check python+onnxruntime and free disk, then upload the runner and the models to a fresh folder."""
        python, name = remote_command(self.device.interpreter), self.device.name
        status, out, err = run_remote(
            client, f"{python} -c 'import numpy, onnxruntime; print(onnxruntime.__version__)'"
        )
        if status != 0:
            python_there = self.device.interpreter
            raise EdgepruneError(
                f"{python_there} on {name} cannot import onnxruntime and numpy: run "
                f"`{python_there} -m pip install onnxruntime numpy` there (or set python: in the device file)"
            )
        base = self.device.workdir
        status, workdir, err = run_remote(
            client, f"mkdir -p {remote_path(base)} && mktemp -d {remote_path(base)}/run.XXXXXX"
        )
        if status != 0:
            raise EdgepruneError(f"cannot create a folder under {base} on {name} ({err.strip()}): set workdir:")
        workdir = workdir.strip()
        try:
            self.upload(client, workdir, models)
        except BaseException:
            clean_up(client, workdir)
            raise
        return workdir

    def upload(self, client: paramiko.SSHClient, workdir: str, models: list[Path]) -> None:
        """The runner and the model files into `workdir`, once `df` shows room for them."""
        name, base = self.device.name, self.device.workdir
        files = [(f"m{i}/{f.name}", f) for i, m in enumerate(models) for f in onnx_files(m)]
        need_mb = DISK_MARGIN * sum(f.stat().st_size for _, f in files) / 2**20
        _, df, _ = run_remote(client, f"df -Pk {shlex.quote(workdir)}")
        free_mb = free_mb_from_df(df, name)
        if free_mb < need_mb:
            raise EdgepruneError(
                f"{name} has {free_mb:.0f} MB free in {base}, the model needs {need_mb:.0f} MB: free space"
            )
        with client.open_sftp() as sftp:
            sftp.get_channel().settimeout(COMMAND_TIMEOUT)
            try:
                sftp.putfo(io.BytesIO(runner_zip()), f"{workdir}/{RUNNER_NAME}")
                for i in range(len(models)):
                    sftp.mkdir(f"{workdir}/m{i}")
                for remote, local in files:
                    sftp.put(str(local), f"{workdir}/{remote}")
            except TimeoutError:
                raise
            except OSError as err:
                raise EdgepruneError(
                    f"upload to {name}:{workdir} failed ({err}): check free disk space there"
                ) from None

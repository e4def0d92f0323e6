"""Device profiles: YAML files that say what a target board is and how to reach it.

Shipped profiles live in `edgeprune/devices/profiles/` (the repository's top-level
`devices/` points there, so editable installs and wheels read the same files). Users add
boards in $EDGEPRUNE_DEVICES (default ~/.config/edgeprune/devices) or with --device-file.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edgeprune.errors import EdgepruneError

PACKAGED_DIR = Path(__file__).parent / "profiles"
SSH_TARGET = re.compile(r"^(?P<user>[^@\s]+)@(?P<host>[^:\s]+)(:(?P<port>\d+))?$")
ARM_ARCHES = ("aarch64", "arm64", "armv7l", "armv8l")
REQUIRED = ("name", "arch", "cores", "threads", "memory_mb", "execution_providers")


@dataclass(frozen=True)
class DeviceProfile:
    """A target device. `ssh` is None for the local machine, else `user@host[:port]`.

    `python` is the device's interpreter command (words, e.g. an emulator wrapper); unset, it is python3 on a
    board and this interpreter locally. `emulated` devices run the right instructions at the wrong speed:
    their timings are functional checks, never latencies.
    """

    name: str
    arch: str
    cores: int
    threads: int
    memory_mb: int
    execution_providers: list[str]
    ssh: str | None = None
    python: str | None = None
    emulated: bool = False
    workdir: str = "/tmp/edgeprune"
    known_hosts: str | None = None  # extra known_hosts file; ~/.ssh/known_hosts is always read
    identity_file: str | None = None
    description: str = ""
    notes: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def reach(self) -> str:
        return "ssh" if self.ssh else "local"

    @property
    def is_arm(self) -> bool:
        return self.arch in ARM_ARCHES

    @property
    def runs_elsewhere(self) -> bool:
        """Not this Python process's interpreter: a board over SSH, or a local interpreter of its own (an emulator)."""
        return self.reach == "ssh" or self.python is not None

    @property
    def interpreter(self) -> str:
        return self.python or ("python3" if self.ssh else shlex.quote(sys.executable))

    def ssh_target(self) -> tuple[str, str, int]:
        """(user, host, port) of an SSH device."""
        match = SSH_TARGET.match(self.ssh or "")
        if not match:
            raise EdgepruneError(f"device '{self.name}' has ssh: '{self.ssh}': write it as user@host or user@host:port")
        return match["user"], match["host"], int(match["port"] or 22)


def command_words(command: str) -> list[str]:
    """A device file's `python:` as words: it may carry arguments (`/usr/bin/env python3`)."""
    try:
        words = shlex.split(command)
    except ValueError as err:
        raise EdgepruneError(
            f"python: '{command}' in the device file cannot be split ({err}): fix its quotes"
        ) from None
    if not words:
        raise EdgepruneError("python: in the device file is empty: give an interpreter such as python3")
    return words


def total_memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError, AttributeError):
        return 0


def resolve_auto(key: str, value):
    """`auto` fields of the local profile: this machine's values."""
    if value != "auto":
        return value
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "threads": os.cpu_count() or 1,
        "memory_mb": total_memory_mb(),
    }.get(key, value)


def load_profile(path: Path) -> DeviceProfile:
    """One YAML file as a profile; bad files are named with what is missing."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgepruneError(f"device file {path} not found: check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise EdgepruneError(f"device file {path} is not valid YAML ({str(err).splitlines()[0]}): fix it") from None
    if not isinstance(data, dict):
        raise EdgepruneError(f"device file {path} must be a YAML mapping of fields such as name, arch, threads")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise EdgepruneError(f"device file {path} lacks {', '.join(missing)}: add them (see devices/rpi5.yaml)")
    if "ssh" not in data and data.get("reach", "local") != "local":
        raise EdgepruneError(f"device file {path}: give `reach: local` or `ssh: user@host[:port]`")
    known = set(DeviceProfile.__dataclass_fields__) - {"source", "extra"}
    fields = {key: resolve_auto(key, value) for key, value in data.items() if key in known}
    extra = {key: value for key, value in data.items() if key not in known and key != "reach"}
    try:
        profile = DeviceProfile(**fields, source=str(path), extra=extra)
    except TypeError as err:
        raise EdgepruneError(f"device file {path}: {err}") from None
    if not isinstance(profile.threads, int) or profile.threads < 1:
        raise EdgepruneError(f"device file {path}: threads must be a positive integer or auto")
    if not isinstance(profile.emulated, bool):
        raise EdgepruneError(f"device file {path}: emulated must be true or false")
    if profile.ssh:
        profile.ssh_target()
    return profile


def user_dir() -> Path:
    return Path(os.environ.get("EDGEPRUNE_DEVICES", Path.home() / ".config" / "edgeprune" / "devices"))


def available_devices(extra_files: tuple[Path, ...] = ()) -> dict[str, DeviceProfile]:
    """Every profile by name: packaged, then the user's folder, then explicit files (later ones win)."""
    paths = sorted(PACKAGED_DIR.glob("*.yaml"))
    if user_dir().is_dir():
        paths += sorted(user_dir().glob("*.yaml"))
    profiles = [load_profile(p) for p in (*paths, *extra_files)]
    return {p.name: p for p in profiles}


def get_device(name: str, extra_files: tuple[Path, ...] = ()) -> DeviceProfile:
    devices = available_devices(extra_files)
    if name not in devices:
        raise EdgepruneError(
            f"unknown device '{name}': choose from {', '.join(sorted(devices))} or add one with --device-file"
        )
    return devices[name]

"""Where edgeprune writes: only folders it created, never over, into or around an input, atomically.

Every output folder carries a marker: `edgeprune.json` (pruned and ONNX folders) or
`edgeprune-run.json` (a run's OUT). `--overwrite` replaces only a marked (or empty) folder, and
only once the new one is complete: a folder is built as `.NAME.tmp-PID` beside its target and
renamed into place. SIGTERM and a full disk remove the temp folder; temp folders of processes
killed harder are removed the next time the same output is written.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from edgeprune.errors import EdgepruneError

PROVENANCE = "edgeprune.json"  # marks pruned and ONNX folders (and records where they came from)
RUN_MARKER = "edgeprune-run.json"  # marks the OUT folder of `edgeprune run`
MARKERS = (PROVENANCE, RUN_MARKER)
DISK_FULL_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # EDQUOT: not on Windows
DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded")  # Rust/C++ writers' wording


def cache_dir() -> Path:
    """Where edgeprune keeps what it makes once per machine: converted default models, self-written text,
    pre-packed sessions ($EDGEPRUNE_CACHE, else ~/.cache/edgeprune)."""
    return Path(os.environ.get("EDGEPRUNE_CACHE", Path.home() / ".cache" / "edgeprune"))


def local_inputs(*specs: str | Path | None) -> tuple[Path, ...]:
    """The specs that name existing local files or folders (hub ids and dataset names are not inputs on disk)."""
    paths = (Path(spec).expanduser() for spec in specs if spec is not None and str(spec))
    return tuple(path for path in paths if path.exists())


def is_edgeprune_output(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).is_file() for marker in MARKERS)


def is_run_folder(folder: Path) -> bool:
    return (folder / RUN_MARKER).is_file()


def is_empty_folder(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir())


def refuse_input_overlap(out: Path, inputs: Iterable[Path | None]) -> None:
    """Refuse an output that is, holds, or sits inside an input: replacing or writing it would touch the input."""
    target = out.resolve()
    for given in inputs:
        if given is None:
            continue
        source = Path(given).expanduser().resolve()
        if target == source:
            relation = "is"
        elif source.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(source):
            relation = "is inside"
        else:
            continue
        raise EdgepruneError(
            f"output {out} {relation} the input {given}: choose an -o outside every input so the inputs stay intact"
        )


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (on Windows, where signal 0 would kill it, always assumed)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, owned by another user
        return True
    return True


def sibling(out: Path, kind: str, pid: int | None = None) -> Path:
    """`.NAME.tmp-PID` (the folder being built) or `.NAME.old-PID` (the folder being replaced)."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid() if pid is None else pid}")


def remove_stale_siblings(out: Path) -> None:
    """Temp folders of `out` left by dead processes; a replaced output whose successor never arrived comes back."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or process_alive(int(match[2])):
            continue
        if match[1] == "old" and not out.exists():
            path.replace(out)  # killed between the two renames of a swap
        elif path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_output(out: Path, overwrite: bool = False, inputs: Iterable[Path | None] = ()) -> Path:
    """The guard every command runs before any work; returns the absolute output path.

    Refuses an output overlapping an input, an existing output without `overwrite`, and any
    existing folder edgeprune did not write (an empty folder counts as none).
    """
    out = Path(out).expanduser().absolute()
    refuse_input_overlap(out, inputs)
    remove_stale_siblings(out)
    if not (out.exists() or out.is_symlink()) or is_empty_folder(out):
        return out
    if not is_edgeprune_output(out):
        raise EdgepruneError(
            f"output {out} exists and was not written by edgeprune (no {PROVENANCE} or {RUN_MARKER}): "
            "choose another -o; edgeprune never writes into or replaces a folder it did not create"
        )
    if not overwrite:
        raise EdgepruneError(f"output {out} already exists: choose another -o or pass --overwrite")
    return out


def check_output_file(path: Path, inputs: Iterable[Path | None], replaceable: Callable[[Path], bool]) -> Path:
    """The guard for a one-file output (scores): never an input nor inside one; an existing file only if ours."""
    path = Path(path).expanduser().absolute()
    refuse_input_overlap(path, inputs)
    if (path.exists() or path.is_symlink()) and not (path.is_file() and replaceable(path)):
        raise EdgepruneError(f"output {path} exists and is not a file edgeprune wrote: choose another -o")
    return path


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM becomes SystemExit(143) so cleanup runs (a kill would leave the temp folder behind).

    Only where SIGTERM would kill the process: an ignored signal or a caller's own handler is
    left alone, and only the main thread may set handlers.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not in_main_thread or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return

    def terminate(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Hold SIGTERM back for the two renames of a swap, so an output is never left half-replaced."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def swap_into_place(tmp: Path, out: Path) -> None:
    """The complete `tmp` becomes `out`; the previous `out` is removed only after that."""
    old = sibling(out, "old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists() or out.is_symlink():
        out.replace(old)
    tmp.replace(out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return True
    return isinstance(err, Exception) and any(text in str(err) for text in DISK_FULL_TEXT)


def disk_full_error(out: Path) -> EdgepruneError:
    existing = next(p for p in (out, *out.parents) if p.exists())
    free_mb = shutil.disk_usage(existing).free / 1e6
    return EdgepruneError(
        f"disk full while writing {out} ({free_mb:,.0f} MB free there): nothing was written; "
        "free some space or choose an -o on another disk"
    )


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, protect: Path | None = None) -> Iterator[Path]:
    """Yield a temp folder beside `out`; once the block succeeds it replaces `out` in one rename.

    `check_output` decides whether `out` may be written (`protect` is the input model folder).
    On any failure, SIGTERM included, the temp folder is removed and `out` is untouched; a
    full disk becomes a one-line error.
    """
    out = check_output(out, overwrite, (protect,))
    tmp = sibling(out, "tmp")
    try:
        with sigterm_raises():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
            check_output(out, overwrite)  # another process may have written `out` meanwhile
            with sigterm_deferred():
                swap_into_place(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise disk_full_error(out) from None
        raise


@contextmanager
def atomic_output_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (same suffix, for writers that read it); it becomes `path` in one rename.

    On any failure, SIGTERM included, the temp file is removed and `path` is as it was; a full
    disk becomes a one-line error.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        with sigterm_raises():
            yield tmp
            with sigterm_deferred():
                tmp.replace(path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_disk_full(err):
            raise disk_full_error(path) from None
        raise


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a whole file through `atomic_output_file`: a reader never sees half of it."""
    with atomic_output_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def check_run_output(out: Path, overwrite: bool, inputs: Iterable[Path | None]) -> Path:
    """`run`'s guard before any work: OUT resumes only in its own run folder, else it must be new or empty."""
    out = Path(out).expanduser().absolute()
    return check_output(out, overwrite or is_run_folder(out), inputs)


def claim_run_output(out: Path, overwrite: bool, inputs: Iterable[Path | None]) -> Path:
    """OUT, marked as a run folder: kept to resume, else created, adopted (empty) or replaced (`overwrite`)."""
    out = check_run_output(out, overwrite, inputs)
    if is_run_folder(out) and not overwrite:
        return out
    if out.exists() and not is_empty_folder(out):  # an edgeprune output: a fresh folder replaces it
        with atomic_output_dir(out, overwrite=True) as tmp:
            write_run_marker(tmp)
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_run_marker(out)
    return out


def write_run_marker(folder: Path) -> None:
    from edgeprune import __version__

    marker = {"edgeprune": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with atomic_output_file(folder / RUN_MARKER) as tmp:
        tmp.write_text(json.dumps(marker, indent=2) + "\n")

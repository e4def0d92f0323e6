"""Warnings a user cannot act on (exporter tracer warnings, tokenizer and library notices) go to a log file.

Commands capture them while they work and write them into the output folder they made
(`OUT/edgeprune.log`), so the screen shows progress and results only, and the notices are
still there for a bug report.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOG_FILE = "edgeprune.log"
# Libraries whose loggers print notices during export and loading (transformers, optimum, torch.onnx).
LIBRARY_LOGGERS = ("transformers", "optimum", "torch.onnx", "onnxruntime", "accelerate", "peft")


class CapturedLog:
    """The text captured so far; `write_to` appends it to a folder's log file."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def write_to(self, folder: Path) -> None:
        """Append to FOLDER/edgeprune.log (only into a folder that exists: an output edgeprune made)."""
        if self.text and Path(folder).is_dir():
            with (Path(folder) / LOG_FILE).open("a", encoding="utf-8") as f:
                f.write(self.text)
            self.buffer = io.StringIO()


@contextmanager
def capture_library_output() -> Iterator[CapturedLog]:
    """Route Python warnings and the libraries' loggers into a buffer."""
    captured = CapturedLog()
    handler = logging.StreamHandler(captured.buffer)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved = [(lg.handlers[:], lg.propagate) for lg in loggers]

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        captured.buffer.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            for lg in loggers:
                lg.handlers[:] = [handler]
                lg.propagate = False
            yield captured
    finally:
        for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:] = handlers
            lg.propagate = propagate


@contextmanager
def notices_logged_in(folder: Path) -> Iterator[None]:
    """Capture library notices while a command works; append them to FOLDER/edgeprune.log when it ends."""
    with capture_library_output() as captured:
        try:
            yield
        finally:
            captured.write_to(folder)

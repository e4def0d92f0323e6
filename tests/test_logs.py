"""Notices a user cannot act on go to OUT/edgeprune.log, not the screen."""

from __future__ import annotations

import logging
import warnings

from click.testing import CliRunner

from edgeprune.cli import main
from edgeprune.logs import LOG_FILE, capture_library_output, notices_logged_in


def test_warnings_and_library_loggers_are_captured_then_restored(tmp_path):
    logger = logging.getLogger("optimum.onnx.some_module")
    optimum = logging.getLogger("optimum")
    before = (list(optimum.handlers), optimum.propagate)
    with notices_logged_in(tmp_path):
        warnings.warn("a tracer warning", UserWarning, stacklevel=1)
        logger.warning("Found different candidate ONNX initializers")
    text = (tmp_path / LOG_FILE).read_text()
    assert "a tracer warning" in text and "Found different candidate ONNX initializers" in text
    assert (optimum.handlers, optimum.propagate) == before  # the library's own set-up is back
    with capture_library_output() as captured:
        pass
    captured.write_to(tmp_path / "missing")  # never creates a folder
    assert not (tmp_path / "missing").exists()


def test_export_prints_no_tracer_warnings_and_logs_them(saved_llama, tmp_path):
    out = tmp_path / "onnx"
    result = CliRunner().invoke(main, ["export", str(saved_llama), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "TracerWarning" not in result.output
    assert "TracerWarning" in (out / LOG_FILE).read_text()

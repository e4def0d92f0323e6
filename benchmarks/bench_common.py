"""What the benchmark scripts share: where the evaluation data is, and the resumable JSON result log."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def data_dir() -> Path:
    """$EDGEPRUNE_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("EDGEPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def wikitext_test_tokens(tokenizer, n: int | None = None) -> torch.Tensor:
    """The first `n` tokens of WikiText-2 test (raw file tokenized once, no BOS): the benchmarks' unseen text."""
    from edgeprune.calibration import tokenize_text

    text = (data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    return tokenize_text(tokenizer, text)[:n]


def read_results(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def append_result(path: Path, entry: dict) -> dict:
    """Append one result, stamped with the date and machine state, to the JSON list in `path` (atomically)."""
    entry = {
        **entry,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([*read_results(path), entry], indent=2) + "\n")
    tmp.replace(path)
    return entry


CRITERION_ALIASES = {"mi-conditional": ("mi", {"selection": "conditional"})}  # benchmark name: (criterion, options)


def criterion_and_options(name: str) -> tuple[str, dict]:
    """A registered criterion and its options, from a benchmark's name for it (`mi-conditional`, or the name)."""
    return CRITERION_ALIASES.get(name, (name, {}))

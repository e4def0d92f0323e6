"""What the benchmark scripts share: where the evaluation data is, the resumable JSON result log, and paired
held-out quality against the dense model."""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from edgeprune.evaluate.divergence import dense_output, windows_of
from edgeprune.window_stats import decoder_window_stats


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
    """A registered criterion and its options, from a benchmark's name for it: an alias (`mi-conditional`), the
    name, or `name:key=value+key=value` (options as `--criterion-option` takes them)."""
    if name in CRITERION_ALIASES:
        return CRITERION_ALIASES[name]
    criterion, _, given = name.partition(":")
    return criterion, dict(item.split("=", 1) for item in given.split("+")) if given else {}


class HeldOut:
    """Windows of one held-out text and the dense model's logits on them (cached on disk: they are large)."""

    def __init__(self, name: str, tokens: torch.Tensor, model, cache: Path) -> None:
        self.name, self.windows = name, windows_of(tokens, 128)
        path = cache / f"dense-{name}-{len(self.windows)}.npy"
        if not path.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            shape = (len(self.windows), 128, model.config.vocab_size)
            tmp = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), "w+", np.float32, shape)
            for i in range(0, len(self.windows), 8):
                tmp[i : i + 8] = dense_output(model, self.windows[i : i + 8])
            tmp.flush()
            del tmp
            path.with_suffix(".tmp.npy").rename(path)
        self.dense = np.load(path, mmap_mode="r")

    def measure(self, model) -> dict:
        """KL(dense || model) nats/token (mean, stderr over windows), and both perplexities."""
        stats: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(self.windows), 8):
            batch = self.windows[i : i + 8]
            dense = np.array(self.dense[i : i + 8])
            for key, value in decoder_window_stats(dense, dense_output(model, batch), batch.numpy()).items():
                stats.setdefault(key, []).append(value)
        kl, nll, dense_nll = (np.concatenate(stats[k]) for k in ("divergence", "nll", "dense_nll"))
        predicted = len(kl) * 127
        return {
            "kl": float(kl.mean()),
            "kl_stderr": float(kl.std(ddof=1) / math.sqrt(len(kl))),
            "ppl": math.exp(float(nll.sum()) / predicted),
            "dense_ppl": math.exp(float(dense_nll.sum()) / predicted),
        }

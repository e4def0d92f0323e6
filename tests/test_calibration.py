"""Calibration batches: the packaged default text, seeded windows, shapes, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgeprune.calibration import (
    PACKAGED_TEXT,
    calibration_batch,
    disjoint_windows,
    load_text,
    sample_windows,
    tokenize_text,
)
from edgeprune.errors import EdgepruneError


def word_file(tmp_path: Path, n_words: int = 400) -> Path:
    """A text the tiny word-level tokenizer knows: w0 w1 ... cycling through its vocabulary."""
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"w{i % 80}" for i in range(n_words)), encoding="utf-8")
    return path


def test_packaged_text_is_the_default_and_is_substantial():
    text = load_text(None)
    assert PACKAGED_TEXT.is_file() and text == PACKAGED_TEXT.read_text(encoding="utf-8")
    assert len(text.encode()) > 40_000 and len(text.split()) > 6_000
    assert (PACKAGED_TEXT.parent / "README.md").read_text().count("Apache-2.0")  # source and licence stated


def test_windows_are_seeded_contiguous_slices(tokenizer, tmp_path):
    source = word_file(tmp_path)
    stream = tokenize_text(tokenizer, source.read_text())
    a = calibration_batch(tokenizer, source, n_samples=6, seq_len=32, seed=3)
    b = calibration_batch(tokenizer, source, n_samples=6, seq_len=32, seed=3)
    c = calibration_batch(tokenizer, source, n_samples=6, seq_len=32, seed=4)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a:
        assert any(torch.equal(stream[s : s + 32], row) for s in range(len(stream) - 31)), "not a slice of the text"


def test_packaged_text_gives_full_windows(tokenizer):
    batch = calibration_batch(tokenizer, None, n_samples=4, seq_len=64, seed=0)
    assert batch.shape == (4, 64)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda tok, tmp: calibration_batch(tok, word_file(tmp, 20), n_samples=2, seq_len=64), "fewer than one window"),
        (lambda tok, tmp: load_text(tmp / "missing.txt"), "neither a file nor a dataset name"),
    ],
)
def test_errors_are_one_line(call, message, tokenizer, tmp_path):
    with pytest.raises(EdgepruneError, match=message) as err:
        call(tokenizer, tmp_path)
    assert "\n" not in str(err.value)


def test_sample_windows_never_run_past_the_end():
    tokens = torch.arange(40)
    windows = sample_windows(tokens, n_samples=200, seq_len=39, seed=0)
    assert windows.shape == (200, 39) and int(windows.max()) <= 39


def test_disjoint_windows_share_no_token_and_spread_over_the_text_in_order():
    tokens = torch.arange(1000)
    every = disjoint_windows(tokens, seq_len=64, max_windows=100)  # 15 fit, the last 40 tokens dropped
    assert torch.equal(every, tokens[:960].reshape(15, 64))
    some = disjoint_windows(tokens, seq_len=64, max_windows=4)
    assert [int(w[0]) for w in some] == [0, 5 * 64, 9 * 64, 14 * 64]  # first and last window, evenly between
    with pytest.raises(EdgepruneError, match="fewer than one window"):
        disjoint_windows(tokens[:10], seq_len=64, max_windows=4)


def test_glue_task_calibration_reads_train_sentences(tokenizer, data_dir):
    from edgeprune.calibration import labelled_batch, load_text

    text = load_text("sst2", data_dir)
    assert text.splitlines()[0] == "hide new secretions from the parental units"  # SST-2 train.tsv row 1
    assert len(text.splitlines()) == 67349
    ids, token_inputs, labels = labelled_batch(tokenizer, "sst2", data_dir, n_samples=6, max_length=16, seed=1)
    mask = token_inputs["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 6 and ids.shape[1] <= 16
    assert labels.dtype == torch.long and set(labels.tolist()) <= {0, 1}
    assert (mask.sum(dim=1) > 0).all() and (ids[mask == 0] == tokenizer.pad_token_id).all()
    again = labelled_batch(tokenizer, "sst2", data_dir, n_samples=6, max_length=16, seed=1)
    assert torch.equal(again[0], ids) and torch.equal(again[2], labels)

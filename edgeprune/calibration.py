"""Calibration token batches: N windows of L tokens from a text file, the packaged text, or a dataset.

A GLUE task name (`sst2`, `mrpc`, ...) reads the task's training sentences from the data folder:
as plain text for the label-free criteria, or, with `labelled_batch`, as padded labelled
sentences for the supervised Taylor score of a fine-tuned classifier.
Seeded and reproducible: the same source, tokenizer, N, L and seed give the same batch.
`score`, `prune` and `run` read a source once (`read_calibration`) and sample its head only: the
held-out tail measures perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from edgeprune.errors import EdgepruneError

PACKAGED_TEXT = Path(__file__).parent / "data" / "calibration.txt"
DATASET_ALIASES = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "train")}
HELDOUT_FRACTION = 0.2  # the tail of a calibration text, never sampled for scoring or trained on, measures perplexity
# Windows for activation statistics and re-fits (a criterion may register fewer: LLM-Pruner's 10 for gradients).
DEFAULT_WINDOWS = 32
REFIT_WINDOWS = 256  # at most this many non-overlapping windows of the calibration text feed the re-fit


def heldout_start(n_tokens: int) -> int:
    """Index of the first held-out token of a calibration stream of `n_tokens`."""
    return int(n_tokens * (1 - HELDOUT_FRACTION))


def load_text(source: str | Path | None = None, data_dir: str | Path | None = None) -> str:
    """Text from a file, `wikitext2`, a GLUE task's training sentences, `name:config:split`, or the packaged text."""
    from edgeprune.evaluate.glue import GLUE_TASKS

    if source is None:
        return PACKAGED_TEXT.read_text(encoding="utf-8")
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    name = str(source)
    if name in GLUE_TASKS:
        return "\n".join(" ".join(t.strip() for t in (e.text_a, e.text_b) if t) for e in glue_train(name, data_dir))
    if name in DATASET_ALIASES or name.count(":") == 2:
        return load_dataset_text(*DATASET_ALIASES.get(name, name.split(":")))
    raise EdgepruneError(
        f"calibration source '{source}' is neither a file nor a dataset name: give a text file, "
        "`wikitext2`, a GLUE task name (sst2, mrpc, ...), or `name:config:split`"
    )


def glue_train(task: str, data_dir: str | Path | None):
    """The examples a GLUE task trains on here (see `evaluate.glue.glue_split`), never its evaluation rows."""
    from edgeprune.evaluate.glue import glue_split

    return glue_split(task, data_dir, "train")[0]


def labelled_batch(
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    data_dir: str | Path | None = None,
    n_samples: int = 32,
    max_length: int = 128,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(input ids, the other token inputs, labels) of `n_samples` seeded training examples of a GLUE task, padded."""
    from edgeprune.evaluate.glue import encode, glue_spec

    examples = glue_train(task, data_dir)
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(examples), generator=gen)[: min(n_samples, len(examples))].sort().values
    chosen = [examples[i] for i in picked.tolist()]
    encoded = dict(encode(tokenizer, chosen, max_length))
    regression = glue_spec(task).labels is None
    labels = torch.tensor([e.label for e in chosen], dtype=torch.float if regression else torch.long)
    return encoded.pop("input_ids"), encoded, labels


def load_dataset_text(name: str, config: str, split: str) -> str:
    """Join the `text` column of a Hugging Face dataset (needs the hub, or a local datasets cache)."""
    try:
        import datasets
    except ImportError:
        raise EdgepruneError("dataset names need the `datasets` package: pip install datasets") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except Exception as err:  # the hub's errors vary by cause; all mean "not available here"
        raise EdgepruneError(
            f"cannot load dataset {name}:{config}:{split} ({type(err).__name__}): use a local text file instead"
        ) from None
    column = "text" if "text" in rows.column_names else rows.column_names[0]
    return "\n".join(str(t) for t in rows[column])


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The whole text as one stream of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """`n_samples` random windows of `seq_len` tokens, [n_samples, seq_len], seeded."""
    if len(tokens) < seq_len:
        raise EdgepruneError(
            f"calibration text has {len(tokens)} tokens, fewer than one window of {seq_len}: "
            "give a longer text or a smaller --calib-seq-len"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def disjoint_windows(tokens: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to `max_windows` non-overlapping windows of `seq_len` tokens, spread evenly over the stream, in text order.

    For the re-fit, which learns width² coefficients: random windows of a short text overlap and repeat
    tokens instead of adding new ones, and its check windows (the last ones) must share no token with
    the windows it fits on.
    """
    n = len(tokens) // seq_len
    if n == 0:
        raise EdgepruneError(
            f"calibration text has {len(tokens)} tokens, fewer than one window of {seq_len}: "
            "give a longer text or a smaller --calib-seq-len"
        )
    picked = torch.linspace(0, n - 1, min(n, max_windows)).round().long()
    return tokens[: n * seq_len].reshape(n, seq_len)[picked]


def calibration_batch(
    tokenizer: PreTrainedTokenizerBase,
    source: str | Path | None = None,
    n_samples: int = 32,
    seq_len: int = 128,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> torch.Tensor:
    """Token ids [n_samples, seq_len] for scoring, from `source` (see `load_text`)."""
    return sample_windows(tokenize_text(tokenizer, load_text(source, data_dir)), n_samples, seq_len, seed)


@dataclass(frozen=True)
class CalibrationSettings:
    """Where calibration windows come from and their shape; `samples` None: the reader's default count."""

    source: str | None = None  # see `load_text`; None: the packaged text
    samples: int | None = None
    seq_len: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.samples is not None and self.samples < 1) or self.seq_len < 2:
            raise EdgepruneError("--calib-samples must be >= 1 and --calib-seq-len >= 2")

    def count(self, default: int) -> int:
        return default if self.samples is None else self.samples


@dataclass
class CalibrationText:
    """A calibration source tokenized once: windows come from `head`, never from the held-out tail."""

    head: torch.Tensor
    heldout: torch.Tensor

    def sample(self, settings: CalibrationSettings, default_samples: int = DEFAULT_WINDOWS) -> torch.Tensor:
        """Seeded windows [n, seq_len] from the head: `settings.samples` of them, else `default_samples`."""
        return sample_windows(self.head, settings.count(default_samples), settings.seq_len, settings.seed)


def read_calibration(
    tokenizer: PreTrainedTokenizerBase, source: str | Path | None, data_dir: str | Path | None = None
) -> CalibrationText:
    """`source` (see `load_text`) tokenized and split into the sampled head and the held-out tail."""
    tokens = tokenize_text(tokenizer, load_text(source, data_dir))
    cut = heldout_start(len(tokens))
    return CalibrationText(head=tokens[:cut], heldout=tokens[cut:])

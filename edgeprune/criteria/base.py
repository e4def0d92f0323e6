"""Scores per structural group, the criterion registry, and saving scores for reuse.

Every criterion returns one score per group, higher = keep: per layer, one score per FFN
neuron and one per query head. Scores are computed once and reused by every cut. A criterion
registers with its options (a dataclass: names, types, defaults, checks), whether it reads
calibration text or task labels, and how many calibration windows it reads by default.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from edgeprune.calibration import DEFAULT_WINDOWS
from edgeprune.errors import EdgepruneError
from edgeprune.models import FamilyAdapter
from edgeprune.outputs import atomic_output_file


@dataclass
class GroupScores:
    """One score per FFN neuron and per query head, per layer (higher = keep)."""

    ffn: list[torch.Tensor]
    heads: list[torch.Tensor]
    criterion: str = ""
    settings: dict = field(default_factory=dict)  # what produced them (calibration, options), to know when to reuse

    def check_matches(self, model: nn.Module, adapter: FamilyAdapter) -> None:
        """Refuse scores computed for a model with other widths."""
        widths = [adapter.widths(layer) for layer in adapter.layers(model)]
        shapes = [(len(f), len(h)) for f, h in zip(self.ffn, self.heads, strict=True)]
        if shapes != [(w.ffn, w.heads) for w in widths]:
            raise EdgepruneError(
                "the scores do not match this model's layer widths: score this model again with `edgeprune score`"
            )

    def save(self, path: Path) -> None:
        tensors = {f"ffn.{i}": s.contiguous().float() for i, s in enumerate(self.ffn)}
        tensors |= {f"heads.{i}": s.contiguous().float() for i, s in enumerate(self.heads)}
        metadata = {"criterion": self.criterion, "layers": str(len(self.ffn)), "settings": json.dumps(self.settings)}
        with atomic_output_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @staticmethod
    def is_scores_file(path: Path) -> bool:
        """Whether `save` wrote this file, so a new score may replace it."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # not a safetensors file at all
            return False
        return {"criterion", "layers"} <= set(meta)

    @classmethod
    def load(cls, path: Path) -> GroupScores:
        if not path.is_file():
            raise EdgepruneError(f"scores file {path} not found: create it with `edgeprune score ... -o {path}`")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        n = int(meta.get("layers", 0))
        return cls(
            ffn=[tensors[f"ffn.{i}"] for i in range(n)],
            heads=[tensors[f"heads.{i}"] for i in range(n)],
            criterion=meta.get("criterion", ""),
            settings=json.loads(meta.get("settings", "{}")),
        )


@dataclass
class ScoringInputs:
    """What a criterion may use: calibration token ids [N, L] (label-free), a seed, options.

    `options` are given as a dict of KEY -> value (or as the criterion's options dataclass);
    `score_groups` checks them and hands the criterion its options dataclass.

    `labels` ([N] class ids) and `token_inputs` (the tokenizer's other [N, L] tensors: attention_mask,
    token_type_ids) describe a padded batch of labelled sentences: only criteria registered with
    `takes_labels` (taylor, for a sequence classifier's task loss) accept them; the label-free
    ones read unpadded text windows.
    """

    calibration: torch.Tensor | None = None
    seed: int = 0
    options: typing.Any = field(default_factory=dict)
    labels: torch.Tensor | None = None
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    # Criteria that loop call progress(step, done, total) after each step, so a caller can show it.
    progress: Callable[[str, int, int], None] | None = None

    def report(self, step: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(step, done, total)


Criterion = Callable[[nn.Module, FamilyAdapter, ScoringInputs], GroupScores]


@dataclass(frozen=True)
class NoOptions:
    """The options of a criterion that takes none."""


@dataclass(frozen=True)
class CriterionSpec:
    """A registered criterion: its function and what it reads."""

    score: Criterion
    options: type = NoOptions  # a dataclass; its fields are the valid option names, its __post_init__ checks values
    needs_calibration: bool = False
    takes_labels: bool = False  # a sequence classifier's labelled sentences (see ScoringInputs)
    windows: int = DEFAULT_WINDOWS  # calibration windows it reads unless told otherwise

    def option_names(self) -> list[str]:
        return [f.name for f in fields(self.options)]


CRITERIA: dict[str, CriterionSpec] = {}


def register(
    name: str,
    options: type = NoOptions,
    needs_calibration: bool = False,
    takes_labels: bool = False,
    windows: int = DEFAULT_WINDOWS,
) -> Callable[[Criterion], Criterion]:
    """Add a criterion to the registry under `name` (the value of `--criterion`)."""

    def add(fn: Criterion) -> Criterion:
        CRITERIA[name] = CriterionSpec(fn, options, needs_calibration, takes_labels, windows)
        return fn

    return add


def criterion_spec(name: str) -> CriterionSpec:
    if name not in CRITERIA:
        raise EdgepruneError(f"unknown criterion '{name}': choose from {', '.join(sorted(CRITERIA))}")
    return CRITERIA[name]


def option_value(name: str, key: str, value: typing.Any, hint: typing.Any) -> typing.Any:
    """`value` as the field's type (`int | None` -> int): the CLI gives numbers as numbers, anything else as text."""
    kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if value is None or isinstance(value, kind):
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise EdgepruneError(f"{name} option {key}={value!r} is not of type {kind.__name__}") from None


def parse_options(name: str, given: typing.Any) -> typing.Any:
    """The named criterion's options dataclass from KEY -> value; unknown keys are refused, naming the valid ones."""
    spec = criterion_spec(name)
    if isinstance(given, spec.options):
        return given
    known = spec.option_names()
    unknown = sorted(set(given) - set(known))
    if unknown:
        valid = f"choose from {', '.join(known)}" if known else f"{name} takes none"
        raise EdgepruneError(f"unknown {name} option(s) {', '.join(unknown)}: {valid}")
    hints = typing.get_type_hints(spec.options)
    return spec.options(**{key: option_value(name, key, value, hints[key]) for key, value in given.items()})


def options_help() -> str:
    """Each criterion's option names, for the CLI's help."""
    return "; ".join(f"{name}: {', '.join(spec.option_names()) or 'none'}" for name, spec in sorted(CRITERIA.items()))


def score_groups(name: str, model: nn.Module, adapter: FamilyAdapter, inputs: ScoringInputs) -> GroupScores:
    """Score every group of `model` with the named criterion."""
    spec = criterion_spec(name)
    options = parse_options(name, inputs.options)
    if spec.needs_calibration and inputs.calibration is None:
        raise EdgepruneError(f"criterion '{name}' needs calibration text: pass --calibration FILE or a dataset name")
    if not spec.takes_labels and (inputs.labels is not None or inputs.token_inputs):
        labelled = sorted(n for n, s in CRITERIA.items() if s.takes_labels)
        raise EdgepruneError(
            f"criterion '{name}' is label-free and reads unpadded text windows: give labels and a padding mask "
            f"only to {', '.join(labelled)}"
        )
    scores = spec.score(model, adapter, replace(inputs, options=options))
    scores.criterion = name
    return scores

"""What a criterion scores from, built in one place for `score`, `prune` and `run`: the same criterion,
calibration and options give the same scores whichever command asks."""

from __future__ import annotations

from edgeprune.calibration import CalibrationSettings, CalibrationText, labelled_batch, read_calibration
from edgeprune.criteria.base import ScoringInputs, criterion_spec, parse_options
from edgeprune.evaluate.glue import GLUE_TASKS
from edgeprune.loading import LoadedModel, require_tokenizer
from edgeprune.models import CLASSIFIER, model_kind

MASK_OPTION = "mask_token_id"  # criteria with this option mask tokens for a masked-LM loss: the tokenizer knows its id


def scoring_inputs(
    name: str,
    loaded: LoadedModel,
    calibration: CalibrationSettings,
    options: dict,
    text: CalibrationText | None = None,
) -> ScoringInputs:
    """The named criterion's inputs, its options checked (unknown ones refused) before any text is read.

    A criterion that takes labels, scoring a sequence classifier on a GLUE task, gets the task's labelled
    training sentences (padded); any other criterion that reads text gets seeded windows from the head of
    the source (`text`, when the caller has read it already). Either way as many as `calibration.samples`,
    else the criterion's registered default.
    """
    spec = criterion_spec(name)
    given = dict(options)
    mask_id = getattr(loaded.tokenizer, "mask_token_id", None)
    if MASK_OPTION in spec.option_names() and mask_id is not None:
        given.setdefault(MASK_OPTION, mask_id)
    parsed = parse_options(name, given)
    if not spec.needs_calibration:
        return ScoringInputs(seed=calibration.seed, options=parsed)
    tokenizer = require_tokenizer(loaded.tokenizer, loaded.source, "calibration")
    if spec.takes_labels and model_kind(loaded.model) == CLASSIFIER and calibration.source in GLUE_TASKS:
        n = calibration.count(spec.windows)
        ids, token_inputs, labels = labelled_batch(
            tokenizer, calibration.source, None, n, calibration.seq_len, calibration.seed
        )
        return ScoringInputs(ids, calibration.seed, parsed, labels=labels, token_inputs=token_inputs)
    text = text or read_calibration(tokenizer, calibration.source)
    return ScoringInputs(text.sample(calibration, spec.windows), calibration.seed, parsed)

"""Pruning criteria, one file each; importing this package fills the registry."""

from edgeprune.criteria import fluctuation, magnitude, mi, random, taylor, wanda_sp  # noqa: F401  (registration)
from edgeprune.criteria.base import CRITERIA, GroupScores, ScoringInputs, options_help, score_groups
from edgeprune.criteria.inputs import scoring_inputs

__all__ = ["CRITERIA", "GroupScores", "ScoringInputs", "options_help", "score_groups", "scoring_inputs"]

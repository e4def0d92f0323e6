"""Guards in the style of optimum's test_all_models_tested: every registered criterion and every model
family is exercised by the parametrized tests, so registering a new one without tests fails here."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from conftest import TINY_MODELS, family_class, family_names, tiny_model

from edgeprune.criteria import CRITERIA
from edgeprune.models import FAMILIES, adapter_for

TESTS = Path(__file__).parent


def parametrized_values(argname: str) -> set:
    """Every value any test module's @pytest.mark.parametrize gives to `argname`."""
    found = set()
    for path in sorted(TESTS.glob("test_*.py")):
        module = importlib.import_module(path.stem)
        for name, test in vars(module).items():
            if not name.startswith("test_"):
                continue
            for mark in getattr(test, "pytestmark", []):
                if mark.name != "parametrize":
                    continue
                names = mark.args[0].split(",") if isinstance(mark.args[0], str) else list(mark.args[0])
                names = [n.strip() for n in names]
                if argname not in names:
                    continue
                for values in mark.args[1]:
                    values = values.values if isinstance(values, type(pytest.param(0))) else values
                    found.add(values[names.index(argname)] if len(names) > 1 else values)
    return found


def test_every_registered_criterion_is_tested():
    assert set(CRITERIA) - parametrized_values("criterion") == set()


def test_every_model_family_is_tested():
    assert {family.model_types[0] for family in FAMILIES} - parametrized_values("family") == set()


@pytest.mark.parametrize("family", family_names())
def test_every_family_has_a_tiny_model_of_its_own(family):
    assert family in TINY_MODELS, f"add a tiny {family} model to tests/conftest.py TINY_MODELS"
    assert type(adapter_for(tiny_model(family).config)) is family_class(family)

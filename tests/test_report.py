"""The run's report: what it says about the final check's spread."""

from __future__ import annotations

import pytest

from edgeprune.report import paired_spread_lines


def test_the_final_checks_per_run_speedups_are_reported_as_a_range():
    profile = {
        "final": {"samples": {"latency_ms": [50.0, 40.0, 60.0]}},
        "dense": {"samples": {"latency_ms": [100.0, 100.0, 90.0]}},
    }
    (blank, line) = paired_spread_lines(profile)
    assert blank == "" and "3 runs" in line and "1.50-2.50x" in line  # 90/60, 100/40


@pytest.mark.parametrize("profile", [{}, {"final": {"samples": {"latency_ms": [5.0]}}, "dense": {"samples": {}}}])
def test_no_spread_line_without_paired_runs(profile):
    assert paired_spread_lines(profile) == []

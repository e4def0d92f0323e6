"""Budget search with an injected, deterministic latency model (the profiler is an interface)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from edgeprune.budget import Budget, Probe, ProbeLog, UnreachableBudget, search_candidates
from edgeprune.errors import EdgepruneError

DENSE_PARAMS = 1_000_000


def params_at(s: float) -> int:
    return int(DENSE_PARAMS * (1 - 0.8 * s))


def latency_at(s: float) -> float:
    """Deterministic, monotone, not linear (so the secant has work to do)."""
    return 100.0 * (1 - 0.6 * s) ** 1.3


class FakeProfiler:
    def __init__(self, fail_after: int | None = None):
        self.calls: list[float] = []
        self.fail_after = fail_after

    def __call__(self, s: float) -> Probe:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # a crash in the middle of the search
        self.calls.append(s)
        return Probe(sparsity=s, params=params_at(s), latency_ms=latency_at(s), onnx_mb=params_at(s) * 4 / 1e6)


def search(tmp_path, budgets, profiler=None, **kw):
    profiler = profiler or FakeProfiler()
    log = ProbeLog(tmp_path / "search.jsonl", {"budgets": [b.__dict__ for b in budgets]})
    # one precision: the sparsity search alone
    return search_candidates(lambda _, s: profiler(s), budgets, params_at, log, precisions=("fp32",), **kw), profiler


@pytest.mark.parametrize("speedup", [1.1, 1.25, 1.5])
def test_converges_to_least_pruned_plan_meeting_speedup(tmp_path, speedup):
    result, profiler = search(tmp_path, [Budget("speedup", speedup)], tol=0.01)
    exact = (1 - (1 / speedup) ** (1 / 1.3)) / 0.6  # where latency_at(s) == 100 / speedup
    assert result.best.latency_ms <= 100.0 / speedup
    assert exact <= result.best.sparsity <= exact + 0.02
    assert len(profiler.calls) <= 1 + 8
    assert all(p.latency_ms > 100.0 / speedup for p in result.probes if p.sparsity < result.best.sparsity)


def test_dense_meeting_budget_needs_no_pruning(tmp_path):
    result, profiler = search(tmp_path, [Budget("latency_ms", 150.0)])
    assert result.best.sparsity == 0.0 and profiler.calls == [0.0]


def test_params_budget_solved_analytically_then_verified(tmp_path):
    result, profiler = search(tmp_path, [Budget("params", 800_000)])
    assert result.best.params <= 800_000
    assert result.best.sparsity == pytest.approx(0.25, abs=0.002)
    assert len(profiler.calls) == 2  # dense reference + the analytic answer, verified


def test_several_budgets_must_all_hold(tmp_path):
    result, _ = search(tmp_path, [Budget("speedup", 1.2), Budget("params", 700_000)])
    assert result.best.params <= 700_000 and 100.0 / result.best.latency_ms >= 1.2


def test_unreachable_budget_names_best_achievable(tmp_path):
    with pytest.raises(UnreachableBudget, match=r"speedup over dense 2\.\d+ \(budget >= 5\)"):
        search(tmp_path, [Budget("speedup", 5.0)], max_sparsity=0.7)
    lines = (tmp_path / "search.jsonl").read_text().splitlines()
    assert len(lines) >= 3  # settings + the probes are kept for the user


def test_unreachable_params_budget(tmp_path):
    with pytest.raises(UnreachableBudget, match="parameters"):
        search(tmp_path, [Budget("params", 10)], max_sparsity=0.5)


def test_resume_after_crash_does_not_redo_finished_probes(tmp_path):
    budgets = [Budget("speedup", 1.4)]
    tight = {"latency_rtol": 0.001, "tol": 0.002}  # forces more than three probes
    with pytest.raises(KeyboardInterrupt):
        search(tmp_path, budgets, profiler=FakeProfiler(fail_after=3), **tight)
    finished = [json.loads(line)["sparsity"] for line in (tmp_path / "search.jsonl").read_text().splitlines()[1:]]
    assert len(finished) == 3
    resumed, profiler = search(tmp_path, budgets, **tight)
    assert profiler.calls and not set(profiler.calls) & set(finished)  # continues; nothing measured twice
    fresh, _ = search(tmp_path / "fresh", budgets, **tight)
    assert resumed.best == fresh.best  # same answer as an uninterrupted search


def test_log_from_other_settings_is_refused(tmp_path):
    search(tmp_path, [Budget("speedup", 1.2)])
    with pytest.raises(EdgepruneError, match="other settings"):
        search(tmp_path, [Budget("speedup", 1.3)])


def test_bad_budgets_refused():
    with pytest.raises(EdgepruneError, match="unknown budget"):
        Budget("joules", 3)
    with pytest.raises(EdgepruneError, match="speedup must be >= 1"):
        Budget("speedup", 0.5)


def test_memory_budget_solved_from_dense_size_then_verified(tmp_path):
    result, profiler = search(tmp_path, [Budget("memory_mb", 3.2)])  # dense file is 4.0 MB
    assert result.best.onnx_mb <= 3.2
    assert result.best.sparsity == pytest.approx(0.25, abs=0.002)
    assert len(profiler.calls) == 2


class QuantizedSizeProfiler(FakeProfiler):
    """A quantized file: a part that no cut shrinks (the vocabulary matrix) plus blocks that shrink unevenly."""

    def __call__(self, s: float) -> Probe:
        probe = super().__call__(s)
        return replace(probe, onnx_mb=1.0 + 2.0 * (1 - 0.6 * s) ** 1.2)


def test_size_budget_on_a_quantized_file_converges_by_secant_on_the_size(tmp_path):
    """The parameter-scaled bound undershoots such a file; the secant on MB then lands within 1% in few probes."""
    from edgeprune.budget import SIZE_RTOL

    result, profiler = search(tmp_path, [Budget("memory_mb", 2.5)], profiler=QuantizedSizeProfiler())
    exact = (1 - (1.5 / 2.0) ** (1 / 1.2)) / 0.6  # where the size reaches 2.5 MB
    assert 2.5 * (1 - SIZE_RTOL) <= result.best.onnx_mb <= 2.5
    assert exact <= result.best.sparsity <= exact + 0.02
    assert len(profiler.calls) <= 4  # the unpruned probe and at most three cuts


def test_a_flat_noisy_slope_never_sends_the_next_probe_past_doubling():
    """Two timings 1% apart at 10% and 25% (noise) extrapolate to a 2.5x target near s=1: the guess doubles instead."""
    from edgeprune.budget import next_guess

    dense = Probe(sparsity=0.0, params=DENSE_PARAMS, latency_ms=100.0)
    timed = ((0.1, 60.0), (0.25, 59.0))
    at = [Probe(sparsity=s, params=params_at(s), latency_ms=ms, speedup=100.0 / ms) for s, ms in timed]
    guess = next_guess(at, [], dense, (40.0, None), max_sparsity=0.8)
    assert guess == pytest.approx(0.5)


class DriftingProfiler(FakeProfiler):
    """The machine slows down 2x on every other probe; the paired speedup (vs dense) stays exact."""

    def __call__(self, s: float) -> Probe:
        self.calls.append(s)
        drift = 2.0 if len(self.calls) % 2 == 0 else 1.0
        paired = None if s == 0 else latency_at(0.0) / latency_at(s)
        return Probe(sparsity=s, params=params_at(s), latency_ms=latency_at(s) * drift, speedup=paired)


def test_paired_speedup_makes_search_immune_to_drift(tmp_path):
    steady, _ = search(tmp_path / "steady", [Budget("speedup", 1.3)])
    drifting, _ = search(tmp_path / "drift", [Budget("speedup", 1.3)], profiler=DriftingProfiler())
    assert drifting.best.sparsity == steady.best.sparsity


def test_tightened_budgets_leave_a_margin_for_noise(tmp_path):
    plain, _ = search(tmp_path / "plain", [Budget("speedup", 1.3)])
    safe, _ = search(tmp_path / "safe", [Budget("speedup", 1.3).tightened(0.02)])
    assert 100.0 / safe.best.latency_ms >= 1.3 * 1.02
    assert safe.best.sparsity > plain.best.sparsity
    assert Budget("latency_ms", 50).tightened(0.02).limit == pytest.approx(49.0)
    assert Budget("params", 10).tightened(0.02).limit == 10  # analytic budgets need no margin


# --- precision as a lever: quantization-only first, then pruning per precision, quality decides ---

# Each precision speeds the whole workload by a fixed factor and adds a fixed divergence from dense;
# pruning adds divergence growing with sparsity (a deterministic stand-in for held-out KL).
QUANT_SPEEDUP = {"fp32": 1.0, "int8": 1.4, "int4": 1.6}
QUANT_DIVERGENCE = {"fp32": 0.0, "int8": 0.004, "int4": 0.08}
QUANT_BYTES = {"fp32": 4.0, "int8": 1.1, "int4": 0.6}


class FakeCandidates:
    """(precision, sparsity) -> Probe with a paired speedup, file size and divergence."""

    def __init__(self, prune_divergence: float = 1.0):
        self.calls: list[tuple[str, float]] = []
        self.prune_divergence = prune_divergence

    def __call__(self, precision: str, s: float) -> Probe:
        self.calls.append((precision, s))
        latency = latency_at(s) / QUANT_SPEEDUP[precision]
        return Probe(
            sparsity=s,
            params=params_at(s),
            precision=precision,
            latency_ms=latency,
            speedup=None if (precision, s) == ("fp32", 0.0) else latency_at(0.0) / latency,
            onnx_mb=params_at(s) * QUANT_BYTES[precision] / 1e6,
            divergence=QUANT_DIVERGENCE[precision] + self.prune_divergence * s**2,
        )


def search_all(tmp_path, budgets, fake=None, **kw):
    from edgeprune.budget import search_candidates

    fake = fake or FakeCandidates()
    log = ProbeLog(tmp_path / "search.jsonl", {"budgets": [b.__dict__ for b in budgets]})
    kw.setdefault("precisions", ("fp32", "int8", "int4"))  # the rules, on the three precisions the tables name
    return search_candidates(fake, budgets, params_at, log, **kw), fake


def test_quantization_only_candidate_wins_when_it_meets_the_budget(tmp_path):
    result, fake = search_all(tmp_path, [Budget("speedup", 1.3)])
    assert result.best.key == ("int8", 0.0)  # int4 is faster but further from dense
    # only fp32, closer to dense than int8, was tried with a cut (and lost: the cut costs more than int8)
    assert {p for p, s in fake.calls if s > 0} == {"fp32"}
    assert "int8 unpruned" in result.reason and "int4 unpruned" in result.reason


def test_quantized_candidate_beats_a_pruned_one_that_also_meets_the_budget(tmp_path):
    """fp32 meets 1.3x only by pruning; the quantized model meets it unpruned and is closer to dense."""
    result, _ = search_all(tmp_path, [Budget("speedup", 1.3)], precisions=("fp32", "int8"))
    assert result.best.key == ("int8", 0.0)
    fp32_only, _ = search_all(tmp_path / "fp32", [Budget("speedup", 1.3)], precisions=("fp32",))
    assert fp32_only.best.precision == "fp32" and fp32_only.best.sparsity > 0
    assert fp32_only.best.divergence > result.best.divergence


def test_budget_only_pruning_plus_quantization_meets_is_met_with_both(tmp_path):
    result, fake = search_all(tmp_path, [Budget("speedup", 2.0)], max_sparsity=0.8)
    assert result.best.sparsity > 0 and result.best.precision in ("int8", "int4")
    assert QUANT_SPEEDUP[result.best.precision] * latency_at(0.0) / latency_at(result.best.sparsity) >= 2.0
    # the fastest precision was searched first; int8 and fp32 need deeper cuts, which (by the cost of the cut
    # int4 measured, extrapolated at least linearly) cannot come closer to dense: neither is probed with a cut
    pruned = [p for p, s in fake.calls if s > 0]
    assert set(pruned) == {"int4"} and result.best.precision == "int4"
    int8_needs = (1 - (1.4 / 2.0) ** (1 / 1.3)) / 0.6  # where int8 reaches 2.0x: what skipping it gave up
    assert QUANT_DIVERGENCE["int8"] + int8_needs**2 > result.best.divergence
    assert "not shipped: " in result.reason and "int8: cannot beat int4" in result.reason  # the report says why


def test_precision_restriction_is_obeyed(tmp_path):
    result, fake = search_all(tmp_path, [Budget("speedup", 1.3)], precisions=("int4",))
    assert result.best.precision == "int4"
    assert {p for p, _ in fake.calls} <= {"fp32", "int4"}  # fp32 dense is always the reference


def test_unreachable_candidates_name_each_precision(tmp_path):
    with pytest.raises(UnreachableBudget, match=r"(?=.*fp32: )(?=.*int8: )(?=.*int4: )"):
        search_all(tmp_path, [Budget("speedup", 9.0)], max_sparsity=0.5)


def test_memory_budget_reached_by_quantization_alone(tmp_path):
    result, fake = search_all(tmp_path, [Budget("memory_mb", 1.5)])  # fp32 dense 4 MB, int8 1.1 MB
    assert result.best.key == ("int8", 0.0) and {p for p, s in fake.calls if s > 0} <= {"fp32"}


def test_a_light_cut_on_a_faithful_precision_beats_a_coarse_one(tmp_path):
    """int4 alone meets 1.5x but drifts far from dense; int8 plus a light cut meets it closer to dense."""
    coarse = {"fp32": 0.0, "int8": 0.004, "int4": 0.3}
    fake = FakeCandidates(prune_divergence=0.5)
    fake_divergence = QUANT_DIVERGENCE.copy()
    QUANT_DIVERGENCE.update(coarse)
    try:
        result, _ = search_all(tmp_path, [Budget("speedup", 1.5)], fake=fake)
    finally:
        QUANT_DIVERGENCE.update(fake_divergence)
    assert result.best.precision == "int8" and result.best.sparsity > 0
    assert ("int4", 0.0) in {c.key for c in result.candidates}  # it was a candidate, and lost on quality
    assert "pruned" in result.reason


class RefusingCandidates(FakeCandidates):
    """int8 fails its verification against PyTorch (a model that does not tolerate it) for sparsity in [lo, hi)."""

    def __init__(self, lo: float = 0.0, hi: float = 2.0):
        super().__init__()
        self.lo, self.hi = lo, hi

    def __call__(self, precision: str, s: float) -> Probe:
        probe = super().__call__(precision, s)
        refused = precision == "int8" and self.lo <= s < self.hi
        return replace(probe, refused="int8 agrees on top-1 for 80%") if refused else probe


def test_a_precision_the_model_does_not_tolerate_is_never_shipped(tmp_path):
    """int8 alone would win at 1.3x (closest to dense) but its file fails verification: int4 ships, int8 is named."""
    result, fake = search_all(tmp_path, [Budget("speedup", 1.3)], fake=RefusingCandidates())
    assert result.best.key == ("int4", 0.0)
    assert {p for p, s in fake.calls if s > 0} <= {"fp32"}  # a refused precision is not searched with cuts
    with pytest.raises(UnreachableBudget, match=r"int8: int8 agrees on top-1 for 80%"):
        search_all(tmp_path / "only", [Budget("speedup", 1.3)], fake=RefusingCandidates(), precisions=("int8",))


def test_a_refused_cut_counts_as_a_miss(tmp_path):
    """Pruned int8 probes refused below 30%: the least sparsity that ships is at least that."""
    fake = RefusingCandidates(0.01, 0.3)
    result, _ = search_all(tmp_path, [Budget("speedup", 1.6)], fake=fake, precisions=("int8",))
    assert result.best.precision == "int8" and result.best.sparsity >= 0.3 and not result.best.refused


def test_candidate_search_resumes_without_remeasuring(tmp_path):
    first, fake = search_all(tmp_path, [Budget("speedup", 2.0)])
    again, fake_again = search_all(tmp_path, [Budget("speedup", 2.0)])
    assert fake_again.calls == [] and again.best == first.best and again.measured == 0


def test_a_precision_that_cannot_beat_the_answer_is_abandoned_early(tmp_path):
    """fp32 must be cut ~40% to reach 1.3x; its first failing probe is already further from dense than int8."""
    result, fake = search_all(tmp_path, [Budget("speedup", 1.3)], fake=FakeCandidates(prune_divergence=5.0))
    assert result.best.key == ("int8", 0.0)
    # the first guess (ideal latency model) passes; the next, lighter cut misses and is already worse: stop
    assert len([1 for p, s in fake.calls if p == "fp32" and s > 0]) == 2


# The precision levers as measured on the 2-core AVX2 CPU without VNNI (benchmarks/RESULTS.md, "Precision
# levers"): int8 in 128 blocks is faster than int4 there, and every lever sits between int8 and int4 in quality.
LEVER_SPEEDUP = {"fp32": 1.0, "int8": 1.22, "int8-b64": 1.4, "int8-b128": 1.6, "int4-mixed": 1.45, "int4": 1.55}
LEVER_DIVERGENCE = {"fp32": 0.0, "int8": 0.005, "int8-b64": 0.008, "int8-b128": 0.012, "int4-mixed": 0.06, "int4": 0.29}


def test_auto_search_measures_every_precision_lever_and_ships_the_closest_meeting_one(tmp_path):
    from edgeprune.budget import AUTO_PRECISIONS, PRECISIONS

    assert AUTO_PRECISIONS == ("fp32", "int8", "int8-b64", "int8-b128", "int4-mixed", "int4-fit", "int4")
    assert (*AUTO_PRECISIONS, "dynamic-int8") == PRECISIONS
    timed = tuple(p for p in AUTO_PRECISIONS if p != "int4-fit")  # made for a size budget only (run.py)
    saved = QUANT_SPEEDUP.copy(), QUANT_DIVERGENCE.copy(), QUANT_BYTES.copy()
    QUANT_SPEEDUP.update(LEVER_SPEEDUP)
    QUANT_DIVERGENCE.update(LEVER_DIVERGENCE)
    QUANT_BYTES.update({"int8-b64": 1.05, "int8-b128": 1.05, "int4-mixed": 0.8})
    try:
        fake = FakeCandidates(prune_divergence=5.0)
        result, _ = search_all(tmp_path, [Budget("speedup", 1.3)], fake=fake, precisions=timed)
        faster, _ = search_all(tmp_path / "1.5", [Budget("speedup", 1.5)], precisions=timed)
    finally:
        for table, old in zip((QUANT_SPEEDUP, QUANT_DIVERGENCE, QUANT_BYTES), saved, strict=True):
            table.clear()
            table.update(old)
    assert {p for p, s in fake.calls if s == 0} == set(timed)  # every lever measured unpruned
    assert result.best.key == ("int8-b64", 0.0)  # int8 misses 1.3x; b64 meets it closest to dense
    assert "int8-b128 unpruned" in result.reason and "int4 unpruned" in result.reason
    assert faster.best.key == ("int8-b128", 0.0)  # faster than int4 here and far closer to dense


def quantized_size(s: float) -> float:
    return 1.0 + 2.0 * (1 - 0.6 * s) ** 1.2  # QuantizedSizeProfiler's file


@pytest.mark.parametrize(("error_mb", "cut_probes"), [(0.004, 1), (0.05, 2)])
def test_a_size_model_aims_the_cut_probes_at_the_budget(tmp_path, error_mb, cut_probes):
    """Cut sizes predicted from the unpruned probe: one cut probe when the prediction is near, two when it is off
    by an error growing with the cut (the second aimed by the first one's measured error)."""
    from edgeprune.budget import SIZE_RTOL

    result, profiler = search(
        tmp_path,
        [Budget("memory_mb", 2.5)],
        profiler=QuantizedSizeProfiler(),
        size_at=lambda _start, s: quantized_size(s) - error_mb * s / 0.35,
    )
    assert 2.5 * (1 - SIZE_RTOL) <= result.best.onnx_mb <= 2.5
    assert len(profiler.calls) == 1 + cut_probes


def test_the_divergence_floor_extrapolates_a_measured_cut_at_least_linearly(tmp_path):
    from edgeprune.budget import CUT_COST_SAFETY, Search, divergence_floor

    fake = FakeCandidates(prune_divergence=1.0)  # cost of a cut: s**2, convex
    log = ProbeLog(tmp_path / "search.jsonl", {})
    found = Search(fake, log, 0.8)
    int8 = found("int8", 0.0)
    assert divergence_floor(found, int8, 0.4) is None  # no cut measured yet
    found("int4", 0.0)
    found("int4", 0.2)  # costs 0.04 over int4 alone
    floor = divergence_floor(found, int8, 0.4)
    assert floor == pytest.approx(QUANT_DIVERGENCE["int8"] + CUT_COST_SAFETY * 0.04 * 2)
    assert floor < fake("int8", 0.4).divergence  # a lower bound of what the probe would measure
    assert divergence_floor(found, int8, 0.1) is None  # a deeper cut measured says nothing about a lighter one

"""Budgets and the search for the best-quality model that meets them all.

A candidate is a precision (fp32, weight-only int8/int4, ...) and a global sparsity; scores
are fixed. Quantization-only candidates are tried first (seconds each); only when none meets
the budgets is pruning searched, on top of each precision: per precision the least sparsity
that meets every budget, then the candidates are compared on quality (divergence from the
dense model on held-out text, lower is better). Parameter and memory budgets are solved
analytically (bytes per group are known once a precision's unpruned file is: its first cut
probe is aimed just under a size budget); latency is measured: each probe is "cut at
sparsity s -> export -> quantize -> profile", and the search brackets the smallest passing s
with secant steps on the measured latency, falling back to bisection. A precision whose
needed cut must cost more divergence than the answer in hand (cut costs grow at least
linearly in the sparsity) is abandoned without probing it. Every probe is
appended to a JSONL log, so rerunning the same search replays finished probes instead of
measuring them again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgeprune.errors import EdgepruneError
from edgeprune.precisions import AUTO_PRECISIONS, PRECISIONS

BUDGET_KINDS = {
    "latency_ms": "latency p50 (ms)",
    "speedup": "speedup over dense",
    "memory_mb": "ONNX size on disk (MB)",
    "peak_mb": "peak resident memory (MB)",
    "params": "parameters",
}
TIMED_KINDS = ("latency_ms", "speedup")  # what only a real device's clock can tell
SPARSITY_DECIMALS = 3
BUDGET_RULES = {
    "latency_ms": "a latency budget must be > 0 ms",
    "speedup": "a speedup must be >= 1 (1 = as fast as dense)",
    "memory_mb": "a size budget must be > 0 MB",
    "peak_mb": "a memory budget must be > 0 MB",
    "params": "a parameter budget must be a positive whole number",
}


@dataclass(frozen=True)
class Probe:
    """What one candidate cut measured. Fields a budget does not need may be None."""

    sparsity: float
    params: int
    precision: str = "fp32"
    latency_ms: float | None = None
    speedup: float | None = None  # measured alternating against dense: robust to machine drift
    onnx_mb: float | None = None
    peak_mb: float | None = None
    divergence: float | None = None  # from the dense model on held-out text (KL nats/token): lower is better
    extra: dict = field(default_factory=dict)
    refused: str = ""  # why this candidate cannot ship (its quantized file failed verification), else empty

    @property
    def key(self) -> tuple[str, float]:
        return (self.precision, self.sparsity)


@dataclass(frozen=True)
class Budget:
    """One limit: `latency_ms`, `memory_mb`, `peak_mb`, `params` (at most) or `speedup` (at least)."""

    kind: str
    limit: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise EdgepruneError(f"unknown budget '{self.kind}': choose from {', '.join(BUDGET_KINDS)}")
        if not budget_limit_valid(self.kind, self.limit):
            rule = BUDGET_RULES[self.kind] if math.isfinite(self.limit) else "a budget must be a finite number"
            raise EdgepruneError(f"budget {self.kind}={self.limit} is not valid: {rule}")

    @property
    def measured(self) -> bool:
        """Needs a profiled probe (not only the analytic parameter count)."""
        return self.kind != "params"

    def value(self, probe: Probe, dense: Probe) -> float:
        if self.kind == "speedup":
            return speedup_of(probe, dense)
        return {
            "latency_ms": latency_of(probe, dense),
            "memory_mb": probe.onnx_mb,
            "peak_mb": probe.peak_mb,
            "params": probe.params,
        }[self.kind]

    def tightened(self, margin: float) -> Budget:
        """The same budget with a safety margin on timed kinds, so a probe that passes by less than
        the measurement noise is not chosen and then missed in the final alternating check."""
        if self.kind == "speedup":
            return Budget(self.kind, self.limit * (1 + margin))
        if self.kind == "latency_ms":
            return Budget(self.kind, self.limit * (1 - margin))
        return self

    def met(self, probe: Probe, dense: Probe) -> bool:
        value = self.value(probe, dense)
        return value >= self.limit if self.kind == "speedup" else value <= self.limit

    def describe(self, probe: Probe, dense: Probe) -> str:
        sign = ">=" if self.kind == "speedup" else "<="
        return f"{BUDGET_KINDS[self.kind]} {self.value(probe, dense):,.4g} (budget {sign} {self.limit:,.4g})"


def budget_limit_valid(kind: str, limit: float) -> bool:
    """NaN passes every comparison, so finiteness is checked first; then the kind's own rule."""
    if not math.isfinite(limit):
        return False
    if kind == "speedup":
        return limit >= 1
    if kind == "params":
        return limit > 0 and limit == int(limit)
    return limit > 0


def speedup_of(probe: Probe, dense: Probe) -> float:
    """The paired speedup where one was measured, else the ratio of separately measured latencies."""
    if probe.key == dense.key:
        return 1.0
    return probe.speedup if probe.speedup is not None else dense.latency_ms / probe.latency_ms


def latency_of(probe: Probe, dense: Probe) -> float:
    """Latency on the dense measurement's scale: dense latency over the paired speedup when there is one."""
    return dense.latency_ms / speedup_of(probe, dense)


class UnreachableBudget(EdgepruneError):
    """Even the most pruned allowed model misses a budget; `detail` is the miss alone, for combined messages."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


def all_met(budgets: list[Budget], probe: Probe, dense: Probe) -> bool:
    """A refused candidate meets nothing: the final export would refuse it too."""
    return not probe.refused and all(b.met(probe, dense) for b in budgets)


def latency_target(budgets: list[Budget], dense: Probe) -> float | None:
    """The strictest latency any budget asks for, in ms."""
    targets = [b.limit for b in budgets if b.kind == "latency_ms"]
    targets += [dense.latency_ms / b.limit for b in budgets if b.kind == "speedup"]
    return min(targets) if targets else None


def smallest_sparsity(predicate: Callable[[float], bool], lo: float, hi: float, tol: float = 1e-3) -> float | None:
    """Smallest s in [lo, hi] where a monotone `predicate` holds (bisection), or None."""
    if predicate(lo):
        return lo
    if not predicate(hi):
        return None
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if predicate(mid) else (mid, hi)
    return hi


class ProbeLog:
    """Append-only JSONL record of a search: a header with the settings, then one line per probe."""

    def __init__(self, path: Path, settings: dict):
        self.path = Path(path)
        self.settings = settings
        self.probes: dict[tuple[str, float], Probe] = {}
        if self.path.is_file():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"kind": "settings", **settings})

    def _load(self) -> None:
        lines = self._complete_lines()
        if not lines:  # killed while writing the header: start afresh
            self._append({"kind": "settings", **self.settings})
            return
        records = [self._parse(number, line) for number, line in enumerate(lines, 1)]
        header = records[0]
        saved = {k: v for k, v in header.items() if k != "kind"}
        if header.get("kind") != "settings" or saved != json.loads(json.dumps(self.settings)):
            raise EdgepruneError(
                f"{self.path} records a search with other settings: rerun with those, choose another -o, "
                "or pass --overwrite to start that run folder afresh"
            )
        for number, record in enumerate(records[1:], 2):
            if record.get("kind") == "probe":
                try:
                    probe = Probe(**{k: v for k, v in record.items() if k != "kind"})
                except TypeError:
                    raise self._damaged(number, "is not a probe record") from None
                self.probes[probe.key] = probe

    def _complete_lines(self) -> list[str]:
        """The log's lines; a last line without its newline was torn by a kill mid-write and is cut off."""
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            kept = text[: text.rfind("\n") + 1]
            with self.path.open("r+") as f:
                f.truncate(len(kept.encode()))
            text = kept
        return [line for line in text.splitlines() if line.strip()]

    def _parse(self, number: int, line: str) -> dict:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise self._damaged(number, "is not JSON") from None
        if not isinstance(record, dict):
            raise self._damaged(number, "is not a JSON object")
        return record

    def _damaged(self, number: int, problem: str) -> EdgepruneError:
        return EdgepruneError(
            f"{self.path} line {number} {problem}: the search log is damaged; use another output folder or --overwrite"
        )

    def _append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def record(self, probe: Probe) -> None:
        self.probes[probe.key] = probe
        self._append({"kind": "probe", **asdict(probe)})


@dataclass
class SearchResult:
    """The chosen probe, the dense reference, and every probe in the order the search asked for it."""

    best: Probe
    dense: Probe
    probes: list[Probe]
    measured: int  # probes actually run (the rest came from the log)
    candidates: list[Probe] = field(default_factory=list)  # per precision, the best probe meeting the budgets
    reason: str = ""  # one line: why `best` was chosen


SizeModel = Callable[[Probe, float], "float | None"]  # (unpruned probe, sparsity) -> predicted file MB, or None


class Search:
    """Probes by (precision, sparsity) through the log: each is measured once, then replayed.

    `size_at`, when given, predicts a cut file's size from its precision's unpruned probe (bytes per
    group are known once the unpruned file is), so size budgets aim their first probe instead of bracketing.
    """

    def __init__(
        self,
        run_probe: Callable[[str, float], Probe],
        log: ProbeLog,
        max_sparsity: float,
        size_at: SizeModel | None = None,
    ):
        self.run_probe, self.log, self.max_sparsity = run_probe, log, max_sparsity
        self.size_at = size_at or (lambda _start, _s: None)
        self.order: list[Probe] = []
        self.measured = 0

    def __call__(self, precision: str, s: float) -> Probe:
        s = round(min(max(s, 0.0), self.max_sparsity), SPARSITY_DECIMALS)
        if (precision, s) not in self.log.probes:
            self.log.record(self.run_probe(precision, s))
            self.measured += 1
        probe = self.log.probes[(precision, s)]
        if probe not in self.order:
            self.order.append(probe)
        return probe


def search_candidates(
    run_probe: Callable[[str, float], Probe],
    budgets: list[Budget],
    params_at: Callable[[float], int],
    log: ProbeLog,
    precisions: tuple[str, ...] = AUTO_PRECISIONS,
    max_sparsity: float = 0.8,
    max_probes: int = 8,
    tol: float = 0.01,
    latency_rtol: float = 0.03,
    ideal_latency_slope: float = 0.5,
    size_at: SizeModel | None = None,
) -> SearchResult:
    """The best-quality candidate meeting every budget, or UnreachableBudget naming what each precision reached.

    The fp32 dense model is always measured first: it is the reference of every speedup and divergence.
    Quantization-only candidates come next (seconds each); pruning is searched (per precision, at most
    `max_probes` probes each) when none of them meets the budgets, or, when some do, on the precisions
    closer to dense that missed: a light cut on top of int8 can beat int4 alone.
    """
    check_budgets_given(budgets)
    search = Search(run_probe, log, max_sparsity, size_at)
    dense = search("fp32", 0.0)
    unpruned = [dense] + [search(p, 0.0) for p in precisions if p != "fp32"]
    unpruned = [p for p in unpruned if p.precision in precisions]
    misses = [f"{p.precision}: {p.refused}" for p in unpruned if p.refused]
    unpruned = [p for p in unpruned if not p.refused]  # a precision the model does not tolerate is not searched
    meeting = [p for p in unpruned if all_met(budgets, p, dense)]
    best_unpruned = min(meeting, key=quality_rank) if meeting else None
    # pruning is searched on the precisions that could still beat the best unpruned answer: all of them
    # when none meets the budgets, else only those closer to dense that missed (a light cut may then win);
    # the one needing the lightest cut first (the fastest, or under size budgets alone the smallest file), so
    # each later one is abandoned as soon as it is, or must be, further from dense than the best answer in hand
    candidates = lightest_cut_first(unpruned, dense, budgets)
    to_prune = [p.precision for p in candidates if best_unpruned is None or better(p, best_unpruned)]
    winners = list(meeting)
    for precision in to_prune:
        try:
            winners.append(
                least_sparsity(
                    search,
                    precision,
                    dense,
                    budgets,
                    params_at,
                    max_probes,
                    tol,
                    latency_rtol,
                    ideal_latency_slope,
                    beat=min(winners, key=quality_rank) if winners else None,
                )
            )
        except UnreachableBudget as err:
            misses.append(f"{precision}: {err.detail}")
    if not winners:
        raise UnreachableBudget(
            f"no candidate meets the budget ({'; '.join(misses)}): relax the budget, raise --max-sparsity, "
            "or choose a faster target"
        )
    best = min(winners, key=quality_rank)
    how = "without pruning" if best.sparsity == 0 else "pruned"
    reason = choice_reason(best, winners, how) + (f"; not shipped: {'; '.join(misses)}" if misses else "")
    return SearchResult(best, dense, search.order, search.measured, winners, reason)


def lightest_cut_first(unpruned: list[Probe], dense: Probe, budgets: list[Budget]) -> list[Probe]:
    """Unpruned candidates in the order of the cut they need: fastest first under a timed budget, else the
    smallest file first (ties keep their order)."""
    if any(b.kind in TIMED_KINDS for b in budgets):
        return sorted(unpruned, key=lambda p: -speedup_of(p, dense))
    return sorted(unpruned, key=lambda p: p.onnx_mb if p.onnx_mb is not None else math.inf)


def better(probe: Probe, than: Probe) -> bool:
    """Strictly closer to dense (a measured divergence beats none)."""
    return quality_rank(probe) < quality_rank(than)


PRECISION_RANK = {name: rank for rank, name in enumerate(PRECISIONS)}


def quality_rank(probe: Probe) -> tuple:
    """Lower is better: measured divergence first; without one, the less compressed candidate."""
    measured = probe.divergence is not None
    return (not measured, probe.divergence if measured else 0.0, probe.sparsity, PRECISION_RANK[probe.precision])


def describe_candidate(probe: Probe) -> str:
    cut = f"{probe.sparsity:.1%} pruned" if probe.sparsity else "unpruned"
    divergence = f", divergence {probe.divergence:.4f}" if probe.divergence is not None else ""
    return f"{probe.precision} {cut}{divergence}"


def choice_reason(best: Probe, rivals: list[Probe], how: str) -> str:
    """One line a person can check: the winner and what it beat."""
    others = [describe_candidate(p) for p in rivals if p.key != best.key]
    beaten = f"; it beat {', '.join(others)}" if others else "; no other candidate met the budgets"
    return f"{describe_candidate(best)} meets every budget {how} with the least divergence from dense{beaten}"


def check_budgets_given(budgets: list[Budget]) -> None:
    if not budgets:
        raise EdgepruneError("no budget given: pass --latency-ms, --speedup, --memory-mb, --peak-mb or --params")


def refuse_timed_budgets_on_emulation(budgets: list[Budget], device: str, emulated: bool) -> None:
    """An emulator's clock says nothing about the board's: qemu ran SmolLM2 10x (int4) to 24x (fp32) slower
    than the x86 host, so not even ratios between candidates carry over. One line, before any work."""
    timed = [b.kind for b in budgets if b.kind in TIMED_KINDS]
    if emulated and timed:
        raise EdgepruneError(
            f"device '{device}' is emulated, so its timings are not the board's and a {timed[0]} budget cannot be "
            "searched there (the default budget is --speedup): give --memory-mb, --peak-mb or --params, or time on "
            "the real board (e.g. --device rpi5)"
        )


def least_sparsity(
    search: Search,
    precision: str,
    dense: Probe,
    budgets: list[Budget],
    params_at: Callable[[float], int],
    max_probes: int,
    tol: float,
    latency_rtol: float,
    ideal_latency_slope: float,
    beat: Probe | None = None,
) -> Probe:
    """The least-pruned probe of one precision meeting every budget, or UnreachableBudget.

    With `beat`, the search gives up as soon as a probe that misses the budgets is already further
    from dense than `beat`: every probe that could pass is cut deeper, hence further still.

    `params_at(s)` is the analytic parameter count at sparsity s. `ideal_latency_slope` is the
    fraction of dense latency that removing everything prunable would save (from FLOPs); it
    only shapes the first latency guess. The search stops when the pass/fail bracket is
    narrower than `tol`, when a passing probe is within `latency_rtol` of the latency target,
    or after `max_probes` probes (the unpruned one not counted).
    """
    start = search(precision, 0.0)
    first = len(search.order)  # probes counted against `max_probes` are the ones after this
    s_low = analytic_lower_bound(budgets, params_at, start, search.max_sparsity)
    target = latency_target(budgets, dense)
    size = size_target(budgets)
    passing = [start] if all_met(budgets, start, dense) and s_low == 0 else []
    failing = [] if passing else [start]
    guess = max(
        s_low,
        first_latency_guess(target, latency_of(start, dense), ideal_latency_slope),
        size_guess(search, start, size, start) or 0.0,
    )
    tried = [start]
    while not passing or not close_enough(passing, failing, dense, s_low, (target, size), tol, latency_rtol):
        if len(search.order) - first >= max_probes:
            break
        lo = max(p.sparsity for p in failing)
        hi = min((p.sparsity for p in passing), default=None)
        s = clip_guess(guess, lo, hi, search.max_sparsity, tol)
        floor = divergence_floor(search, start, s)
        if beat is not None and beat.divergence is not None and floor is not None and floor >= beat.divergence:
            raise UnreachableBudget(
                f"{precision} needs a cut of at least {s:.1%}, which costs at least {floor:.4f} by the cuts measured, "
                f"no closer to dense than {describe_candidate(beat)}",
                detail=f"cannot beat {describe_candidate(beat)} (at sparsity {s:.3f} at least {floor:.4f} from dense)",
            )
        p = search(precision, s)
        tried.append(p)
        met = all_met(budgets, p, dense)
        (passing if met else failing).append(p)
        if not met and beat is not None and not better(p, beat):
            raise UnreachableBudget(
                f"{describe_candidate(p)} already misses the budget further from dense than {describe_candidate(beat)}",
                detail=f"cannot beat {describe_candidate(beat)} (at sparsity {p.sparsity} already further from dense)",
            )
        if not passing and p.sparsity >= search.max_sparsity:
            break
        fail = max(failing, key=lambda q: q.sparsity)
        aimed = size_guess(search, start, size, fail) if size is not None and (fail.onnx_mb or 0) > size else None
        guess = aimed if aimed is not None else next_guess(failing, passing, dense, (target, size), search.max_sparsity)
    if not passing:
        worst = max(tried, key=lambda p: p.sparsity)
        missed = worst.refused or "; ".join(b.describe(worst, dense) for b in budgets if not b.met(worst, dense))
        raise UnreachableBudget(
            f"no sparsity up to {worst.sparsity} meets the budget ({missed}): relax the budget, "
            "raise --max-sparsity, or choose a faster target",
            detail=f"at sparsity {worst.sparsity} {missed}",
        )
    return min(passing, key=lambda p: p.sparsity)


def analytic_lower_bound(
    budgets: list[Budget], params_at: Callable[[float], int], start: Probe, max_sparsity: float
) -> float:
    """Smallest sparsity the parameter and size budgets allow; no probe below it can pass.

    Size is estimated as the unpruned file of the same precision scaled by the parameter count
    (exact for fp32 weights; for quantized files, whose float embedding does not shrink, an
    overestimate of the saving, so the bound stays a lower bound), then verified by the probe.
    """
    params_limit = min((b.limit for b in budgets if b.kind == "params"), default=float("inf"))
    size_limit = min((b.limit for b in budgets if b.kind == "memory_mb"), default=float("inf"))

    def allowed(s: float) -> bool:
        params = params_at(s)
        size = start.onnx_mb * params / start.params if start.onnx_mb else 0.0
        return params <= params_limit and size <= size_limit

    s_low = smallest_sparsity(allowed, 0.0, max_sparsity)
    if s_low is None:
        at_max = Probe(sparsity=max_sparsity, params=params_at(max_sparsity))
        raise UnreachableBudget(
            f"at the maximum sparsity {max_sparsity} the model keeps {at_max.params:,} parameters, too many for "
            "the parameter or size budget: raise the budget or --max-sparsity",
            detail=f"{at_max.params:,} parameters at sparsity {max_sparsity}: too many for the budget",
        )
    return round(s_low, SPARSITY_DECIMALS)


def size_guess(search: Search, start: Probe, size: float | None, anchor: Probe) -> float | None:
    """The least sparsity whose predicted file fits just under the size budget (None: no budget or no model).

    The prediction is shifted by its error at `anchor` (a measured probe of the same precision), so a
    second aimed probe corrects what the first one taught (block rounding, metadata).
    """
    if size is None or anchor.onnx_mb is None:
        return None
    predicted = search.size_at(start, anchor.sparsity)
    if predicted is None:
        return None
    offset = anchor.onnx_mb - predicted
    aim = size * (1 - SIZE_RTOL / 2)
    return smallest_sparsity(lambda s: search.size_at(start, s) + offset <= aim, 0.0, search.max_sparsity)


CUT_COST_SAFETY = 0.8  # the floor trusts only this share of the extrapolated cut cost (quantization interacts)


def divergence_floor(search: Search, start: Probe, s: float) -> float | None:
    """A lower bound on the divergence of `start`'s precision cut to sparsity s, from the cuts measured so far.

    What a cut adds to a precision's own divergence grows at least linearly in the sparsity: the criterion
    removes the least useful groups first, so each further group costs more (convex, zero at no cut).
    A cut measured at s0 <= s on any precision therefore costs at least (s / s0) times as much at s. None
    when nothing measured bounds it.
    """
    if start.divergence is None:
        return None
    costs = []
    for probe in search.order:
        base = search.log.probes.get((probe.precision, 0.0))
        measured = probe.divergence is not None and base is not None and base.divergence is not None
        if measured and 0 < probe.sparsity <= s and not probe.refused:
            costs.append(max(probe.divergence - base.divergence, 0.0) * s / probe.sparsity)
    return start.divergence + CUT_COST_SAFETY * max(costs) if costs else None


def first_latency_guess(target: float | None, unpruned_ms: float, slope: float) -> float:
    """Sparsity the ideal (FLOP-proportional) latency model predicts for the target (0 if none)."""
    if target is None or target >= unpruned_ms:
        return 0.0
    return (1 - target / unpruned_ms) / max(slope, 1e-3)


def size_target(budgets: list[Budget]) -> float | None:
    """The strictest file-size budget, in MB."""
    return min((b.limit for b in budgets if b.kind == "memory_mb"), default=None)


SIZE_RTOL = 0.01  # a passing probe this close under the size budget is final: file size is not noisy


def close_enough(
    passing: list[Probe],
    failing: list[Probe],
    dense: Probe,
    s_low: float,
    targets: tuple[float | None, float | None],
    tol: float,
    rtol: float,
) -> bool:
    """Whether the least-pruned passing probe cannot be improved by more than the tolerances.

    `targets` is (latency ms, file MB): a passing probe within `rtol` of the latency target, or
    within SIZE_RTOL of the size budget, leaves nothing worth another probe.
    """
    best = min(passing, key=lambda p: p.sparsity)
    if best.sparsity <= s_low:
        return True
    lo = max(p.sparsity for p in failing)
    if best.sparsity - lo <= tol:
        return True
    latency, size = targets
    if size is not None and best.onnx_mb is not None and best.onnx_mb >= size * (1 - SIZE_RTOL):
        return True
    return latency is not None and latency_of(best, dense) >= latency * (1 - rtol)


def clip_guess(guess: float, lo: float, hi: float | None, max_sparsity: float, tol: float) -> float:
    """Keep the guess strictly inside the bracket, away from its ends, so every probe narrows it."""
    if hi is None:
        return min(max(guess, lo + tol), max_sparsity)
    margin = max(tol / 2, 0.15 * (hi - lo))
    return min(max(guess, lo + margin), hi - margin)


def next_guess(
    failing: list[Probe],
    passing: list[Probe],
    dense: Probe,
    targets: tuple[float | None, float | None],
    max_sparsity: float,
) -> float:
    """Secant through the two probes nearest the bracket, on the file size when the deepest failing probe
    misses the size budget (`targets` = (latency ms, file MB)), else on latency; bisection or doubling otherwise."""
    fail = max(failing, key=lambda p: p.sparsity)
    ok = min(passing, key=lambda p: p.sparsity, default=None)
    other = ok if ok is not None else second_highest(failing)
    latency, size = targets
    if size is not None and fail.onnx_mb is not None and fail.onnx_mb > size:
        measure, target = (lambda p: p.onnx_mb), size
    else:
        measure, target = (lambda p: latency_of(p, dense)), latency
    doubling = min(max_sparsity, max(2 * fail.sparsity, fail.sparsity + 0.1))
    if target is not None and other is not None and other.sparsity != fail.sparsity:
        t_fail, t_other = measure(fail), measure(other)
        slope = (t_other - t_fail) / (other.sparsity - fail.sparsity)
        if slope < 0:  # never further than doubling: a slope from two noisy timings can point far past the target
            return min(fail.sparsity + (target - t_fail) / slope, doubling)
    if ok is None:
        return doubling
    return (fail.sparsity + ok.sparsity) / 2


def second_highest(probes: list[Probe]) -> Probe | None:
    ranked = sorted(probes, key=lambda p: p.sparsity)
    return ranked[-2] if len(ranked) > 1 else None

"""Re-fit what stays after a cut: least-squares compensation of the output projections, OBS selection.

Removing FFN neurons (or attention heads) deletes columns of the output projection W (`down_proj`,
`o_proj`; BERT's `output.dense`, `attention.output.dense`). With A the projection's input on
calibration tokens and K the kept columns, the layer's output A Wᵀ is best rebuilt from what stays by

    W'_K = argmin ‖A_K W'_Kᵀ − A Wᵀ‖² + λ‖W'_K − W_K‖²  =>  W'_Kᵀ = (G_KK + λI)⁻¹ (G_K: Wᵀ + λ W_Kᵀ),

G = AᵀA accumulated in float64 (../shared/notes/COMPENSATION.md). The ridge pulls towards the old
weights, not towards zero, so a re-fit that removes nothing is exactly the identity. Where the
projection has a bias, a column of ones joins A and the bias is re-fit with the weights (FLAP's mean
compensation is the case of no kept column). Layers are processed in order, each calibrated on the
outputs of the already cut layers before it (SparseGPT/SlimGPT), from cached layer inputs: the whole
model runs about twice over the calibration windows, whatever the number of layers.

The stream target: in a pre-norm layer each output projection adds straight into the residual stream, so with
the dense model run beside the cut one (each layer before it is cut), T = the dense stream after the projection's
add − the cut model's stream before it, and C = AᵀT replaces G Wᵀ above: the re-fit also undoes the drift the
earlier cuts left. It has more to fit than the layer's own output, so it needs more text; the check judges
it against the own-output re-fits on held-back windows.

OBS selection (SlimGPT's structured OBS): removing column j with the best re-fit of the others costs
‖w_j‖² / [G⁻¹]_jj (a head: tr(W_S [G⁻¹]_SS⁻¹ W_Sᵀ) over its block S); the cheapest groups go in
batches, W and G⁻¹ updated after each batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from edgeprune.criteria.activations import record_inputs
from edgeprune.errors import EdgepruneError
from edgeprune.models import CAUSAL_LM, FamilyAdapter, LayerWidths, model_kind
from edgeprune.models.base import head_rows
from edgeprune.structure import ALLOCATIONS, LayerKeep, record_widths

CUT_SELECTIONS = ("scores", "obs")
ERRORS_ALLOCATION = "errors"  # FFN widths where the re-fit error is smallest (allocate_by_errors)
CUT_ALLOCATIONS = (*ALLOCATIONS, ERRORS_ALLOCATION)  # what `prune --allocation` accepts
# What each re-fit rebuilds from the cut model's activations: the projection's own output on them ("layer"), or
# what brings the residual stream back to the dense model's ("stream", pre-norm families). "auto": the stream
# from STREAM_MIN_WINDOWS re-fit windows on, below that the stream target fits the calibration text's noise
# (benchmarks/RESULTS.md, "Re-fit to the dense model's residual stream").
REFIT_TARGETS = ("auto", "layer", "stream")
STREAM_MIN_WINDOWS = 128


@dataclass(frozen=True)
class CompensateOptions:
    """How the re-fit runs: its ridge candidates (× the mean diagonal of G), the windows that check them.

    Each cut projection keeps whichever candidate, the plain cut included, rebuilds its output best on
    the check windows (the last `check_fraction` of the calibration windows, never fitted on), and is
    then re-fit at that damping on all windows. Why: least squares over width² coefficients from a few
    thousand tokens fits the calibration text's noise; on held-out text a weakly damped re-fit of a
    small cut did worse than no re-fit at all (benchmarks/RESULTS.md, the compensation section).
    `damping` is the inverse Gram of OBS selection and of the error allocation (rankings, not weights).
    """

    dampings: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    check_fraction: float = 0.25
    damping: float = 1e-4
    add_bias: bool = False  # give bias-free projections a bias (Llama: sets mlp_bias/attention_bias)
    batch_size: int = 8
    obs_batch: int = 32  # FFN columns removed per OBS step (heads: one at a time)
    allocation_batch: int = 128  # per step of each layer's error curve in `allocate_by_errors` (only its shape counts)
    target: str = "auto"  # REFIT_TARGETS; "stream" needs a pre-norm family (others re-fit to the layer's output)

    def __post_init__(self) -> None:
        if self.target not in REFIT_TARGETS:
            raise EdgepruneError(f"unknown re-fit target '{self.target}': choose from {', '.join(REFIT_TARGETS)}")
        if not self.dampings or min(self.dampings) < 0:
            raise EdgepruneError(f"re-fit dampings {self.dampings} must be one or more non-negative numbers")
        if not 0.0 <= self.check_fraction < 1.0:
            raise EdgepruneError(f"check fraction {self.check_fraction} is outside [0, 1)")


@dataclass(frozen=True)
class RefitChoice:
    """What one cut projection got: the damping that won on the check windows (None: the plain cut won)."""

    layer: int
    kind: str
    damping: float | None
    check_error: float  # the winner's output error on the check windows, relative to the output's energy there
    plain_error: float  # the plain cut's, on the same windows
    target: str | None = None  # the target the winning re-fit was fitted to (None: the plain cut won)


@dataclass
class Compensation:
    """The groups each layer kept and the re-fit each cut projection got."""

    keep: list[LayerKeep]
    choices: list[RefitChoice]


# -- the math (pure) ------------------------------------------------------------------------


@dataclass
class Gram:
    """AᵀA, the column sums and the row count of a projection's input, in float64; with targets T (the output
    the re-fit should rebuild, when it is not the projection's own A Wᵀ) also AᵀT, T's column sums and ‖T‖²."""

    xtx: torch.Tensor
    total: torch.Tensor
    count: int = 0
    xty: torch.Tensor | None = None
    target_total: torch.Tensor | None = None
    target_energy: float = 0.0

    @classmethod
    def empty(cls, width: int) -> Gram:
        return cls(torch.zeros(width, width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))

    def add(self, rows: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).double()
        self.xtx.addmm_(rows.T, rows)
        self.total += rows.sum(0)
        self.count += rows.shape[0]
        if targets is None:
            return
        targets = targets.detach().reshape(-1, targets.shape[-1]).double()
        if self.xty is None:
            self.xty = torch.zeros(rows.shape[1], targets.shape[1], dtype=torch.float64)
            self.target_total = torch.zeros(targets.shape[1], dtype=torch.float64)
        self.xty.addmm_(rows.T, targets)
        self.target_total += targets.sum(0)
        self.target_energy += float(targets.square().sum())

    def augmented(self, with_ones: bool) -> torch.Tensor:
        """G of [A, 1] when the projection has a bias (the ones column last), else G of A."""
        if not with_ones:
            return self.xtx
        d = self.xtx.shape[0]
        out = torch.empty(d + 1, d + 1, dtype=torch.float64)
        out[:d, :d], out[:d, d], out[d, :d], out[d, d] = self.xtx, self.total, self.total, self.count
        return out

    def fit(self, with_ones: bool) -> Fit:
        """What the re-fit needs, with the ones column when the projection has a bias."""
        if self.xty is None:
            return Fit(self.augmented(with_ones))
        cross = torch.cat([self.xty, self.target_total[None]]) if with_ones else self.xty
        return Fit(self.augmented(with_ones), cross, self.target_energy)


@dataclass(frozen=True)
class Fit:
    """A projection's re-fit statistics: G of its input A and, when the output to rebuild is a target T rather
    than its own A Wᵀ, C = AᵀT and ‖T‖² (None: T = A Wᵀ)."""

    gram: torch.Tensor
    cross: torch.Tensor | None = None
    energy: float = 0.0

    def __add__(self, other: Fit) -> Fit:
        if self.cross is None:
            return Fit(self.gram + other.gram)
        return Fit(self.gram + other.gram, self.cross + other.cross, self.energy + other.energy)

    def refit(self, weight: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
        return refit(self.gram, weight, keep, damping, self.cross)

    def error(self, weight: torch.Tensor, columns: torch.Tensor, new: torch.Tensor | None) -> float:
        """‖A_K W'ᵀ − T‖² with W' = `new` (None: W's own columns) on the kept `columns`."""
        if self.cross is None:
            return output_error(self.gram, weight, columns, new)
        new = weight[:, columns].double() if new is None else new
        quadratic = float((new @ self.gram[columns][:, columns] * new).sum())
        return max(quadratic - 2 * float((new * self.cross[columns].T).sum()) + self.energy, 0.0)

    def target_energy(self, weight: torch.Tensor) -> float:
        """‖T‖², the scale of the relative errors."""
        if self.cross is None:
            weight = weight.double()
            return float((weight @ self.gram * weight).sum())
        return self.energy


def ridge(gram: torch.Tensor, damping: float) -> float:
    return damping * float(gram.diagonal().mean())


def refit(
    gram: torch.Tensor, weight: torch.Tensor, keep: torch.Tensor, damping: float, cross: torch.Tensor | None = None
) -> torch.Tensor:
    """W'_K [out, |K|] rebuilding A Wᵀ (or the target T with AᵀT = `cross`) from the kept columns, ridge
    towards W_K (see the module docstring)."""
    weight = weight.double()
    lam = ridge(gram, damping)
    g_kk = gram[keep][:, keep] + lam * torch.eye(len(keep), dtype=torch.float64)
    rhs = (gram[keep] @ weight.T if cross is None else cross[keep]) + lam * weight[:, keep].T
    return torch.linalg.solve(g_kk, rhs).T


def output_error(gram: torch.Tensor, weight: torch.Tensor, columns: torch.Tensor, new: torch.Tensor | None) -> float:
    """‖A W'ᵀ − A Wᵀ‖² (A: the input with Gram `gram`), W' = `new` in `columns` (None: W's own), 0 elsewhere."""
    delta = -weight.double()
    delta[:, columns] += weight[:, columns].double() if new is None else new
    return float((delta @ gram * delta).sum())


def checked_refit(
    fit: Fit,
    check: Fit | None,
    weight: torch.Tensor,
    columns: torch.Tensor,
    dampings: tuple,
    layer_too: bool = False,
) -> tuple[torch.Tensor, float | None, float, float, str | None]:
    """The kept columns' new weights: the plain cut or the re-fit whose output error on `check` is smallest.

    A winning re-fit is redone at its damping on fit + check (more tokens, the same ridge). With `layer_too`
    (`fit` has a dense target) the re-fits to the projection's own output compete too, judged by the same
    target's check error: where too few windows let the dense target's fit chase noise, they win. Returns the
    weights, the winning damping (None: plain cut), its and the plain cut's relative check errors, and the target
    the winner was fitted to ("layer" or "stream"; None: plain cut). Without check windows the most damped
    candidate of `fit`'s target is taken unchecked (errors reported as NaN).
    """
    target = "layer" if fit.cross is None else "stream"
    if check is None:
        return fit.refit(weight, columns, max(dampings)), max(dampings), math.nan, math.nan, target
    weight = weight.double()
    energy = max(check.target_energy(weight), 1e-300)  # ‖T‖², the scale of the relative errors
    plain = check.error(weight, columns, None) / energy
    candidates = [(damping, False) for damping in dampings] + [(damping, True) for damping in dampings if layer_too]
    best, best_error = None, plain
    for damping, own in candidates:
        fitted = Fit(fit.gram) if own else fit
        error = check.error(weight, columns, fitted.refit(weight, columns, damping)) / energy
        if error < best_error:
            best, best_error = (damping, own), error
    if best is None:
        return weight[:, columns].double(), None, plain, plain, None
    damping, own = best
    both = Fit(fit.gram + check.gram) if own else fit + check
    return both.refit(weight, columns, damping), damping, best_error, plain, "layer" if own else target


def damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    lam = max(ridge(gram, damping), 1e-12 * float(gram.diagonal().abs().max()) + 1e-300)
    return torch.linalg.inv(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64))


def removal_costs(weight: torch.Tensor, ginv: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Output error of removing each unit (a block of columns, [n_units, size]) with the rest re-fit."""
    w_s = weight[:, units].permute(1, 0, 2)  # [units, out, size]
    g_ss = ginv[units[:, :, None], units[:, None, :]]  # [units, size, size]
    solved = torch.linalg.solve(g_ss, w_s.transpose(1, 2))  # [units, size, out]
    return (w_s.transpose(1, 2) * solved).sum(dim=(1, 2))


def obs_removal(
    gram: torch.Tensor,
    weight: torch.Tensor,
    units: torch.Tensor,
    n_remove: int,
    batch: int = 32,
    damping: float = 1e-4,
    groups: torch.Tensor | None = None,
    per_group_keep: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Units to remove, cheapest first, each batch costed after the previous ones were re-fit away, and the
    output error each unit added when it went (same order).

    `units` [n_units, size] are column indices of W (and rows/columns of G); columns not in any unit
    (a bias's ones column) always stay. With `groups` (a KV group per unit) no group drops below
    `per_group_keep` units, so GQA layers keep equal query heads per KV group.
    """
    weight = weight.double().clone()
    ginv = damped_inverse(gram, damping)
    alive = torch.ones(len(units), dtype=torch.bool)
    order: list[int] = []
    errors: list[float] = []
    while len(order) < n_remove:
        eligible = alive.clone()
        if groups is not None:
            counts = torch.bincount(groups[alive], minlength=int(groups.max()) + 1)
            eligible &= counts[groups] > per_group_keep
        candidates = torch.nonzero(eligible).reshape(-1)
        if len(candidates) == 0:
            raise EdgepruneError("OBS selection ran out of removable groups: lower the sparsity")
        costs = removal_costs(weight, ginv, units[candidates])
        step = 1 if groups is not None else min(batch, n_remove - len(order))
        picked = torch.argsort(costs)[:step]
        chosen = candidates[picked]
        errors += costs[picked].tolist()
        cols = units[chosen].reshape(-1)
        g_inv_ss = torch.linalg.inv(ginv[cols][:, cols])
        weight -= weight[:, cols] @ g_inv_ss @ ginv[cols]
        ginv -= ginv[:, cols] @ g_inv_ss @ ginv[cols]
        ginv[cols], ginv[:, cols] = 0.0, 0.0
        ginv[cols, cols] = 1.0  # removed columns: inert, never chosen again (not alive)
        alive[chosen] = False
        order += chosen.tolist()
    return torch.tensor(order, dtype=torch.long), torch.tensor(errors, dtype=torch.float64)


def kept_units(n_units: int, removed: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n_units, dtype=torch.bool)
    mask[removed] = False
    return torch.nonzero(mask).reshape(-1)


# -- layer-by-layer execution ----------------------------------------------------------------


class StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


LayerCall = tuple[tuple, dict]


def first_layer_inputs(model: nn.Module, adapter: FamilyAdapter, calibration: torch.Tensor, batch_size: int):
    """The (args, kwargs) the model passes its first layer, one per calibration batch (the rest is skipped)."""
    calls: list[LayerCall] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict):
        calls.append((args, kwargs))
        raise StopForward

    handle = adapter.layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    extra = {"use_cache": False} if model_kind(model) == CAUSAL_LM else {}  # no KV cache filled by the catch
    try:
        with torch.no_grad():
            for start in range(0, len(calibration), batch_size):
                with contextlib.suppress(StopForward):
                    model(input_ids=calibration[start : start + batch_size], **extra)
    finally:
        handle.remove()
    return calls


def layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def run_layer(layer: nn.Module, calls: list[LayerCall]) -> list[LayerCall]:
    """The next layer's calls: this layer's outputs with the same keyword arguments."""
    with torch.no_grad():
        return [((layer_output(layer(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in calls]


def input_gram(
    layer: nn.Module,
    projection: nn.Linear,
    calls: list[LayerCall],
    wanted: list[torch.Tensor] | None = None,
    residual_at: nn.Module | None = None,
) -> Gram:
    """Gram of `projection`'s input over all calls (the layer stops right after reaching it).

    With `wanted` (the dense model's residual stream, one tensor per call) the re-fit target is
    T = wanted − the stream the projection's output is added to: the layer's input, or the input of
    `residual_at` (the norm that reads the stream once attention's output is in it).
    """
    gram = Gram.empty(projection.in_features)
    seen: dict = {}

    def keep_stream(_module: nn.Module, args: tuple) -> None:
        seen["stream"] = args[0]

    def hook(_module: nn.Module, args: tuple) -> None:
        gram.add(args[0], None if wanted is None else wanted[seen["call"]] - seen["stream"])
        raise StopForward

    handles = [projection.register_forward_pre_hook(hook)]
    if wanted is not None and residual_at is not None:
        handles.append(residual_at.register_forward_pre_hook(keep_stream))
    try:
        with torch.no_grad():
            for k, (args, kwargs) in enumerate(calls):
                seen["call"], seen["stream"] = k, args[0]
                with contextlib.suppress(StopForward):
                    layer(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return gram


@dataclass
class DenseStates:
    """The dense model's residual stream at one layer, per call: after attention (`mid`) and after the layer."""

    mid: list[torch.Tensor]
    out: list[torch.Tensor]

    @classmethod
    def of(cls, layer: nn.Module, ffn_norm: nn.Module, calls: list[LayerCall]) -> DenseStates:
        """Run the still uncut `layer` on the dense model's inputs; `ffn_norm` reads the stream after attention."""
        mids: list[torch.Tensor] = []
        handle = ffn_norm.register_forward_pre_hook(lambda _module, args: mids.append(args[0]))
        try:
            outs = [args[0] for args, _ in run_layer(layer, calls)]
        finally:
            handle.remove()
        return cls(mids, outs)

    def next_calls(self, calls: list[LayerCall]) -> list[LayerCall]:
        """The dense model's inputs to the next layer."""
        return [((out, *args[1:]), kwargs) for out, (args, kwargs) in zip(self.out, calls, strict=True)]


def install_refit(linear: nn.Linear, new_weight: torch.Tensor, has_bias: bool) -> nn.Linear:
    """A Linear holding the re-fit [W'_K, b'] (b' last when the projection has a bias)."""
    weight = new_weight[:, :-1] if has_bias else new_weight
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(weight.to(linear.weight.dtype))
        if has_bias:
            new.bias.copy_(new_weight[:, -1].to(linear.weight.dtype))
    return new.to(linear.weight.dtype)


def augmented_weight(linear: nn.Linear) -> torch.Tensor:
    weight = linear.weight.detach().double()
    if linear.bias is None:
        return weight
    return torch.cat([weight, linear.bias.detach().double()[:, None]], dim=1)


def replace_projection(adapter: FamilyAdapter, layer: nn.Module, old: nn.Linear, new: nn.Linear) -> None:
    owner, name, _ = adapter._named(layer, [old])[0]
    setattr(owner, name, new)


# A chooser gets (layer index, kind "ffn"/"heads", the layer, the projection's Gram, its weight [with bias
# column]) and returns the sorted indices of the groups to keep, or None to leave that kind whole.
Chooser = Callable[[int, str, nn.Module, torch.Tensor, torch.Tensor], torch.Tensor | None]


@dataclass
class LayerCalls:
    """The current layer's inputs on the fit windows and on the check windows (none: nothing is checked)."""

    fit: list[LayerCall]
    check: list[LayerCall]

    def advance(self, layer: nn.Module) -> LayerCalls:
        return LayerCalls(run_layer(layer, self.fit), run_layer(layer, self.check))


def split_check(calibration: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit windows, check windows): the last `fraction` of the windows check, if that leaves both non-empty."""
    n_check = int(len(calibration) * fraction)
    if n_check == 0:
        return calibration, calibration[:0]
    return calibration[:-n_check], calibration[-n_check:]


def compensate_kind(
    adapter: FamilyAdapter,
    index: int,
    layer: nn.Module,
    kind: str,
    calls: LayerCalls,
    choose: Chooser,
    options: CompensateOptions,
    dense: tuple[DenseStates, DenseStates] | None = None,
) -> tuple[torch.Tensor, RefitChoice] | None:
    """Choose, cut and re-fit one kind of group of one layer; returns the kept groups and the re-fit (None: untouched).

    Groups are chosen on all windows' Gram; the re-fit candidates are fitted on the fit windows and
    judged on the check windows (`checked_refit`). With `dense` (the dense model's residual stream on the fit
    and check windows) the re-fit rebuilds what brings the cut model's stream back to the dense one.
    """
    projection = adapter.ffn_output(layer) if kind == "ffn" else adapter.head_output(layer)
    has_bias = projection.bias is not None
    residual_at = adapter.input_norms(layer)[1] if kind == "ffn" and dense is not None else None

    def fit_of(layer_calls: list[LayerCall], states: DenseStates | None) -> Fit:
        wanted = None if states is None else states.out if kind == "ffn" else states.mid
        return input_gram(layer, projection, layer_calls, wanted, residual_at).fit(has_bias)

    fit = fit_of(calls.fit, None if dense is None else dense[0])
    check = fit_of(calls.check, None if dense is None else dense[1]) if calls.check else None
    weight = augmented_weight(projection)
    keep = choose(index, kind, layer, (fit if check is None else fit + check).gram, weight)
    if keep is None:
        return None
    columns = keep if kind == "ffn" else head_rows(keep, adapter.head_dim(layer))
    if has_bias:
        columns = torch.cat([columns, torch.tensor([fit.gram.shape[0] - 1])])
    refitted = checked_refit(fit, check, weight, columns, options.dampings, layer_too=dense is not None)
    new_weight, damping, error, plain, target = refitted
    new = install_refit(projection, new_weight, has_bias)
    if kind == "ffn":
        adapter.cut_ffn(layer, keep)
        replace_projection(adapter, layer, adapter.ffn_output(layer), new)
    else:
        adapter.cut_heads(layer, keep)
        replace_projection(adapter, layer, adapter.head_output(layer), new)
    return keep, RefitChoice(index, kind, damping, error, plain, target)


def resolved_target(target: str, windows: int, adapter: FamilyAdapter, layer: nn.Module) -> str:
    """ "stream" where asked for (or `auto` with enough windows) and the family is pre-norm, so each output
    projection adds straight into the stream; else "layer"."""
    wanted = target == "stream" or (target == "auto" and windows >= STREAM_MIN_WINDOWS)
    return "stream" if wanted and adapter.input_norms(layer) is not None else "layer"


def compensate_layers(
    model: nn.Module,
    adapter: FamilyAdapter,
    calibration: torch.Tensor,
    choose: Chooser,
    cuts: list[tuple[bool, bool]],
    options: CompensateOptions,
) -> Compensation:
    """Cut every layer in order with its groups chosen by `choose`, re-fitting on the cut model's activations.

    `cuts[i]` = (heads cut?, FFN cut?) in layer i. Heads come first: the FFN is calibrated on the
    output of the re-fit attention. The last `options.check_fraction` of the windows only check.
    With the stream target the dense model runs beside the cut one, each layer before it is cut, so each
    re-fit also undoes the drift the earlier cuts left in the residual stream.
    """
    if options.add_bias:
        for kind, position in (("heads", 0), ("ffn", 1)):
            if any(cut[position] for cut in cuts):
                require_biases(model, adapter, kind)
    fit, check = split_check(calibration, options.check_fraction)
    calls = LayerCalls(
        first_layer_inputs(model, adapter, fit, options.batch_size),
        first_layer_inputs(model, adapter, check, options.batch_size) if len(check) else [],
    )
    layers = adapter.layers(model)
    stream = resolved_target(options.target, len(calibration), adapter, layers[0]) == "stream"
    dense_calls = calls if stream else None
    result = Compensation([], [])
    for i, (layer, cut) in enumerate(zip(layers, cuts, strict=True)):
        dense = None
        if dense_calls is not None:
            norm = adapter.input_norms(layer)[1]
            dense = (DenseStates.of(layer, norm, dense_calls.fit), DenseStates.of(layer, norm, dense_calls.check))
        entry = LayerKeep()
        for kind, wanted in zip(("heads", "ffn"), cut, strict=True):
            done = compensate_kind(adapter, i, layer, kind, calls, choose, options, dense) if wanted else None
            if done is not None:
                setattr(entry, kind, done[0])
                result.choices.append(done[1])
        result.keep.append(entry)
        if i + 1 < len(layers):
            calls = calls.advance(layer)
            if dense is not None:
                dense_calls = LayerCalls(dense[0].next_calls(dense_calls.fit), dense[1].next_calls(dense_calls.check))
    record_widths(model, adapter)
    return result


def cut_and_compensate(
    model: nn.Module,
    adapter: FamilyAdapter,
    keep: list[LayerKeep],
    calibration: torch.Tensor,
    options: CompensateOptions = CompensateOptions(),
) -> Compensation:
    """Cut `model` in place to the given keep-indices, re-fitting each cut output projection."""

    def choose(i: int, kind: str, *_args) -> torch.Tensor | None:
        return keep[i].ffn if kind == "ffn" else keep[i].heads

    cuts = [(entry.heads is not None, entry.ffn is not None) for entry in keep]
    return compensate_layers(model, adapter, calibration, choose, cuts, options)


def obs_chooser(adapter: FamilyAdapter, plan: list[LayerWidths], options: CompensateOptions) -> Chooser:
    """Keep, per layer and kind, the groups OBS would remove last, down to the planned width."""

    def choose(i: int, kind: str, layer: nn.Module, gram: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        now = adapter.widths(layer)
        if kind == "ffn":
            units = torch.arange(now.ffn)[:, None]
            removed, _ = obs_removal(gram, weight, units, now.ffn - plan[i].ffn, options.obs_batch, options.damping)
            return kept_units(now.ffn, removed)
        hd = adapter.head_dim(layer)
        units = torch.arange(now.heads * hd).reshape(now.heads, hd)
        step = adapter.head_step(layer)
        groups = torch.arange(now.heads) // (now.heads // now.kv_heads) if step > 1 else None
        per_group = plan[i].heads // now.kv_heads if step > 1 else 0
        n_remove = now.heads - plan[i].heads
        removed, _ = obs_removal(gram, weight, units, n_remove, 1, options.damping, groups, per_group)
        return kept_units(now.heads, removed)

    return choose


def cut_by_obs(
    model: nn.Module,
    adapter: FamilyAdapter,
    plan: list[LayerWidths],
    calibration: torch.Tensor,
    options: CompensateOptions = CompensateOptions(),
) -> Compensation:
    """Cut `model` in place to the planned widths, choosing the groups by OBS error after re-fitting."""
    widths = [adapter.widths(layer) for layer in adapter.layers(model)]
    cuts = [(p.heads < w.heads, p.ffn < w.ffn) for p, w in zip(plan, widths, strict=True)]
    return compensate_layers(model, adapter, calibration, obs_chooser(adapter, plan, options), cuts, options)


# -- allocation across layers from the re-fit errors ------------------------------------------


def dense_ffn_grams(model: nn.Module, adapter: FamilyAdapter, calibration: torch.Tensor, batch_size: int = 8):
    """Gram of every layer's FFN activations on the uncut model, one pass over the calibration windows."""
    outputs = [adapter.ffn_output(layer) for layer in adapter.layers(model)]
    grams = [Gram.empty(output.in_features) for output in outputs]
    record_inputs(model, outputs, calibration, batch_size, lambda i, _first, x: grams[i].add(x))
    return grams


def allocate_by_errors(
    model: nn.Module,
    adapter: FamilyAdapter,
    calibration: torch.Tensor,
    plan: list[LayerWidths],
    min_keep: float = 0.1,
    options: CompensateOptions = CompensateOptions(),
) -> list[LayerWidths]:
    """FFN widths that remove as many neurons as `plan` in total, where the re-fit error is smallest.

    Each cut layer's OBS path (on the uncut model) gives the output error of every further neuron
    removed, relative to the layer's FFN output energy tr(W G Wᵀ), so layers compare on one scale;
    the cheapest removals across layers win (error-sorted, as global pruning but with costs that
    already count the re-fit), and every layer keeps `min_keep` of its neurons. Heads keep `plan`'s widths.
    """
    layers = adapter.layers(model)
    cut = [i for i, (layer, p) in enumerate(zip(layers, plan, strict=True)) if p.ffn < adapter.widths(layer).ffn]
    budget = sum(adapter.widths(layers[i]).ffn - plan[i].ffn for i in cut)
    grams = dense_ffn_grams(model, adapter, calibration, options.batch_size)
    candidates: list[tuple[float, int]] = []
    for i in cut:
        width = adapter.widths(layers[i]).ffn
        weight = adapter.ffn_output(layers[i]).weight.detach().double()
        energy = float((weight @ grams[i].xtx * weight).sum())
        removable = width - max(1, math.ceil(min_keep * width))
        _, errors = obs_removal(
            grams[i].xtx, weight, torch.arange(width)[:, None], removable, options.allocation_batch, options.damping
        )
        cumulative = torch.cummax(errors, 0).values / max(energy, 1e-300)  # removal order costs only rise
        candidates += [(float(c), i) for c in cumulative]
    removed = {i: 0 for i in cut}
    for _, i in sorted(candidates)[:budget]:
        removed[i] += 1
    return [
        LayerWidths(
            ffn=p.ffn + (adapter.widths(layers[i]).ffn - p.ffn) - removed[i], heads=p.heads, kv_heads=p.kv_heads
        )
        if i in removed
        else p
        for i, p in enumerate(plan)
    ]


# -- FLAP's bias compensation (the mean of the removed channels, no re-fit) ------------------


def output_means(
    model: nn.Module, adapter: FamilyAdapter, calibration: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Mean input of every layer's FFN and attention output projections, measured before the cut."""
    from edgeprune.criteria.base import ScoringInputs
    from edgeprune.criteria.fluctuation import output_input_stats

    ffn, heads = output_input_stats(model, adapter, ScoringInputs(calibration=calibration))
    return [s.mean for s in ffn], [s.mean for s in heads]


def removed(keep: torch.Tensor, width: int) -> torch.Tensor:
    mask = torch.ones(width, dtype=torch.bool)
    mask[keep] = False
    return torch.nonzero(mask).reshape(-1)


def require_biases(model: nn.Module, adapter: FamilyAdapter, kind: str) -> None:
    """Give every FFN (or attention) projection of every layer a bias, zero where there was none.

    A family whose config switches those biases on and off together (Llama's `mlp_bias`,
    `attention_bias`) only reloads if all of them exist, so all get one and the flag is set;
    a model type without such a flag could not reload an added bias, so it is refused.
    """
    linears = []
    for layer in adapter.layers(model):
        if kind == "ffn":
            linears += [*adapter.ffn_inputs(layer), adapter.ffn_output(layer)]
        else:
            linears += list(adapter.attention_projections(layer).values())
    missing = [linear for linear in linears if linear.bias is None]
    if not missing:
        return
    flag = adapter.bias_flags.get(kind)
    if flag is None or not hasattr(model.config, flag):
        raise EdgepruneError(
            f"bias compensation needs a bias on the {kind} output projection, which a {model.config.model_type} "
            "checkpoint cannot store: prune without --bias-compensation"
        )
    for linear in missing:
        weight = linear.weight
        linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    setattr(model.config, flag, True)


def add_removed_mean(linear: nn.Linear, channels: torch.Tensor, mean: torch.Tensor) -> None:
    """bias += W[:, channels] @ E[a[channels]]: the removed channels' average contribution."""
    with torch.no_grad():
        weight = linear.weight.index_select(1, channels.to(linear.weight.device)).double()
        linear.bias += (weight @ mean[channels].to(weight.device)).to(linear.bias.dtype)


def compensate_bias(
    model: nn.Module,
    adapter: FamilyAdapter,
    keep: list[LayerKeep],
    means: tuple[list[torch.Tensor], list[torch.Tensor]],
) -> None:
    """FLAP's compensation, applied before `cut_model` while the removed columns still exist."""
    ffn_means, head_means = means
    layers = adapter.layers(model)
    if any(entry.ffn is not None for entry in keep):
        require_biases(model, adapter, "ffn")
    if any(entry.heads is not None for entry in keep):
        require_biases(model, adapter, "heads")
    for layer, entry, ffn_mean, head_mean in zip(layers, keep, ffn_means, head_means, strict=True):
        widths = adapter.widths(layer)
        if entry.ffn is not None:
            add_removed_mean(adapter.ffn_output(layer), removed(entry.ffn, widths.ffn), ffn_mean)
        if entry.heads is not None:
            channels = head_rows(removed(entry.heads, widths.heads), adapter.head_dim(layer))
            add_removed_mean(adapter.head_output(layer), channels, head_mean)


def compensated_cut(
    model: nn.Module,
    adapter: FamilyAdapter,
    keep: list[LayerKeep],
    plan: list[LayerWidths],
    calibration: torch.Tensor,
    selection: str = "scores",
    options: CompensateOptions = CompensateOptions(),
) -> Compensation:
    """The cut `prune` makes with compensation on: the scores' `keep`, or OBS's choice at the same `plan`."""
    if selection not in CUT_SELECTIONS:
        raise EdgepruneError(f"unknown selection '{selection}': choose from {', '.join(CUT_SELECTIONS)}")
    if selection == "obs":
        return cut_by_obs(model, adapter, plan, calibration, options)
    return cut_and_compensate(model, adapter, keep, calibration, options)

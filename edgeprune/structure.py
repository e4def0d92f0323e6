"""Physical cutting of coupled groups: width plans, keep-indices, smaller matrices.

Flow: `plan_uniform_widths` or `plan_global_widths` (how wide each layer stays) -> `select_keep`
(which groups stay, from scores) -> `cut_model` (new, smaller nn.Linear modules). The per-layer widths
are recorded in `config.pruned_layer_widths` so a checkpoint can rebuild the shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeprune.criteria.base import GroupScores
from edgeprune.errors import EdgepruneError
from edgeprune.models import FamilyAdapter, LayerWidths, adapter_for

TARGETS = ("ffn", "heads")
ALLOCATIONS = ("uniform", "global")
WIDTHS_KEY = "pruned_layer_widths"


@dataclass(frozen=True)
class PruneSpec:
    """What to cut: the fraction of prunable parameters, which groups, which layers are kept whole."""

    sparsity: float
    targets: tuple[str, ...] = TARGETS
    protect_first: int = 0
    protect_last: int = 0
    round_to: int = 1
    allocation: str = "uniform"  # "global": rank groups across layers on per-layer normalized scores
    min_keep: float = 0.1  # global allocation keeps at least this fraction of each layer's groups

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise EdgepruneError(f"unknown allocation '{self.allocation}': choose from {', '.join(ALLOCATIONS)}")
        if not 0.0 < self.min_keep <= 1.0:
            raise EdgepruneError(f"min_keep {self.min_keep} is outside (0, 1]: give a fraction such as 0.1")
        if not 0.0 <= self.sparsity < 1.0:
            raise EdgepruneError(f"sparsity {self.sparsity} is outside [0, 1): give a fraction such as 0.2")
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise EdgepruneError(f"unknown targets {sorted(unknown) or '(none)'}: choose from {', '.join(TARGETS)}")
        if self.protect_first < 0 or self.protect_last < 0 or self.round_to < 1:
            raise EdgepruneError("protect-first/last must be >= 0 and round-to >= 1")

    def pruned_layers(self, n_layers: int) -> list[int]:
        return list(range(self.protect_first, n_layers - self.protect_last))


@dataclass
class LayerKeep:
    """Sorted indices of the FFN neurons and query heads one layer keeps (None: keep all)."""

    ffn: torch.Tensor | None = None
    heads: torch.Tensor | None = None


@dataclass
class PruneSummary:
    """Parameter counts before and after a cut, for reports and `inspect`."""

    params_before: int
    params_after: int
    prunable_before: int
    prunable_after: int
    widths: list[LayerWidths] = field(default_factory=list)

    @property
    def prunable_removed(self) -> float:
        return 1.0 - self.prunable_after / self.prunable_before if self.prunable_before else 0.0

    @property
    def total_removed(self) -> float:
        return 1.0 - self.params_after / self.params_before


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def plan_layer_widths(adapter: FamilyAdapter, layer: nn.Module, sparsity: float, spec: PruneSpec) -> LayerWidths:
    """Widths that remove `sparsity` of the layer's prunable parameters across FFN and heads.

    Heads are coarse (under GQA one step removes a query head from every KV group), so the
    head count is rounded first, never past the layer's share, and FFN neurons fill the rest.
    """
    now = adapter.widths(layer)
    to_remove = sparsity * adapter.prunable_params(layer)
    heads = now.heads
    if "heads" in spec.targets:
        step = adapter.head_step(layer)
        per_step = step * adapter.query_head_params(layer)
        steps = min(round(sparsity * now.heads / step), now.heads // step - 1)
        if "ffn" in spec.targets:
            steps = min(steps, int(to_remove // per_step))
        heads -= steps * step
        to_remove -= steps * per_step
    ffn = now.ffn
    if "ffn" in spec.targets:
        ffn = now.ffn - round(to_remove / adapter.ffn_neuron_params(layer))
        if spec.round_to > 1:
            ffn = min(now.ffn, spec.round_to * round(ffn / spec.round_to))
        if ffn < max(1, spec.round_to):
            raise EdgepruneError(
                f"sparsity {sparsity} would remove every FFN neuron of a layer: lower --sparsity "
                "or add heads to --targets"
            )
    return LayerWidths(ffn=ffn, heads=heads, kv_heads=now.kv_heads)


def plan_uniform_widths(model: nn.Module, adapter: FamilyAdapter, spec: PruneSpec) -> list[LayerWidths]:
    """The same sparsity in every unprotected layer (LLM-Pruner's default allocation)."""
    layers = adapter.layers(model)
    pruned = set(spec.pruned_layers(len(layers)))
    return [
        plan_layer_widths(adapter, layer, spec.sparsity, spec) if i in pruned else adapter.widths(layer)
        for i, layer in enumerate(layers)
    ]


def normalized(scores: torch.Tensor) -> torch.Tensor:
    """A layer's scores over their mean magnitude, so a layer's raw scale does not decide its share of the cut."""
    scores = scores.double()
    scale = scores.abs().mean()
    return scores / scale if scale > 0 else torch.ones_like(scores)


def removal_units(
    adapter: FamilyAdapter, layer: nn.Module, index: int, scores: GroupScores, spec: PruneSpec
) -> list[tuple[float, int, str, int]]:
    """(normalized score, layer index, kind, parameters) of every group the layer may lose under `min_keep`.

    A head unit is one head step (under GQA, the i-th weakest query head of every KV group), scored by
    the mean of its heads, so units come in the order `select_keep` would remove them.
    """
    now = adapter.widths(layer)
    units: list[tuple[float, int, str, int]] = []
    if "ffn" in spec.targets:
        removable = now.ffn - max(1, math.ceil(spec.min_keep * now.ffn))
        cost = adapter.ffn_neuron_params(layer)
        units += [(v, index, "ffn", cost) for v in normalized(scores.ffn[index]).sort().values[:removable].tolist()]
    if "heads" in spec.targets:
        step = adapter.head_step(layer)
        steps = now.heads // step
        per_step = normalized(scores.heads[index]).reshape(step, steps).sort(dim=1).values.mean(dim=0)
        removable = steps - max(1, math.ceil(spec.min_keep * steps))
        cost = step * adapter.query_head_params(layer)
        units += [(v, index, "heads", cost) for v in per_step[:removable].tolist()]
    return units


def plan_global_widths(
    model: nn.Module, adapter: FamilyAdapter, scores: GroupScores, spec: PruneSpec
) -> list[LayerWidths]:
    """Widths from one ranking of all unprotected layers' groups on per-layer normalized scores.

    Removes the lowest-ranked groups until `spec.sparsity` of the pruned layers' prunable
    parameters is gone (the uniform plan's definition), keeping `min_keep` of every layer.
    """
    layers = adapter.layers(model)
    pruned = spec.pruned_layers(len(layers))
    budget = spec.sparsity * prunable_parameters(model, adapter, pruned)
    units = sorted(u for i in pruned for u in removal_units(adapter, layers[i], i, scores, spec))
    cut = {(i, kind): 0 for i in pruned for kind in TARGETS}
    for _, i, kind, cost in units:
        if cost <= budget:
            cut[i, kind] += 1
            budget -= cost
    if units and budget >= max(cost for *_, cost in units):
        raise EdgepruneError(
            f"sparsity {spec.sparsity} cannot be reached while every layer keeps {spec.min_keep:.0%} of its groups: "
            "lower --sparsity or add targets"
        )
    plan = [adapter.widths(layer) for layer in layers]
    for i in pruned:
        now = plan[i]
        ffn = now.ffn - cut[i, "ffn"]
        if spec.round_to > 1 and ffn < now.ffn:
            ffn = min(now.ffn, max(spec.round_to, spec.round_to * round(ffn / spec.round_to)))
        heads = now.heads - cut[i, "heads"] * adapter.head_step(layers[i])
        plan[i] = LayerWidths(ffn=ffn, heads=heads, kv_heads=now.kv_heads)
    return plan


def plan_widths(model: nn.Module, adapter: FamilyAdapter, scores: GroupScores, spec: PruneSpec) -> list[LayerWidths]:
    """Per-layer widths at `spec`, by its allocation rule (no cut is made)."""
    if spec.allocation == "global":
        return plan_global_widths(model, adapter, scores, spec)
    return plan_uniform_widths(model, adapter, spec)


def select_keep(
    model: nn.Module, adapter: FamilyAdapter, scores: GroupScores, plan: list[LayerWidths]
) -> list[LayerKeep]:
    """The highest-scoring groups of each layer, as many as the plan keeps."""
    keep = []
    for i, (layer, widths) in enumerate(zip(adapter.layers(model), plan, strict=True)):
        now = adapter.widths(layer)
        entry = LayerKeep()
        if widths.ffn < now.ffn:
            entry.ffn = torch.sort(torch.topk(scores.ffn[i], widths.ffn).indices).values
        if widths.heads < now.heads:
            entry.heads = adapter.select_heads(scores.heads[i], widths.heads, layer)
        keep.append(entry)
    return keep


def cut_model(model: nn.Module, adapter: FamilyAdapter, keep: list[LayerKeep]) -> None:
    """Replace the projections of every layer by smaller ones holding only the kept groups."""
    for layer, entry in zip(adapter.layers(model), keep, strict=True):
        if entry.ffn is not None:
            adapter.cut_ffn(layer, entry.ffn)
        if entry.heads is not None:
            adapter.cut_heads(layer, entry.heads)
    record_widths(model, adapter)


def layer_widths(model: nn.Module, adapter: FamilyAdapter) -> list[LayerWidths]:
    return [adapter.widths(layer) for layer in adapter.layers(model)]


def record_widths(model: nn.Module, adapter: FamilyAdapter) -> None:
    """Write the per-layer widths into the config, named as the config names the uniform ones."""
    widths = layer_widths(model, adapter)
    setattr(
        model.config,
        WIDTHS_KEY,
        {
            "intermediate_size": [w.ffn for w in widths],
            "num_attention_heads": [w.heads for w in widths],
            "num_key_value_heads": [w.kv_heads for w in widths],
        },
    )


def widths_from_config(config) -> list[LayerWidths] | None:
    saved = getattr(config, WIDTHS_KEY, None)
    if not saved:
        return None
    return [
        LayerWidths(ffn=f, heads=h, kv_heads=kv)
        for f, h, kv in zip(
            saved["intermediate_size"], saved["num_attention_heads"], saved["num_key_value_heads"], strict=True
        )
    ]


def apply_widths(model: nn.Module, adapter: FamilyAdapter, widths: list[LayerWidths]) -> None:
    """Give an unpruned (usually empty, meta-device) model the saved per-layer shapes."""
    keep = []
    for layer, target in zip(adapter.layers(model), widths, strict=True):
        now = adapter.widths(layer)
        entry = LayerKeep()
        if target.ffn != now.ffn:
            entry.ffn = torch.arange(target.ffn)
        if (target.heads, target.kv_heads) != (now.heads, now.kv_heads):
            group, per_group = now.heads // now.kv_heads, target.heads // target.kv_heads
            entry.heads = torch.tensor(
                [g * group + j for g in range(target.kv_heads) for j in range(per_group)], dtype=torch.long
            )
        keep.append(entry)
    cut_model(model, adapter, keep)


def prunable_parameters(model: nn.Module, adapter: FamilyAdapter, layers: list[int] | None = None) -> int:
    all_layers = adapter.layers(model)
    chosen = range(len(all_layers)) if layers is None else layers
    return sum(adapter.prunable_params(all_layers[i]) for i in chosen)


def prune_model(
    model: nn.Module,
    adapter: FamilyAdapter,
    scores: GroupScores,
    spec: PruneSpec,
    before_cut: Callable[[list[LayerKeep]], None] | None = None,
    cut: Callable[[nn.Module, FamilyAdapter, list[LayerKeep], list[LayerWidths]], object] | None = None,
) -> PruneSummary:
    """Cut `model` in place at `spec` using `scores`; returns the parameter accounting.

    `before_cut(keep)` runs while the removed weights still exist (FLAP's bias compensation);
    `cut(model, adapter, keep, plan)` replaces the plain cut (compensation re-fits as it cuts).
    """
    pruned_layers = spec.pruned_layers(len(adapter.layers(model)))
    if not pruned_layers:
        raise EdgepruneError("every layer is protected: lower --protect-first/--protect-last")
    params_before = count_parameters(model)
    prunable_before = prunable_parameters(model, adapter, pruned_layers)
    plan = plan_widths(model, adapter, scores, spec)
    keep = select_keep(model, adapter, scores, plan)
    if before_cut is not None:
        before_cut(keep)
    if cut is None:
        cut_model(model, adapter, keep)
    else:
        cut(model, adapter, keep, plan)
    return PruneSummary(
        params_before=params_before,
        params_after=count_parameters(model),
        prunable_before=prunable_before,
        prunable_after=prunable_parameters(model, adapter, pruned_layers),
        widths=layer_widths(model, adapter),
    )


def describe_model(model: nn.Module) -> dict:
    """Per-layer widths and parameter counts, as plain data for `inspect` and reports."""
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    return {
        "model_type": model.config.model_type,
        "params": count_parameters(model),
        "prunable_params": prunable_parameters(model, adapter),
        "layers": [{**adapter.widths(layer).__dict__, "params": adapter.prunable_params(layer)} for layer in layers],
    }

"""LLM-Pruner's Taylor criterion: how much the language-model loss would change if a group were removed.

Removing a group sets its weights W to 0, so to first order the loss changes by -Σ W·∂L/∂W.
Options (`TaylorOptions`):
- `taylor`: `first` (default; element-wise Σ|W·g| over the group), `second` (element-wise
  Σ|W·g - ½·W·F·W| with F the diagonal Fisher, the mean of per-sequence g²), `vector`
  (|Σ W·g| per linear, the signed first-order loss change).
- `aggregation`: how the per-linear scores of one coupled group are combined (sum, mean, max, prod).
- `micro_batch`: sequences per backward pass (default 2; `second` needs per-sequence gradients and uses 1).
- `mask_token_id`: for masked-LM encoders, the id that replaces masked tokens (else a random token).

Loss: causal-LM loss for decoders; masked-LM loss for encoders with an LM head (15% of tokens
masked with a generator seeded by `inputs.seed`); for a sequence classifier, its task loss on
labelled sentences (`inputs.labels`, one per sequence, with the padding mask and token types in
`inputs.token_inputs`): the supervised Taylor score the label-free criteria are compared with. A bare encoder
(no LM head, e.g. a sentence embedder) has no loss whose gradient ranks groups, so it is refused.

Memory: only the prunable projections get gradients (embeddings, norms and the LM head are
frozen for the pass), autograd accumulates micro-batches in place, and each layer's gradients
are freed as soon as the layer is scored. The second order keeps one Fisher buffer per projection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from edgeprune.criteria.base import GroupScores, ScoringInputs, register
from edgeprune.errors import EdgepruneError
from edgeprune.models import CAUSAL_LM, CLASSIFIER, ENCODER, IGNORE, MASK_FRACTION, FamilyAdapter, model_kind

ORDERS = ("first", "second", "vector")
AGGREGATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum": lambda t: t.sum(0),
    "mean": lambda t: t.mean(0),
    "max": lambda t: t.amax(0),
    "prod": lambda t: t.prod(0),
}
GRADIENT_WINDOWS = 10  # LLM-Pruner's calibration sequences for gradients (CPU-sized)


@dataclass(frozen=True)
class TaylorOptions:
    """Options of `taylor` (see the module docstring)."""

    taylor: str = "first"
    aggregation: str = "sum"
    micro_batch: int = 2
    mask_token_id: int | None = None

    def __post_init__(self) -> None:
        for key, allowed in (("taylor", ORDERS), ("aggregation", tuple(AGGREGATIONS))):
            if getattr(self, key) not in allowed:
                raise EdgepruneError(
                    f"taylor option {key}='{getattr(self, key)}' is unknown: choose from {', '.join(allowed)}"
                )
        if self.micro_batch < 1:
            raise EdgepruneError(f"taylor micro_batch must be >= 1, got {self.micro_batch}")


def unique(linears: list[nn.Linear]) -> list[nn.Linear]:
    return list({id(lin): lin for lin in linears}.values())


def group_linears(adapter: FamilyAdapter, layer: nn.Module) -> list[nn.Linear]:
    """The projections whose rows or columns belong to an FFN neuron or a query-head group."""
    return unique(
        [*adapter.ffn_inputs(layer), adapter.ffn_output(layer), *adapter.head_inputs(layer), adapter.head_output(layer)]
    )


def params_of(linears: list[nn.Linear]) -> list[nn.Parameter]:
    return [p for lin in linears for p in (lin.weight, lin.bias) if p is not None]


@contextmanager
def gradients_only_for(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every other parameter (no gradient buffers for embeddings, norms, LM head); restore after."""
    previous = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    was_training = model.training
    model.eval()  # no dropout: the gradient of the deployed function
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
        p.grad = None
    try:
        yield
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)


def lm_targets(model: nn.Module, calibration: torch.Tensor, inputs: ScoringInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) for the model's own loss; refuses a model without an LM head or task labels."""
    kind = model_kind(model)
    if kind == CLASSIFIER:
        if inputs.labels is None or len(inputs.labels) != len(calibration):
            raise EdgepruneError(
                "taylor on a sequence classifier needs one task label per calibration sentence "
                "(ScoringInputs.labels, e.g. from `labelled_batch`): or score it with a label-free criterion"
            )
        return calibration, inputs.labels
    if inputs.labels is not None:
        raise EdgepruneError(f"{type(model).__name__} is not a sequence classifier: score it without labels")
    if kind == CAUSAL_LM:
        return calibration, calibration.clone()
    if kind == ENCODER:
        raise EdgepruneError(
            f"taylor needs a language-model head, and {type(model).__name__} has none: score this model with "
            "fluctuation, wanda-sp or magnitude, or load its ...ForMaskedLM class"
        )
    gen = torch.Generator().manual_seed(inputs.seed)
    draws = torch.rand(calibration.shape, generator=gen)
    masked = draws < MASK_FRACTION
    masked[torch.arange(len(calibration)), draws.argmin(dim=1)] = True  # every sequence predicts at least one token
    mask_id = inputs.options.mask_token_id
    if mask_id is None:
        replacement = torch.randint(0, model.config.vocab_size, calibration.shape, generator=gen)
    else:
        replacement = torch.full_like(calibration, int(mask_id))
    ids = torch.where(masked, replacement, calibration)
    labels = torch.where(masked, calibration, torch.full_like(calibration, IGNORE))
    return ids, labels


def predicted_tokens(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Tokens each sequence's loss averages over (causal LMs predict all but the first; a classifier, one label)."""
    kind = model_kind(model)
    if kind == CLASSIFIER:
        return torch.ones(len(labels), dtype=torch.long)
    counted = labels[:, 1:] if kind == CAUSAL_LM else labels
    return (counted != IGNORE).sum(dim=1)


def accumulate_gradients(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    micro_batch: int,
    fisher: dict[nn.Parameter, torch.Tensor] | None,
    inputs: ScoringInputs,
) -> None:
    """Leave ∂L/∂W of the whole batch's mean token loss in `.grad`; with `fisher`, also mean per-sequence g²."""
    weights = predicted_tokens(model, labels).double()
    weights = weights / weights.sum()
    n_steps = -(-len(ids) // micro_batch)
    current = {"scale": 1.0}

    def add_square(buffer: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:  # returns None: the gradient itself is left unchanged
            buffer.add_((grad / current["scale"]).square() / len(ids))

        return hook

    handles = []
    if fisher is not None:  # micro_batch is 1: the hook sees one sequence's weighted gradient
        handles = [p.register_hook(add_square(buffer)) for p, buffer in fisher.items()]
    try:
        for step, start in enumerate(range(0, len(ids), micro_batch)):
            chunk = slice(start, start + micro_batch)
            current["scale"] = float(weights[chunk].sum())
            extra = {name: tensor[chunk] for name, tensor in inputs.token_inputs.items()}
            loss = model(input_ids=ids[chunk], labels=labels[chunk], **extra).loss
            (loss * current["scale"]).backward()
            inputs.report("gradients", step + 1, n_steps)
    finally:
        for handle in handles:
            handle.remove()


def group_sums(tensor: torch.Tensor, dim: int, n_groups: int) -> torch.Tensor:
    """Sum of a weight-shaped tensor over each group's contiguous block of rows (dim=0) or columns (dim=1)."""
    along = tensor if dim == 0 else tensor.transpose(0, 1)
    return along.reshape(n_groups, -1).sum(dim=1)


def salience(param: nn.Parameter, fisher: dict[nn.Parameter, torch.Tensor] | None, order: str) -> torch.Tensor:
    """Element-wise loss-change estimate of zeroing each weight: W·g, or W·g - ½·W·F·W (second order)."""
    weight, grad = param.detach(), param.grad
    if grad is None:
        grad = torch.zeros_like(weight)  # no path from this parameter to the loss
    value = weight * grad
    if order == "second":
        value = value - 0.5 * weight * fisher[param] * weight
    return value if order == "vector" else value.abs()


def linear_group_salience(
    linear: nn.Linear, dim: int, n_groups: int, order: str, fisher: dict[nn.Parameter, torch.Tensor] | None
) -> torch.Tensor:
    """Per-group salience of one linear (signed for `vector`): its rows or columns, plus bias rows."""
    total = group_sums(salience(linear.weight, fisher, order), dim, n_groups)
    if dim == 0 and linear.bias is not None:
        total = total + salience(linear.bias, fisher, order).reshape(n_groups, -1).sum(dim=1)
    return total


def coupled_salience(
    parts: list[tuple[nn.Linear, int]], n_groups: int, order: str, fisher, aggregation: str
) -> torch.Tensor:
    """One score per group: the per-linear saliences (made non-negative) combined by `aggregation`."""
    stacked = torch.stack([linear_group_salience(lin, dim, n_groups, order, fisher).abs() for lin, dim in parts])
    return AGGREGATIONS[aggregation](stacked.double()).float()


def layer_scores(
    adapter: FamilyAdapter, layer: nn.Module, order: str, fisher, aggregation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    widths = adapter.widths(layer)
    ffn_parts = [(lin, 0) for lin in adapter.ffn_inputs(layer)] + [(adapter.ffn_output(layer), 1)]
    head_parts = [(lin, 0) for lin in adapter.head_inputs(layer)] + [(adapter.head_output(layer), 1)]
    return (
        coupled_salience(ffn_parts, widths.ffn, order, fisher, aggregation),
        coupled_salience(head_parts, widths.heads, order, fisher, aggregation),
    )


@register("taylor", TaylorOptions, needs_calibration=True, takes_labels=True, windows=GRADIENT_WINDOWS)
def score_taylor(model: nn.Module, adapter: FamilyAdapter, inputs: ScoringInputs) -> GroupScores:
    opts: TaylorOptions = inputs.options
    order, aggregation = opts.taylor, opts.aggregation
    micro_batch = 1 if order == "second" else opts.micro_batch
    ids, labels = lm_targets(model, inputs.calibration, inputs)
    layers = adapter.layers(model)
    per_layer = [params_of(group_linears(adapter, layer)) for layer in layers]
    params = [p for group in per_layer for p in group]
    ffn, heads = [], []
    with gradients_only_for(model, params):
        fisher = {p: torch.zeros_like(p, dtype=torch.float32) for p in params} if order == "second" else None
        accumulate_gradients(model, ids, labels, micro_batch, fisher, inputs)
        for i, (layer, group) in enumerate(zip(layers, per_layer, strict=True)):
            with torch.no_grad():
                f, h = layer_scores(adapter, layer, order, fisher, aggregation)
            ffn.append(f)
            heads.append(h)
            for p in group:  # free this layer's gradients now rather than at the end
                p.grad = None
                if fisher is not None:
                    del fisher[p]
            inputs.report("layers", i + 1, len(layers))
    return GroupScores(ffn=ffn, heads=heads)

"""What every model-family adapter provides: where the prunable groups are and how to slice them.

A family adapter knows the module names of one architecture family and what kind of model it is
(causal decoder or bidirectional encoder). Everything that is the same across families (slicing
linears, counting parameters) lives here once, and so does the registry that finds a family by
`config.model_type`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from edgeprune.errors import EdgepruneError

# What a family's layers compute: a causal decoder (next-token LM) or a bidirectional encoder.
CAUSAL_LM = "causal-lm"
ENCODER = "encoder"


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one transformer layer: FFN neurons, query heads, key/value heads."""

    ffn: int
    heads: int
    kv_heads: int


def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim=0, output features) or columns (dim=1, input features).

    dtype and device are kept; on the meta device this only builds shapes, which is how
    a pruned checkpoint's empty model gets its saved widths.
    """
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index)
    has_bias = linear.bias is not None
    out_features, in_features = weight.shape
    new = nn.Linear(in_features, out_features, bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if has_bias:
            bias = linear.bias.detach()
            new.bias.copy_(bias.index_select(0, index) if dim == 0 else bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of a projection that belong to the given heads, in head order."""
    offsets = torch.arange(head_dim, device=heads.device)
    return (heads[:, None] * head_dim + offsets[None, :]).reshape(-1)


def linear_params(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


class FamilyAdapter(ABC):
    """Where one architecture family keeps its prunable groups, and how to cut them.

    Groups: an FFN neuron is one row of every `ffn_inputs` linear (with its bias) and one
    column of `ffn_output`; an attention group is one query head (its rows of the query
    projection and columns of the output projection; for families without shared KV
    heads, also its key/value rows).
    """

    model_types: ClassVar[tuple[str, ...]] = ()  # the `config.model_type` values this family serves
    kind: ClassVar[str]  # CAUSAL_LM or ENCODER
    # Config flags that switch a kind's biases ("ffn", "heads") on for every layer at once, where
    # the family has such flags; a bias added to one projection (bias compensation) needs them set.
    bias_flags: ClassVar[dict[str, str]] = {}

    def __init__(self, prune_kv_heads: bool = False):
        self.prune_kv_heads = prune_kv_heads  # families without shared KV heads have no KV group to remove

    # -- where things are ---------------------------------------------------------------
    @abstractmethod
    def layers(self, model: nn.Module) -> list[nn.Module]:
        """The transformer layers, in order."""

    @abstractmethod
    def ffn_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears whose output rows are FFN neurons."""

    @abstractmethod
    def ffn_output(self, layer: nn.Module) -> nn.Linear:
        """The linear whose input columns are FFN neurons; its input is the activation."""

    @abstractmethod
    def attention_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """All attention projections of a layer, by name (q, k, v, o)."""

    @abstractmethod
    def head_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        """Linears whose rows come in per-query-head blocks of `head_dim` (q; for BERT also k, v)."""

    def input_norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module] | None:
        """The norms whose outputs are the attention's and the FFN's inputs, each output multiplied by a per-channel
        `weight` (pre-norm families; a scale on those inputs can be folded into them); None: post-norm."""
        return None

    def ffn_plain_input(self, layer: nn.Module) -> nn.Linear | None:
        """The FFN input Linear whose output multiplies the activated one, not passing through the activation
        (gated FFNs: a scale on the output projection's inputs can be folded into its rows); None: ungated."""
        return None

    def head_output(self, layer: nn.Module) -> nn.Linear:
        """The output projection, whose columns come in per-head blocks."""
        return self.attention_projections(layer)["o"]

    @abstractmethod
    def head_dim(self, layer: nn.Module) -> int:
        """Width of one attention head; never cut."""

    @abstractmethod
    def widths(self, layer: nn.Module) -> LayerWidths:
        """Current widths of a layer."""

    @abstractmethod
    def head_step(self, layer: nn.Module) -> int:
        """Query heads must be removed in multiples of this (one per KV group under GQA)."""

    @abstractmethod
    def select_heads(self, scores: torch.Tensor, n_keep: int, layer: nn.Module) -> torch.Tensor:
        """Sorted indices of the query heads to keep, honouring the family's head coupling."""

    @abstractmethod
    def cut_heads(self, layer: nn.Module, keep: torch.Tensor) -> None:
        """Remove every query head not in `keep` (sorted indices) and update the layer's attributes."""

    # -- shared mechanics ---------------------------------------------------------------
    def cut_ffn(self, layer: nn.Module, keep: torch.Tensor) -> None:
        """Remove every FFN neuron not in `keep` (sorted indices)."""
        for owner, name, linear in self._named(layer, self.ffn_inputs(layer)):
            setattr(owner, name, slice_linear(linear, keep, dim=0))
        owner, name, linear = self._named(layer, [self.ffn_output(layer)])[0]
        setattr(owner, name, slice_linear(linear, keep, dim=1))

    def ffn_neuron_params(self, layer: nn.Module) -> int:
        """Parameters removed with one FFN neuron."""
        rows = sum(lin.in_features + (1 if lin.bias is not None else 0) for lin in self.ffn_inputs(layer))
        return rows + self.ffn_output(layer).out_features

    def prunable_params(self, layer: nn.Module) -> int:
        """Parameters of the layer's FFN and attention projections."""
        linears = [*self.ffn_inputs(layer), self.ffn_output(layer), *self.attention_projections(layer).values()]
        return sum(linear_params(lin) for lin in linears)

    def layer_params(self, layer: nn.Module, widths: LayerWidths) -> int:
        """Prunable parameters the layer would have at `widths` (exact, from its current shapes)."""
        now = self.widths(layer)
        attn_now = sum(linear_params(p) for p in self.attention_projections(layer).values())
        per_head = self.query_head_params(layer)
        per_kv = self.kv_head_params(layer)
        attn = attn_now - (now.heads - widths.heads) * per_head - (now.kv_heads - widths.kv_heads) * per_kv
        output_bias = self.ffn_output(layer).bias  # one per hidden unit, kept whatever the FFN width (BERT)
        ffn_fixed = output_bias.numel() if output_bias is not None else 0
        return self.ffn_neuron_params(layer) * widths.ffn + ffn_fixed + attn

    @abstractmethod
    def query_head_params(self, layer: nn.Module) -> int:
        """Parameters removed with one query head (keeping its KV head)."""

    @abstractmethod
    def kv_head_params(self, layer: nn.Module) -> int:
        """Parameters removed with one key/value head on top of its query heads (0 if not separate)."""

    @staticmethod
    def _named(layer: nn.Module, linears: list[nn.Linear]) -> list[tuple[nn.Module, str, nn.Linear]]:
        """(parent module, attribute name, linear) for each linear, so it can be replaced."""
        wanted = {id(lin): lin for lin in linears}
        found: dict[int, tuple[nn.Module, str, nn.Linear]] = {}
        for parent in layer.modules():
            for name, child in parent.named_children():
                if id(child) in wanted:
                    found[id(child)] = (parent, name, child)
        return [found[id(lin)] for lin in linears]


FAMILIES: list[type[FamilyAdapter]] = []  # in registration order; `register_family` adds to it


def register_family(adapter: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: serve the adapter's `model_types` with it."""
    taken = {t for family in FAMILIES for t in family.model_types} & set(adapter.model_types)
    if taken or adapter.kind not in (CAUSAL_LM, ENCODER):
        raise ValueError(f"{adapter.__name__}: model types {sorted(taken)} taken, or kind {adapter.kind!r} unknown")
    FAMILIES.append(adapter)
    return adapter


def family_for(config) -> type[FamilyAdapter]:
    """The registered family serving `config.model_type`, or a one-line refusal naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for family in FAMILIES for t in family.model_types)
    raise EdgepruneError(f"unsupported architecture '{model_type}': edgeprune supports {supported}")

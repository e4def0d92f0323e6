"""Whole-layer removal: score each transformer block by how much it changes its input, drop the weakest.

A removed block saves all of its time, norms, rotary embedding and attention softmax included. Two
importance measures (higher = keep), both from the block's input X and output Y on calibration tokens:
- `block-influence` (ShortGPT, Men et al. 2024): 1 - mean cosine similarity of X and Y per token;
- `block-information`: the share of Y's information its input does not explain, 1 - I(X;Y)/S(Y), with
  the matrix-based Rényi α=2 estimator on Gaussian Gram matrices of sampled token positions (median
  rule width): a block whose output is nearly a function of its input carries little new.
Removing a layer deletes it from the layer list and renumbers the remaining layers' cache slots;
`config.removed_layers` keeps the original indices and `config.num_hidden_layers` the new depth, so
a saved checkpoint reloads with the ordinary shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.compensate import first_layer_inputs, layer_output
from edgeprune.errors import EdgepruneError
from edgeprune.models import FamilyAdapter
from edgeprune.structure import record_widths

LAYER_MEASURES = ("block-influence", "block-information")
REMOVED_KEY = "removed_layers"


def block_io(
    model: nn.Module, adapter: FamilyAdapter, calibration: torch.Tensor, batch_size: int = 8
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) hidden states [tokens, hidden] of every block on the calibration windows."""
    calls = first_layer_inputs(model, adapter, calibration, batch_size)
    pairs = []
    with torch.no_grad():
        for layer in adapter.layers(model):
            outputs = [layer_output(layer(*args, **kwargs)) for args, kwargs in calls]
            x = torch.cat([args[0].reshape(-1, args[0].shape[-1]) for args, _ in calls])
            pairs.append((x.float(), torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs]).float()))
            calls = [((out, *args[1:]), kwargs) for out, (args, kwargs) in zip(outputs, calls, strict=True)]
    return pairs


def block_influence(x: torch.Tensor, y: torch.Tensor) -> float:
    """ShortGPT's BI: 1 - mean cosine similarity between a block's input and output tokens."""
    return float(1 - nn.functional.cosine_similarity(x.double(), y.double(), dim=1).mean())


def renyi2_gram(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """Trace-one Gaussian Gram matrix of the rows of z."""
    k = torch.exp(-torch.cdist(z, z).square() / (2 * sigma**2))
    return k / k.shape[0]


def renyi2(a: torch.Tensor) -> float:
    return float(-torch.log2(a.square().sum()))


def median_width(z: torch.Tensor) -> float:
    distances = torch.cdist(z, z)
    return float(distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), 1)].median().clamp_min(1e-12))


def block_information(x: torch.Tensor, y: torch.Tensor, n_positions: int = 512, seed: int = 0) -> float:
    """1 - I_2(X;Y)/S_2(Y) on `n_positions` sampled tokens: what the output holds beyond the input."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(x), generator=gen)[: min(n_positions, len(x))]
    x, y = x[rows].double(), y[rows].double()
    a_x, a_y = renyi2_gram(x, median_width(x)), renyi2_gram(y, median_width(y))
    joint = a_x * a_y
    joint = joint / joint.trace()
    s_y = renyi2(a_y)
    mutual = renyi2(a_x) + s_y - renyi2(joint)
    return 1 - mutual / s_y


def layer_importance(
    model: nn.Module, adapter: FamilyAdapter, calibration: torch.Tensor, measure: str = "block-influence"
) -> torch.Tensor:
    """One importance per layer (higher = keep)."""
    if measure not in LAYER_MEASURES:
        raise EdgepruneError(f"unknown layer measure '{measure}': choose from {', '.join(LAYER_MEASURES)}")
    score = block_influence if measure == "block-influence" else block_information
    return torch.tensor([score(x, y) for x, y in block_io(model, adapter, calibration)])


def layers_to_remove(importance: torch.Tensor, n_remove: int, protect_first: int, protect_last: int) -> list[int]:
    """The `n_remove` least important layers outside the protected ends, in index order."""
    candidates = list(range(protect_first, len(importance) - protect_last))
    if not 0 <= n_remove < len(importance) or n_remove > len(candidates):
        raise EdgepruneError(
            f"cannot remove {n_remove} of {len(candidates)} unprotected layers: lower --sparsity or protect fewer"
        )
    ranked = sorted(candidates, key=lambda i: float(importance[i]))
    return sorted(ranked[:n_remove])


def remove_layers(model: nn.Module, adapter: FamilyAdapter, indices: list[int]) -> None:
    """Delete the given layers (indices into the current list) and keep the config and cache slots consistent."""
    layers = adapter.layers(model)
    container = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) and m[0] is layers[0])
    kept_before = getattr(model.config, REMOVED_KEY, None) or []
    original = [i for i in range(len(layers) + len(kept_before)) if i not in kept_before]
    gone = sorted(set(indices))
    for i in reversed(gone):
        del container[i]
    for new_index, layer in enumerate(container):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    model.config.num_hidden_layers = len(container)
    setattr(model.config, REMOVED_KEY, sorted(kept_before + [original[i] for i in gone]))
    record_widths(model, adapter)

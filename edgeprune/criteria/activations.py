"""Channel statistics of the inputs of FFN and attention output projections on calibration tokens.

The input of `down_proj` (or BERT's `output.dense`) is the FFN activation, one channel per
neuron (for SwiGLU, act(gate) * up); the input of `o_proj` is the concatenated head
outputs. Activation-aware criteria (MI, fluctuation, wanda-sp) read them from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeprune.models import FamilyAdapter


@dataclass
class ChannelStats:
    """Running moments per channel plus a seeded sample of rows (token positions)."""

    count: int = 0
    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None
    total_abs: torch.Tensor | None = None
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(self, rows: torch.Tensor, sampled: torch.Tensor | None) -> None:
        rows64 = rows.detach().double()
        if self.total is None:
            self.total = torch.zeros(rows.shape[1], dtype=torch.float64)
            self.total_sq = torch.zeros_like(self.total)
            self.total_abs = torch.zeros_like(self.total)
        self.count += rows.shape[0]
        self.total += rows64.sum(0)
        self.total_sq += rows64.pow(2).sum(0)
        self.total_abs += rows64.abs().sum(0)
        if sampled is not None and len(sampled):
            self.samples.append(rows.detach().float()[sampled])

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        return (self.total_sq / self.count - self.mean.pow(2)).clamp_min(0.0)

    @property
    def mean_square(self) -> torch.Tensor:
        return self.total_sq / self.count

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.total_abs / self.count

    @property
    def sampled(self) -> torch.Tensor:
        """[n_sampled_positions, channels] float32."""
        return torch.cat(self.samples) if self.samples else torch.empty(0)


def record_inputs(
    model: nn.Module,
    modules: list[nn.Module],
    calibration: torch.Tensor,
    batch_size: int,
    record: Callable[[int, int, torch.Tensor], None],
) -> None:
    """Run the model over the calibration windows in batches; `record(i, first_window, x)` sees the input of
    `modules[i]` for the batch starting at window `first_window`. The hooks are removed whatever happens."""
    first = {"window": 0}

    def hook_for(index: int):
        return lambda _module, args: record(index, first["window"], args[0])

    handles = [module.register_forward_pre_hook(hook_for(i)) for i, module in enumerate(modules)]
    try:
        with torch.no_grad():
            for start in range(0, len(calibration), batch_size):
                first["window"] = start
                model(input_ids=calibration[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()


def collect_channel_stats(
    model: nn.Module,
    adapter: FamilyAdapter,
    calibration: torch.Tensor,
    module_of: Callable[[nn.Module], nn.Module],
    n_sampled: int = 0,
    seed: int = 0,
    batch_size: int = 8,
) -> list[ChannelStats]:
    """Stats of the input of `module_of(layer)` for every layer over the calibration batch.

    `n_sampled` token positions (the same positions in every layer, chosen with `seed`)
    are also kept whole, for criteria that compare channels position by position.
    """
    n_seq, seq_len = calibration.shape
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_seq * seq_len, generator=gen)[: min(n_sampled, n_seq * seq_len)].sort().values
    layers = adapter.layers(model)
    stats = [ChannelStats() for _ in layers]

    def record(i: int, first_window: int, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        lo, hi = first_window * seq_len, first_window * seq_len + rows.shape[0]
        stats[i].add(rows, chosen[(chosen >= lo) & (chosen < hi)] - lo)

    record_inputs(model, [module_of(layer) for layer in layers], calibration, batch_size, record)
    return stats

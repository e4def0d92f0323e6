"""BERT family (BERT, RoBERTa, XLM-R; MiniLM checkpoints are BERT).

FFN neuron i: row i of intermediate.dense (with its bias), column i of output.dense.
Attention head h: its rows of query/key/value (with biases), its columns of
attention.output.dense.
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.models.base import ENCODER, FamilyAdapter, LayerWidths, head_rows, register_family, slice_linear


@register_family
class BertAdapter(FamilyAdapter):
    model_types = ("bert", "roberta", "xlm-roberta")
    kind = ENCODER

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.encoder.layer)

    def ffn_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.intermediate.dense]

    def ffn_output(self, layer: nn.Module) -> nn.Linear:
        return layer.output.dense

    def attention_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        sa = layer.attention.self
        return {"q": sa.query, "k": sa.key, "v": sa.value, "o": layer.attention.output.dense}

    def head_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        sa = layer.attention.self
        return [sa.query, sa.key, sa.value]

    def head_dim(self, layer: nn.Module) -> int:
        return layer.attention.self.attention_head_size

    def widths(self, layer: nn.Module) -> LayerWidths:
        heads = layer.attention.self.num_attention_heads
        return LayerWidths(ffn=layer.intermediate.dense.out_features, heads=heads, kv_heads=heads)

    def head_step(self, layer: nn.Module) -> int:
        return 1

    def query_head_params(self, layer: nn.Module) -> int:
        sa, hd = layer.attention.self, self.head_dim(layer)
        qkv = 3 * (hd * sa.query.in_features + hd)
        return qkv + hd * layer.attention.output.dense.out_features

    def kv_head_params(self, layer: nn.Module) -> int:
        return 0

    def select_heads(self, scores: torch.Tensor, n_keep: int, layer: nn.Module) -> torch.Tensor:
        return torch.sort(torch.topk(scores, n_keep).indices).values

    def cut_heads(self, layer: nn.Module, keep: torch.Tensor) -> None:
        if len(keep) == 0:
            raise EdgepruneError("cannot remove every attention head of a layer: keep at least one")
        sa, hd = layer.attention.self, self.head_dim(layer)
        rows = head_rows(keep, hd)
        sa.query = slice_linear(sa.query, rows, dim=0)
        sa.key = slice_linear(sa.key, rows, dim=0)
        sa.value = slice_linear(sa.value, rows, dim=0)
        out = layer.attention.output
        out.dense = slice_linear(out.dense, rows, dim=1)
        sa.num_attention_heads = len(keep)
        sa.all_head_size = len(keep) * hd

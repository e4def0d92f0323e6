"""LLaMA family (Llama, Mistral, Qwen2; SmolLM2 is a Llama): SwiGLU FFN and GQA attention.

FFN neuron i: row i of gate_proj and up_proj, column i of down_proj.
Attention: query heads are cut the same number from every KV group, so every layer keeps
all its KV heads and the KV cache has one shape for all layers (what Optimum's cache
generator and ORTModelForCausalLM assume). With `prune_kv_heads=True` a KV group whose
query heads are all removed goes too; only runtimes with per-layer caches can run that.
head_dim is never cut (RoPE rotates pairs inside a head).
"""

from __future__ import annotations

import torch
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.models.base import CAUSAL_LM, FamilyAdapter, LayerWidths, head_rows, register_family, slice_linear


@register_family
class LlamaAdapter(FamilyAdapter):
    model_types = ("llama", "mistral", "qwen2")
    kind = CAUSAL_LM
    bias_flags = {"ffn": "mlp_bias", "heads": "attention_bias"}

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(model.base_model.layers)

    def ffn_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    def ffn_output(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    def input_norms(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer.input_layernorm, layer.post_attention_layernorm

    def ffn_plain_input(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.up_proj

    def attention_projections(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attn = layer.self_attn
        return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}

    def head_inputs(self, layer: nn.Module) -> list[nn.Linear]:
        return [layer.self_attn.q_proj]

    def head_dim(self, layer: nn.Module) -> int:
        return layer.self_attn.head_dim

    def widths(self, layer: nn.Module) -> LayerWidths:
        attn, hd = layer.self_attn, layer.self_attn.head_dim
        return LayerWidths(
            ffn=layer.mlp.gate_proj.out_features,
            heads=attn.q_proj.out_features // hd,
            kv_heads=attn.k_proj.out_features // hd,
        )

    def head_step(self, layer: nn.Module) -> int:
        return 1 if self.prune_kv_heads else self.widths(layer).kv_heads

    def query_head_params(self, layer: nn.Module) -> int:
        attn, hd = layer.self_attn, layer.self_attn.head_dim
        bias = hd if attn.q_proj.bias is not None else 0
        return hd * attn.q_proj.in_features + bias + hd * attn.o_proj.out_features

    def kv_head_params(self, layer: nn.Module) -> int:
        attn, hd = layer.self_attn, layer.self_attn.head_dim
        per = hd * attn.k_proj.in_features + (hd if attn.k_proj.bias is not None else 0)
        return 2 * per

    def select_heads(self, scores: torch.Tensor, n_keep: int, layer: nn.Module) -> torch.Tensor:
        w = self.widths(layer)
        group = w.heads // w.kv_heads
        if self.prune_kv_heads:
            return torch.sort(torch.topk(scores, n_keep).indices).values
        if n_keep % w.kv_heads:
            raise EdgepruneError(
                f"cannot keep {n_keep} query heads in a layer with {w.kv_heads} KV heads: keep a multiple "
                f"of {w.kv_heads} so every KV group stays equal (or allow KV-head pruning)"
            )
        per_group = n_keep // w.kv_heads
        grouped = scores.reshape(w.kv_heads, group)
        best = torch.topk(grouped, per_group, dim=1).indices.sort(dim=1).values
        keep = best + torch.arange(w.kv_heads, device=scores.device)[:, None] * group
        return keep.reshape(-1)

    def cut_heads(self, layer: nn.Module, keep: torch.Tensor) -> None:
        attn, w = layer.self_attn, self.widths(layer)
        hd, group = attn.head_dim, w.heads // w.kv_heads
        counts = torch.bincount(keep // group, minlength=w.kv_heads)
        kept_groups = torch.nonzero(counts).reshape(-1)
        per_group = counts[kept_groups]
        if len(kept_groups) == 0:
            raise EdgepruneError("cannot remove every attention head of a layer: keep at least one")
        if not bool((per_group == per_group[0]).all()):
            raise EdgepruneError(
                f"query heads kept per KV group differ ({counts.tolist()}): HF attention needs the same "
                "number of query heads in every KV group"
            )
        if len(kept_groups) < w.kv_heads and not self.prune_kv_heads:
            raise EdgepruneError(
                "this cut removes whole KV groups, which changes the KV-cache shape of one layer; "
                "enable KV-head pruning only if the target runtime builds per-layer caches"
            )
        rows = head_rows(keep, hd)
        attn.q_proj = slice_linear(attn.q_proj, rows, dim=0)
        attn.o_proj = slice_linear(attn.o_proj, rows, dim=1)
        if len(kept_groups) < w.kv_heads:
            kv_rows = head_rows(kept_groups, hd)
            attn.k_proj = slice_linear(attn.k_proj, kv_rows, dim=0)
            attn.v_proj = slice_linear(attn.v_proj, kv_rows, dim=0)
        attn.num_key_value_groups = int(per_group[0])

"""The fused decoder graph: onnxruntime-genai's model builder, fed the in-memory (possibly pruned) model.

The builder writes what ONNX Runtime runs fastest for a Llama-style decoder: GroupQueryAttention
with rotary embedding inside, SkipSimplifiedLayerNormalization, packed QKV projections (gate and up
are packed here: `pack_gate_up`), a graph onnxruntime-genai loads (with the genai_config.json written
beside it). Its `load_weights` reads a Hugging Face folder through `from_pretrained`, which rejects
per-layer widths; here it is handed the model object instead, and the modules are walked explicitly
(the builder's own walk takes any Linear as wide as the vocabulary for the lm_head). Each MatMul's
shape comes from its weight, so per-layer FFN widths pass; query-head counts are set per layer (a GQA
node attribute); KV-head counts must be uniform, as onnxruntime-genai sizes one cache for all layers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from torch import nn
from transformers import PreTrainedModel

from edgeprune.errors import EdgepruneError
from edgeprune.export.files import save_onnx

GENAI_CONFIG = "genai_config.json"
FUSED_FAMILIES = ("llama",)  # model_type values whose decoder the builder's LlamaModel expresses
LAYER_NAME = re.compile(r"layers[./]\d+[./]")  # any name of a layer's, as the builder writes them
FFN_TENSOR = re.compile(r"layers[./](\d+)[./]mlp[./]")  # the builder's FFN initializers, before and after quantizing


def genai_builder():
    """onnxruntime-genai's LlamaModel builder class (the package puts its `builders` folder on sys.path)."""
    try:
        import onnxruntime_genai.models  # noqa: F401
        from builders import LlamaModel
    except ImportError:
        raise EdgepruneError(
            "the fused graph needs onnxruntime-genai's model builder: pip install onnxruntime-genai==0.11.4"
        ) from None
    return LlamaModel


def check_fusable(model: PreTrainedModel) -> None:
    """Refuse what the builder's graph cannot express, in one line naming the way out."""
    config = model.config
    if config.model_type not in FUSED_FAMILIES:
        raise EdgepruneError(f"the fused graph supports {', '.join(FUSED_FAMILIES)} decoders, not {config.model_type}")
    kv_heads = {layer.self_attn.k_proj.out_features // head_dim(config) for layer in model.model.layers}
    if len(kv_heads) > 1:
        raise EdgepruneError(
            f"layers keep different KV-head counts {sorted(kv_heads)}: onnxruntime-genai sizes one cache for "
            "all layers; export without --fused"
        )
    if head_dim(config) % 16:
        raise EdgepruneError(
            f"head size {head_dim(config)} is not a multiple of 16, which ONNX Runtime's GroupQueryAttention "
            "needs: export without --fused"
        )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def builder_for(model: PreTrainedModel, cache_dir: Path):
    """A builder instance whose `make_model` walks `model` itself, with each layer's own head counts."""
    import onnx_ir as ir

    base = genai_builder()
    config = copy.deepcopy(model.config)
    config.architectures = ["LlamaForCausalLM"]  # the builder picks its class by this; pruned configs may lack it

    class InMemoryLlama(base):
        def make_model(self, input_path: str) -> None:
            self.make_inputs_and_outputs()
            self.make_preprocessing_nodes()
            self.make_embedding(model.model.embed_tokens.weight)
            for layer_id, layer in enumerate(model.model.layers):
                self.layer_id = layer_id
                self.num_attn_heads = layer.self_attn.q_proj.out_features // self.head_size
                self.make_layer(layer_id, layer)
            self.layer_id = len(model.model.layers)
            self.num_attn_heads = config.num_attention_heads  # what genai_config.json states
            self.make_layernorm(
                self.layer_id, model.model.norm, skip=True, simple=self.layernorm_attrs["simple"], location="final_norm"
            )
            self.make_lm_head(model.lm_head)

    return InMemoryLlama(config, ir.DataType.FLOAT, ir.DataType.FLOAT, "cpu", str(cache_dir), {})


def build_fused(model: PreTrainedModel, folder: Path) -> Path:
    """Write the fused fp32 graph (`model.onnx` + its weights file) and `genai_config.json` into `folder`."""
    import torch

    check_fusable(model)
    model.eval()
    quiet = io.StringIO()  # the builder prints each layer and a progress bar; nothing below the CLI prints
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        scratch = Path(scratch)
        (scratch / "cache").mkdir()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            builder = builder_for(model, scratch / "cache")
            builder.make_model("")
            builder.save_model(str(scratch))
            graph = onnx.load(str(scratch / builder.filename))  # weights in model.onnx.data beside it
            drop_layer_shapes(graph.graph)
            pack_gate_up(graph.graph)
            save_onnx(graph, folder / builder.filename)
            model.config.save_pretrained(folder)  # what Optimum writes too: evaluation and generate read them
            model.generation_config.save_pretrained(folder)
            builder.make_genai_config(str(folder), {}, str(folder))
    return folder / builder.filename


def layer_weights(layer: nn.Module) -> dict[str, np.ndarray]:
    """A decoder layer's projection weights under the builder's initializer names' suffixes, stored [in, out]."""
    attn, mlp = layer.self_attn, layer.mlp

    def stored(linear: nn.Linear) -> np.ndarray:
        return np.ascontiguousarray(linear.weight.detach().float().numpy().T)

    qkv = np.concatenate([stored(attn.q_proj), stored(attn.k_proj), stored(attn.v_proj)], axis=1)
    return {
        "attn.qkv_proj": qkv,
        "attn.o_proj": stored(attn.o_proj),
        "mlp.gate_up_proj": np.concatenate([stored(mlp.gate_proj), stored(mlp.up_proj)], axis=1),
        "mlp.down_proj": stored(mlp.down_proj),
    }


def write_fused_probe(dense_fused: Path, out_file: Path, model: PreTrainedModel) -> Path:
    """The fused graph of a cut `model` from the dense fused fp32 graph in seconds, instead of a rebuild.

    Each layer's projections are replaced by the cut model's own weights (any neurons or query
    heads cut, compensated values included), each GroupQueryAttention gets its layer's head count,
    and the layers' shape annotations are dropped, as in every fused build (`drop_layer_shapes`). The
    embedding, norms and lm_head are the dense graph's, so only FFN and query-head cuts qualify.
    """
    check_fusable(model)
    graph_model = onnx.load(str(dense_fused))
    graph = graph_model.graph
    drop_layer_shapes(graph)  # a dense graph built before they were dropped
    initializers = {init.name: init for init in graph.initializer}
    attention = {n.name: n for n in graph.node if n.op_type == "GroupQueryAttention"}
    size = head_dim(model.config)
    for index, layer in enumerate(model.model.layers):
        for suffix, array in layer_weights(layer).items():
            name = f"model.layers.{index}.{suffix}.MatMul.weight"
            if name not in initializers:
                raise EdgepruneError(f"{dense_fused} has no {name}: give the dense graph `export --fused` wrote")
            initializers[name].CopyFrom(numpy_helper.from_array(array, name))
        gqa = attention[f"/model/layers.{index}/attn/GroupQueryAttention"]
        next(a for a in gqa.attribute if a.name == "num_heads").i = layer.self_attn.q_proj.out_features // size
    return save_onnx(graph_model, out_file)


def pack_gate_up(graph: onnx.GraphProto) -> None:
    """Each layer's gate and up MatMuls (one input, equal widths) become one MatMul of both weights side by side
    and a Split in halves: one pass over the input and one kernel call where there were two. Decoding a token
    calls each projection once, so per-call costs count: 4% faster int4 decode on the default decoder, outputs
    bit-identical (benchmarks/RESULTS.md, "gate and up as one MatMul"). Split by halves needs no width
    constant, so a probe writing cut weights into the graph changes nothing else."""
    weights = {init.name: init for init in graph.initializer}
    nodes = {node.name: node for node in graph.node}
    layer = 0
    while (gate := nodes.get(f"/model/layers.{layer}/mlp/gate_proj/MatMul")) is not None:
        up = nodes[f"/model/layers.{layer}/mlp/up_proj/MatMul"]
        gate_weight, up_weight = weights.pop(gate.input[1]), weights.pop(up.input[1])
        name = f"model.layers.{layer}.mlp.gate_up_proj.MatMul.weight"
        packed = np.concatenate([numpy_helper.to_array(gate_weight), numpy_helper.to_array(up_weight)], axis=1)
        graph.initializer.remove(gate_weight)
        graph.initializer.remove(up_weight)
        graph.initializer.append(numpy_helper.from_array(packed, name))
        basename = f"/model/layers.{layer}/mlp/gate_up_proj"
        index = list(graph.node).index(gate)
        graph.node.remove(gate)
        graph.node.remove(up)
        matmul = onnx.helper.make_node(
            "MatMul", [gate.input[0], name], [f"{basename}/MatMul/output_0"], f"{basename}/MatMul"
        )
        split = onnx.helper.make_node(
            "Split", matmul.output, [gate.output[0], up.output[0]], f"{basename}/Split", axis=-1, num_outputs=2
        )
        graph.node.insert(index, split)
        graph.node.insert(index, matmul)
        layer += 1


def drop_layer_shapes(graph: onnx.GraphProto) -> None:
    """Remove the layers' shape annotations (ONNX Runtime infers them): a probe's cut widths would make them
    stale, and without them a probe written into the dense graph is, byte for byte, as large as the cut model's
    own build, so the size a budget search measured on the probe is the size that ships."""
    for info in [v for v in graph.value_info if LAYER_NAME.search(v.name)]:
        graph.value_info.remove(info)


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes a tensor takes in its file, read from the graph alone (external data is not loaded)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int(next(entry.value for entry in tensor.external_data if entry.key == "length"))
    return len(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).nbytes


@dataclass
class FfnBytes:
    """What one layer's FFN takes in a file: the gate/up rows (linear in the neurons kept) and the down
    projection, stored in blocks of `block` neurons along its `width` inputs (1: float, no blocks)."""

    rows_mb: float = 0.0
    down_mb: float = 0.0
    width: int = 0
    block: int = 1

    def cut_mb(self, kept: int) -> float:
        """MB the layer frees when it keeps `kept` neurons (a partial block of the down projection stays whole)."""
        blocks = math.ceil(self.width / self.block)
        return self.rows_mb * (1 - kept / self.width) + self.down_mb * (1 - math.ceil(kept / self.block) / blocks)


def ffn_bytes(file: Path, widths: list[int]) -> list[FfnBytes]:
    """Each layer's FFN bytes in a fused-graph file of any precision (`widths`: its FFN widths, layer by layer).

    The budget search predicts a cut file's size from it, so a size budget's first probe of a precision
    lands at the right sparsity instead of being bracketed.
    """
    graph = onnx.load(str(file), load_external_data=False).graph
    blocks = {
        name: next((a.i for a in node.attribute if a.name == "block_size"), 1)
        for node in graph.node
        if node.op_type == "MatMulNBits"
        for name in node.input[1:]
    }
    layers = [FfnBytes(width=width) for width in widths]
    for tensor in graph.initializer:
        match = FFN_TENSOR.search(tensor.name)
        if not match or int(match[1]) >= len(layers):
            continue
        layer, mb = layers[int(match[1])], tensor_bytes(tensor) / 1e6
        if "down_proj" in tensor.name:
            layer.down_mb += mb
            layer.block = max(layer.block, blocks.get(tensor.name, 1))
        else:
            layer.rows_mb += mb
    return layers


def cut_file_megabytes(unpruned_mb: float, layers: list[FfnBytes], kept: list[int]) -> float:
    """A cut file's size from its precision's unpruned one and the FFN neurons each layer keeps."""
    return unpruned_mb - sum(layer.cut_mb(k) for layer, k in zip(layers, kept, strict=True))

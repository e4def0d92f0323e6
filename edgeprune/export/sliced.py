"""Cheap budget-search probes: cut FFN neurons out of an already exported dense ONNX graph.

Tracing a 135M decoder through the exporter takes minutes; an FFN cut only changes the
shapes of the FFN weights (their MatMul initializers, stored transposed) and of the FFN
input biases (BERT's intermediate bias), and no other node depends on the FFN width. So a
probe loads the dense graph, slices those constants and saves: seconds. Initializers are
anonymous (`onnx::MatMul_1338`), so each torch weight is matched to its initializer by
content; a bias is found through the graph (the constant added to that MatMul's output),
because the exporter folds equal biases into one initializer shared through Identity nodes.
Head cuts change reshape/expand constants and are not handled here: callers export such
probes in full.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edgeprune.errors import EdgepruneError
from edgeprune.export.files import save_onnx
from edgeprune.models import FamilyAdapter
from edgeprune.structure import LayerKeep

FULL_EXPORT = "export the probe in full"


def content_key(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value behind `name` if it is a constant (an initializer or Constant node, through Identity nodes)."""
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    while name not in initializers:
        node = producers.get(name)
        if node is None or node.op_type not in ("Identity", "Constant"):
            return None
        if node.op_type == "Constant":
            values = [attr.t for attr in node.attribute if attr.name == "value"]
            return numpy_helper.to_array(values[0]) if values else None
        name = node.input[0]
    return numpy_helper.to_array(initializers[name])


def bias_slot(graph: onnx.GraphProto, weight: str, width: int) -> list | None:
    """[output of the Add node, input index] where a [width] constant bias joins the MatMul by `weight`."""
    products = {node.output[0] for node in graph.node if node.op_type == "MatMul" and weight in node.input}
    for node in graph.node:
        if node.op_type != "Add" or not products & set(node.input):
            continue
        slot = 1 if node.input[0] in products else 0
        value = constant_value(graph, node.input[slot])
        if value is not None and value.shape == (width,):
            return [node.output[0], slot]
    return None


def ffn_initializer_names(model: nn.Module, adapter: FamilyAdapter, graph: onnx.GraphProto) -> list[dict[str, list]]:
    """Per layer: the initializers of each FFN input linear (transposed) and of the output linear, and where
    each input linear's bias is added (None for linears without bias)."""
    by_content = {
        hashlib.sha1(init.raw_data).hexdigest(): init.name
        for init in graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT and init.raw_data
    }

    def name_of(linear: nn.Linear) -> str:
        key = content_key(linear.weight.detach().float().T.numpy())
        if key not in by_content:
            raise EdgepruneError(
                "the dense ONNX graph does not hold this model's FFN weights unchanged (optimized or quantized?): "
                + FULL_EXPORT
            )
        return by_content[key]

    def bias_of(linear: nn.Linear) -> list | None:
        if linear.bias is None:
            return None
        found = bias_slot(graph, name_of(linear), linear.out_features)
        if found is None:
            raise EdgepruneError(f"the dense ONNX graph adds no constant bias to an FFN input linear: {FULL_EXPORT}")
        return found

    return [
        {
            "inputs": [name_of(lin) for lin in adapter.ffn_inputs(layer)],
            "biases": [bias_of(lin) for lin in adapter.ffn_inputs(layer)],
            "output": name_of(adapter.ffn_output(layer)),
        }
        for layer in adapter.layers(model)
    ]


def drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the constants named `names` (and the Identity/Constant chains behind them) once nothing reads them."""
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    pending = set(names)
    while pending:
        name = pending.pop()
        if any(name in node.input for node in graph.node) or name in {out.name for out in graph.output}:
            continue
        if name in initializers:
            graph.initializer.remove(initializers.pop(name))
        elif name in producers and producers[name].op_type in ("Identity", "Constant"):
            node = producers.pop(name)
            graph.node.remove(node)
            pending.update(node.input)


def slice_ffn(dense_onnx: Path, out_file: Path, names: list[dict[str, list]], keep: list[LayerKeep]) -> Path:
    """Write a copy of the dense graph keeping only the FFN neurons in `keep` (heads must be untouched)."""
    if any(entry.heads is not None for entry in keep):
        raise EdgepruneError(f"a sliced probe cannot cut attention heads: {FULL_EXPORT}")
    model = onnx.load(str(dense_onnx))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    adds = {node.output[0]: node for node in graph.node if node.op_type == "Add"}
    replaced: set[str] = set()

    def replace(name: str, index: torch.Tensor, axis: int) -> None:
        array = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(numpy_helper.from_array(np.take(array, index.numpy(), axis=axis), name))

    def replace_bias(add_output: str, slot: int, index: torch.Tensor) -> None:
        """A bias of its own for this Add: the dense one may be shared with other layers' Adds."""
        add = adds[add_output]
        replaced.add(add.input[slot])
        sliced = np.take(constant_value(graph, add.input[slot]), index.numpy())
        add.input[slot] = f"{add_output}.sliced_bias"
        graph.initializer.append(numpy_helper.from_array(sliced, add.input[slot]))

    for layer_names, entry in zip(names, keep, strict=True):
        if entry.ffn is None:
            continue
        for name in layer_names["inputs"]:  # stored [in, out]: neurons are columns
            replace(name, entry.ffn, axis=1)
        for bias in layer_names["biases"]:
            if bias is not None:
                replace_bias(*bias, entry.ffn)
        replace(layer_names["output"], entry.ffn, axis=0)  # stored [neurons, hidden]
    drop_unused(graph, replaced)
    return save_onnx(model, out_file)


def ffn_bias_names(names: list[dict[str, list]], graph: onnx.GraphProto) -> list[dict[str, list]]:
    """Per layer: (Add node name, input position) of the bias added to each FFN MatMul's output, or None.

    Found through the graph (MatMul of the weight -> Add of a constant), not by content: the exporter
    shares equal biases (all-zero ones, across layers) through Identity nodes, so a bias is rewired to an
    initializer of its own when written.
    """
    constants = {init.name for init in graph.initializer}
    constants |= {
        node.output[0]
        for node in graph.node
        if node.op_type == "Constant" or (node.op_type == "Identity" and node.input[0] in constants)
    }
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def bias_of(weight: str) -> tuple[str, int] | None:
        for matmul in consumers.get(weight, []):
            for add in consumers.get(matmul.output[0], []):
                if add.op_type == "Add":
                    positions = [k for k, name in enumerate(add.input) if name in constants]
                    if positions:
                        return add.name, positions[0]
        return None

    return [
        {"inputs": [bias_of(name) for name in layer["inputs"]], "output": bias_of(layer["output"])} for layer in names
    ]


def write_ffn(
    dense_onnx: Path,
    out_file: Path,
    names: list[dict[str, list]],
    bias_names: list[dict[str, list]],
    cut: nn.Module,
    adapter: FamilyAdapter,
) -> Path:
    """A copy of the dense graph holding the cut model's own FFN weights and biases (re-fit ones included).

    `slice_ffn` only drops neurons; after compensation the kept down_proj columns (and a bias) have
    new values, so every FFN initializer is replaced by the cut model's tensor, in the graph's layout.
    """
    model = onnx.load(str(dense_onnx))
    initializers = {init.name: init for init in model.graph.initializer}
    adds = {node.name: node for node in model.graph.node if node.op_type == "Add"}

    def write_bias(where: tuple[str, int] | None, bias: torch.Tensor | None) -> None:
        if (where is None) != (bias is None):
            raise EdgepruneError("the cut model's FFN biases differ from the dense graph's: export the probe in full")
        if where is not None:
            add, position = adds[where[0]], where[1]
            name = f"{add.name}/refit_bias"
            model.graph.initializer.append(numpy_helper.from_array(bias.detach().float().numpy(), name))
            add.input[position] = name

    for layer, weights, biases in zip(adapter.layers(cut), names, bias_names, strict=True):
        linears = [*adapter.ffn_inputs(layer), adapter.ffn_output(layer)]
        for linear, weight_name, bias_where in zip(
            linears, [*weights["inputs"], weights["output"]], [*biases["inputs"], biases["output"]], strict=True
        ):
            array = np.ascontiguousarray(linear.weight.detach().float().T.numpy())  # MatMul stores [in, out]
            initializers[weight_name].CopyFrom(numpy_helper.from_array(array, weight_name))
            write_bias(bias_where, linear.bias)
    return save_onnx(model, out_file)

"""Weight-only quantization of a tiny exported decoder: the embedding shares the tied lm_head's blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tokenizer, tiny_llama
from onnx import numpy_helper

from edgeprune.export import export_model
from edgeprune.export.quantize import quantize_weight_only
from edgeprune.runtime import OnnxModel, onnx_bytes

TEXT = " ".join(f"w{(i * 37) % 89}" for i in range(40))
IDS = np.array([[3, 17, 42, 95, 0, 64]], dtype=np.int64)


def untied_llama():
    """The tiny Llama with its own lm_head (perturbed, so no exporter can dedupe it with the embedding)."""
    model = tiny_llama()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach() * 0.5 + 0.01)
    return model


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    for name, model in (("tied", tiny_llama()), ("untied", untied_llama())):
        export_model(model, make_tokenizer(), root / name, text=TEXT)
    return {name: root / name / "model.onnx" for name in ("tied", "untied")}


def dequantized_rows(graph: onnx.GraphProto, node: onnx.NodeProto, ids: np.ndarray) -> np.ndarray:
    """Rows of a GatherBlockQuantized table decoded by hand: low bits first, zero point 2^(bits-1)."""
    attrs = {a.name: a.i for a in node.attribute}
    bits, block = attrs["bits"], attrs["block_size"]
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    reshape = next(n for n in graph.node if node.input[0] in n.output)
    packed, scales = weights[reshape.input[0]], weights[node.input[2]]
    packed = packed.reshape(packed.shape[0], -1)
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    values = nibbles if bits == 4 else packed
    signed = values.astype(np.float32) - 2 ** (bits - 1)
    table = signed * np.repeat(scales.reshape(scales.shape[0], -1), block, axis=1)
    return table[ids]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_embedding_is_block_quantized_like_the_projections(dense, tmp_path, kind, bits):
    source = dense[kind]
    plain = quantize_weight_only(source, tmp_path / "plain.onnx", bits, embedding=False)
    file = quantize_weight_only(source, tmp_path / "q.onnx", bits)
    graph = onnx.load(str(file)).graph
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gathers) == 1 and not [n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
    assert not [i for i in graph.initializer if list(i.dims) == [96, 64]]  # no float vocabulary table left
    head = next(n for n in graph.node if "logits" in n.output or n.name.startswith("/lm_head/"))
    assert head.op_type == "MatMulNBits"  # the lm_head is quantized too, tied or not
    reshape = next(n for n in graph.node if gathers[0].input[0] in n.output)
    assert (reshape.input[0] == head.input[1] and gathers[0].input[2] == head.input[2]) == (kind == "tied")
    vocab_bits = {a.name: a.i for a in gathers[0].attribute}["bits"]
    assert vocab_bits == 8  # the vocabulary matrix keeps 8 bits; the projections take `bits`
    if kind == "tied":
        assert {a.name: a.i for a in head.attribute}["bits"] == 8
    assert {(a.name, a.i) for n in graph.node if "/mlp/" in n.name for a in n.attribute if a.name == "bits"} == {
        ("bits", bits)
    }
    assert onnx_bytes(file) < onnx_bytes(plain)

    # ORT's embedding output is exactly the hand-decoded blocks, within half a step of the float table
    probe = onnx.load(str(file))
    probe.graph.output.append(onnx.helper.make_tensor_value_info(gathers[0].output[0], onnx.TensorProto.FLOAT, None))
    onnx.save(probe, str(tmp_path / "probe.onnx"))
    model = OnnxModel(tmp_path / "probe.onnx")
    feeds = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "position_ids": np.arange(6)[None]}
    feeds |= model.empty_cache(1)
    got = model.session.run([gathers[0].output[0]], {k: v for k, v in feeds.items() if k in model.input_names})[0]
    expected = dequantized_rows(graph, gathers[0], IDS)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    table = numpy_helper.to_array(next(i for i in onnx.load(str(source)).graph.initializer if list(i.dims) == [96, 64]))
    step = np.abs(table[IDS]).reshape(1, 6, 2, 32).max(-1, keepdims=True) / (2 ** (vocab_bits - 1) - 1)
    assert np.all(np.abs(got - table[IDS]).reshape(1, 6, 2, 32) <= step * 0.51 + 1e-6)


def test_quantized_embedding_runs_through_the_cache(dense, tmp_path):
    """The whole-sequence logits equal the prefix + one-token-at-a-time logits on the int4 file."""
    model = OnnxModel(quantize_weight_only(dense["tied"], tmp_path / "q.onnx", 4))
    full = model.forward(IDS)
    logits, cache = model.step(IDS[:, :3], model.empty_cache(1))
    steps = [logits]
    for pos in range(3, 6):
        logits, cache = model.step(IDS[:, pos : pos + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4 * np.abs(full).max())

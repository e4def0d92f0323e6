"""Weight-only quantization of a tiny exported decoder: the embedding shares the tied lm_head's blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tokenizer, tiny_llama
from onnx import numpy_helper
from transformers import LlamaForCausalLM

from edgeprune.export import export_model
from edgeprune.export.quantize import (
    BLOCK_SIZE,
    MIXED_EIGHT_BIT_BLOCK,
    fitting_block,
    quantize_model,
    quantize_weight_only,
    sensitive_matmuls,
)
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


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory) -> dict[str, Path]:
    """A 6-layer tiny Llama exported both ways: Optimum (q/k/v apart) and the fused builder graph (qkv packed)."""
    root = tmp_path_factory.mktemp("six")
    config = tiny_llama().config
    config.num_hidden_layers, config.num_attention_heads, config.head_dim = 6, 4, 16  # GQA needs heads of 16
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for graph in ("optimum", "fused"):
        export_model(model, make_tokenizer(), root / graph, text=TEXT, fused=graph == "fused")
    return {graph: root / graph / "model.onnx" for graph in ("optimum", "fused")}


def nbits_nodes(file: Path) -> dict[str, tuple[int, int]]:
    """MatMulNBits node name -> (bits, block_size)."""
    graph = onnx.load(str(file)).graph
    return {
        n.name: ({a.name: a.i for a in n.attribute}["bits"], {a.name: a.i for a in n.attribute}["block_size"])
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }


def rms_error(file: Path, reference: np.ndarray) -> float:
    return float(np.sqrt(np.mean((OnnxModel(file).forward(LONG_IDS) - reference) ** 2)))


LONG_IDS = np.array([[(i * 37 + 5) % 96 for i in range(48)]], dtype=np.int64)


@pytest.mark.parametrize("graph", ["optimum", "fused"])
def test_int4_mixed_keeps_the_sensitive_matmuls_at_8_bits(six_layers, tmp_path, graph):
    """First and last two layers whole, and q/k/v and down everywhere, at 8 bits (128 blocks); the rest 4-bit."""
    source = six_layers[graph]
    file = quantize_model(source, tmp_path / "mixed.onnx", "int4-mixed")
    nodes = {name: bits for name, bits in nbits_nodes(file).items() if "/layers." in name}
    assert len(nodes) == 6 * (7 if graph == "optimum" else 4)
    for name, (bits, block) in nodes.items():
        layer = int(name.split("/layers.")[1].split("/")[0])
        sensitive = layer in (0, 1, 4, 5) or any(f"/{k}/" in name for k in ("q_proj", "k_proj", "v_proj", "qkv_proj"))
        sensitive = sensitive or "/down_proj/" in name
        assert (bits, block) == ((8, MIXED_EIGHT_BIT_BLOCK) if sensitive else (4, BLOCK_SIZE)), name
    assert {n for n in sensitive_matmuls(source)} == {n[: -len("_Q8")] for n, (b, _) in nodes.items() if b == 8}
    # between int4 and int8 in distance from fp32
    reference = OnnxModel(source).forward(LONG_IDS)
    int4 = quantize_model(source, tmp_path / "int4.onnx", "int4")
    int8 = quantize_model(source, tmp_path / "int8.onnx", "int8")
    # (larger than int8 here: rows of 64 inputs are padded to one 128 block; SmolLM2's 576 to 640)
    assert onnx_bytes(int4) < onnx_bytes(file)
    assert rms_error(int8, reference) < rms_error(file, reference) < rms_error(int4, reference)


def test_a_vocabulary_at_8_bits_over_4_bit_projections_takes_the_8_bit_blocks(six_layers, tmp_path):
    """The tied vocabulary matrix kept at 8 bits under int4 takes the 8-bit parts' blocks (as large as its 64-wide
    rows allow), in the Gather's table and the head alike: half the scales its packed copy and table hold twice.
    At int8 everything keeps the precision's block."""
    source = six_layers["fused"]
    for precision, block in (("int4", 64), ("int4-mixed", 64), ("int8", BLOCK_SIZE)):
        file = quantize_model(source, tmp_path / f"{precision}.onnx", precision)
        head = next(bits_block for name, bits_block in nbits_nodes(file).items() if "lm_head" in name)
        gather = next(n for n in onnx.load(str(file)).graph.node if n.op_type == "GatherBlockQuantized")
        assert head == (8, block) and {a.name: a.i for a in gather.attribute}["block_size"] == block, precision


def test_int8_in_larger_blocks(six_layers, tmp_path):
    """int8-b128: projections in 128 blocks; the vocabulary matrix (hidden 64) in the largest block that divides
    its rows, shared by the embedding and the tied head; it stays close to fp32 (8-bit steps)."""
    source = six_layers["fused"]
    file = quantize_model(source, tmp_path / "b128.onnx", "int8-b128", block_size=32)  # its own block wins
    nodes = nbits_nodes(file)
    head = next(name for name in nodes if "lm_head" in name)
    assert nodes.pop(head) == (8, 64)
    assert set(nodes.values()) == {(8, 128)}
    gather = next(n for n in onnx.load(str(file)).graph.node if n.op_type == "GatherBlockQuantized")
    assert {a.name: a.i for a in gather.attribute}["block_size"] == 64
    reference = OnnxModel(source).forward(LONG_IDS)
    int4 = quantize_model(source, tmp_path / "int4.onnx", "int4")
    # weight steps of 1/128 of a 128-block's largest |weight| against int4's 1/8 of a 32-block's; both kernels
    # also round the activations to int8 (accuracy level 4): measured 0.17 of int4's logit error
    assert rms_error(file, reference) < 0.25 * rms_error(int4, reference)
    assert fitting_block(576, 128) == 64 and fitting_block(1536, 128) == 128 and fitting_block(48, 32) == 16


def test_precision_names_agree_everywhere():
    """The search, the quantizer and both CLI options name the same precisions, in the same order."""
    from edgeprune.budget import PRECISIONS as searched
    from edgeprune.cli import main
    from edgeprune.export.quantize import PRECISIONS as made
    from edgeprune.export.quantize import WEIGHT_ONLY

    assert searched is made and tuple(WEIGHT_ONLY) == made[1:-1]  # one list; a recipe for each weight-only name
    run_choices = next(p for p in main.commands["run"].params if p.name == "precision").type.choices
    export_choices = next(p for p in main.commands["export"].params if p.name == "quantize").type.choices
    assert tuple(run_choices) == ("auto", *made)
    assert tuple(export_choices) == tuple(p for p in made[1:] if p != "int4-fit")  # made for a run's size budget


@pytest.mark.parametrize("precision", ["int8-b64", "int8-b128", "int4-mixed"])
def test_export_ships_each_new_precision_verified(tmp_path, precision):
    """`export --quantize` takes the new names: one verified model.onnx within that precision's tolerance."""
    result = export_model(tiny_llama(), make_tokenizer(), tmp_path / "out", quantize=precision, text=TEXT)
    assert result.precision == precision and set(result.verification) == {"fp32", precision}
    assert result.sizes[precision] < result.sizes["fp32"]
    assert {n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node} >= {"MatMulNBits"}

"""int4-fit: which projections keep 8 bits (bit_allocation.py), and a run filling its size budget with them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_tokenizer, tiny_llama
from onnx import TensorProto, helper, numpy_helper
from transformers import LlamaForCausalLM

from edgeprune.errors import EdgepruneError
from edgeprune.export import export_model
from edgeprune.export.bit_allocation import (
    VOCABULARY,
    Projection,
    Sensitivity,
    choose_eight_bit,
    graph_projections,
    projection_sensitivity,
    quantized_bytes,
    rounding_error,
)
from edgeprune.export.quantize import quantize_model, quantize_weight_only, vocabulary_head
from edgeprune.runtime import onnx_bytes
from tests.test_fused import TEXT, fusable_llama


def single_matmul(weight: torch.Tensor, path) -> None:
    """y = x @ weight.T as a one-node graph named like a layer's down projection."""
    out_features, in_features = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="/model/layers.0/mlp/down_proj/MatMul")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_features])],
        [numpy_helper.from_array(weight.numpy().T.copy(), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.mark.parametrize(("bits", "block"), [(4, 32), (4, 16), (8, 128), (8, 32)])
def test_rounding_error_is_what_matmulnbits_computes_with(tmp_path, bits, block):
    """W - error equals the weight ONNX Runtime's kernel multiplies by (read back through identity inputs; in=40 is
    not a multiple of the block, so padded blocks are covered). An exact copy: only float summation order differs."""
    torch.manual_seed(0)
    weight = torch.randn(24, 40)
    single_matmul(weight, tmp_path / "w.onnx")
    quantize_weight_only(tmp_path / "w.onnx", tmp_path / "q.onnx", bits, block, embedding=False)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    identity = np.eye(40, dtype=np.float32)  # exact under the kernel's int8 activations: one nonzero per row
    used = np.concatenate([session.run(None, {"x": identity[i : i + 1]})[0] for i in range(40)]).T
    error = rounding_error(weight, bits, block)
    assert np.abs((weight - error).numpy() - used).max() <= 1e-6 * float(weight.abs().max())
    assert float(error.abs().max()) > 0  # 4 or 8 bits do round


def test_knapsack_takes_most_loss_saved_per_byte_and_never_overfills():
    projections = [
        Projection("a", extra_bytes=100, sensitivity=5.0),  # 0.05 per byte
        Projection("b", extra_bytes=100, sensitivity=9.0),  # 0.09
        Projection("c", extra_bytes=300, sensitivity=12.0),  # 0.04
        Projection("d", extra_bytes=50, sensitivity=1.0),  # 0.02: still fits after c does not
        Projection("e", extra_bytes=10, sensitivity=0.0),  # saves nothing: never worth its bytes
    ]
    assert choose_eight_bit(projections, 260) == ["b", "a", "d"]
    assert choose_eight_bit(projections, 1000) == ["b", "a", "c", "d"]
    assert choose_eight_bit(projections, 40) == []
    assert choose_eight_bit(projections, -5) == []


def test_knapsack_takes_a_large_item_greedy_would_pass_over():
    """Per byte the small items come first and leave no room for the large one, which alone saves more."""
    projections = [Projection(f"small{i}", 10, 1.0) for i in range(3)] + [Projection("large", 25, 2.4)]
    assert choose_eight_bit(projections, 25) == ["large"]  # 2.4 against greedy's two small ones, 2.0
    assert choose_eight_bit(projections, 30) == ["small0", "small1", "small2"]  # 3.0 against 2.4
    assert choose_eight_bit(projections, 35) == ["large", "small0"]  # 3.4 against 3.0


def test_sensitivity_is_zero_where_the_loss_cannot_see_the_weights(llama, token_ids):
    """Layer 0's attention output zeroed: its q/k/v have no gradient, so keeping them at 8 bits saves nothing."""
    with torch.no_grad():
        llama.model.layers[0].self_attn.o_proj.weight.zero_()
    sensitivity = projection_sensitivity(llama, token_ids[:2], block_size=16)
    layers = len(llama.model.layers)
    assert sensitivity[VOCABULARY].loss > 0  # the tied embedding / lm_head matrix, valued for both its uses
    assert set(sensitivity) - {VOCABULARY} == {
        (i, f"{part}_proj") for i in range(layers) for part in ("self_attn/q", "self_attn/k", "self_attn/v",
        "self_attn/o", "mlp/gate", "mlp/up", "mlp/down")
    }  # fmt: skip
    for part in ("q", "k", "v"):
        assert sensitivity[(0, f"self_attn/{part}_proj")].loss == 0.0
    assert all(s.loss >= 0 for s in sensitivity.values())  # 4 bits never round closer than 8 here
    assert sensitivity[(1, "self_attn/q_proj")].loss > 0


def test_packed_graph_projections_sum_their_parts_and_scale_with_the_weights_kept():
    """The fused graph's qkv MatMul is valued as q + k + v, its gate_up as gate + up; a cut matrix by the share of
    weights it keeps."""
    measured = {
        (0, "self_attn/q_proj"): Sensitivity(1.0, 64 * 64),
        (0, "self_attn/k_proj"): Sensitivity(2.0, 64 * 32),
        (0, "self_attn/v_proj"): Sensitivity(3.0, 64 * 32),
        (0, "mlp/gate_proj"): Sensitivity(5.0, 64 * 80),
        (0, "mlp/up_proj"): Sensitivity(7.0, 64 * 80),
        (0, "mlp/down_proj"): Sensitivity(4.0, 80 * 64),
    }
    # qkv whole; gate_up and down at half width
    weights = [np.zeros((64, 128), np.float32), np.zeros((64, 80), np.float32), np.zeros((40, 64), np.float32)]
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "qkv"], ["q"], name="/model/layers.0/attn/qkv_proj/MatMul"),
            helper.make_node("MatMul", ["x", "gate_up"], ["g"], name="/model/layers.0/mlp/gate_up_proj/MatMul"),
            helper.make_node("MatMul", ["h", "down"], ["d"], name="/model/layers.0/mlp/down_proj/MatMul"),
            helper.make_node("MatMul", ["y", "head"], ["z"], name="/lm_head/MatMul"),  # not a layer's
        ],
        "g",
        [],
        [],
        [numpy_helper.from_array(w, n) for w, n in zip(weights, ("qkv", "gate_up", "down"), strict=True)]
        + [numpy_helper.from_array(np.zeros((64, 10), np.float32), "head")],
    )
    found = {p.node: p for p in graph_projections(graph, measured, 32, 128)}
    assert set(found) == {f"/model/layers.0/{p}/MatMul" for p in ("attn/qkv_proj", "mlp/gate_up_proj", "mlp/down_proj")}
    assert found["/model/layers.0/attn/qkv_proj/MatMul"].sensitivity == pytest.approx(6.0)
    assert found["/model/layers.0/mlp/gate_up_proj/MatMul"].sensitivity == pytest.approx(6.0)  # half of 5 + 7
    assert found["/model/layers.0/mlp/down_proj/MatMul"].sensitivity == pytest.approx(2.0)
    assert found["/model/layers.0/mlp/down_proj/MatMul"].extra_bytes == (
        quantized_bytes(40, 64, 8, 128) - quantized_bytes(40, 64, 4, 32)
    )


def test_int4_fit_is_only_made_with_its_eight_bit_list(tmp_path):
    torch.manual_seed(0)
    single_matmul(torch.randn(24, 64), tmp_path / "w.onnx")
    with pytest.raises(EdgepruneError, match="--memory-mb"):
        quantize_model(tmp_path / "w.onnx", tmp_path / "q.onnx", "int4-fit")
    with pytest.raises(EdgepruneError, match="only for int4-fit"):
        quantize_model(tmp_path / "w.onnx", tmp_path / "q.onnx", "int4", eight_bit=())
    four = quantize_model(tmp_path / "w.onnx", tmp_path / "four.onnx", "int4-fit", eight_bit=())
    eight = quantize_model(
        tmp_path / "w.onnx", tmp_path / "eight.onnx", "int4-fit", eight_bit=("/model/layers.0/mlp/down_proj/MatMul",)
    )
    assert onnx_bytes(eight) - onnx_bytes(four) == pytest.approx(
        quantized_bytes(64, 24, 8, 128) - quantized_bytes(64, 24, 4, 32), abs=64
    )


@pytest.mark.parametrize("fused", [False, True])
def test_the_tied_vocabulary_keeps_8_bits_only_when_int4_fit_names_its_head(tmp_path, fused):
    """Optimum's and onnxruntime-genai's graphs tie the head differently; in both, naming the head MatMul keeps
    the shared matrix at 8 bits, and leaving it out stores it at 4 bits: the size differs by the bytes priced."""
    if fused:
        pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai not installed (export --fused needs it)")
    model = fusable_llama(cut=False) if fused else tiny_llama()
    export_model(model, make_tokenizer(), tmp_path / "fp32", text=TEXT, fused=fused)
    fp32 = tmp_path / "fp32" / "model.onnx"
    head = vocabulary_head(onnx.load(str(fp32), load_external_data=False).graph)
    assert head is not None and (head.hidden, head.vocab) == (64, model.config.vocab_size)
    four = quantize_model(fp32, tmp_path / "four.onnx", "int4-fit", eight_bit=())
    eight = quantize_model(fp32, tmp_path / "eight.onnx", "int4-fit", eight_bit=(head.node,))
    priced = {p.node: p for p in graph_projections(
        onnx.load(str(fp32), load_external_data=False).graph, {VOCABULARY: Sensitivity(1.0, 1)}, 32, 128
    )}  # fmt: skip
    assert set(priced) == {head.node}  # without layer sensitivities only the vocabulary is valued
    assert onnx_bytes(eight) - onnx_bytes(four) == pytest.approx(priced[head.node].extra_bytes, abs=256)
    gathers = [n for n in onnx.load(str(four)).graph.node if n.op_type == "GatherBlockQuantized"]
    assert [next(a.i for a in n.attribute if a.name == "bits") for n in gathers] == [4]


def test_an_untied_embedding_keeps_its_8_bits_under_int4_fit(tmp_path):
    """Only a tied matrix is a knapsack item (valued for both uses); an untied table keeps the usual 8 bits."""
    config = tiny_llama().config
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    export_model(LlamaForCausalLM(config).eval(), make_tokenizer(), tmp_path / "fp32", text=TEXT)
    fp32 = tmp_path / "fp32" / "model.onnx"
    assert vocabulary_head(onnx.load(str(fp32), load_external_data=False).graph) is None
    four = quantize_model(fp32, tmp_path / "four.onnx", "int4-fit", eight_bit=())
    gathers = [n for n in onnx.load(str(four)).graph.node if n.op_type == "GatherBlockQuantized"]
    assert [next(a.i for a in n.attribute if a.name == "bits") for n in gathers] == [8]

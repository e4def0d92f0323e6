"""The fused decoder graph (onnxruntime-genai's builder fed the in-memory model) against Optimum's export."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import VOCAB, make_tokenizer, tiny_bert, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from edgeprune.errors import EdgepruneError
from edgeprune.export import export_model
from edgeprune.export.exporter import Tolerance
from edgeprune.export.fused import build_fused, cut_file_megabytes, ffn_bytes, tensor_bytes, write_fused_probe
from edgeprune.export.quantize import quantize_model
from edgeprune.layers import remove_layers
from edgeprune.loading import load_tokenizer
from edgeprune.models import adapter_for
from edgeprune.runtime import CacheDecoder, OnnxModel, greedy_generate, onnx_bytes
from edgeprune.structure import LayerKeep, cut_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai (its model builder) not installed"
)
TEXT = " ".join(f"w{(i * 37) % 89}" for i in range(40))
IDS = np.array([[5, 17, 33, 60, 41, 7, 88, 12]], dtype=np.int64)
ANY = Tolerance(min_top1=0.0, max_relative_diff=float("inf"))
# fp32: both graphs compute the same float model in a different op order. int4: the same 4-bit blocks
# (QKV packed or not, the blocks run along each column's inputs), but int8-quantized activations
# (accuracy_level 4) round differently once the fp32 paths differ by an ulp; the random tiny model
# amplifies that through 4 layers.
TOLERANCE = {"fp32": 1e-5, "int4": 5e-2}  # x the largest |logit|


def fusable_llama(cut: bool) -> LlamaForCausalLM:
    """GQA Llama with head size 16 (GroupQueryAttention's minimum multiple); cut: per-layer FFN and query heads."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config).eval()
    if cut:
        keep = [
            LayerKeep(ffn=torch.arange(0, 80, i + 2), heads=torch.tensor([0, 2]) if i == 1 else None) for i in range(4)
        ]
        cut_model(model, adapter_for(model.config), keep)
    return model


def prefill_and_cached(model: OnnxModel) -> tuple[np.ndarray, np.ndarray]:
    """All positions' logits in one call, and the same positions as a 3-token prefill then one token at a time."""
    full = model.forward(IDS)
    logits, cache = model.step(IDS[:, :3], model.empty_cache(1))
    stepped = [logits]
    for pos in range(3, IDS.shape[1]):
        logits, cache = model.step(IDS[:, pos : pos + 1], cache)
        stepped.append(logits)
    return full, np.concatenate(stepped, axis=1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    found = {}
    for cut in (False, True):
        model = fusable_llama(cut)
        for precision in ("fp32", "int4"):
            for fused in (False, True):
                folder = root / f"{'cut' if cut else 'dense'}-{precision}-{'fused' if fused else 'optimum'}"
                quantize = None if precision == "fp32" else precision
                result = export_model(
                    model, make_tokenizer(), folder, quantize=quantize, text=TEXT, tolerance=ANY, fused=fused
                )
                found[cut, precision, fused] = (model, result)
    return found


@pytest.mark.parametrize("precision", ["fp32", "int4"])
@pytest.mark.parametrize("cut", [False, True])
def test_fused_and_optimum_exports_agree_in_prefill_and_through_the_cache(exports, cut, precision):
    model, optimum = exports[cut, precision, False]
    _, fused = exports[cut, precision, True]
    reference = model(torch.tensor(IDS)).logits.detach().numpy()
    optimum_full, optimum_cached = prefill_and_cached(OnnxModel(optimum.path))
    fused_full, fused_cached = prefill_and_cached(OnnxModel(fused.path))
    limit = TOLERANCE[precision] * np.abs(reference).max()
    assert np.abs(fused_full - optimum_full).max() <= limit
    assert np.abs(fused_cached - optimum_cached).max() <= limit
    assert np.abs(fused_cached - fused_full).max() <= 1e-4 * np.abs(reference).max()  # the cache path is exact
    if precision == "fp32":
        assert np.abs(fused_full - reference).max() <= TOLERANCE["fp32"] * np.abs(reference).max()
    check = fused.verification[precision]
    assert check.cache_steps == 8 and check.positions > 40


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_gate_and_up_are_one_matmul_split_in_halves(exports, precision):
    """Each layer reads its FFN input once for gate and up: one MatMul (int4: MatMulNBits) as wide as both,
    a Split in halves, no separate gate or up node; the cut model's layers keep their own widths."""
    model, fused = exports[True, precision, True]
    graph = onnx.load(str(fused.path / "model.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if "/gate_proj/" in n.name or "/up_proj/" in n.name]
    for index, layer in enumerate(model.model.layers):
        packed = next(n for n in graph.node if n.name.startswith(f"/model/layers.{index}/mlp/gate_up_proj/MatMul"))
        split = next(n for n in graph.node if n.input and n.input[0] == packed.output[0])
        assert split.op_type == "Split" and {a.name: a.i for a in split.attribute}["num_outputs"] == 2
        width = 2 * layer.mlp.gate_proj.out_features
        if precision == "fp32":
            weight = next(i for i in graph.initializer if i.name == packed.input[1])
            assert (packed.op_type, list(weight.dims)) == ("MatMul", [64, width])
        else:
            assert (packed.op_type, {a.name: a.i for a in packed.attribute}["N"]) == ("MatMulNBits", width)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_fused_graph_decodes_in_its_cache_buffers_as_the_copying_path_does(exports, precision):
    """GroupQueryAttention appends into the buffers bound as both past and present (no cache copy per token),
    and the buffers grow when a run outlasts them; the logits are the copying path's."""
    _, fused = exports[True, precision, True]
    _, optimum = exports[True, precision, False]
    model = OnnxModel(fused.path)
    assert model.shares_cache and not OnnxModel(optimum.path).shares_cache
    _, copied = prefill_and_cached(model)  # positions 0..2 at once, then one call per position
    decoder = CacheDecoder(model, 1, 4)  # room for 4 positions: the buffers grow at the fifth
    assert decoder.shared
    shared = [decoder.feed(IDS[:, :3])] + [decoder.feed(IDS[:, pos : pos + 1]) for pos in range(3, IDS.shape[1])]
    # the same kernels on the same values, only where the cache lives differs: equal to float rounding
    assert np.abs(np.concatenate(shared, axis=1) - copied[:, 2:]).max() <= 1e-6 * np.abs(copied).max()
    assert decoder.length == IDS.shape[1]


def test_a_graph_without_logits_to_keep_decodes_in_its_cache_buffers(tmp_path):
    """The builder's own graph (what onnxruntime-genai writes; `export` adds logits_to_keep) returns every
    position's logits, so the logits output changes shape between the prompt and each token: the decoder
    gives the copying path's last-position logits (it failed on the second call before)."""
    model = fusable_llama(cut=False)
    onnx_model = OnnxModel(build_fused(model, tmp_path))
    assert onnx_model.shares_cache and "logits_to_keep" not in onnx_model.input_names
    _, copied = prefill_and_cached(onnx_model)
    decoder = CacheDecoder(onnx_model, 1, IDS.shape[1])
    shared = [decoder.feed(IDS[:, :3])] + [decoder.feed(IDS[:, pos : pos + 1]) for pos in range(3, IDS.shape[1])]
    assert np.abs(np.concatenate(shared, axis=1) - copied[:, 2:]).max() <= 1e-6 * np.abs(copied).max()


def test_fused_folder_is_one_model_with_a_genai_config(exports):
    model, result = exports[True, "int4", True]
    names = sorted(p.name for p in result.path.iterdir())
    assert [n for n in names if ".onnx" in n] == ["model.onnx", "model.onnx_data"]  # one graph, its weights apart
    assert {"genai_config.json", "config.json", "tokenizer.json", "edgeprune.json"} <= set(names)
    decoder = json.loads((result.path / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["filename"] == "model.onnx" and decoder["num_key_value_heads"] == 2
    assert json.loads((result.path / "edgeprune.json").read_text())["fused"] is True
    session = OnnxModel(result.path).session
    ops = {n.op_type for n in __import__("onnx").load(str(result.path / "model.onnx")).graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits", "GatherBlockQuantized"} <= ops
    assert "logits_to_keep" in {i.name for i in session.get_overridable_initializers()}


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_onnxruntime_genai_generates_what_edgeprune_generates(exports, precision):
    import onnxruntime_genai as og

    _, result = exports[True, precision, True]
    model = og.Model(str(result.path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=20)
    generator = og.Generator(model, params)
    prompt = [5, 17, 33, 60, 41]
    generator.append_tokens(prompt)
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))
    ours = greedy_generate(OnnxModel(result.path), prompt, len(theirs), {3})
    assert len(ours) >= 3 and theirs[: len(ours)] == ours


def gguf_style_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer as transformers' GGUF converter writes SmolLM2's: SentencePiece's byte
    fallback switched on, and its decoder sequence."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(["The capital of France is Paris. The cat sat on the mat."] * 20, trainer)
    core.model.byte_fallback = True
    core.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " "), decoders.ByteLevel()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_onnxruntime_genai_tokenizes_a_gguf_converted_tokenizer_as_edgeprune_does(exports, tmp_path):
    """onnxruntime-genai's tokenizer took the byte fallback for SentencePiece and made each space three unknown
    ids (-1); edgeprune loads such a tokenizer without it: the same ids in both runtimes, the same text back."""
    import onnxruntime_genai as og

    gguf_style_tokenizer().save_pretrained(tmp_path / "source")
    tokenizer = load_tokenizer(tmp_path / "source")
    folder = tmp_path / "model"
    shutil.copytree(exports[False, "fp32", True][1].path, folder)
    tokenizer.save_pretrained(folder)
    text = "The capital of France is Paris, \u00fcber 2 caf\u00e9s."
    ids = tokenizer(text).input_ids
    assert ids == gguf_style_tokenizer()(text).input_ids and tokenizer.decode(ids) == text
    assert [int(i) for i in og.Tokenizer(og.Model(str(folder))).encode(text)] == ids


def test_what_the_fused_graph_cannot_express_is_refused(tmp_path):
    with pytest.raises(EdgepruneError, match="not a multiple of 16"):
        export_model(tiny_llama(), make_tokenizer(), tmp_path / "a", text=TEXT, fused=True)
    with pytest.raises(EdgepruneError, match="drop --fused"):
        export_model(tiny_bert(), make_tokenizer(), tmp_path / "b", text=TEXT, fused=True)
    model = fusable_llama(False)
    cut_model(
        model,
        adapter_for(model.config, prune_kv_heads=True),
        [LayerKeep(heads=torch.tensor([0, 1]))] + [LayerKeep()] * 3,
    )
    with pytest.raises(EdgepruneError, match="different KV-head counts"):
        export_model(model, make_tokenizer(), tmp_path / "c", text=TEXT, fused=True)
    assert list(tmp_path.iterdir()) == []


def test_probe_from_the_dense_fused_graph_equals_the_cut_models_own_graph(exports, tmp_path):
    """FFN neurons and query heads cut by replacing initializers and head counts: no rebuild, same logits."""
    _, dense = exports[False, "fp32", True]
    cut_model_, built = exports[True, "fp32", True]
    probe = write_fused_probe(dense.path / "model.onnx", tmp_path / "probe" / "model.onnx", cut_model_)
    reference = cut_model_(torch.tensor(IDS)).logits.detach().numpy()
    probe_full, probe_cached = prefill_and_cached(OnnxModel(probe))
    built_full, _ = prefill_and_cached(OnnxModel(built.path))
    limit = TOLERANCE["fp32"] * np.abs(reference).max()
    assert np.abs(probe_full - reference).max() <= limit and np.abs(probe_cached - reference).max() <= limit
    assert np.abs(probe_full - built_full).max() <= limit
    int4 = OnnxModel(quantize_model(probe, tmp_path / "probe" / "model.int4.onnx", "int4"))
    assert np.abs(int4.forward(IDS) - reference).max() < np.abs(reference).max()  # runs, and is near
    with pytest.raises(EdgepruneError, match="give the dense graph"):
        write_fused_probe(exports[False, "fp32", False][1].path / "model.onnx", tmp_path / "x.onnx", cut_model_)


def test_a_decoder_without_a_layer_builds_a_shallower_fused_graph(tmp_path):
    """Whole-layer removal: the graph has one layer and one cache pair fewer, and computes the shortened model."""
    model = fusable_llama(cut=False)
    remove_layers(model, adapter_for(model.config), [1])
    result = export_model(model, make_tokenizer(), tmp_path / "out", text=TEXT, tolerance=ANY, fused=True)
    reference = model(torch.tensor(IDS)).logits.detach().numpy()
    onnx_model = OnnxModel(result.path)
    full, cached = prefill_and_cached(onnx_model)
    limit = TOLERANCE["fp32"] * np.abs(reference).max()
    assert np.abs(full - reference).max() <= limit and np.abs(cached - reference).max() <= limit
    inputs = {i.name for i in onnx_model.session.get_inputs()}
    assert {f"past_key_values.{i}.key" for i in range(3)} <= inputs and "past_key_values.3.key" not in inputs
    decoder = json.loads((result.path / "genai_config.json").read_text())["model"]["decoder"]
    assert decoder["num_hidden_layers"] == 3


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4", "int4-mixed"])
def test_a_cut_files_size_is_predicted_from_the_unpruned_file(exports, tmp_path, precision):
    """The budget search aims size budgets with this: per-layer FFN bytes of the unpruned file, then the cut."""
    dense_model, dense = exports[False, "fp32", True]
    cut = fusable_llama(cut=False)
    cut_model(cut, adapter_for(cut.config), [LayerKeep(ffn=torch.arange(0, 80, i + 2)) for i in range(4)])
    kept = [layer.mlp.gate_proj.out_features for layer in cut.model.layers]
    probe = write_fused_probe(dense.path / "model.onnx", tmp_path / "cut" / "model.onnx", cut)
    unpruned, cut_file = dense.path / "model.onnx", probe
    if precision != "fp32":
        unpruned = quantize_model(unpruned, tmp_path / "dense" / f"model.{precision}.onnx", precision)
        cut_file = quantize_model(probe, tmp_path / "cut" / f"model.{precision}.onnx", precision)
    layers = ffn_bytes(unpruned, [80] * 4)
    # every tensor byte is accounted for, exactly (the files also differ by the graph's shape annotations,
    # which the probe drops: kilobytes, which the search's aim below the budget absorbs)
    predicted = cut_file_megabytes(tensor_megabytes(unpruned), layers, kept)
    assert predicted == pytest.approx(tensor_megabytes(cut_file), abs=1e-9)
    assert sum(layer.cut_mb(80) for layer in layers) == 0.0
    assert abs(cut_file_megabytes(onnx_bytes(unpruned) / 1e6, layers, kept) - onnx_bytes(cut_file) / 1e6) < 0.01


def tensor_megabytes(file) -> float:
    return sum(tensor_bytes(t) for t in onnx.load(str(file), load_external_data=False).graph.initializer) / 1e6

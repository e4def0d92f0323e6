"""Evaluation: perplexity and multiple choice by hand, ONNX equals PyTorch, loaders on the real files, GLUE."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from transformers import BertForSequenceClassification

from edgeprune.checkpoint import load_pruned, save_pruned
from edgeprune.cli import main
from edgeprune.errors import EdgepruneError
from edgeprune.evaluate import (
    MCItem,
    evaluate_glue,
    evaluate_multiple_choice,
    evaluate_task,
    load_for_eval,
    load_mc_task,
    perplexity,
    resolve_data_dir,
    wikitext2_text,
)
from edgeprune.evaluate.glue import matthews, pearson, read_glue, read_tsv, spearman
from edgeprune.evaluate.multiple_choice import encode_pair, load_boolq, score_items


class UniformLM(nn.Module):
    """Predicts every token with probability 1/V: perplexity must be exactly V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    tokens = torch.randint(0, 50, (1000,))
    assert math.isclose(perplexity(UniformLM(50), tokens, seq_len=64), 50.0, rel_tol=1e-5)  # float32 logits


def test_perplexity_by_hand(llama):
    tokens = torch.randint(7, 90, (40,), generator=torch.Generator().manual_seed(0))
    windows = tokens[:40].reshape(2, 20)
    with torch.no_grad():
        logp = torch.log_softmax(llama(input_ids=windows).logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    assert math.isclose(perplexity(llama, tokens, seq_len=20, batch_size=1), math.exp(nll), rel_tol=1e-5)


# --- perplexity with a stride ------------------------------------------------------------------


def test_sliding_window_perplexity_by_hand(llama):
    tokens = torch.randint(7, 90, (50,), generator=torch.Generator().manual_seed(0))
    seq_len, stride = 20, 10  # windows start at 0, 10, 20, 30
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in (0, 10, 20, 30):
            window = tokens[start : start + seq_len][None]
            logp = torch.log_softmax(llama(input_ids=window).logits[0, :-1], dim=-1)
            token_nll = -logp.gather(-1, window[0, 1:, None])[:, 0]
            scored = token_nll if start == 0 else token_nll[-stride:]  # each token scored once
            nll, count = nll + scored.sum().item(), count + len(scored)
    got = perplexity(llama, tokens, seq_len=seq_len, stride=stride, batch_size=3)
    assert math.isclose(got, math.exp(nll / count), rel_tol=1e-5)
    assert count == 19 + 3 * 10


def test_stride_equal_to_seq_len_is_the_non_overlapping_default(llama):
    tokens = torch.randint(7, 90, (64,), generator=torch.Generator().manual_seed(2))
    assert perplexity(llama, tokens, seq_len=16, stride=16) == perplexity(llama, tokens, seq_len=16)


def test_wikitext2_text_joins_rows_like_the_hf_dataset(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(" \n = Title = \n \n Body line . \n")
    rows = ["", " = Title = \n", "", " Body line . \n"]  # HF rows: lines kept, blank lines empty
    assert wikitext2_text(raw) == "\n\n".join(rows)


# --- multiple choice ---------------------------------------------------------------------------


class BigramForCausalLM(nn.Module):
    """Logits depend only on the current token (a fixed table): what it prefers is known exactly."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table
        self.config = SimpleNamespace(max_position_embeddings=64, model_type="llama")  # a causal family

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.table[input_ids])


def bigram_preferring(tokenizer, pairs: list[tuple[str, str]]) -> BigramForCausalLM:
    table = torch.zeros(len(tokenizer), len(tokenizer))
    for current, following in pairs:
        table[tokenizer.convert_tokens_to_ids(current), tokenizer.convert_tokens_to_ids(following)] = 10.0
    return BigramForCausalLM(table)


def test_multiple_choice_picks_the_likely_continuation_and_can_fail(tokenizer):
    model = bigram_preferring(tokenizer, [("w1", "w2")])
    right = MCItem(("w1",) * 3, ("w5", "w2", "w9"), gold=1)
    wrong = MCItem(("w1",) * 3, ("w5", "w2", "w9"), gold=0)  # the model prefers w2: this one is missed
    metrics = evaluate_multiple_choice(model, tokenizer, [right, wrong], max_length=64)
    assert metrics["acc"] == 0.5 and metrics["acc_norm"] == 0.5


def test_acc_norm_divides_by_characters_and_can_disagree_with_acc(tokenizer):
    """Uniform model: every token costs log(V). One short option (1 token, 2 chars) vs one long (3 tokens, 11 chars)."""
    item = MCItem(("w1", "w1"), ("w3", "w10 w11 w12"), gold=1)
    [scores] = score_items(UniformForCausalLM(len(tokenizer)), tokenizer, [item], max_length=64)
    assert scores == pytest.approx([-math.log(len(tokenizer)), -3 * math.log(len(tokenizer))], rel=1e-5)
    metrics = evaluate_multiple_choice(UniformForCausalLM(len(tokenizer)), tokenizer, [item], max_length=64)
    assert metrics["acc"] == 0.0 and metrics["acc_norm"] == 1.0


class UniformForCausalLM(UniformLM):
    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return super().forward(input_ids)


def test_batched_left_padded_scores_equal_one_at_a_time_by_hand(llama, tokenizer):
    items = [
        MCItem(("w1 w2 w3",) * 2, ("w4", "w5 w6 w7"), 0),
        MCItem(("w9", "w9 w10 w11 w12 w13"), ("w14 w15", "w14 w15"), 0),  # partial scoring (winogrande-like)
        MCItem(("w20 w21",) * 3, ("w22", "w23", "w24 w25 w26 w27"), 2),
    ]
    batched = score_items(llama, tokenizer, items, max_length=128, batch_size=8)
    single = score_items(llama, tokenizer, items, max_length=128, batch_size=1)
    by_hand = []
    for item in items:
        row = []
        for context, choice in zip(item.contexts, item.choices, strict=True):
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(llama(input_ids=torch.tensor([ctx + cont])).logits[0], dim=-1)
            row.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        by_hand.append(row)
    flat = [x for row in by_hand for x in row]
    assert [x for row in batched for x in row] == pytest.approx(flat, abs=1e-4)
    assert [x for row in single for x in row] == pytest.approx(flat, abs=1e-4)


def test_encode_pair_moves_trailing_space_of_the_context_into_the_continuation(tokenizer):
    assert encode_pair(tokenizer, "w1 w2 ", "w3") == encode_pair(tokenizer, "w1 w2", " w3")
    with pytest.raises(EdgepruneError, match="empty context"):
        encode_pair(tokenizer, "", " w3")


def test_generic_jsonl_task_through_evaluate_task(tokenizer, tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "w1", "choices": ["w7", "w2"], "gold": 1},
        {"question": "w3", "choices": ["w4", "w8"], "gold": 0},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = bigram_preferring(tokenizer, [("w1", "w2"), ("w3", "w4")])
    result = evaluate_task(model, tokenizer, str(path))
    assert result["kind"] == "multiple_choice" and result["n"] == 2 and result["metrics"]["acc"] == 1.0
    assert evaluate_task(model, tokenizer, str(path), limit=1)["n"] == 1


@pytest.mark.parametrize(
    ("row", "message"),
    [({"question": "w1", "choices": ["w2"], "gold": 0}, "a list of 2"), ({"question": "w1", "gold": 0}, "'choices'")],
)
def test_generic_jsonl_format_errors_name_the_item(row, message, tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(EdgepruneError, match=message):
        evaluate_task(bigram_preferring(tokenizer, []), tokenizer, str(path))


def test_boolq_labels_may_be_booleans_or_strings(tmp_path):
    path = tmp_path / "val.jsonl"
    rows = [{"passage": "p", "question": "q", "label": v} for v in (True, "false", "true", False)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_boolq(path)
    assert [i.gold for i in items] == [1, 0, 1, 0]
    assert items[0].contexts[0] == "p\nQuestion: q?\nAnswer:" and items[0].choices == ("no", "yes")


def test_task_and_data_errors_are_one_line_edgeprune_errors(llama, tokenizer, tmp_path):
    with pytest.raises(EdgepruneError, match="unknown task 'hellaswag'"):
        evaluate_task(llama, tokenizer, "hellaswag")
    with pytest.raises(EdgepruneError, match="boolq/val.jsonl not found"):
        evaluate_task(llama, tokenizer, "boolq", data_dir=tmp_path)
    with pytest.raises(EdgepruneError, match="needs a causal language model"):
        evaluate_task(nn.Linear(2, 2), tokenizer, "wikitext2", data_dir=tmp_path)


def test_data_dir_rule(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEPRUNE_DATA", raising=False)
    assert resolve_data_dir() == Path("../shared/data")
    monkeypatch.setenv("EDGEPRUNE_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"  # the argument wins


# --- the real files in the shared data folder ----------------------------------------------------


@pytest.mark.parametrize(
    ("task", "n_items", "n_choices"),
    [
        ("boolq", 3270, {2}),
        ("piqa", 1838, {2}),
        ("winogrande", 1267, {2}),
        ("arc_easy", 2376, {3, 4, 5}),
        ("arc_challenge", 1172, {3, 4, 5}),
    ],
)
def test_zero_shot_loaders_parse_the_real_files(task, n_items, n_choices, data_dir):
    items = load_mc_task(task, data_dir)
    assert len(items) == n_items
    assert {len(i.choices) for i in items} == n_choices
    assert all(0 <= i.gold < len(i.choices) and len(i.contexts) == len(i.choices) for i in items)
    assert all(i.choices[0] and i.contexts[0] for i in items[:20])


def test_zero_shot_label_details_on_real_files(data_dir):
    boolq = load_mc_task("boolq", data_dir)
    assert sum(i.gold for i in boolq) == 2033  # "true" strings in this copy
    piqa = load_mc_task("piqa", data_dir)
    assert sum(i.gold for i in piqa) == 928 and piqa[0].contexts[0].startswith("Question: How do I ready a guinea pig")
    wino = load_mc_task("winogrande", data_dir)
    official = (data_dir / "commonsense/winogrande/dev-labels.lst").read_text().split()
    assert [str(i.gold + 1) for i in wino] == official
    prefix = "Sarah was a much better surgeon than Maria so "
    assert (
        wino[0].contexts == (prefix + "Sarah", prefix + "Maria")
        and wino[0].choices[0] == "always got the easier cases."
    )
    arc = [json.loads(line) for line in (data_dir / "commonsense/arc/ARC-Easy-Test.jsonl").read_text().splitlines()]
    numeric = [i for i, row in enumerate(arc) if row["answerKey"].isdigit()]
    assert numeric  # numeric labels "1".."4" map to the position of that label
    items = load_mc_task("arc_easy", data_dir)
    for i in numeric[:5]:
        labels = [c["label"] for c in arc[i]["question"]["choices"]]
        assert items[i].gold == labels.index(arc[i]["answerKey"])


@pytest.mark.parametrize(
    ("task", "n_rows", "label_counts"),
    [
        ("sst2", 872, {1.0: 444, 0.0: 428}),
        ("cola", 1043, {1.0: 721, 0.0: 322}),
        ("mrpc", 408, {1.0: 279, 0.0: 129}),
        ("rte", 277, {0.0: 146, 1.0: 131}),
        ("qnli", 5463, {0.0: 2702, 1.0: 2761}),
        ("stsb", 1500, None),
    ],
)
def test_glue_dev_readers_parse_the_real_files(task, n_rows, label_counts, data_dir):
    examples = read_glue(task, data_dir, "dev.tsv")
    assert len(examples) == n_rows
    if label_counts is None:
        assert min(e.label for e in examples) == 0.0 and max(e.label for e in examples) == 5.0
    else:
        assert {v: sum(e.label == v for e in examples) for v in label_counts} == label_counts
    assert (examples[0].text_b is None) == (task in ("sst2", "cola"))
    assert not examples[0].text_a.startswith("\ufeff")


def test_glue_quirks_on_the_real_files(data_dir):
    assert read_glue("cola", data_dir, "dev.tsv")[0].text_a == "The sailors rode the breeze clear of the rocks."
    mrpc = read_glue("mrpc", data_dir, "dev.tsv")
    assert mrpc[0].text_b.startswith('" The foodservice pie')  # an unbalanced quote kept as text
    assert len(read_glue("sst2", data_dir, "train.tsv")) == 67349


def test_wikitext2_real_file_has_the_published_line_count(data_dir):
    text = wikitext2_text(data_dir / "wikitext-2-raw/wiki.test.raw")
    assert text.count("\n\n") >= 4357 and " = Robert Boulter = \n" in text


def test_read_tsv_strips_a_bom_and_keeps_quotes(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes('\ufeffa\tb\n"x\ty "z\n'.encode())
    assert read_tsv(path) == [{"a": '"x', "b": 'y "z'}]
    with pytest.raises(EdgepruneError, match="line 2 has 1 fields"):
        path.write_text("a\tb\nonly\n")
        read_tsv(path)


# --- ONNX export equals PyTorch ----------------------------------------------------------------


@pytest.fixture
def onnx_llama(tmp_path, llama, tokenizer) -> Path:
    from optimum.exporters.onnx import onnx_export_from_model

    folder = tmp_path / "tiny-llama-onnx"
    from edgeprune.export.graph import add_logits_to_keep

    onnx_export_from_model(llama, folder, task="text-generation-with-past")
    assert add_logits_to_keep(folder / "model.onnx")  # as `edgeprune export` ships decoders
    tokenizer.save_pretrained(folder)
    return folder


def tiny_wikitext(folder: Path, n_lines: int = 40) -> Path:
    gen = torch.Generator().manual_seed(3)
    lines = [
        " " + " ".join(f"w{int(i)}" for i in torch.randint(0, 80, (12,), generator=gen)) + " \n" for _ in range(n_lines)
    ]
    path = folder / "wikitext-2-raw" / "wiki.test.raw"
    path.parent.mkdir(parents=True)
    path.write_text(" \n".join(lines))
    return folder


def test_onnx_perplexity_and_choices_equal_pytorch(onnx_llama, llama, tokenizer, tmp_path):
    onnx_model, onnx_tokenizer, _ = load_for_eval(str(onnx_llama))
    assert "logits_to_keep" in onnx_model.runtime.input_names
    assert load_for_eval(str(onnx_llama / "model.onnx"))[0].runtime.path == onnx_model.runtime.path
    data = tiny_wikitext(tmp_path / "data")
    for seq_len, stride in ((32, None), (64, 16)):
        ours = evaluate_task(onnx_model, onnx_tokenizer, "wikitext2", data, seq_len=seq_len, stride=stride)
        ref = evaluate_task(llama, tokenizer, "wikitext2", data, seq_len=seq_len, stride=stride)
        assert ours["n"] == ref["n"] > 1
        assert math.isclose(ours["metrics"]["ppl"], ref["metrics"]["ppl"], rel_tol=1e-4)
    items = [MCItem(("w1 w2", "w1 w2 w3 w4"), ("w5 w6", "w5 w6"), 0), MCItem(("w9",) * 2, ("w1", "w2 w3 w4"), 1)]
    ours, ref = score_items(onnx_model, tokenizer, items, 128), score_items(llama, tokenizer, items, 128)
    assert [x for row in ours for x in row] == pytest.approx([x for row in ref for x in row], abs=1e-4)


# --- GLUE metrics and fine-tuning a head ---------------------------------------------------------


def test_matthews_equals_hand_computation():
    pred = np.array([1, 1, 1, 0, 0, 1, 0, 1])
    gold = np.array([1, 0, 1, 0, 1, 1, 0, 1])
    tp, tn, fp, fn = 4, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert math.isclose(matthews(pred, gold), expected)
    assert matthews(np.ones(4), np.array([1, 0, 1, 0])) == 0.0  # a constant prediction


def test_spearman_and_pearson_equal_hand_computation():
    x = np.array([1.0, 2.0, 2.0, 4.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    rank_x = np.array([1.0, 2.5, 2.5, 4.0, 5.0])  # tied values share their mean rank
    rank_y = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    dx, dy = rank_x - rank_x.mean(), rank_y - rank_y.mean()
    assert math.isclose(spearman(x, y), (dx @ dy) / math.sqrt((dx @ dx) * (dy @ dy)))
    mx, my = x - x.mean(), y - y.mean()
    assert math.isclose(pearson(x, y), (mx @ my) / math.sqrt((mx @ mx) * (my @ my)))


def toy_sst2(folder: Path, n_train: int = 96, n_dev: int = 32) -> Path:
    """A trivially separable SST-2 lookalike: label 0 uses words w10..w19, label 1 uses w50..w59."""
    gen = torch.Generator().manual_seed(4)

    def rows(n: int) -> str:
        lines = []
        for i in range(n):
            label = i % 2
            words = torch.randint(10 + 40 * label, 20 + 40 * label, (5,), generator=gen)
            lines.append(" ".join(f"w{int(w)}" for w in words) + f"\t{label}\n")
        return "sentence\tlabel\n" + "".join(lines)

    (folder / "glue" / "SST-2").mkdir(parents=True)
    (folder / "glue" / "SST-2" / "train.tsv").write_text(rows(n_train))
    (folder / "glue" / "SST-2" / "dev.tsv").write_text(rows(n_dev))
    return folder


def cut_ffn_unevenly(model) -> None:
    from edgeprune.models import adapter_for
    from edgeprune.structure import LayerKeep, cut_model

    adapter = adapter_for(model.config)
    keep = [
        LayerKeep(ffn=torch.arange(0, adapter.widths(layer).ffn, i + 2))
        for i, layer in enumerate(adapter.layers(model))
    ]
    cut_model(model, adapter, keep)


def test_glue_refuses_a_model_without_a_classification_head(bert, tokenizer, tmp_path):
    with pytest.raises(EdgepruneError, match="finetune-head"):
        evaluate_glue(bert, tokenizer, "sst2", toy_sst2(tmp_path))


def test_glue_splits_of_dev_only_tasks_do_not_overlap(data_dir):
    from edgeprune.evaluate.glue import glue_split

    train, train_note = glue_split("rte", data_dir, "train")
    evaluated, eval_note = glue_split("rte", data_dir, "eval")
    assert (len(train), len(evaluated)) == (139, 138) and "even" in train_note and "odd" in eval_note
    assert not {(e.text_a, e.text_b) for e in train} & {(e.text_a, e.text_b) for e in evaluated}


# --- the command line ---------------------------------------------------------------------------


def run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_eval_prints_a_table_and_writes_json(saved_llama, llama, tokenizer, tmp_path):
    data = tiny_wikitext(tmp_path / "data")
    result = run(
        "eval", saved_llama, "--task", "wikitext2", "--data-dir", data, "--seq-len", 32, "--json", tmp_path / "r.json"
    )
    assert result.exit_code == 0, result.output
    assert "ppl" in result.output and "windows of 32 tokens" in result.output
    record = json.loads((tmp_path / "r.json").read_text())
    expected = evaluate_task(llama, tokenizer, "wikitext2", data, seq_len=32)["metrics"]["ppl"]
    assert record["results"][0]["metrics"]["ppl"] == pytest.approx(expected, rel=1e-6)
    assert record["settings"]["seq_len"] == 32 and record["settings"]["stride"] == 32


def test_cli_finetune_head_on_a_pruned_encoder_learns_and_reloads(bert, tokenizer, tmp_path):
    """The toy task is trivially separable: a working head gets every dev sentence right."""
    cut_ffn_unevenly(bert)  # per-layer FFN widths 48, 32, 24 must survive fine-tuning and saving
    save_pruned(bert, tokenizer, tmp_path / "pruned", {"source": "tiny"})
    data = toy_sst2(tmp_path / "data")
    args = ("--task", "sst2", "--data-dir", data, "--steps", 30, "--lr", 2e-3, "--batch-size", 16)
    trained = run("finetune-head", tmp_path / "pruned", *args, "-o", tmp_path / "head")
    assert trained.exit_code == 0, trained.output
    assert "acc 1.0000" in trained.output and "SST-2 train.tsv" in trained.output
    loaded, _ = load_pruned(tmp_path / "head")
    assert type(loaded) is BertForSequenceClassification and loaded.config.finetuning_task == "sst2"
    assert [layer.intermediate.dense.out_features for layer in loaded.bert.encoder.layer] == [48, 32, 24]
    assert json.loads((tmp_path / "head" / "edgeprune.json").read_text())["head"]["steps"] == 30
    evaluated = run("eval", tmp_path / "head", "--task", "sst2", "--data-dir", data)
    assert evaluated.exit_code == 0 and "1.0000" in evaluated.output


def test_cli_eval_errors_are_one_line(saved_llama, tmp_path):
    for args, message in (
        (("--task", "hellaswag"), "unknown task 'hellaswag'"),
        (("--task", "boolq", "--data-dir", tmp_path), "not found: pass --data-dir"),
        (("--task", "sst2", "--data-dir", toy_sst2(tmp_path / "d")), "no classification head"),
    ):
        result = run("eval", saved_llama, *args)
        assert result.exit_code == 1, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output


def test_cli_eval_datasets_name_without_the_hub_is_a_one_line_error(saved_llama):
    result = run("eval", saved_llama, "--task", "wikitext:wikitext-2-raw-v1:test")
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "dataset" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_default_decoder_wikitext2_and_arc_easy(data_dir):
    """SmolLM2-135M-Instruct (Q4_1 dequantized): PPL@128 near the criteria note's 55, ARC-Easy above chance."""
    model, tokenizer, _ = load_for_eval(None)
    ppl = evaluate_task(model, tokenizer, "wikitext2", data_dir, limit=16)["metrics"]["ppl"]
    assert 30 < ppl < 90
    arc = evaluate_task(model, tokenizer, "arc_easy", data_dir, limit=100)["metrics"]
    assert arc["acc_norm"] > 0.3

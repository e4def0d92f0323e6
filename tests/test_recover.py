"""LoRA recovery: adapters on pruned widths, exact merge, lower held-out loss, resume, 2 processes, clear errors."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import family_names, tiny_bert, tiny_model
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, LlamaForCausalLM

from edgeprune.checkpoint import load_pruned, save_pruned
from edgeprune.cli import main
from edgeprune.errors import EdgepruneError
from edgeprune.evaluate import perplexity
from edgeprune.models import adapter_for
from edgeprune.recover import (
    ALPACA_PROMPT_NO_INPUT,
    IGNORE,
    RecoveryConfig,
    attach_lora,
    encode_instructions,
    fixed_val_batches,
    load_recovery_data,
    merge,
    recover,
    recover_folder,
    recover_model,
    work_dir_for,
)
from edgeprune.structure import LayerKeep, cut_model, layer_widths

MERGE_TOL = 1e-4  # abs and rel: float32 W + (alpha/r)·B·A vs the two paths summed, through 3-4 layers
FAST = {"seq_len": 32, "lr": 1e-2, "batch_size": 4, "grad_accum": 2, "val_size": 8, "eval_every": 5}


def prune_non_uniform(model) -> None:
    """Every layer a different FFN width; one layer with fewer heads."""
    adapter = adapter_for(model.config)
    keep = []
    for i, layer in enumerate(adapter.layers(model)):
        w = adapter.widths(layer)
        heads = None
        if i == 1:
            heads = torch.tensor([0, 1, 4, 5]) if w.kv_heads == 2 else torch.tensor([0, 3])
        keep.append(LayerKeep(ffn=torch.arange(0, w.ffn, i + 2), heads=heads))
    cut_model(model, adapter, keep)


@pytest.fixture
def pattern_text(tmp_path: Path) -> Path:
    return write_pattern_text(tmp_path)


def write_pattern_text(folder: Path, seed: int = 0) -> Path:
    """Runs of consecutive words (w7 w8 w9 ...): learnable, so LoRA can lower the loss quickly."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    words = []
    for _ in range(600):
        start = rng.randrange(0, 80)
        words += [f"w{(start + k) % 89}" for k in range(8)]
    path = folder / "pattern.txt"
    path.write_text(" ".join(words))
    return path


@pytest.fixture
def pruned_dir(tmp_path: Path, llama, tokenizer) -> Path:
    prune_non_uniform(llama)
    return save_pruned(llama, tokenizer, tmp_path / "pruned", {"source": "tiny", "criterion": "test"})


def lora_layers(peft_model) -> dict:
    return {name: m for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


@pytest.mark.parametrize("family", family_names())
def test_lora_wraps_every_projection_with_its_pruned_shape(family):
    model = tiny_model(family)
    prune_non_uniform(model)
    peft_model = attach_lora(model, RecoveryConfig())
    wrapped = lora_layers(peft_model)
    suffixes = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if family == "bert":  # `output.dense` is both the attention output and the FFN output: each once per layer
        suffixes = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "layer.N.output.dense")
    names = [re.sub(r"layer\.\d+\.", "layer.N.", n) for n in wrapped]
    assert len(wrapped) == len(suffixes) * model.config.num_hidden_layers
    for suffix in suffixes:
        assert sum(n.endswith("." + suffix) for n in names) == model.config.num_hidden_layers, suffix
    assert not any("pooler" in n or "cls." in n or "lm_head" in n for n in wrapped)
    for module in wrapped.values():
        base = module.base_layer
        assert module.lora_A["default"].in_features == base.in_features
        assert module.lora_B["default"].out_features == base.out_features
    assert (
        len({m.base_layer.out_features for n, m in wrapped.items() if n.endswith(("up_proj", "intermediate.dense"))})
        > 1
    )


@pytest.mark.parametrize("family", family_names())
def test_merged_model_matches_unmerged_peft_model(family, token_ids):
    model = tiny_model(family)
    prune_non_uniform(model)
    with torch.no_grad():
        before = model(input_ids=token_ids).logits
    peft_model = attach_lora(model, RecoveryConfig())
    torch.manual_seed(3)
    for module in lora_layers(peft_model).values():  # trained-looking adapters (B starts at zero)
        torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=token_ids).logits
        merged_model = merge(peft_model)
        merged = merged_model(input_ids=token_ids).logits
    assert type(merged_model) is (LlamaForCausalLM if family == "llama" else BertForMaskedLM)
    assert not lora_layers(merged_model)
    torch.testing.assert_close(merged, unmerged, atol=MERGE_TOL, rtol=MERGE_TOL)
    assert (merged - before).abs().max() > 100 * MERGE_TOL  # the adapter really changed the model


def val_loss_of(model, data, tokenizer, config, causal: bool) -> float:
    """Token-weighted held-out loss of a plain model, computed independently of the trainer."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in fixed_val_batches(data, tokenizer, config.batch_size, config.seed):
            labels = batch["labels"][:, 1:] if causal else batch["labels"]
            n = int(labels.ne(IGNORE).sum())
            total += model(**batch).loss.item() * n
            count += n
    return total / count


@pytest.mark.parametrize("family", family_names())
def test_recovery_lowers_validation_loss(family, tokenizer, pattern_text):
    model = tiny_model(family)
    prune_non_uniform(model)
    widths = layer_widths(model, adapter_for(model.config))
    config = RecoveryConfig(steps=20, **FAST)
    data = load_recovery_data(pattern_text, tokenizer, model, config)
    assert data.kind == ("text" if family == "llama" else "mlm")
    result = recover(model, tokenizer, data, config)
    before, best = result.record.val_loss_before, result.record.val_loss_best
    assert best < before - 0.2, result.record.val_losses
    assert result.record.steps == 20 and result.record.best_step > 0
    assert layer_widths(result.model, adapter_for(result.model.config)) == widths
    measured = val_loss_of(result.model, data, tokenizer, config, causal=family == "llama")
    assert measured == pytest.approx(best, abs=1e-4)  # the best step's adapter is what got merged


def test_cpu_minutes_cap_stops_training_and_counts_its_tokens(llama, tokenizer, pattern_text):
    prune_non_uniform(llama)
    config = RecoveryConfig(steps=50, cpu_minutes=1e-5, **FAST)  # 0.6 ms of CPU: spent within the first step
    data = load_recovery_data(pattern_text, tokenizer, llama, config)
    record = recover(llama, tokenizer, data, config).record
    assert record.steps == 1  # not the 50 asked for
    assert record.tokens == config.batch_size * config.grad_accum * config.seq_len  # full windows, no padding


def test_linear_schedule_warms_up_then_decays_to_zero_with_the_budget():
    config = RecoveryConfig(lr=1e-3, schedule="linear", warmup_steps=4, steps=100, minutes=10)
    assert config.budget_spent(50, 0.0, 0.0, total=100) == 0.5
    assert config.budget_spent(10, 450.0, 0.0, total=100) == 0.75  # the wall clock is ahead of the steps
    assert config.budget_spent(10, 900.0, 0.0, total=100) == 1.0
    assert config.learning_rate(0, 0.0) == pytest.approx(2.5e-4)  # first of 4 warm-up steps
    assert config.learning_rate(3, 0.0) == pytest.approx(1e-3)
    assert config.learning_rate(60, 0.75) == pytest.approx(2.5e-4)
    assert config.learning_rate(99, 1.0) == 0.0
    assert replace(config, schedule="constant").learning_rate(99, 0.9) == 1e-3
    with pytest.raises(EdgepruneError, match="--schedule cosine"):
        RecoveryConfig(schedule="cosine")


def test_recover_model_updates_the_model_in_place(llama, tokenizer, pattern_text, token_ids, tmp_path):
    prune_non_uniform(llama)
    with torch.no_grad():
        before = llama(input_ids=token_ids).logits
    config = RecoveryConfig(steps=5, **FAST)
    heldout = torch.randint(7, 96, (64,), generator=torch.Generator().manual_seed(2))
    result = recover_model(
        llama, tokenizer, config, work=tmp_path, prompt_text="", data=pattern_text, heldout=heldout, eval_seq_len=32
    )
    record = result.record
    assert record.steps == 5 and record.val_loss_best <= record.val_loss_before
    assert not lora_layers(llama)
    with torch.no_grad():
        after = llama(input_ids=token_ids).logits
    assert record.best_step == 5 and not torch.equal(after, before)  # the merged weights are in `llama`
    assert record.heldout_ppl_before != record.heldout_ppl_after
    assert record.heldout_ppl_after == pytest.approx(perplexity(llama, heldout, seq_len=32), rel=1e-5)
    json.dumps(record.as_dict())  # goes into edgeprune.json as it is


def test_instruction_loss_covers_response_only(tokenizer):
    row = {"instruction": "w1 w2", "input": "", "output": "w3 w4"}
    (example,) = encode_instructions([row], tokenizer, seq_len=200)
    prompt = tokenizer(ALPACA_PROMPT_NO_INPUT.format(instruction="w1 w2"))["input_ids"]
    n = len(prompt)
    assert example["input_ids"][:n] == prompt
    assert example["labels"][:n] == [IGNORE] * n
    response = tokenizer("w3 w4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["labels"][n:] == response == example["input_ids"][n:]
    assert encode_instructions([row], tokenizer, seq_len=n) == []  # nothing of the response would be left


def test_shared_alpaca_file_loads(data_dir, llama, tokenizer):
    config = RecoveryConfig()
    alpaca = load_recovery_data(data_dir / "instruct" / "alpaca_data_cleaned.first5000.json", tokenizer, llama, config)
    assert alpaca.kind == "instruct" and len(alpaca.val) == 32 and 4900 < len(alpaca.train) + 32 <= 5000
    assert all(any(t != IGNORE for t in e["labels"]) and e["labels"][0] == IGNORE for e in alpaca.train)


def test_instruction_json_trains_decoder(tmp_path, llama, tokenizer):
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        a = rng.randrange(7, 80)
        rows.append({"instruction": f"w{a}", "input": "", "output": " ".join(f"w{a + k}" for k in range(1, 6))})
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(rows))
    config = RecoveryConfig(steps=15, **{**FAST, "seq_len": 128})
    data = load_recovery_data(path, tokenizer, llama, config)
    assert data.kind == "instruct" and len(data.train) == 32 and len(data.val) == 8
    record = recover(llama, tokenizer, data, config).record
    assert record.val_loss_best < record.val_loss_before


def test_labelled_tsv_trains_encoder_classifier(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=96, hidden_size=32, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
    model = BertForSequenceClassification(config).eval()
    prune_non_uniform(model)
    head = model.classifier.weight.detach().clone()
    rng = random.Random(0)
    lines = ["sentence\tlabel"]
    for _ in range(120):  # label 0 uses words w0..w39, label 1 words w40..w79
        label = rng.randrange(2)
        lines.append(" ".join(f"w{rng.randrange(40) + 40 * label}" for _ in range(6)) + f"\t{label}")
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    recovery = RecoveryConfig(steps=40, **{**FAST, "val_size": 16, "eval_every": 10})
    data = load_recovery_data(path, tokenizer, model, recovery)
    assert data.kind == "classify" and data.train[0]["labels"] in (0, 1)
    result = recover(model, tokenizer, data, recovery)
    assert result.record.val_loss_best < result.record.val_loss_before - 0.05, result.record.val_losses
    assert type(result.model) is BertForSequenceClassification
    assert not torch.equal(result.model.classifier.weight, head)  # the head is trained and kept
    measured = val_loss_of(result.model, data, tokenizer, recovery, causal=False)
    assert measured == pytest.approx(result.record.val_loss_best, abs=1e-4)
    with pytest.raises(EdgepruneError, match="does not fit"):
        load_recovery_data(path, tokenizer, tiny_bert(), recovery)  # labels for a masked LM


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_recover_writes_loadable_pruned_folder(pruned_dir, pattern_text, tmp_path):
    before = {p.name: p.read_bytes() for p in pruned_dir.iterdir()}
    out = tmp_path / "recovered"
    args = ["recover", pruned_dir, "--data", pattern_text, "--steps", 6, "--seq-len", 32, "--eval-every", 3]
    args += ["--save-every", 2, "--val-size", 8, "--lr", 1e-2, "-o", out]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in pruned_dir.iterdir()} == before  # input untouched
    model, _ = load_pruned(out)
    original, _ = load_pruned(pruned_dir)
    assert layer_widths(model, adapter_for(model.config)) == layer_widths(original, adapter_for(original.config))
    record = json.loads((out / "edgeprune.json").read_text())
    assert record["criterion"] == "test" and record["recovered_from"] == str(pruned_dir)
    recovery = record["recovery"]
    assert recovery["steps"] == 6 and [s for s, _ in recovery["val_losses"]] == [0, 3, 6]
    assert not work_dir_for(out).exists()
    again = run_cli(*args)
    assert again.exit_code == 1 and "already exists" in again.output


BAD_DATA = {
    "missing.json": (None, "not found"),
    "broken.json": ("[{", "not valid JSON"),
    "dict.json": ('{"instruction": "w1"}', "not a list"),
    "wrong_keys.jsonl": ('{"question": "w1"}\n', "need `instruction` and `output`"),
    "empty.txt": ("", "need at least"),
    "binary.bin": ("\udcff\udcfe", "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_one_line_error(name, pruned_dir, tmp_path):
    content, message = BAD_DATA[name]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content.encode("utf-8", "surrogateescape"))
    result = run_cli("recover", pruned_dir, "--data", path, "-o", tmp_path / "out")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_unreachable_dataset_name_is_one_line_error(pruned_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("recover", pruned_dir, "--data", "yahma/alpaca-cleaned", "-o", tmp_path / "out")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "yahma/alpaca-cleaned" in lines[0], result.output


def test_unknown_targets_is_one_line_error_and_leaves_nothing(pruned_dir, pattern_text, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "recover", pruned_dir, "--data", pattern_text, "--seq-len", 32, "--targets", "nope_proj", "-o", out
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "nope_proj" in lines[0], result.output
    assert not out.exists() and not work_dir_for(out).exists()


class Interrupt(Exception):
    pass


def test_resume_continues_from_saved_step(pruned_dir, pattern_text, tmp_path):
    """In float32; the distillation resume test runs bfloat16 steps (both deterministic on a CPU)."""
    config = RecoveryConfig(steps=6, save_every=2, precision="float32", **{**FAST, "eval_every": 3})
    config = replace(config, schedule="linear", warmup_steps=2)  # the rate is a function of the saved state
    full = recover_folder(str(pruned_dir), str(pattern_text), tmp_path / "full", config)

    def stop_at_3(report):
        if report.step == 3:
            raise Interrupt

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        recover_folder(str(pruned_dir), str(pattern_text), out, config, on_step=stop_at_3)
    assert not out.exists()
    assert json.loads((work_dir_for(out) / "checkpoint" / "state.json").read_text())["step"] == 2
    with pytest.raises(EdgepruneError, match="--resume"):
        recover_folder(str(pruned_dir), str(pattern_text), out, config)
    with pytest.raises(EdgepruneError, match="different lr"):
        recover_folder(str(pruned_dir), str(pattern_text), out, replace(config, lr=0.5), resume=True)
    run_file = work_dir_for(out) / "run.json"  # written before recovery had a precision: it ran float32
    run_file.write_text(json.dumps({k: v for k, v in json.loads(run_file.read_text()).items() if k != "precision"}))
    work = work_dir_for(out)  # a kill between save_checkpoint's two renames leaves only the previous checkpoint
    (work / "checkpoint").replace(work / "checkpoint.previous")
    steps_seen = []
    resumed = recover_folder(
        str(pruned_dir), str(pattern_text), out, config, resume=True, on_step=lambda r: steps_seen.append(r.step)
    )
    assert steps_seen == [3, 4, 5, 6] and resumed.record.resumed_from_step == 2 and resumed.record.steps == 6
    resumed_val, full_val = resumed.record.val_losses, full.record.val_losses
    assert [s for s, _ in resumed_val] == [s for s, _ in full_val] == [0, 3, 6]
    resumed_losses, full_losses = [v for _, v in resumed_val], [v for _, v in full_val]
    assert resumed_losses == pytest.approx(full_losses, abs=1e-6)  # same batches, same RNG: the same run
    assert not work_dir_for(out).exists()


def free_port() -> int:
    """A free local port, so concurrent runs on this shared machine do not collide on torchrun's default."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_accelerate_run(pruned_dir, pattern_text, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    cmd += ["-m", "edgeprune.cli", "recover", str(pruned_dir), "--data", str(pattern_text), "--steps", "6"]
    cmd += ["--seq-len", "32", "--val-size", "8", "--eval-every", "3", "--lr", "1e-2", "-o", str(out)]
    cmd += ["--schedule", "linear", "--warmup-steps", "2", "--minutes", "60"]  # one rate from two clocks: a collective
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "EDGEPRUNE_CACHE": str(tmp_path / "cache")}  # not the user's
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("recovered ") == 1  # only the main process reports
    model, _ = load_pruned(out)
    recovery = json.loads((out / "edgeprune.json").read_text())["recovery"]
    assert recovery["processes"] == 2
    assert min(v for _, v in recovery["val_losses"]) < recovery["val_losses"][0][1]
    assert model(input_ids=torch.tensor([[7, 8, 9]])).logits.isfinite().all()

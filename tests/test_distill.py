"""Distillation from the dense teacher: KL loss, the student moving toward the teacher, self-written text, resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import VOCAB, tiny_llama
from safetensors.torch import load_file
from test_recover import FAST, free_port, prune_non_uniform, write_pattern_text

from edgeprune.calibration import heldout_start, tokenize_text
from edgeprune.checkpoint import load_pruned, save_pruned
from edgeprune.cli import main
from edgeprune.errors import EdgepruneError
from edgeprune.recover import RecoveryConfig, SelfTextConfig, load_recovery_data, recover, recover_folder
from edgeprune.recover.selftext import draw_prompts, sample_batch, sample_top_p, write_self_text
from edgeprune.recover.teacher import distill_loss, kl_full, kl_top_k, objective_for

ZERO_TOL = 1e-5  # float32 log-softmax differences of equal logits, relative to KL values of order 0.1-1
BF16_REL = 0.02  # bfloat16 keeps 8 significant bits (0.4% per rounding), compounded over 4 layers and the logits


@pytest.fixture
def pattern_text(tmp_path: Path) -> Path:
    return write_pattern_text(tmp_path)


def random_logits(seed: int, shape=(3, 10, VOCAB)) -> torch.Tensor:
    return 3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k", [None, 8])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_of_student_equal_to_teacher_is_zero_and_its_gradient_vanishes(top_k, temperature):
    teacher = random_logits(0)
    labels = torch.randint(7, VOCAB, teacher.shape[:2], generator=torch.Generator().manual_seed(1))
    student = teacher.clone().requires_grad_(True)
    loss = distill_loss(student, teacher, labels, temperature, top_k)
    loss.backward()
    assert abs(loss.item()) < ZERO_TOL
    assert student.grad.abs().max() < ZERO_TOL
    other = random_logits(2).requires_grad_(True)
    moved = distill_loss(other, teacher, labels, temperature, top_k)
    moved.backward()
    assert moved.item() > 100 * ZERO_TOL and other.grad.abs().max() > 100 * ZERO_TOL  # the same code can see a gap


def test_top_k_with_the_rest_lumped_is_a_coarser_kl():
    """Lumping outcomes never raises the KL (data processing), and k = vocabulary - 1 loses nothing."""
    teacher, student = random_logits(3).flatten(0, 1), random_logits(4).flatten(0, 1)
    full = kl_full(student, teacher, 1.0)
    assert torch.all(kl_top_k(student, teacher, 1.0, 8) <= full + 1e-5)
    torch.testing.assert_close(kl_top_k(student, teacher, 1.0, VOCAB - 1), full, atol=1e-4, rtol=1e-4)


def test_ignored_positions_carry_no_distillation_loss():
    teacher, student = random_logits(5), random_logits(6)
    labels = torch.full(teacher.shape[:2], -100)
    labels[:, 4:] = 9  # only positions 3.. predict a labelled token
    tail = distill_loss(student[:, 3:], teacher[:, 3:], labels[:, 3:])
    assert distill_loss(student, teacher, labels) == pytest.approx(tail.item(), rel=1e-6)


def heldout_kl(student, teacher, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return distill_loss(student(input_ids=tokens).logits, teacher(input_ids=tokens).logits, tokens).item()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_distilled_student_moves_toward_the_teacher_on_held_out_tokens(
    method, llama, tokenizer, pattern_text, tmp_path
):
    teacher = llama
    student = copy.deepcopy(teacher)
    prune_non_uniform(student)
    heldout = tokenize_text(tokenizer, write_pattern_text(tmp_path / "heldout", seed=1).read_text())[:96].view(4, 24)
    before = heldout_kl(student, teacher, heldout)
    config = RecoveryConfig(method=method, steps=15, **{**FAST, "lr": 3e-3 if method == "full" else 1e-2})
    data = load_recovery_data(pattern_text, tokenizer, student, config)
    result = recover(student, tokenizer, data, config, teacher=teacher, teacher_id="tiny")
    after = heldout_kl(result.model, teacher, heldout)
    assert after < 0.9 * before, (before, after)
    record = result.record
    assert record.teacher == "tiny" and 0 < record.teacher_share < 1 and record.tokens_per_s_per_process[0] > 0
    assert record.val_loss_best < record.val_loss_before  # the held-out objective is the KL too


def test_training_batches_run_in_bfloat16_and_evaluation_batches_in_float32(llama, tokenizer, pattern_text):
    student = copy.deepcopy(llama)
    prune_non_uniform(student)
    tokens = tokenize_text(tokenizer, pattern_text.read_text())[:96].view(4, 24)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    cpu = torch.device("cpu")
    exact = objective_for(student, llama, RecoveryConfig(precision="float32"), cpu)
    low = objective_for(student, copy.deepcopy(llama), RecoveryConfig(precision="bfloat16"), cpu)
    assert exact.low_teacher is None and {p.dtype for p in low.low_teacher.parameters()} == {torch.bfloat16}
    reference = exact(student, batch).item()
    assert low(student, batch, train=False).item() == reference  # evaluation: float32 throughout
    loss = low(student, batch)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() != reference
    assert loss.item() == pytest.approx(reference, rel=BF16_REL)
    assert all(p.grad.dtype == torch.float32 for p in student.parameters() if p.grad is not None)
    with pytest.raises(EdgepruneError, match="--precision"):
        RecoveryConfig(precision="float16")


def test_bfloat16_distillation_moves_the_student_toward_the_teacher_like_float32(
    llama, tokenizer, pattern_text, tmp_path
):
    """The adapters and AdamW moments stay float32 (read from the checkpoint); the record names the dtype."""
    teacher, student = llama, copy.deepcopy(llama)
    prune_non_uniform(student)
    heldout = tokenize_text(tokenizer, write_pattern_text(tmp_path / "heldout", seed=1).read_text())[:96].view(4, 24)
    before = heldout_kl(student, teacher, heldout)
    gains = {}
    for precision in ("float32", "bfloat16"):
        config = RecoveryConfig(steps=15, save_every=15, precision=precision, **FAST)
        data = load_recovery_data(pattern_text, tokenizer, student, config)
        work = tmp_path / precision
        result = recover(
            copy.deepcopy(student), tokenizer, data, config, work_dir=work, teacher=teacher, teacher_id="t"
        )
        assert result.record.as_dict()["dtype"] == precision
        gains[precision] = before - heldout_kl(result.model, teacher, heldout)
        assert {p.dtype for p in result.model.parameters()} == {torch.float32}
        adapters = load_file(work / "checkpoint" / "weights.safetensors")
        assert adapters and {t.dtype for t in adapters.values()} == {torch.float32}
        optimizer = torch.load(work / "checkpoint" / "optimizer.pt", weights_only=True)["state"]
        moments = [t for state in optimizer.values() for name, t in state.items() if name.startswith("exp_avg")]
        assert len(moments) == 2 * len(adapters) and {t.dtype for t in moments} == {torch.float32}
    assert gains["float32"] > 0.1 * before and gains["bfloat16"] > 0.8 * gains["float32"], (before, gains)


def test_distillation_refuses_an_encoder_or_a_foreign_vocabulary(llama, bert, tokenizer, pattern_text):
    config = RecoveryConfig(steps=1, **FAST)
    data = load_recovery_data(pattern_text, tokenizer, llama, config)
    with pytest.raises(EdgepruneError, match="decoder"):
        recover(llama, tokenizer, data, config, teacher=bert)
    foreign = tiny_llama(seed=1)
    foreign.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(EdgepruneError, match="vocabulary"):
        recover(llama, tokenizer, data, config, teacher=foreign)


@pytest.fixture
def split_text(tokenizer) -> tuple[str, set[int]]:
    """A calibration text whose held-out tail uses words its head never does: (head text, tail token ids)."""
    import random

    rng = random.Random(0)
    words = [f"w{rng.randrange(7, 50)}" for _ in range(800)] + [f"w{rng.randrange(50, 89)}" for _ in range(200)]
    tokens = tokenize_text(tokenizer, " ".join(words))
    cut = heldout_start(len(tokens))
    return tokenizer.decode(tokens[:cut].tolist()), set(tokens[cut:].tolist())


def test_self_text_is_reproducible_for_a_seed_and_never_includes_the_held_out_tail(
    llama, tokenizer, split_text, tmp_path, monkeypatch
):
    head, tail_ids = split_text
    config = SelfTextConfig(samples=24, prompt_tokens=8, new_tokens=12, batch_size=5, seed=3)
    first = write_self_text(llama, tokenizer, head, tmp_path / "a", config, "")  # no hash: generated each time
    again = write_self_text(llama, tokenizer, head, tmp_path / "b", config, "")
    other = write_self_text(llama, tokenizer, head, tmp_path / "c", SelfTextConfig(**{**vars(config), "seed": 4}), "")
    assert first.read_text() == again.read_text() != other.read_text()
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert len(rows) == 24 and all(
        r["text"].startswith(r["prompt"]) and len(r["text"]) > len(r["prompt"]) for r in rows
    )
    head_ids = tokenize_text(tokenizer, head).tolist()
    windows = [r["prompt"] for r in rows if not r["prompt"].startswith("Below is an instruction")]
    assert len(windows) == 12  # half instructions, half windows of the head
    for prompt in windows:
        ids = tokenize_text(tokenizer, prompt).tolist()
        assert not set(ids) & tail_ids
        assert any(head_ids[i : i + len(ids)] == ids for i in range(len(head_ids) - len(ids) + 1))
    assert draw_prompts(head, tokenizer, config) == [r["prompt"] for r in rows]

    def no_generation(*args, **kwargs):
        raise AssertionError("reused text must not be generated again")

    monkeypatch.setattr("edgeprune.recover.selftext.sample_continuations", no_generation)
    assert write_self_text(llama, tokenizer, head, tmp_path / "a", config, "").read_text() == first.read_text()


def test_self_text_written_for_a_teacher_hash_is_reused_by_any_later_folder(llama, tokenizer, split_text, tmp_path):
    """The shared cache: a second run (another budget, another -o) of the same teacher skips the writing."""
    from edgeprune.recover import selftext

    head, _ = split_text
    config = SelfTextConfig(samples=6, prompt_tokens=8, new_tokens=6, batch_size=3, seed=1)
    first = write_self_text(llama, tokenizer, head, tmp_path / "run1", config, "sha-of-teacher")
    generate = selftext.sample_continuations
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return generate(*args, **kwargs)

    selftext.sample_continuations = counted
    try:
        reused = write_self_text(llama, tokenizer, head, tmp_path / "run2", config, "sha-of-teacher")
        assert reused.read_text() == first.read_text() and calls == []
        write_self_text(llama, tokenizer, head, tmp_path / "run3", config, "sha-of-another-teacher")
        write_self_text(llama, tokenizer, head + " w9", tmp_path / "run4", config, "sha-of-teacher")
        assert len(calls) == 2  # another teacher, another prompt text: written anew
    finally:
        selftext.sample_continuations = generate


def test_top_p_sampling_with_a_tiny_nucleus_or_temperature_is_greedy():
    logits = random_logits(5, (40, 600))
    seed = torch.Generator().manual_seed(0)
    assert torch.equal(sample_top_p(logits, 1.0, 1e-6, seed), logits.argmax(-1))
    assert torch.equal(sample_top_p(logits, 1e-4, 0.95, seed), logits.argmax(-1))


@pytest.mark.parametrize("top_p", [0.95, 1.0])
def test_top_p_sampling_draws_the_nucleus_of_the_tempered_softmax(top_p):
    """Nuclei inside the first 64 candidates, inside 512, and wider: HF's TopPLogitsWarper says which tokens stay.

    20,000 draws per row; every token's frequency within 5 binomial standard deviations of its probability
    (1,800 tokens: a chance failure about 1 in 1,000 for a correct sampler) and no token outside the nucleus.
    """
    from transformers.generation.logits_process import TopPLogitsWarper

    draws, temperature = 20_000, 0.7
    decay = torch.tensor([0.5, 0.01, 0.001])[:, None] * temperature  # nucleus of ~6, ~300, ~570 of 600 tokens
    logits = -decay * torch.arange(600.0)
    warped = logits / temperature if top_p >= 1 else TopPLogitsWarper(top_p)(None, logits / temperature)
    expected = warped.softmax(-1).double()  # double: the binomial bound of a 1e-42 probability is no underflow
    tokens = sample_top_p(logits.repeat_interleave(draws, 0), temperature, top_p, torch.Generator().manual_seed(1))
    counts = torch.zeros(3, 600).index_put_(
        (torch.arange(3).repeat_interleave(draws), tokens), torch.ones(3 * draws), accumulate=True
    )
    frequency = counts.double() / draws
    assert torch.all((frequency - expected).abs() <= 5 * (expected * (1 - expected) / draws).sqrt())
    assert torch.all(counts[expected == 0] == 0) and (expected[1] > 0).sum() > 64


def test_sampled_batch_with_a_tiny_nucleus_is_each_prompt_greedy_alone_up_to_the_stop_token(llama):
    """Left padding, positions, and rows leaving the batch at the stop token change nothing a row would write alone."""
    prompts = [[11, 12, 13, 14, 15, 16], [20, 30], [40, 41, 42, 43]]
    config = SelfTextConfig(new_tokens=10, top_p=1e-6)
    with torch.inference_mode():
        alone = [
            llama.generate(torch.tensor([p]), do_sample=False, max_new_tokens=10)[0, len(p) :].tolist() for p in prompts
        ]
    stop = alone[0][2]  # the first prompt stops after 3 tokens; the others where they write it, if they do
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in alone]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        assert sample_batch(llama, ids, mask, config, stop, seed=0) == expected
    assert len(expected[0]) == 3 and max(map(len, expected)) > 3


@pytest.fixture
def dense_and_pruned(tmp_path: Path, llama, tokenizer) -> tuple[Path, Path]:
    dense = tmp_path / "dense"
    llama.save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    prune_non_uniform(llama)
    return dense, save_pruned(llama, tokenizer, tmp_path / "pruned", {"source": "tiny", "criterion": "test"})


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["full", "lora"])
def test_distillation_resumed_after_interruption_gives_the_uninterrupted_losses(method, dense_and_pruned, tmp_path):
    dense, pruned = dense_and_pruned
    config = RecoveryConfig(
        method=method, steps=6, save_every=2, precision="bfloat16", **{**FAST, "eval_every": 3, "lr": 3e-3}
    )
    small = SelfTextConfig(samples=40, prompt_tokens=8, new_tokens=24, batch_size=8)

    def distill(out: Path, **kwargs):
        return recover_folder(str(pruned), None, out, config, teacher_spec=str(dense), self_text=small, **kwargs)

    full = distill(tmp_path / "full")

    def stop_at_3(report):
        if report.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(tmp_path / "resumed", on_step=stop_at_3)
    resumed = distill(tmp_path / "resumed", resume=True)
    assert resumed.record.resumed_from_step == 2 and resumed.record.steps == 6
    assert [s for s, _ in resumed.record.val_losses] == [0, 3, 6]
    resumed_losses = [v for _, v in resumed.record.val_losses]
    assert resumed_losses == pytest.approx([v for _, v in full.record.val_losses], abs=1e-6)
    assert [v for _, v in resumed.train_losses[-3:]] == pytest.approx([v for _, v in full.train_losses[-3:]], abs=1e-6)
    assert "self-generated" in resumed.record.data
    model, _ = load_pruned(tmp_path / "resumed")
    reference, _ = load_pruned(tmp_path / "full")
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_cli_recover_with_teacher_and_no_data_distills_on_self_written_text(dense_and_pruned, tmp_path):
    dense, pruned = dense_and_pruned
    out = tmp_path / "recovered"
    args = ["recover", pruned, "--teacher", dense, "--method", "full", "--steps", 2, "--seq-len", 32]
    args += ["--val-size", 4, "--lr", 1e-3, "--top-k", 16, "--precision", "bfloat16", "-o", out]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "tokens/s per process" in result.output
    recovery = json.loads((out / "edgeprune.json").read_text())["recovery"]
    assert recovery["teacher"] == str(dense) and recovery["config"]["top_k"] == 16
    assert recovery["data"].startswith("self-generated") and recovery["steps"] == 2
    assert recovery["config"]["precision"] == "bfloat16" and recovery["dtype"] == "bfloat16"
    wrong = CliRunner().invoke(main, [str(a) for a in [*args[:-2], "--precision", "fp16", "-o", tmp_path / "y"]])
    assert wrong.exit_code == 1 and "--precision fp16" in wrong.output and "Traceback" not in wrong.output
    missing = CliRunner().invoke(main, ["recover", str(pruned), "-o", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "--teacher" in missing.output


def test_two_process_distillation_replicates_the_teacher_and_reports_tokens_per_second(dense_and_pruned, tmp_path):
    dense, pruned = dense_and_pruned
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(free_port()), "-m", "edgeprune.cli", "recover", str(pruned)]
    cmd += ["--teacher", str(dense), "--method", "full", "--steps", "4", "--seq-len", "32", "--val-size", "8"]
    cmd += ["--eval-every", "2", "--lr", "3e-3", "-o", str(out)]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "EDGEPRUNE_CACHE": str(tmp_path / "cache")},  # not the user's
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("recovered ") == 1  # only the main process reports
    recovery = json.loads((out / "edgeprune.json").read_text())["recovery"]
    assert recovery["processes"] == 2 and len(recovery["tokens_per_s_per_process"]) == 2
    assert all(rate > 0 for rate in recovery["tokens_per_s_per_process"])
    assert recovery["data"].startswith("self-generated") and recovery["val_loss_best"] < recovery["val_loss_before"]
    assert recovery["dtype"] == "float32"  # the default precision

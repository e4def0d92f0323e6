"""The command line: prune and inspect on tiny saved models; every refusal is one line and exit 1."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import family_names, save_tiny
from transformers import GPT2Config, GPT2LMHeadModel

from edgeprune.checkpoint import load_pruned
from edgeprune.cli import main


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert pattern in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("family", family_names())
def test_prune_then_inspect(family, tokenizer, tmp_path):
    source = save_tiny(family, tmp_path / family, tokenizer)
    before = folder_digest(source)
    out = tmp_path / "pruned"
    result = run("prune", source, "--sparsity", "0.3", "--criterion", "magnitude", "-o", out)
    assert result.exit_code == 0, result.output
    assert folder_digest(source) == before  # the input model is never modified
    model, _ = load_pruned(out)
    ids = torch.randint(7, 90, (1, 9))
    assert model(input_ids=ids).logits.isfinite().all()
    info = json.loads(run("inspect", out, "--json").output)
    assert info["prunable_removed"] == pytest.approx(0.3, abs=0.02)
    assert 0 < info["total_removed"] < info["prunable_removed"]
    assert info["params"] < info["params_before"]
    assert len(info["layers"]) == len(model.config.pruned_layer_widths["intermediate_size"])


def test_prune_with_protection_and_random_is_seeded(saved_llama, tmp_path):
    args = ["--sparsity", "0.25", "--criterion", "random", "--protect-first", "1", "--targets", "ffn"]
    assert run("prune", saved_llama, *args, "--seed", "4", "-o", tmp_path / "a").exit_code == 0
    assert run("prune", saved_llama, *args, "--seed", "4", "-o", tmp_path / "b").exit_code == 0
    a, b = (load_pruned(tmp_path / name)[0] for name in "ab")
    assert a.config.pruned_layer_widths["intermediate_size"][0] == 96
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_prune_defaults_keep_the_layers_run_keeps_whole(saved_llama, tmp_path):
    """`prune` and `run` share one default for the protected layers (RunConfig's), not two."""
    from edgeprune.run import RunConfig

    out = tmp_path / "pruned"
    args = ["--sparsity", "0.3", "--criterion", "magnitude", "--targets", "ffn", "--no-compensate"]
    assert run("prune", saved_llama, *args, "-o", out).exit_code == 0
    widths = load_pruned(out)[0].config.pruned_layer_widths["intermediate_size"]
    first, last = RunConfig.protect_first, RunConfig.protect_last
    assert first >= 1 and last >= 1
    assert widths[:first] == [96] * first and widths[len(widths) - last :] == [96] * last
    assert all(w < 96 for w in widths[first : len(widths) - last])


@pytest.mark.parametrize(
    ("option", "owner"),
    [
        ("--allocation", "edgeprune.compensate:CUT_ALLOCATIONS"),
        ("--selection", "edgeprune.compensate:CUT_SELECTIONS"),
        ("--layer-measure", "edgeprune.layers:LAYER_MEASURES"),
    ],
)
def test_prune_choices_are_the_owning_modules_lists(option, owner, saved_llama, tmp_path):
    from importlib import import_module

    module, name = owner.split(":")
    choices = getattr(import_module(module), name)
    result = run("prune", saved_llama, "--sparsity", "0.2", option, "nonsense", "-o", tmp_path / "o")
    assert result.exit_code == 2 and all(choice in result.output for choice in choices), result.output


def test_unknown_architecture_is_refused(tmp_path):
    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(folder)
    result = run("prune", folder, "--sparsity", "0.2", "-o", tmp_path / "out")
    assert_one_line_error(result, "unsupported architecture 'gpt2'")
    assert not (tmp_path / "out").exists()


def test_bad_sparsity_is_refused(saved_llama, tmp_path):
    assert_one_line_error(run("prune", saved_llama, "--sparsity", "1.5", "-o", tmp_path / "o"), "outside [0, 1)")
    result = run("prune", saved_llama, "--sparsity", "0.95", "--targets", "ffn", "-o", tmp_path / "o")
    assert_one_line_error(result, "every FFN neuron")
    assert not (tmp_path / "o").exists()


def test_existing_output_is_refused_and_untouched(saved_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(run("prune", saved_llama, "--sparsity", "0.2", "-o", out), "not written by edgeprune")
    assert (out / "notes.txt").read_text() == "mine"
    pruned = tmp_path / "pruned"
    assert run("prune", saved_llama, "--sparsity", "0.2", "-o", pruned).exit_code == 0
    assert_one_line_error(run("prune", saved_llama, "--sparsity", "0.2", "-o", pruned), "already exists")
    assert run("prune", saved_llama, "--sparsity", "0.2", "-o", pruned, "--overwrite").exit_code == 0


def test_missing_model_folder_is_refused(tmp_path):
    assert_one_line_error(run("prune", tmp_path / "nope", "--sparsity", "0.2", "-o", tmp_path / "o"), "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("inspect", empty), "no config.json")


def test_unknown_criterion_is_refused(saved_llama, tmp_path):
    result = run("prune", saved_llama, "--sparsity", "0.2", "--criterion", "psychic", "-o", tmp_path / "o")
    assert_one_line_error(result, "unknown criterion 'psychic'")


def config_options() -> list[tuple[str, click.Option]]:
    """(command, option) for every option whose default lives in a config dataclass."""
    from edgeprune.cli import ConfigDefault

    return [
        (name, param)
        for name, command in main.commands.items()
        for param in command.params
        if isinstance(param, ConfigDefault)
    ]


@pytest.mark.parametrize("command, option", config_options(), ids=lambda x: getattr(x, "name", x))
def test_config_options_keep_no_default_and_show_the_dataclass_one(command, option):
    ctx = click.Context(main.commands[command])
    assert option.get_default(ctx) is None  # unset options are not passed: the dataclass's default applies
    assert "default: " in option.get_help_record(ctx)[1]  # and the field it names exists


def test_run_and_recover_without_options_are_their_configs_defaults(saved_llama, monkeypatch, tmp_path):
    """What a Python caller of RunConfig() / RecoveryConfig() gets is what the CLI gets."""
    import edgeprune.recover
    import edgeprune.run
    from edgeprune.budget import Budget
    from edgeprune.recover import RecoveryConfig
    from edgeprune.run import RunConfig, default_budgets

    seen = {}

    def capture(name):
        def called(*args, **kwargs):
            seen[name] = args
            raise click.ClickException("captured")

        return called

    monkeypatch.setattr(edgeprune.run, "run_job", capture("run"))
    monkeypatch.setattr(edgeprune.recover, "recover_folder", capture("recover"))
    assert "captured" in run("run", str(saved_llama), "-o", str(tmp_path / "run")).output
    assert seen["run"][0] == RunConfig(budgets=default_budgets(str(saved_llama)), model=str(saved_llama))
    assert seen["run"][0] == RunConfig(model=str(saved_llama))  # a MODEL given: a 1.3x speedup
    assert RunConfig().budgets == [Budget("memory_mb", 120.0)]  # the default model: a file it must be cut to fit
    assert "captured" in run("recover", str(saved_llama), "-o", str(tmp_path / "rec")).output
    assert seen["recover"][3] == RecoveryConfig()

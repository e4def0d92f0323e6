"""Recovery of a cut, re-fit SmolLM2 by distillation vs LoRA, at equal CPU time of the training process.

Budget: `--cpu-minutes` of CPU time of the training process (`time.process_time`, every thread of
the process; `RecoveryConfig.cpu_minutes`) at `--threads 1`. On a machine shared by several
engineers wall time says more about the others' jobs than about the method; CPU time of a
1-thread process is close to load-independent. Each row reports its optimizer steps, training
tokens and tokens per CPU-second beside the budget, so it converts to any machine.

Cuts (each re-fit by least squares after the cut, as `prune` and `run` do by default; the plain
cut is scored too):
- `llmpruner20`: LLM-Pruner's protocol (bench_llmpruner.py): Element¹ Taylor on 10 windows of 128
  tokens of WikiText-2 validation, FFN neurons and query heads of layers 4..27, 20.0% of all
  parameters; re-fit on 32 windows of 128 of validation (seed 0, as bench_compensate.py);
- `llmpruner20-fluctuation`: the same cut size and groups scored by fluctuation on 32 windows of validation
  (the best training-free criterion there, 1.47x dense after the re-fit: RESULTS, issue 13's goals);
  `llmpruner20-fluctuation-256`: re-fit on 256 disjoint windows of validation instead (1.40x there);
  `llmpruner20-stream-256`: the same, the re-fit rebuilding the dense model's residual stream (1.37x);
- `run<NN>`: the default `run` job's kind of cut: `run`'s criterion (fluctuation) on its 32
  calibration windows of the packaged text, FFN neurons of layers 1..28, NN% of them, re-fit on the
  same windows (`probes.pruned_copy`).
Rows `<loss>-<trained>-<data>`, all with `run`'s recovery settings (`run.run_recovery`: seq 128,
8 held-out examples, held-out loss every 5 steps, the best step kept) unless named otherwise:
- `kd-lora-*`: KL to the dense model (T=1, full vocabulary), LoRA r=8, lr `run`'s (1e-3);
- `kd-full-*`: the same, every parameter, lr --full-lr;
- `lm-lora-alpaca`: LLM-Pruner's reference: LoRA, LM loss on Alpaca responses, lr 1e-3, seq 256;
data `self` (text the dense model writes, `recover.selftext` defaults: its CPU cost is measured
once and reported apart), `packaged` (`selftext.packaged_head_text`: the packaged calibration
text minus `run`'s held-out tail) or `alpaca` (Alpaca-cleaned, first 5,000).
Quality: WikiText-2 test PPL@128 on the first --ppl-tokens tokens (non-overlapping windows), and
for `run` cuts also `run`'s held-out tail of the packaged text (what `run` reports).
Resumable: finished rows are read back from --out and skipped; a row's training is checkpointed
every --save-every steps under --work and resumed after a crash. `--thread-scaling STEPS` times
STEPS optimizer steps of `kd-lora-self` at 1 and 2 threads, alternating (meaningful on an idle
machine only: it records the load). `--score DIR` scores a folder `edgeprune recover` wrote from the cut
(e.g. data-parallel under `torchrun --nproc_per_node 2 -m edgeprune.cli recover ...`) with its recovery record,
then prints the table. `--wall` makes the budgets wall minutes (with `--threads 2`: the
issue's "30 minutes on 2 cores"); `--schedule linear --warmup-steps N` decays the learning rate to zero
over the budget (`RecoveryConfig.schedule`), `--lr` sets the LoRA rows' rate; both name the row.

    python benchmarks/bench_distill.py --cut llmpruner20 --cpu-minutes 6 \
        --rows kd-lora-self kd-lora-packaged kd-lora-alpaca lm-lora-alpaca
    python benchmarks/bench_distill.py --cut llmpruner20 --cpu-minutes 30 --rows kd-lora-self lm-lora-alpaca
    python benchmarks/bench_distill.py --cut run06 --cpu-minutes 2 --rows kd-lora-packaged
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import torch
from bench_common import append_result, data_dir, read_results, wikitext_test_tokens
from bench_llmpruner import CALIBRATION, sparsity_for_total
from bench_llmpruner import spec as llmpruner_spec

from edgeprune.calibration import calibration_batch, disjoint_windows, load_text, tokenize_text
from edgeprune.checkpoint import load_pruned, read_provenance, save_pruned
from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.evaluate import perplexity
from edgeprune.loading import hash_weights, load_model
from edgeprune.models import adapter_for
from edgeprune.probes import pruned_copy
from edgeprune.recover import RecoveryConfig, SelfTextConfig, StepReport, load_recovery_data, recover
from edgeprune.recover.config import SCHEDULES
from edgeprune.recover.selftext import SELF_TEXT_FILE, default_data, packaged_head_text
from edgeprune.run import RunConfig, load_or_score, run_calibration, run_recovery
from edgeprune.structure import count_parameters

OUT = Path(__file__).parent / "out"
ALPACA = ("instruct", "alpaca_data_cleaned.first5000.json")
REFIT_SAMPLES = 32  # windows of 128 tokens of wiki.valid for llmpruner20's re-fit (bench_compensate.py)


def cut_folders(cut: str, work: Path) -> tuple[Path, Path]:
    """(plain cut, re-fit cut) folders of a cut name."""
    return work / cut / "plain", work / cut / "refit"


LLMPRUNER_CUTS = {  # cut name: (criterion, re-fit windows: 0 = REFIT_SAMPLES random ones, N = N disjoint ones,
    # what the re-fit rebuilds: each projection's output, or the dense model's residual stream)
    "llmpruner20": ("taylor", 0, "layer"),
    "llmpruner20-fluctuation": ("fluctuation", 0, "layer"),
    "llmpruner20-fluctuation-256": ("fluctuation", 256, "layer"),
    "llmpruner20-stream-256": ("fluctuation", 256, "stream"),
}


def make_llmpruner_cut(cut: str, dense, tokenizer, work: Path) -> dict:
    """LLM-Pruner's 20% cut scored by the cut's criterion, saved plain and re-fit; returns what was done."""
    criterion, windows, target = LLMPRUNER_CUTS[cut]
    adapter = adapter_for(dense.config)
    valid = data_dir() / "wikitext-2-raw" / "wiki.valid.raw"
    calib = calibration_batch(tokenizer, valid, CALIBRATION.get(criterion, 32), 128, seed=0)
    scores = score_groups(criterion, dense, adapter, ScoringInputs(calibration=calib, seed=0))
    spec = llmpruner_spec(sparsity_for_total(dense, adapter, scores, 0.20))
    if windows:  # as bench_compensate.py's re-fit: non-overlapping windows spread over the file
        refit_windows = disjoint_windows(tokenize_text(tokenizer, load_text(valid)), 128, windows)
    else:
        refit_windows = calibration_batch(tokenizer, valid, REFIT_SAMPLES, 128, seed=0)
    return save_cuts(dense, tokenizer, adapter, scores, spec, refit_windows, cut_folders(cut, work), target)


def make_run_cut(cut: str, dense, tokenizer, work: Path) -> dict:
    """`run`'s kind of cut at NN% of the FFN neurons of layers 1..28, saved plain and re-fit."""
    cfg = RunConfig()
    adapter = adapter_for(dense.config)
    calib = run_calibration(tokenizer, cfg)
    scores = load_or_score(work / "run_scores.safetensors", dense, adapter, cfg, calib, "bench")
    spec = cfg.spec(int(cut.removeprefix("run")) / 100)
    return save_cuts(dense, tokenizer, adapter, scores, spec, calib.windows, cut_folders(cut, work))


def save_cuts(dense, tokenizer, adapter, scores, spec, windows, folders: tuple[Path, Path], target="auto") -> dict:
    """Cut a copy of `dense` plain and another re-fit on `windows` (to `target`); save both."""
    info = {"sparsity": spec.sparsity, "targets": list(spec.targets), "refit_target": target}
    info["protect"] = [spec.protect_first, spec.protect_last]
    for folder, calibration in zip(folders, (None, windows), strict=True):
        started = time.process_time()
        model, _ = pruned_copy(dense, adapter, scores, spec, calibration, target)
        cpu = time.process_time() - started
        info |= {"params": count_parameters(model), f"{folder.name}_cpu_seconds": round(cpu, 1)}
        save_pruned(model, tokenizer, folder, {"benchmark": "bench_distill.py", **info}, overwrite=True)
    return info


def row_config(row: str, minutes: float, args: argparse.Namespace) -> tuple[RecoveryConfig, str, bool]:
    """(training settings, data name, distilled?) of a row name; `minutes` of CPU time, or wall time with --wall."""
    loss, method, data = row.split("-")
    budget = {"minutes": minutes, "cpu_minutes": None} if args.wall else {"minutes": None, "cpu_minutes": minutes}
    base = replace(run_recovery(), **budget, save_every=args.save_every)
    base = replace(base, schedule=args.schedule, warmup_steps=args.warmup_steps, lr=args.lr or base.lr)
    if loss == "lm":
        return replace(base, seq_len=256), data, False
    return replace(base, method=method, lr=args.full_lr if method == "full" else base.lr), data, True


def row_key(row: str, minutes: float, args: argparse.Namespace) -> str:
    """The row's name in --out: cut, row, budget, and the settings that differ from `run`'s."""
    key = f"{args.cut}:{row}@{minutes:g}{'wall' if args.wall else 'cpu'}-min"
    if args.schedule != "constant":
        key += f"+{args.schedule}{args.warmup_steps}"
    if args.lr:
        key += f"+lr{args.lr:g}"
    return key + (f"+{args.threads}threads" if args.threads != 1 else "")


def self_text(tokenizer, teacher, args: argparse.Namespace) -> Path:
    """The text the dense model writes (once into --work); its cost is logged to --out the first time."""
    folder = args.work / "self_text"
    fresh = not (folder / SELF_TEXT_FILE).is_file()
    wall, cpu = time.perf_counter(), time.process_time()
    path = default_data(tokenizer, packaged_head_text(tokenizer), folder, teacher, "dense", SelfTextConfig())
    if fresh:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        written = sum(len(tokenize_text(tokenizer, r["text"][len(r["prompt"]) :])) for r in rows)
        entry = {"selftext": True, "samples": len(rows), "generated_tokens": written}
        entry |= {"cpu_seconds": time.process_time() - cpu, "wall_seconds": time.perf_counter() - wall}
        entry["text_tokens"] = len(tokenize_text(tokenizer, "\n\n".join(r["text"] for r in rows)))
        append_result(args.out, entry)
        print(f"self text: {written} tokens written in {entry['cpu_seconds']:.0f} CPU-s", flush=True)
    return path


def data_path(name: str, tokenizer, teacher, args: argparse.Namespace) -> Path:
    if name == "alpaca":
        return data_dir().joinpath(*ALPACA)
    if name == "self":
        return self_text(tokenizer, teacher, args)
    return default_data(tokenizer, packaged_head_text(tokenizer), args.work / "packaged")


def quality(model, wiki: torch.Tensor, heldout: torch.Tensor | None) -> dict:
    """WikiText-2 PPL@128 (and the run's held-out tail PPL) with the CPU time they took."""
    started = time.process_time()
    out = {"ppl128": perplexity(model, wiki, seq_len=128)}
    if heldout is not None:
        out["heldout_ppl128"] = perplexity(model, heldout, seq_len=128)
    return out | {"eval_cpu_seconds": round(time.process_time() - started, 1)}


def run_row(row: str, key: str, cpu_minutes: float, args, dense, tokenizer, wiki, heldout) -> dict:
    config, data_name, distilled = row_config(row, cpu_minutes, args)
    cut = cut_folders(args.cut, args.work)[1]
    student, _ = load_pruned(cut)
    data = load_recovery_data(data_path(data_name, tokenizer, dense, args), tokenizer, student, config)
    # a checkpoint resumes only onto the very cut it was trained on (a re-made cut gets a fresh folder)
    work = args.work / "train" / f"{key.replace(':', '_').replace('@', '_')}_{hash_weights(cut)[:12]}"
    resume = (work / "checkpoint" / "state.json").is_file()

    def on_step(report: StepReport) -> None:
        note = f" val {report.val_loss:.4f}" if report.val_loss is not None else ""
        print(f"  {key} step {report.step} loss {report.train_loss:.4f}{note}", flush=True)

    teacher = dense if distilled else None
    result = recover(
        student, tokenizer, data, config, work, resume, on_step=on_step, teacher=teacher, teacher_id="dense"
    )
    record = result.record
    entry = {"row": key, "cut": args.cut, "cpu_minutes_budget": cpu_minutes, "recovery": record.as_dict()}
    entry |= {"wall_budget": args.wall, "threads": args.threads}
    entry |= quality(result.model, wiki, heldout)
    print(
        f"{key}: PPL@128 {entry['ppl128']:.2f} after {record.steps} steps, {record.tokens} tokens, "
        f"{record.cpu_seconds:.0f} CPU-s ({record.seconds:.0f} wall s)",
        flush=True,
    )
    return entry


def score_folder(folder: Path, args, wiki: torch.Tensor) -> dict:
    """A model `edgeprune recover` wrote from the cut (e.g. under `torchrun`): its quality and recovery record."""
    record = read_provenance(folder)["recovery"]
    config = record["config"]
    budget = config["minutes"] or config["cpu_minutes"] or 0  # 0: a step budget
    entry = {"row": f"{args.cut}:{folder.name}", "cut": args.cut, "cpu_minutes_budget": budget, "recovery": record}
    entry |= {"wall_budget": config["minutes"] is not None, "processes": record["processes"], "cli": True}
    return entry | quality(load_pruned(folder)[0], wiki, None)


def thread_scaling(steps: int, args, dense, tokenizer) -> None:
    """Wall and CPU time of `steps` kd-lora-self steps at 1 and 2 threads, alternating twice."""
    config = replace(run_recovery(), minutes=None, steps=steps, eval_every=10**6)
    path = self_text(tokenizer, dense, args)
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        student, _ = load_pruned(cut_folders(args.cut, args.work)[1])
        data = load_recovery_data(path, tokenizer, student, config)
        load_before = os.getloadavg()[0]
        record = recover(student, tokenizer, data, config, teacher=dense, teacher_id="dense").record
        entry = {"thread_scaling": True, "threads": threads, "steps": record.steps, "tokens": record.tokens}
        entry |= {"wall_seconds": record.seconds, "cpu_seconds": record.cpu_seconds, "load_before": load_before}
        append_result(args.out, entry)
        print(
            f"{threads} threads: {record.tokens / record.seconds:.0f} tokens per wall s, "
            f"{record.tokens / record.cpu_seconds:.0f} per CPU-s (load before {load_before:.1f})",
            flush=True,
        )
    torch.set_num_threads(args.threads)


def reference(args, dense, tokenizer, wiki, heldout) -> dict:
    """The cut's plain and re-fit quality (made and scored once), beside the dense model's."""
    entries = read_results(args.out)
    found = next((e for e in entries if e.get("reference") == args.cut), None)
    if found is not None:
        return found
    if args.cut in LLMPRUNER_CUTS:
        info = make_llmpruner_cut(args.cut, dense, tokenizer, args.work)
    else:
        info = make_run_cut(args.cut, dense, tokenizer, args.work)
    entry = {"reference": args.cut, **info, "dense": quality(dense, wiki, heldout)}
    for folder in cut_folders(args.cut, args.work):
        entry[folder.name] = quality(load_pruned(folder)[0], wiki, heldout)
    append_result(args.out, entry)
    return entry


def print_table(entries: list[dict], cut: str) -> None:
    ref = next(e for e in entries if e.get("reference") == cut)
    dense = ref["dense"]["ppl128"]
    print(f"| {cut} row | CPU-min budget | steps | tokens | tokens/CPU-s | val loss | PPL@128 | of dense |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("dense", "plain", "refit"):
        print(f"| {name} | | | | | | {ref[name]['ppl128']:.2f} | {ref[name]['ppl128'] / dense:.2f}x |")
    for e in entries:
        if e.get("cut") != cut:
            continue
        r = e["recovery"]
        print(
            f"| {e['row']} | {e['cpu_minutes_budget']:g} | {r['steps']} | {r['tokens']} | "
            f"{r['tokens'] / r['cpu_seconds']:.0f} | {r['val_loss_before']:.3f} -> {r['val_loss_best']:.3f} | "
            f"{e['ppl128']:.2f} | {e['ppl128'] / dense:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cut", default="llmpruner20", help="llmpruner20[-fluctuation[-256]] or runNN (NN%% of FFN neurons, 1..28)"
    )
    parser.add_argument("--rows", nargs="*", default=["kd-lora-self", "lm-lora-alpaca"])
    parser.add_argument("--cpu-minutes", type=float, nargs="+", default=[6.0], help="one row per budget")
    parser.add_argument("--wall", action="store_true", help="budgets are wall minutes, not CPU minutes")
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--lr", type=float, help="LoRA rows' learning rate (default: run's)")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=25, help="steps between resumable checkpoints")
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--thread-scaling", type=int, metavar="STEPS", help="time 1 vs 2 threads instead")
    parser.add_argument("--score", type=Path, metavar="DIR", help="score a folder `edgeprune recover` made instead")
    parser.add_argument("--work", type=Path, default=OUT / "distill")
    parser.add_argument("--out", type=Path, default=OUT / "bench_distill.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    dense, tokenizer = loaded.model, loaded.tokenizer
    wiki = wikitext_test_tokens(tokenizer, args.ppl_tokens)
    heldout = None if args.cut in LLMPRUNER_CUTS else run_calibration(tokenizer, RunConfig()).heldout
    reference(args, dense, tokenizer, wiki, heldout)
    if args.thread_scaling:
        return thread_scaling(args.thread_scaling, args, dense, tokenizer)
    if args.score:
        append_result(args.out, score_folder(args.score, args, wiki))
        return print_table(read_results(args.out), args.cut)
    for cpu_minutes in args.cpu_minutes:
        for row in args.rows:
            key = row_key(row, cpu_minutes, args)
            if any(e.get("row") == key for e in read_results(args.out)):
                continue
            append_result(args.out, run_row(row, key, cpu_minutes, args, dense, tokenizer, wiki, heldout))
    print_table(read_results(args.out), args.cut)


if __name__ == "__main__":
    main()

"""Seed 001's protocol (LLM-Pruner) on the default decoder: 20% of parameters, Taylor vs MI, LoRA.

Protocol, scaled from LLM-Pruner's LLaMA-7B setting to SmolLM2-135M-Instruct (30 layers):
- cut: FFN neurons and query heads of layers 4..27 (LLM-Pruner prunes 4..29 of 32: the first 4
  and the last 2 layers are kept whole), uniform per layer, the sparsity solved so that 20% of
  *all* parameters (embeddings included) are removed;
- criteria: `taylor` Element¹ (first order, element-wise, summed per group) on 10 windows of 128
  tokens, LLM-Pruner's calibration size; `mi` (the default options) on 32 windows of 128; both
  from WikiText-2 *validation* (the evaluation uses the test split);
- recovery: LoRA (r=8, alpha=16, all linear projections) on Alpaca-cleaned (first 5,000 rows)
  for a fixed number of steps, merged;
- quality: WikiText-2 test perplexity at 128 tokens (non-overlapping windows, first
  --ppl-tokens tokens) and five zero-shot tasks (lm-eval prompts, a seeded random --limit items
  per task, the same items for every model); per-item hits are stored so differences can be
  tested pairwise.

Resumable: every result is appended to --out as soon as it exists and skipped on a rerun; cut and
recovered models are saved under --work and reloaded.

    /work/venv/bin/python benchmarks/bench_llmpruner.py --threads 1
    /work/venv/bin/python benchmarks/bench_llmpruner.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from bench_common import append_result, data_dir, read_results, wikitext_test_tokens

from edgeprune.calibration import calibration_batch
from edgeprune.checkpoint import is_pruned_folder, load_pruned, save_pruned
from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.evaluate import perplexity
from edgeprune.evaluate.data import subsample
from edgeprune.evaluate.multiple_choice import item_hits, load_mc_task, mc_metrics, score_items
from edgeprune.loading import load_model
from edgeprune.models import adapter_for
from edgeprune.recover import RecoveryConfig, StepReport, load_recovery_data, recover
from edgeprune.run import RunConfig, parameters_at
from edgeprune.structure import TARGETS, PruneSpec, count_parameters, prune_model

OUT = Path(__file__).parent / "out"
TASKS = ("boolq", "piqa", "winogrande", "arc_easy", "arc_challenge")
# lm-eval's usual headline metric per task (LLM-Pruner reports lm-eval numbers).
HEADLINE = {
    "boolq": "acc",
    "piqa": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
}
PROTECT_FIRST, PROTECT_LAST = 4, 2
CALIBRATION = {"taylor": 10, "mi": 32}
TARGET_REMOVED = 0.20
# LLM-Pruner (Ma et al., 2023), LLaMA-7B, 20% parameters, mean of 7 zero-shot tasks (from the issue).
LLM_PRUNER_7B = {"dense": 63.25, "taylor (Element¹)": 56.69, "+LoRA (Vector)": 59.23, "+LoRA (Element²)": 60.07}


def done(path: Path, model: str, task: str) -> bool:
    return any(e["model"] == model and e["task"] == task for e in read_results(path))


def sparsity_for_total(model, adapter, scores, target: float) -> float:
    """The uniform sparsity of layers 4..27 that removes `target` of all parameters (bisection on the plan)."""
    total = count_parameters(model)
    cfg = RunConfig(budgets=[], targets=TARGETS, protect_first=PROTECT_FIRST, protect_last=PROTECT_LAST)
    params_at = parameters_at(model, adapter, scores, cfg)
    lo, hi = 0.0, 0.9  # 0.9 itself is infeasible (no FFN left): bisect without evaluating the ends
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total - params_at(mid) < target * total else (lo, mid)
    return hi


def spec(sparsity: float) -> PruneSpec:
    return PruneSpec(sparsity, protect_first=PROTECT_FIRST, protect_last=PROTECT_LAST)


def cut(criterion: str, args: argparse.Namespace, folder: Path) -> None:
    """Score the dense model, cut 20% of its parameters, save it to `folder`."""
    loaded = load_model(None)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter_for(model.config)
    calib = calibration_batch(tokenizer, data_dir() / "wikitext-2-raw" / "wiki.valid.raw", CALIBRATION[criterion], 128)
    start = time.perf_counter()
    scores = score_groups(criterion, model, adapter, ScoringInputs(calibration=calib, seed=0))
    scored = time.perf_counter() - start
    sparsity = sparsity_for_total(model, adapter, scores, TARGET_REMOVED)
    summary = prune_model(model, adapter, scores, spec(sparsity))
    print(f"{criterion}: sparsity {sparsity:.4f} of layers 4..27 removes {summary.total_removed:.2%} of all parameters")
    provenance = {
        "benchmark": "bench_llmpruner.py",
        "criterion": criterion,
        "calibration": f"{CALIBRATION[criterion]}x128 wiki.valid.raw seed 0",
        "score_seconds": scored,
        "sparsity": sparsity,
        "protect": [PROTECT_FIRST, PROTECT_LAST],
        "params_before": summary.params_before,
        "params_after": summary.params_after,
        "total_removed": summary.total_removed,
    }
    save_pruned(model, tokenizer, folder, provenance)


def lora(source: Path, args: argparse.Namespace, folder: Path) -> None:
    """LoRA-recover the cut model in `source` for --lora-steps and save the merged model to `folder`."""
    model, tokenizer = load_pruned(source)
    config = RecoveryConfig(steps=args.lora_steps, lr=args.lora_lr, seq_len=args.lora_seq_len, seed=0)
    data = load_recovery_data(data_dir() / "instruct" / "alpaca_data_cleaned.first5000.json", tokenizer, model, config)

    def on_step(report: StepReport) -> None:
        if report.val_loss is not None or report.step % 10 == 0:
            note = f" val {report.val_loss:.4f}" if report.val_loss is not None else ""
            print(f"  step {report.step}/{report.total} loss {report.train_loss:.3f}{note}", flush=True)

    work = folder.with_name(folder.name + ".work")
    start = time.perf_counter()
    resume = (work / "checkpoint" / "state.json").is_file()
    result = recover(model, tokenizer, data, config, work_dir=work, resume=resume, on_step=on_step)
    provenance = json.loads((source / "edgeprune.json").read_text())
    provenance |= {"recovery": result.record.as_dict(), "recovery_wall_seconds": time.perf_counter() - start}
    save_pruned(result.model, tokenizer, folder, provenance)


def model_for(name: str, args: argparse.Namespace):
    """(model, tokenizer, params) for 'dense', 'taylor', 'mi', 'taylor+lora', 'mi+lora', making what is missing."""
    if name == "dense":
        loaded = load_model(None)
        return loaded.model, loaded.tokenizer
    criterion, _, recovered = name.partition("+")
    cut_folder = args.work / f"{criterion}-20"
    if not is_pruned_folder(cut_folder):
        cut(criterion, args, cut_folder)
    folder = cut_folder
    if recovered:
        folder = args.work / f"{criterion}-20-lora{args.lora_steps}"
        if not is_pruned_folder(folder):
            lora(cut_folder, args, folder)
    return load_pruned(folder)


def evaluate(name: str, args: argparse.Namespace) -> None:
    """PPL@128 and the five zero-shot tasks of one model, each appended to --out unless already there."""
    if all(done(args.out, name, t) for t in ("wikitext2", *TASKS)):
        return
    model, tokenizer = model_for(name, args)
    model.eval()
    params = count_parameters(model)
    if not done(args.out, name, "wikitext2"):
        tokens = wikitext_test_tokens(tokenizer, args.ppl_tokens)
        start = time.perf_counter()
        ppl = perplexity(model, tokens, seq_len=128)
        entry = {"model": name, "task": "wikitext2", "params": params, "metrics": {"ppl128": ppl}, "n": len(tokens)}
        append_result(args.out, {**entry, "seconds": time.perf_counter() - start})
        print(f"{name} wikitext2 PPL@128 {ppl:.2f} ({len(tokens)} tokens)", flush=True)
    for task in TASKS:
        if done(args.out, name, task):
            continue
        items = load_mc_task(task, data_dir())
        picked = subsample(len(items), args.limit, seed=0)
        chosen = [items[i] for i in picked]
        start = time.perf_counter()
        lls = score_items(model, tokenizer, chosen, max_length=2048)
        metrics = mc_metrics(lls, chosen)
        hits, normed = item_hits(lls, chosen)
        entry = {
            "model": name,
            "task": task,
            "params": params,
            "metrics": metrics,
            "n": len(chosen),
            "of": len(items),
            "hits": "".join("01"[h] for h in hits),
            "hits_norm": "".join("01"[h] for h in normed),
        }
        append_result(args.out, {**entry, "seconds": time.perf_counter() - start})
        print(
            f"{name} {task}: acc {metrics['acc']:.3f} acc_norm {metrics['acc_norm']:.3f} (n={len(chosen)})", flush=True
        )


def headline(entries: list[dict], name: str, task: str) -> float | None:
    found = [e for e in entries if e["model"] == name and e["task"] == task]
    return found[-1]["metrics"][HEADLINE[task]] if found else None


def chance_level(task: str, n: int) -> float:
    """Expected accuracy of guessing on the task's evaluated items: mean of 1 / number of options."""
    items = load_mc_task(task, data_dir())
    picked = subsample(len(items), n, seed=0)
    return sum(1 / len(items[i].choices) for i in picked) / len(picked)


def table(entries: list[dict], names: list[str]) -> list[dict]:
    """One row per model: params, PPL, headline accuracy per task, mean, and two shares of the dense model kept.

    `retained`: mean accuracy over the five tasks / the dense mean (the issue's and LLM-Pruner's figure).
    `above_chance`: accuracy above guessing kept, summed over the tasks where the dense model is more
    than two standard errors above guessing (near-chance tasks carry no signal to keep or lose).
    """
    rows = []
    for name in names:
        ppl = [e for e in entries if e["model"] == name and e["task"] == "wikitext2"]
        accs = {t: headline(entries, name, t) for t in TASKS}
        complete = all(v is not None for v in accs.values())
        rows.append(
            {
                "model": name,
                "params": ppl[-1]["params"] if ppl else None,
                "ppl128": ppl[-1]["metrics"]["ppl128"] if ppl else None,
                **accs,
                "mean": sum(accs.values()) / len(accs) if complete else None,
            }
        )
    dense = rows[0]
    n = {t: next(e["n"] for e in entries if e["model"] == "dense" and e["task"] == t) for t in TASKS}
    chance = {t: chance_level(t, n[t]) for t in TASKS}
    informative = [t for t in TASKS if dense[t] - chance[t] > 2 * math.sqrt(dense[t] * (1 - dense[t]) / (n[t] - 1))]
    headroom = sum(dense[t] - chance[t] for t in informative)
    for row in rows:
        complete = row["mean"] is not None
        row["retained"] = row["mean"] / dense["mean"] if complete else None
        row["above_chance"] = sum(row[t] - chance[t] for t in informative) / headroom if complete else None
    print("chance: " + ", ".join(f"{t} {chance[t]:.3f}" for t in TASKS) + f"; above chance in dense: {informative}")
    return rows


def paired_difference(entries: list[dict], a: str, b: str) -> tuple[float, float, int] | None:
    """Mean headline-hit difference a - b over all items of the five tasks, its standard error, n items."""
    diffs = []
    for task in TASKS:
        key = "hits" if HEADLINE[task] == "acc" else "hits_norm"
        ea = [e for e in entries if e["model"] == a and e["task"] == task]
        eb = [e for e in entries if e["model"] == b and e["task"] == task]
        if not ea or not eb:
            return None
        diffs += [int(x) - int(y) for x, y in zip(ea[-1][key], eb[-1][key], strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(var / n), n


def print_table(rows: list[dict]) -> None:
    def fmt(v, spec: str) -> str:
        return "–" if v is None else format(v, spec)

    print("| model | params | PPL@128 | " + " | ".join(TASKS) + " | mean | of dense | above chance kept |")
    print("|---" * (len(TASKS) + 6) + "|")
    for r in rows:
        cells = [r["model"], fmt(r["params"], ","), fmt(r["ppl128"], ".2f")]
        cells += [fmt(r[t], ".3f") for t in TASKS] + [fmt(r["mean"], ".3f"), fmt(r["retained"], ".1%")]
        cells += [fmt(r["above_chance"], ".1%")]
        print("| " + " | ".join(cells) + " |")


def plot(rows: list[dict], path: Path) -> None:
    """Fraction of dense zero-shot accuracy retained, ours beside LLM-Pruner's LLaMA-7B, and PPL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.6, 1]})
    ours = [r for r in rows[1:] if r["retained"] is not None]
    theirs = [(k, v / LLM_PRUNER_7B["dense"]) for k, v in LLM_PRUNER_7B.items() if k != "dense"]
    width = 0.4
    x = list(range(len(ours)))
    for offset, key, label, alpha in (
        (-width / 2, "retained", "mean of 5 tasks", 1.0),
        (width / 2, "above_chance", "above-chance accuracy", 0.55),
    ):
        colors = ["#2b7bba" if "taylor" in r["model"] else "#e07b39" for r in ours]
        bars = left.bar(
            [i + offset for i in x],
            [100 * r[key] for r in ours],
            width,
            color=colors,
            alpha=alpha,
            label=label,
            edgecolor="black",
            linewidth=0.4,
        )
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    x_theirs = [len(ours) + i for i in range(len(theirs))]
    bars = left.bar(x_theirs, [100 * v for _, v in theirs], width, color="#999999", label="LLM-Pruner, LLaMA-7B")
    left.bar_label(bars, fmt="%.1f", fontsize=7)
    left.axhline(100, color="black", lw=0.8)
    labels = [r["model"] for r in ours] + [f"7B {k}" for k, _ in theirs]
    left.set_xticks(x + x_theirs, labels, fontsize=7, rotation=20)
    left.set_ylabel("% of the dense model kept")
    left.legend(fontsize=7, loc="lower left")
    title = "20% of parameters removed: zero-shot accuracy kept\n(SmolLM2-135M: 5 tasks; LLM-Pruner LLaMA-7B: 7 tasks)"
    left.set_title(title, fontsize=9)
    ppl = [r for r in rows if r["ppl128"] is not None]
    bars = right.bar(
        range(len(ppl)),
        [r["ppl128"] for r in ppl],
        color=["#555555"] + ["#2b7bba" if "taylor" in r["model"] else "#e07b39" for r in ppl[1:]],
    )
    right.bar_label(bars, fmt="%.1f", fontsize=8)
    right.set_xticks(range(len(ppl)), [r["model"] for r in ppl], fontsize=7)
    right.set_ylabel("WikiText-2 test perplexity @128 (lower is better)")
    right.set_title("Perplexity", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=130)
    tmp.replace(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["dense", "taylor", "mi", "taylor+lora", "mi+lora"])
    parser.add_argument("--limit", type=int, default=300, help="items per zero-shot task (seeded, same for all)")
    parser.add_argument("--ppl-tokens", type=int, default=32768, help="WikiText-2 test tokens for PPL@128")
    parser.add_argument("--lora-steps", type=int, default=100)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=OUT / "llmpruner")
    parser.add_argument("--out", type=Path, default=OUT / "bench_llmpruner.json")
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "llmpruner.png")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.plot_only:
        for name in args.models:
            evaluate(name, args)
    order = ["dense", "taylor", "mi", "taylor+lora", "mi+lora"]
    entries = read_results(args.out)
    rows = table(entries, [m for m in order if any(e["model"] == m for e in entries)])
    if rows and rows[0]["model"] == "dense":
        print_table(rows)
        for a, b in (("mi", "taylor"), ("mi+lora", "taylor+lora"), ("taylor+lora", "taylor"), ("mi+lora", "mi")):
            diff = paired_difference(entries, a, b)
            if diff:
                print(f"paired {a} - {b}: {diff[0]:+.4f} ± {diff[1]:.4f} over {diff[2]} items")
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

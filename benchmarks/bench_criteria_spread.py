"""Seed 000's claim: does the criterion matter more for a small encoder than for a larger decoder?

Encoder: all-MiniLM-L6-v2 (22.7M parameters) with a classification head, every weight fine-tuned
on SST-2 (a seeded random 20,000 of train's 67,349 sentences, 300 steps of 32, lr 1e-4, as in
bench_eval.py), then FFN neurons of all 6 layers removed at 10..50% (uniform per layer, no
recovery) and SST-2 dev accuracy measured on all 872 sentences.
Decoder: SmolLM2-135M-Instruct, FFN neurons of layers 3..26 removed at the same ratios; WikiText-2
test PPL@128 (first --ppl-tokens tokens) and zero-shot SST-2 dev accuracy (lm-eval's `sst2`
prompt, "<sentence>\\nQuestion: Is this sentence positive or negative?\\nAnswer:", choices
" negative"/" positive"; all 872 sentences) so both models are judged on one task and metric.

Criteria: `mi` (label-free), `fluctuation` (label-free), `magnitude` and `random` (data-free;
random with --random-seeds seeds) and `taylor`. Calibration: encoder, the label-free criteria read
32 windows of 128 tokens of SST-2 *train* sentences (labels unused), `taylor` the task loss on
64 labelled SST-2 train sentences (supervised: the comparison seed 000 makes); decoder, 32 windows
(10 for taylor, LLM-Pruner's size) of 128 tokens from WikiText-2 validation, causal-LM loss.

Resumable: results are appended to --out as they are measured, and skipped on a rerun.

    /work/venv/bin/python benchmarks/bench_criteria_spread.py --models encoder decoder --threads 1
    /work/venv/bin/python benchmarks/bench_criteria_spread.py --plot-only
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from bench_common import append_result, data_dir, read_results, wikitext_test_tokens

from edgeprune.calibration import calibration_batch, labelled_batch, load_text, sample_windows, tokenize_text
from edgeprune.checkpoint import is_pruned_folder, load_pruned, save_pruned
from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.evaluate import evaluate_glue, finetune_head, perplexity
from edgeprune.evaluate.glue import read_glue
from edgeprune.evaluate.multiple_choice import MCItem, mc_metrics, score_items
from edgeprune.loading import DEFAULT_ENCODER, load_model
from edgeprune.models import adapter_for
from edgeprune.structure import PruneSpec, count_parameters, prune_model

OUT = Path(__file__).parent / "out"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
CRITERIA = ("mi", "fluctuation", "taylor", "magnitude", "random")
PROTECT = {"encoder": 0, "decoder": 3}
SST2_PROMPT = "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"
COLORS = {"mi": "#e07b39", "fluctuation": "#8c564b", "taylor": "#2b7bba", "magnitude": "#7f7f7f", "random": "#bbbbbb"}


def report(path: Path, entry: dict) -> None:
    """Append one result to the log and print it."""
    entry = append_result(path, entry)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in entry["metrics"].items() if not k.endswith("_stderr"))
    print(f"{entry['model']} {entry['criterion']}{entry.get('seed', '')} {entry['ratio']:.0%}: {metrics}", flush=True)


def key(entry: dict) -> tuple:
    return entry["model"], entry["criterion"], entry.get("seed", 0), entry["ratio"]


def sst2_classifier(args: argparse.Namespace):
    """The fine-tuned MiniLM SST-2 classifier, trained once and saved under --work."""
    folder = args.work / "minilm-sst2"
    if not is_pruned_folder(folder):
        loaded = load_model(DEFAULT_ENCODER)
        start = time.perf_counter()
        classifier, head = finetune_head(
            loaded.model, loaded.tokenizer, "sst2", data_dir(), steps=300, max_train=20000, lr=1e-4, seed=0
        )
        head["seconds"] = time.perf_counter() - start
        save_pruned(classifier, loaded.tokenizer, folder, {"benchmark": "bench_criteria_spread.py", "head": head})
    return load_pruned(folder)


def encoder_inputs(criterion: str, tokenizer, seed: int) -> ScoringInputs:
    if criterion == "taylor":
        ids, token_inputs, labels = labelled_batch(tokenizer, "sst2", data_dir(), n_samples=64, max_length=128)
        return ScoringInputs(calibration=ids, labels=labels, token_inputs=token_inputs, seed=seed)
    if criterion in ("mi", "fluctuation"):
        tokens = tokenize_text(tokenizer, load_text("sst2", data_dir()))
        return ScoringInputs(calibration=sample_windows(tokens, 32, 128, seed=0), seed=seed)
    return ScoringInputs(seed=seed)


def decoder_inputs(criterion: str, tokenizer, seed: int) -> ScoringInputs:
    if criterion in ("mi", "fluctuation", "taylor"):
        n = 10 if criterion == "taylor" else 32
        calib = calibration_batch(tokenizer, data_dir() / "wikitext-2-raw" / "wiki.valid.raw", n, 128, seed=0)
        return ScoringInputs(calibration=calib, seed=seed)
    return ScoringInputs(seed=seed)


def sst2_zero_shot(model, tokenizer) -> dict:
    """lm-eval's zero-shot `sst2` on all of dev: acc of " negative" vs " positive" by log-likelihood."""
    examples = read_glue("sst2", data_dir(), "dev.tsv")
    items = [
        MCItem((SST2_PROMPT.format(sentence=e.text_a.strip()),) * 2, ("negative", "positive"), int(e.label))
        for e in examples
    ]
    metrics = mc_metrics(score_items(model, tokenizer, items, max_length=2048), items)
    return {"sst2_acc": metrics["acc"], "sst2_acc_stderr": metrics["acc_stderr"]}


def measure(kind: str, model, tokenizer, eval_tokens: torch.Tensor | None) -> dict:
    if kind == "encoder":
        result = evaluate_glue(model, tokenizer, "sst2", data_dir())
        acc = result["metrics"]["acc"]
        return {"sst2_acc": acc, "sst2_acc_stderr": math.sqrt(acc * (1 - acc) / (result["n"] - 1))}
    return {"ppl128": perplexity(model, eval_tokens, seq_len=128), **sst2_zero_shot(model, tokenizer)}


def run_model(kind: str, args: argparse.Namespace) -> None:
    """Every (criterion, seed, ratio) cut of one model, skipping what --out already holds."""
    have = {key(e) for e in read_results(args.out)}
    if kind == "encoder":
        model, tokenizer = sst2_classifier(args)
    else:
        loaded = load_model(None)
        model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    eval_tokens = None
    if kind == "decoder":
        eval_tokens = wikitext_test_tokens(tokenizer, args.ppl_tokens)
    adapter = adapter_for(model.config)
    params = count_parameters(model)
    if (kind, "dense", 0, 0.0) not in have:
        start = time.perf_counter()
        metrics = measure(kind, model, tokenizer, eval_tokens)
        entry = {"model": kind, "criterion": "dense", "ratio": 0.0, "params": params, "metrics": metrics}
        report(args.out, {**entry, "seconds": time.perf_counter() - start})
    for criterion in args.criteria:
        seeds = range(args.random_seeds) if criterion == "random" else [0]
        for seed in seeds:
            todo = [r for r in RATIOS if (kind, criterion, seed, r) not in have]
            if not todo:
                continue
            make_inputs = encoder_inputs if kind == "encoder" else decoder_inputs
            start = time.perf_counter()
            scores = score_groups(criterion, model, adapter, make_inputs(criterion, tokenizer, seed))
            score_seconds = time.perf_counter() - start
            for ratio in todo:
                pruned = copy.deepcopy(model)
                spec = PruneSpec(ratio, targets=("ffn",), protect_first=PROTECT[kind], protect_last=PROTECT[kind])
                summary = prune_model(pruned, adapter, scores, spec)
                start = time.perf_counter()
                metrics = measure(kind, pruned, tokenizer, eval_tokens)
                entry = {
                    "model": kind,
                    "criterion": criterion,
                    "seed": seed,
                    "ratio": ratio,
                    "params": summary.params_after,
                    "total_removed": summary.total_removed,
                    "score_seconds": score_seconds,
                    "metrics": metrics,
                }
                report(args.out, {**entry, "seconds": time.perf_counter() - start})
                del pruned


def cell(entries: list[dict], kind: str, criterion: str, ratio: float, metric: str) -> tuple[float, float] | None:
    """Mean and spread (max - min over random seeds, else 0) of one metric."""
    values = [
        e["metrics"][metric]
        for e in entries
        if e["model"] == kind and e["criterion"] == criterion and e["ratio"] == ratio and metric in e["metrics"]
    ]
    if not values:
        return None
    return sum(values) / len(values), max(values) - min(values)


def dense_value(entries: list[dict], kind: str, metric: str) -> float | None:
    found = cell(entries, kind, "dense", 0.0, metric)
    return found[0] if found else None


def print_tables(entries: list[dict]) -> None:
    for kind, metric, spec in (
        ("encoder", "sst2_acc", ".3f"),
        ("decoder", "ppl128", ".1f"),
        ("decoder", "sst2_acc", ".3f"),
    ):
        dense = dense_value(entries, kind, metric)
        if dense is None:
            continue
        print(f"\n{kind} {metric} (dense {dense:{spec}})")
        print("| criterion | " + " | ".join(f"{r:.0%}" for r in RATIOS) + " |")
        print("|---" * (len(RATIOS) + 1) + "|")
        for criterion in CRITERIA:
            cells = []
            for r in RATIOS:
                found = cell(entries, kind, criterion, r, metric)
                if found is None:
                    cells.append("–")
                else:
                    cells.append(f"{found[0]:{spec}}" + (f" (±{found[1] / 2:{spec}})" if found[1] else ""))
            print(f"| {criterion} | " + " | ".join(cells) + " |")


def spread(entries: list[dict], kind: str, metric: str, ratio: float, chance: float | None, criteria) -> float | None:
    """Best minus worst of `criteria` (random: its mean over seeds), as a share of the dense model's quality.

    Accuracy: retained points above chance, (acc - chance) / (dense - chance). Perplexity: dense/PPL.
    """
    dense = dense_value(entries, kind, metric)
    values = [cell(entries, kind, c, ratio, metric) for c in criteria]
    if dense is None or any(v is None for v in values):
        return None
    if chance is None:
        retained = [dense / v[0] for v in values]
    else:
        retained = [(v[0] - chance) / (dense - chance) for v in values]
    return max(retained) - min(retained)


def plot(entries: list[dict], path: Path) -> None:
    """Three panels: encoder SST-2 accuracy, decoder zero-shot SST-2 accuracy, decoder perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("encoder", "sst2_acc", "MiniLM-L6 (22.7M), fine-tuned\nSST-2 dev accuracy", False),
        ("decoder", "sst2_acc", "SmolLM2-135M, zero-shot\nSST-2 dev accuracy", False),
        ("decoder", "ppl128", "SmolLM2-135M\nWikiText-2 PPL@128 (log)", True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (kind, metric, title, log) in zip(axes, panels, strict=True):
        dense = dense_value(entries, kind, metric)
        if dense is None:
            ax.set_visible(False)
            continue
        for criterion in CRITERIA:
            points = [(r, cell(entries, kind, criterion, r, metric)) for r in RATIOS]
            points = [(r, c) for r, c in points if c is not None]
            if not points:
                continue
            xs = [0] + [100 * r for r, _ in points]
            ys = [dense] + [c[0] for _, c in points]
            ax.plot(xs, ys, marker="o", ms=4, label=criterion, color=COLORS[criterion])
            if criterion == "random":
                lo = [dense] + [c[0] - c[1] / 2 for _, c in points]
                hi = [dense] + [c[0] + c[1] / 2 for _, c in points]
                ax.fill_between(xs, lo, hi, color=COLORS[criterion], alpha=0.3, lw=0)
        if metric == "sst2_acc":
            ax.axhline(0.5, color="black", lw=0.6, ls=":")
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("FFN neurons removed (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Criterion choice vs model size: same criteria, same FFN ratios, no recovery", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=130)
    tmp.replace(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["encoder", "decoder"])
    parser.add_argument("--criteria", nargs="*", default=list(CRITERIA))
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=OUT / "criteria_spread")
    parser.add_argument("--out", type=Path, default=OUT / "bench_criteria_spread.json")
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "criteria_spread.png")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.plot_only:
        for kind in args.models:
            run_model(kind, args)
    entries = read_results(args.out)
    print_tables(entries)
    print(
        "\nspread (best - worst share of dense quality kept): informed = mi, fluctuation, taylor; all: + the baselines"
    )
    print("| ratio | encoder acc, informed | encoder acc, all | decoder dense/PPL, informed | decoder dense/PPL, all |")
    print("|---|---|---|---|---|")
    for ratio in RATIOS:
        cells = [
            spread(entries, kind, metric, ratio, chance, criteria)
            for kind, metric, chance in (("encoder", "sst2_acc", 0.5), ("decoder", "ppl128", None))
            for criteria in (("mi", "fluctuation", "taylor"), CRITERIA)
        ]
        print(f"| {ratio:.0%} | " + " | ".join(f"{v:.3f}" if v is not None else "–" for v in cells) + " |")
    plot(entries, args.plot)


if __name__ == "__main__":
    main()

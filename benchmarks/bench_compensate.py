"""Cut without breaking: no compensation vs least-squares re-fit vs OBS selection, criteria side by side.

SmolLM2-135M-Instruct, no training. Calibration: windows of 128 tokens from WikiText-2 *validation*
(`wiki.valid.raw`, seed 0): 32 random ones for scoring (10 for taylor, LLM-Pruner's size); for the
re-fit `--calib-samples` non-overlapping ones spread over the whole file (`calibration.disjoint_windows`,
as `prune`). Quality: WikiText-2 *test* PPL@128 on the first `--ppl-tokens` tokens (raw file
tokenized once without BOS, non-overlapping windows). Cuts:
- `llmpruner20`: LLM-Pruner's protocol, FFN neurons and query heads of layers 4..27, uniform, the
  sparsity that removes 20% of *all* parameters;
- `default35`: the default `run` job's kind of cut, FFN neurons of layers 1..28, the sparsity that
  removes 35% of all parameters (the default job's final model: 34.5%); `default35-heads`: the same size
  with query heads of those layers cut too (one per KV group, a third of them), the FFN cut shallower.
Methods: `none` (plain cut), `ls` (the criterion's groups, down_proj/o_proj re-fit layer by layer),
`obs` (groups chosen by their error after the re-fit; no criterion), `alloc` (`obs` after the FFN
neurons of the uniform plan are moved to the layers where the re-fit error is lowest), `alloc-ls` (the
criterion's groups at those moved widths, re-fit: `prune --allocation errors`). The re-fit is
compensate.py's default (the last quarter of the `--calib-samples` windows checks each projection's
damping, the plain cut included); `--damping D` re-fits at D on all windows unchecked instead (the
re-fit before the check: D = 1e-4). Criteria: any registered name, `mi-conditional` (mi with
`selection=conditional`), or `A/B`: FFN neurons ranked by A, query heads by B. Seconds per stage are wall
time (and process CPU time for the cut).
Resumable: every row is appended to --out and skipped on a rerun.

    python benchmarks/bench_compensate.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from bench_common import append_result, criterion_and_options, data_dir, read_results, wikitext_test_tokens

from edgeprune.calibration import calibration_batch, disjoint_windows, load_text, tokenize_text
from edgeprune.compensate import (
    REFIT_TARGETS,
    CompensateOptions,
    allocate_by_errors,
    cut_and_compensate,
    cut_by_obs,
)
from edgeprune.criteria import GroupScores, ScoringInputs, score_groups
from edgeprune.evaluate import perplexity
from edgeprune.loading import load_model
from edgeprune.models import adapter_for
from edgeprune.run import RunConfig, parameters_at
from edgeprune.structure import PruneSpec, count_parameters, cut_model, plan_widths, select_keep

OUT = Path(__file__).parent / "out" / "bench_compensate.json"
CUTS = {  # name: (targets, protect_first, protect_last, fraction of all parameters removed)
    "llmpruner20": (("ffn", "heads"), 4, 2, 0.20),
    "default35": (("ffn",), 1, 1, 0.35),
    "default35-heads": (("ffn", "heads"), 1, 1, 0.35),
}
SCORE_SAMPLES = {"taylor": 10}


def cut_spec(name: str, model, adapter, scores) -> PruneSpec:
    """The uniform spec of cut `name`, its sparsity solved by bisection on the exact parameter count."""
    targets, first, last, removed = CUTS[name]
    cfg = RunConfig(budgets=[], targets=targets, protect_first=first, protect_last=last)
    params_at, total = parameters_at(model, adapter, scores, cfg), count_parameters(model)
    lo, hi = 0.0, 0.85
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total - params_at(mid) < removed * total else (lo, mid)
    return cfg.spec(hi)


def criterion_scores(criterion: str, model, adapter, tokenizer, valid: Path) -> GroupScores:
    """One criterion's scores from its calibration windows of `valid`."""
    calib = calibration_batch(tokenizer, valid, SCORE_SAMPLES.get(criterion, 32), 128, seed=0)
    name, criterion_options = criterion_and_options(criterion)
    return score_groups(name, model, adapter, ScoringInputs(calibration=calib, seed=0, options=criterion_options))


def split_scores(criterion: str, model, adapter, tokenizer, valid: Path) -> GroupScores:
    """`A/B`: FFN neurons ranked by criterion A, query heads by B (which half of a criterion makes a gap)."""
    ffn_name, _, heads_name = criterion.partition("/")
    ffn = criterion_scores(ffn_name, model, adapter, tokenizer, valid)
    if not heads_name:
        return ffn
    heads = criterion_scores(heads_name, model, adapter, tokenizer, valid)
    return GroupScores(ffn=ffn.ffn, heads=heads.heads, criterion=criterion)


def done(path: Path, key: dict) -> bool:
    """A row with this key exists (a row without `target` was re-fit to each layer's output, the first target)."""
    wanted = {"target": "layer", **key}
    return any(all({"target": "layer", **e}.get(k) == v for k, v in wanted.items()) for e in read_results(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criteria", default="fluctuation,mi,taylor,random")
    parser.add_argument("--cuts", default=",".join(CUTS))
    parser.add_argument("--methods", default="obs,ls,none")
    parser.add_argument("--calib-samples", type=int, default=64, help="windows of 128 tokens for the re-fit")
    parser.add_argument("--damping", type=float, help="re-fit at this damping on all windows, unchecked")
    parser.add_argument("--target", choices=REFIT_TARGETS, default="layer", help="what each re-fit rebuilds")
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter_for(model.config)
    valid = data_dir() / "wikitext-2-raw" / "wiki.valid.raw"
    test = wikitext_test_tokens(tokenizer, args.ppl_tokens)
    refit_calib = disjoint_windows(tokenize_text(tokenizer, load_text(valid)), 128, args.calib_samples)
    base = {"ppl_tokens": len(test), "calib_samples": args.calib_samples, "damping": args.damping}
    if args.target != "layer":  # rows of the layer target (the first ones) keep their keys
        base["target"] = args.target
    if args.damping is None:
        options = CompensateOptions(target=args.target)
    else:
        options = CompensateOptions((args.damping,), check_fraction=0.0, target=args.target)

    def evaluate(m) -> tuple[float, float]:
        start = time.perf_counter()
        return perplexity(m, test, seq_len=128), time.perf_counter() - start

    if not done(args.out, {"method": "dense", **base}):
        ppl, seconds = evaluate(model)
        append_result(args.out, {"method": "dense", **base, "params": count_parameters(model), "ppl128": ppl})
        print(f"dense PPL@128 {ppl:.2f} ({seconds:.0f} s)", flush=True)

    methods = args.methods.split(",")
    for criterion in args.criteria.split(","):
        scores, score_seconds, score_cpu = None, None, None
        for cut in args.cuts.split(","):
            for method in methods:
                key = {"cut": cut, "method": method, **base}
                if method not in ("obs", "alloc"):
                    key["criterion"] = criterion
                elif method in ("obs", "alloc") and criterion != args.criteria.split(",")[0]:
                    continue  # OBS needs no criterion: measured once per cut
                if done(args.out, key):
                    continue
                if method in ("obs", "alloc"):  # OBS chooses its own groups: only the (uniform) plan is needed
                    scores_for_plan = score_groups("random", model, adapter, ScoringInputs(seed=0))
                    spec = cut_spec(cut, model, adapter, scores_for_plan)
                    plan = plan_widths(model, adapter, scores_for_plan, spec)
                elif scores is None:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    scores = split_scores(criterion, model, adapter, tokenizer, valid)
                    score_seconds, score_cpu = time.perf_counter() - start, time.process_time() - cpu_start
                if method not in ("obs", "alloc"):
                    spec = cut_spec(cut, model, adapter, scores)
                    plan = plan_widths(model, adapter, scores, spec)
                    keep = select_keep(model, adapter, scores, plan)
                pruned = copy.deepcopy(model)
                start, cpu_start = time.perf_counter(), time.process_time()
                choices = []
                if method == "none":
                    cut_model(pruned, adapter, keep)
                elif method in ("ls", "alloc-ls"):  # alloc-ls: the criterion's groups at the error-moved widths
                    if method == "alloc-ls":
                        plan = allocate_by_errors(pruned, adapter, refit_calib, plan, spec.min_keep, options)
                        keep = select_keep(pruned, adapter, scores, plan)
                    choices = cut_and_compensate(pruned, adapter, keep, refit_calib, options).choices
                else:  # obs; alloc: OBS after moving the uniform plan's FFN neurons to where errors are lowest
                    if method == "alloc":
                        plan = allocate_by_errors(pruned, adapter, refit_calib, plan, options=options)
                    choices = cut_by_obs(pruned, adapter, plan, refit_calib, options).choices
                cut_seconds, cut_cpu = time.perf_counter() - start, time.process_time() - cpu_start
                ppl, eval_seconds = evaluate(pruned)
                row = {
                    **key,
                    "criterion": key.get("criterion", method),
                    "ffn_widths": [w.ffn for w in plan],
                    "sparsity": spec.sparsity,
                    "params": count_parameters(pruned),
                    "ppl128": ppl,
                    "score_seconds": None if method in ("obs", "alloc") else score_seconds,
                    "score_cpu_seconds": None if method in ("obs", "alloc") else score_cpu,
                    "choices": [(c.layer, c.kind, c.damping, c.target) for c in choices],
                    "cut_seconds": cut_seconds,
                    "cut_cpu_seconds": cut_cpu,
                    "eval_seconds": eval_seconds,
                }
                append_result(args.out, row)
                print(
                    f"{cut:12s} {row['criterion']:12s} {method:5s} params {row['params']:,} PPL@128 {ppl:8.2f}  "
                    f"cut {cut_seconds:.0f} s, eval {eval_seconds:.0f} s",
                    flush=True,
                )
                del pruned


if __name__ == "__main__":
    main()

"""Does the least-squares re-fit pay? KL(dense || cut) and perplexity on two held-out texts, per re-fit variant.

SmolLM2-135M-Instruct, FFN neurons of layers 1..28 (the default `run` job's kind of cut), uniform;
groups chosen by `--criteria` (scores from `run`'s 32 scoring windows of the packaged text, seed 0;
`obs`: by their error after the re-fit, on the re-fit windows; `obs` and `none` do not go together). Sparsities are
`run`'s (fraction of those layers' prunable parameters). Held-out texts, both paired against the
dense model window by window: `pkg` = the packaged text's held-out tail exactly as `run` measures it
(13 windows of 128), `wiki` = the first `--wiki-tokens` of WikiText-2 *test* (raw file, no BOS).
Methods: `none` (plain cut), `fixed:D` (re-fit at damping D × mean diagonal, all windows fitted:
the re-fit before this benchmark was `fixed:0.0001`), `checked` (compensate.py's default: each
projection keeps the plain cut or the damping of the grid with the smallest error on the last
quarter of the windows, then is re-fit at it on all). Re-fit windows (`--windows`):
`pkg-random-N` (N random windows of the packaged text's head, what `run` passed before),
`pkg-disjoint` (every non-overlapping window of the head, what `run` passes now), `wiki-random-N`
(N random windows of WikiText-2 validation). Resumable: rows are appended to --out.

    python benchmarks/bench_refit.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from pathlib import Path

import torch
from bench_common import (
    HeldOut,
    append_result,
    criterion_and_options,
    data_dir,
    read_results,
    wikitext_test_tokens,
)

from edgeprune.calibration import (
    calibration_batch,
    disjoint_windows,
    heldout_start,
    load_text,
    sample_windows,
    tokenize_text,
)
from edgeprune.compensate import CompensateOptions, cut_and_compensate, cut_by_obs
from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.loading import load_model
from edgeprune.models import adapter_for
from edgeprune.run import RunConfig
from edgeprune.structure import cut_model, plan_uniform_widths, select_keep

OUT = Path(__file__).parent / "out" / "bench_refit.json"


def options_for(method: str, obs_damping: float) -> CompensateOptions | None:
    """None: the plain cut."""
    if method == "none":
        return None
    if method == "checked":
        return CompensateOptions(damping=obs_damping)
    return CompensateOptions(dampings=(float(method.split(":")[1]),), check_fraction=0.0, damping=obs_damping)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.061,0.2,0.35")
    parser.add_argument("--criteria", default="fluctuation", help="registered names, mi-conditional, obs")
    parser.add_argument("--obs-damping", type=float, default=CompensateOptions().damping, help="OBS selection's")
    parser.add_argument("--methods", default="none,fixed:0.0001,checked")
    parser.add_argument("--windows", default="pkg-random-32,pkg-disjoint")
    parser.add_argument("--wiki-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/edgeprune-bench-refit"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter_for(model.config)
    cfg = RunConfig(budgets=[])
    packaged = tokenize_text(tokenizer, load_text(None))
    head, tail = packaged[: heldout_start(len(packaged))], packaged[heldout_start(len(packaged)) :]
    wiki = data_dir() / "wikitext-2-raw"
    test = wikitext_test_tokens(tokenizer, args.wiki_tokens)
    texts = [HeldOut("pkg", tail[: cfg.eval_tokens], model, args.cache), HeldOut("wiki", test, model, args.cache)]
    scoring_windows = sample_windows(head, 32, 128, 0)
    scores = {}
    for name in [c for c in args.criteria.split(",") if c != "obs"]:
        criterion, options = criterion_and_options(name)
        scores[name] = score_groups(criterion, model, adapter, ScoringInputs(scoring_windows, seed=0, options=options))

    def refit_calibration(spec: str) -> torch.Tensor:
        source, kind, *n = spec.split("-")
        if kind == "disjoint":
            return disjoint_windows(head, cfg.calib_seq_len, cfg.refit_samples)
        if source == "pkg":
            return sample_windows(head, int(n[0]), 128, seed=0)
        return calibration_batch(tokenizer, wiki / "wiki.valid.raw", int(n[0]), 128, seed=0)

    done = read_results(args.out)
    if not any(e["method"] == "dense" and e["wiki_tokens"] == len(test) for e in done):
        row = {"method": "dense", "wiki_tokens": len(test), **{t.name: t.measure(model) for t in texts}}
        append_result(args.out, row)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    for sparsity, criterion in itertools.product(sparsities, args.criteria.split(",")):
        plan = plan_uniform_widths(model, adapter, cfg.spec(sparsity))
        keep = None if criterion == "obs" else select_keep(model, adapter, scores[criterion], plan)
        for windows in args.windows.split(","):
            for method in args.methods.split(","):
                key = {"sparsity": sparsity, "criterion": criterion, "method": method}
                key["windows"] = "-" if method == "none" else windows
                if criterion == "obs":
                    key["obs_damping"] = args.obs_damping
                if (criterion, method) == ("obs", "none") or any(
                    all(e.get(k) == v for k, v in key.items()) and e["wiki_tokens"] == len(test) for e in done
                ):
                    continue
                pruned = copy.deepcopy(model)
                start, cpu = time.perf_counter(), time.process_time()
                options, choices = options_for(method, args.obs_damping), []
                if options is None:
                    cut_model(pruned, adapter, keep)
                elif criterion == "obs":
                    choices = cut_by_obs(pruned, adapter, plan, refit_calibration(windows), options).choices
                else:
                    choices = cut_and_compensate(pruned, adapter, keep, refit_calibration(windows), options).choices
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
                row = {**key, "wiki_tokens": len(test), **{t.name: t.measure(pruned) for t in texts}}
                row |= {"cut_seconds": seconds, "cut_cpu_seconds": cpu_seconds, "choices": [c.damping for c in choices]}
                done.append(append_result(args.out, row))
                print(
                    f"s={sparsity:<6} {criterion:12s} {key['windows']:16s} {method:14s} "
                    + " | ".join(f"{t.name} KL {row[t.name]['kl']:.4f} PPL {row[t.name]['ppl']:.2f}" for t in texts)
                    + f" | cut {seconds:.0f} s",
                    flush=True,
                )
                del pruned


if __name__ == "__main__":
    main()

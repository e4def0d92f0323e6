"""Why `prune`'s old defaults (every layer cut, FFN and heads, no compensation) at --sparsity 0.2 broke `mi`.

SmolLM2-135M-Instruct, uniform cut of 20% of each cut layer's prunable parameters (FFN neurons and
query heads), no training. Scores from 32 windows of 128 tokens of WikiText-2 validation (seed 0);
the re-fit uses the same windows. WikiText-2 test PPL@128 on the first --ppl-tokens tokens. Rows
separate the suspects: the first/last layers (protect 0/0 vs 1/1), mi's head scores (mi FFN scores
with fluctuation's head scores), and compensation. Resumable (rows appended to --out).

    python benchmarks/bench_prune_defaults.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from bench_common import append_result, data_dir, read_results, wikitext_test_tokens

from edgeprune.calibration import calibration_batch
from edgeprune.compensate import cut_and_compensate
from edgeprune.criteria import GroupScores, ScoringInputs, score_groups
from edgeprune.evaluate import perplexity
from edgeprune.loading import load_model
from edgeprune.models import adapter_for
from edgeprune.structure import PruneSpec, count_parameters, cut_model, plan_widths, select_keep

OUT = Path(__file__).parent / "out" / "bench_prune_defaults.json"
ROWS = [  # (label, FFN scores, head scores, protect first/last, compensate)
    ("mi, every layer (old prune default)", "mi", "mi", 0, False),
    ("mi, first/last kept", "mi", "mi", 1, False),
    ("mi FFN + fluctuation heads, every layer", "mi", "fluctuation", 0, False),
    ("fluctuation, every layer", "fluctuation", "fluctuation", 0, False),
    ("fluctuation, first/last kept + re-fit (new prune default)", "fluctuation", "fluctuation", 1, True),
    ("mi, first/last kept + re-fit", "mi", "mi", 1, True),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter_for(model.config)
    calib = calibration_batch(tokenizer, data_dir() / "wikitext-2-raw" / "wiki.valid.raw", 32, 128, seed=0)
    test = wikitext_test_tokens(tokenizer, args.ppl_tokens)
    done = {e["label"] for e in read_results(args.out) if e.get("ppl_tokens") == len(test)}
    if "dense" not in done:
        append_result(args.out, {"label": "dense", "ppl_tokens": len(test), "ppl128": perplexity(model, test)})
    scores: dict[str, GroupScores] = {}
    for label, ffn_from, heads_from, protect, compensate in ROWS:
        if label in done:
            continue
        for name in {ffn_from, heads_from} - set(scores):
            start = time.perf_counter()
            scores[name] = score_groups(name, model, adapter, ScoringInputs(calibration=calib, seed=0))
            print(f"scored {name} in {time.perf_counter() - start:.0f} s", flush=True)
        mixed = GroupScores(ffn=scores[ffn_from].ffn, heads=scores[heads_from].heads)
        spec = PruneSpec(0.2, protect_first=protect, protect_last=protect)
        keep = select_keep(model, adapter, mixed, plan_widths(model, adapter, mixed, spec))
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        if compensate:
            cut_and_compensate(pruned, adapter, keep, calib)
        else:
            cut_model(pruned, adapter, keep)
        cut_seconds = time.perf_counter() - start
        ppl = perplexity(pruned, test)
        row = {"label": label, "ppl_tokens": len(test), "params": count_parameters(pruned), "ppl128": ppl}
        append_result(args.out, {**row, "cut_seconds": cut_seconds})
        print(f"{label:60s} PPL@128 {ppl:9.2f}", flush=True)


if __name__ == "__main__":
    main()

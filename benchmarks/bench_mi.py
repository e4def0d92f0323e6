"""Benchmark of the MI criterion's variants on the default decoder (SmolLM2-135M).

Protocol (../shared/notes/CRITERIA.md): WikiText-2 raw test tokenized once without BOS, the
first --max-tokens tokens (65,536 for the full protocol), non-overlapping windows of 128.
Calibration: --calib-samples windows of 128 tokens from wiki.valid.raw (seed 0).
Cuts: `note` = CRITERIA.md's exact cut (FFN only, layers 3..26, 1128 of 1536 neurons kept);
`20`/`50` = that share of the prunable (FFN + attention) parameters of layers 3..26, FFN and heads.

    /work/venv/bin/python benchmarks/bench_mi.py --max-tokens 16384 --variants mi,entropy --cuts note
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from bench_common import data_dir, wikitext_test_tokens

from edgeprune.calibration import calibration_batch
from edgeprune.criteria import ScoringInputs, score_groups
from edgeprune.criteria.mi import (
    MIOptions,
    cluster_mi,
    exact_entropies,
    exact_mi,
    ffn_output_info,
    kernel_widths,
    renyi2_entropy,
    renyi2_sums,
)
from edgeprune.evaluate import perplexity
from edgeprune.loading import load_model
from edgeprune.models import adapter_for
from edgeprune.structure import PruneSpec, prune_model

# name -> (criterion, options). Reconstructions of CRITERIA.md's failed forms are kept as rows.
VARIANTS: dict[str, tuple[str, dict]] = {
    "mi": ("mi", {}),  # the default: mrmr on contribution-scaled activations, median width x16 per layer
    "mi-n256": ("mi", {"n_positions": 256}),  # every pair of 256 positions instead of sampled pairs of 1024
    "mi-exact": ("mi", {"selection": "entropy", "alpha": 1.01, "n_positions": 128}),
    "entropy-g16": ("mi", {"selection": "entropy"}),
    "entropy-silverman": ("mi", {"selection": "entropy", "width_rule": "silverman", "gamma": 1.0}),
    "output-info": ("mi", {"selection": "output-info", "gamma": 1.0}),
    "paper": ("mi", {"selection": "paper", "member": "contribution"}),
    "redundancy-contribution": (
        "mi",
        {
            "selection": "redundancy",
            "member": "contribution",
            "scale": "none",
            "width_scope": "neuron",
            "width_rule": "silverman",
            "gamma": 1.0,
            "n_positions": 128,
        },
    ),
    "redundancy-pure": (
        "mi",
        {
            "selection": "redundancy",
            "scale": "none",
            "width_scope": "neuron",
            "width_rule": "silverman",
            "gamma": 1.0,
            "n_positions": 128,
        },
    ),
    "fluctuation": ("fluctuation", {}),
    "taylor": ("taylor", {}),
    "random": ("random", {}),
    "magnitude": ("magnitude", {}),
}


def parse_variant(spec: str) -> tuple[str, dict]:
    """A name from VARIANTS, or `criterion[key=value;key=value]` for ad-hoc options (values as strings)."""
    if "[" not in spec:
        return VARIANTS[spec]
    criterion, _, rest = spec.partition("[")
    pairs = (item.split("=", 1) for item in rest.rstrip("]").split(";") if item)
    return criterion, {k: v for k, v in pairs}


def cut_spec(model, adapter, cut: str) -> PruneSpec:
    """PruneSpec of a named cut; `note` solves for the sparsity that leaves 1128 FFN neurons."""
    if cut == "note":
        layer = adapter.layers(model)[0]
        removed = (adapter.widths(layer).ffn - 1128) * adapter.ffn_neuron_params(layer)
        sparsity = removed / adapter.prunable_params(layer)
        return PruneSpec(sparsity=sparsity, targets=("ffn",), protect_first=3, protect_last=3)
    return PruneSpec(sparsity=int(cut) / 100, targets=("ffn", "heads"), protect_first=3, protect_last=3)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def path_agreement(model, adapter, calib: torch.Tensor) -> dict:
    """Max |fast α=2 - eigenvalue α=2| on small slices (64 neurons × 64 positions) of three layers."""
    from edgeprune.criteria.activations import collect_channel_stats

    stats = collect_channel_stats(model, adapter, calib, adapter.ffn_output, n_sampled=64, seed=0)
    out = {"entropy": 0.0, "pairwise_mi": 0.0, "output_info": 0.0}
    for i in (3, 15, 26):
        layer = adapter.layers(model)[i]
        w = adapter.ffn_output(layer).weight.detach().double()[:, :64]
        z = stats[i].sampled.double()[:, :64] * w.norm(dim=0)
        sigma = kernel_widths(z, "median", "layer", 1.0)
        s, _ = renyi2_sums(z, sigma, pairs=False)
        out["entropy"] = max(
            out["entropy"], (renyi2_entropy(s, 64) - exact_entropies(z, sigma, 2.0)).abs().max().item()
        )
        fast = cluster_mi(z, sigma, 2.0)
        iu, ju = torch.triu_indices(16, 16, 1)

        exact = exact_mi(z[:, :16], sigma[:16], 2.0, torch.stack([iu, ju], 1))
        out["pairwise_mi"] = max(out["pairwise_mi"], (fast[iu, ju] - exact).abs().max().item())
        zr = stats[i].sampled.double()[:, :64]
        f = ffn_output_info(zr, w, MIOptions())
        e = ffn_output_info(zr, w, MIOptions(alpha=2.0 + 1e-12))
        out["output_info"] = max(out["output_info"], (f - e).abs().max().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="mi,random,magnitude", help=f"comma list from {', '.join(VARIANTS)}")
    parser.add_argument("--cuts", default="note,20,50")
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 can be faster on a crowded machine)")
    parser.add_argument("--agreement", action="store_true", help="also check fast vs exact path")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "bench_mi.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(None)
    adapter = adapter_for(loaded.model.config)
    wiki = data_dir() / "wikitext-2-raw"
    test_tokens = wikitext_test_tokens(loaded.tokenizer)
    calib = calibration_batch(loaded.tokenizer, wiki / "wiki.valid.raw", args.calib_samples, 128, args.seed)
    cuts = args.cuts.split(",")
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} cores, torch threads {args.threads}",
        "load_at_start": os.getloadavg(),
        "max_tokens": args.max_tokens,
        "calibration": f"{args.calib_samples}x128 tokens of wiki.valid.raw, seed {args.seed}",
        "dense_ppl128": perplexity(loaded.model, test_tokens, 128, args.max_tokens),
        "rows": [],
    }
    print(f"dense PPL@128 {result['dense_ppl128']:.2f}  load {os.getloadavg()}", flush=True)
    if args.agreement:
        result["fast_vs_exact_max_abs_diff"] = path_agreement(loaded.model, adapter, calib)
        print("fast vs exact", result["fast_vs_exact_max_abs_diff"], flush=True)
    for name in args.variants.split(","):
        criterion, options = parse_variant(name)
        model = load_model(None).model
        start, cpu_start = time.perf_counter(), time.process_time()
        scores = score_groups(
            criterion, model, adapter, ScoringInputs(calibration=calib, seed=args.seed, options=options)
        )
        row = {
            "variant": name,
            "criterion": criterion,
            "options": options,
            "score_s": time.perf_counter() - start,
            "score_cpu_s": time.process_time() - cpu_start,
            "peak_rss_mb": peak_rss_mb(),
            "load": os.getloadavg()[0],
        }
        for cut in cuts:
            model = load_model(None).model
            summary = prune_model(model, adapter, scores, cut_spec(model, adapter, cut))
            row[f"ppl_{cut}"] = perplexity(model, test_tokens, 128, args.max_tokens)
            row[f"removed_{cut}"] = summary.prunable_removed
        result["rows"].append(row)
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    header = ["variant", "score s", *[f"PPL@128 {c}" for c in cuts]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in result["rows"]:
        cells = [row["variant"], f"{row['score_s']:.1f}", *[f"{row[f'ppl_{c}']:.2f}" for c in cuts]]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

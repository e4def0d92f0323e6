"""int4-fit against the fixed recipes at equal file size: which projections keep 8 bits, chosen by Fisher-weighted
rounding loss per byte (export/bit_allocation.py) or by hand, on the default decoder's dense fused graph.

    EDGEPRUNE_DATA=/work/shared/data PYTHONPATH=$PWD:$PWD/benchmarks \\
        python benchmarks/bench_bit_allocation.py [--budgets 90,95,100,105,110,115,120,124.41] [--windows 16,32] \\
        [--wiki 8192]

Rows: dense fp32, int8, int4-mixed (8-bit q/k/v and down projections and the two end layers), int4 (all 4-bit,
the vocabulary matrix at 8), the same with the vocabulary at 4 bits (int4-fit's starting point), two hand-made
lists (int4-mixed with some down projections at 4 bits, the lists that fitted 120 MB best before),
and int4-fit at each budget and each Fisher window count. Quality through ONNX Runtime on the very file, as
`edgeprune run` measures it: KL(dense || file) per token with its standard error, perplexity and top-1 agreement
on the packaged text's held-out tail (1,728 tokens: 13 windows of 128), and perplexity on WikiText-2 test (text
the sensitivities never saw). Writes benchmarks/out/bench_bit_allocation.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnx
import torch
from bench_common import wikitext_test_tokens

from edgeprune.calibration import disjoint_windows, heldout_start, load_text, tokenize_text
from edgeprune.evaluate.divergence import heldout_divergence
from edgeprune.export import export_model
from edgeprune.export.bit_allocation import FIT_FILL, choose_eight_bit, graph_projections, projection_sensitivity
from edgeprune.export.quantize import (
    BLOCK_SIZE,
    LAYER_INDEX,
    MIXED_EIGHT_BIT_BLOCK,
    quantize_model,
    quantize_weight_only,
    sensitive_matmuls,
)
from edgeprune.loading import DEFAULT_DECODER, load_model
from edgeprune.runtime import MODEL_FILE, onnx_bytes

OUT = Path(__file__).parent / "out" / "bit_allocation"


def layer_of(name: str) -> int:
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else -1


def hand_lists(fp32: Path) -> dict[str, list[str]]:
    """int4-mixed's list minus the down projections of some middle layers (RESULTS, "Finer mixed precision")."""
    mixed = sensitive_matmuls(fp32)
    return {
        f"int4-mixed, down of layers {lo}..{hi} at 4 bits": [
            n for n in mixed if not ("/down_proj/" in n and lo <= layer_of(n) <= hi)
        ]
        for lo, hi in ((10, 19), (2, 27))
    }


def quality(file: Path, model, heldout: torch.Tensor, wiki: torch.Tensor) -> dict:
    packaged = heldout_divergence(file, model, heldout, seq_len=128)
    row = {
        "mb": round(onnx_bytes(file) / 1e6, 2),
        "kl": round(packaged.mean, 4),
        "kl_stderr": round(packaged.stderr, 4),
        "ppl": round(packaged.perplexity, 2),
        "top1": round(packaged.top1_agreement, 4),
    }
    if len(wiki):
        row["wiki_ppl"] = round(heldout_divergence(file, model, wiki, seq_len=128).perplexity, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="90,95,100,105,110,115,120,124.41", help="int4-fit file budgets, MB")
    parser.add_argument("--windows", default="16", help="Fisher calibration windows (comma-separated counts)")
    parser.add_argument("--wiki", type=int, default=8192, help="WikiText-2 test tokens (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(DEFAULT_DECODER)
    packaged = tokenize_text(loaded.tokenizer, load_text(None))
    start = heldout_start(len(packaged))
    heldout = packaged[start:]
    wiki = wikitext_test_tokens(loaded.tokenizer, args.wiki) if args.wiki else torch.tensor([], dtype=torch.long)
    fp32 = OUT / "dense" / MODEL_FILE
    if not fp32.is_file():
        export_model(loaded.model, loaded.tokenizer, fp32.parent, overwrite=True, fused=True)
    rows = []

    def add(name: str, file: Path, **fields) -> None:
        rows.append({"variant": name, **fields, **quality(file, loaded.model, heldout, wiki)})
        print(json.dumps(rows[-1]), flush=True)

    add("dense fp32", fp32)
    for precision in ("int8", "int4-mixed", "int4"):
        add(precision, quantize_model(fp32, OUT / f"{precision}.onnx", precision))
    for name, eight in hand_lists(fp32).items():
        file = OUT / f"hand-{len(rows)}.onnx"
        quantize_weight_only(fp32, file, 4, BLOCK_SIZE, eight_bit=tuple(eight), eight_bit_block=MIXED_EIGHT_BIT_BLOCK)
        add(name, file, eight_bit=len(eight))
    all_four_file = quantize_model(fp32, OUT / "int4-vocab4.onnx", "int4-fit", eight_bit=())
    add("int4, 4-bit vocabulary too (int4-fit with nothing at 8 bits)", all_four_file, eight_bit=0)
    all_four = onnx_bytes(all_four_file)
    graph = onnx.load(str(fp32), load_external_data=False).graph
    for count in [int(w) for w in args.windows.split(",")]:
        began = time.perf_counter()
        windows = disjoint_windows(packaged[:start], 128, count)
        sensitivity = projection_sensitivity(loaded.model, windows, BLOCK_SIZE)
        seconds = round(time.perf_counter() - began, 1)
        projections = graph_projections(graph, sensitivity, BLOCK_SIZE, MIXED_EIGHT_BIT_BLOCK)
        for budget in [float(b) for b in args.budgets.split(",")]:
            eight = choose_eight_bit(projections, int(budget * 1e6 * FIT_FILL) - all_four)
            file = OUT / f"fit-{count}-{budget:g}.onnx"
            quantize_model(fp32, file, "int4-fit", eight_bit=tuple(eight))
            kinds = {}
            for name in eight:
                kind = name.split("/")[-2] if "layers" in name else "vocabulary"
                kinds[kind] = kinds.get(kind, 0) + 1
            add(
                f"int4-fit {budget:g} MB", file, windows=count, sensitivity_s=seconds, eight_bit=len(eight), kinds=kinds
            )
    print("\n| variant | file MB | KL from dense | held-out PPL | top-1 | WikiText-2 PPL | 8-bit MatMuls |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['variant']}{' (' + str(row['windows']) + ' windows)' if 'windows' in row else ''} | {row['mb']} | "
            f"{row['kl']} ± {row['kl_stderr']} | {row['ppl']} | {row['top1']} | {row.get('wiki_ppl', '–')} | "
            f"{row.get('eight_bit', '–')} |"
        )
    (OUT.parent / "bench_bit_allocation.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

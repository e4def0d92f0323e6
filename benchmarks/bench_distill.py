"""Recovery of LLM-Pruner's 20% cut by distillation from the dense model vs LoRA, at equal wall time.

Protocol (bench_llmpruner.py's cut): SmolLM2-135M-Instruct, Element¹ Taylor on 10 windows of 128
tokens of WikiText-2 validation, FFN neurons and query heads of layers 4..27, 20.0% of all
parameters removed. Each row trains that cut model for --minutes of wall time from the same
start, then WikiText-2 test PPL@128 (first --ppl-tokens tokens, non-overlapping windows):
- `lora-alpaca`: LoRA r=8 on Alpaca-cleaned (first 5,000), LM loss on responses, lr 1e-3, seq 256
  (bench_llmpruner's recovery, the reference);
- `kd-<method>-<data>[-top<k>]`: KL to the dense teacher (temperature 1, full vocabulary unless
  top-k), `full` (every parameter, lr --full-lr) or `lora` (lr 1e-3), seq 128, on `self` (text
  the dense model writes: `edgeprune.recover.selftext`, generated once into --work, its time
  reported apart), `packaged` (the packaged calibration text minus run's held-out tail) or
  `alpaca`.
Resumable: finished rows are read back from --out and skipped.

    python benchmarks/bench_distill.py --minutes 5 --threads 1
    python benchmarks/bench_distill.py --rows kd-full-self lora-alpaca --minutes 30   # the issue's goal rows
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_common import append_result, data_dir, read_results
from bench_llmpruner import cut

from edgeprune.calibration import tokenize_text
from edgeprune.checkpoint import is_pruned_folder, load_pruned
from edgeprune.evaluate import perplexity
from edgeprune.loading import load_model
from edgeprune.recover import RecoveryConfig, SelfTextConfig, load_recovery_data, recover
from edgeprune.recover.selftext import default_data, packaged_head_text

OUT = Path(__file__).parent / "out"
ALPACA = ("instruct", "alpaca_data_cleaned.first5000.json")
ROWS = ("kd-full-self", "lora-alpaca", "kd-lora-self", "kd-full-alpaca", "kd-full-packaged", "kd-full-self-top64")


def wiki_tokens(tokenizer, n: int) -> torch.Tensor:
    text = (data_dir() / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    return tokenize_text(tokenizer, text)[:n]


def row_config(row: str, args: argparse.Namespace) -> tuple[RecoveryConfig, str, bool]:
    """(training settings, data name, distilled?) of a row name."""
    if row == "lora-alpaca":
        return RecoveryConfig(minutes=args.minutes, lr=1e-3, seq_len=256, eval_every=5), "alpaca", False
    _, method, data, *rest = row.split("-")
    top_k = int(rest[0].removeprefix("top")) if rest else None
    lr = args.full_lr if method == "full" else 1e-3
    config = RecoveryConfig(method=method, minutes=args.minutes, lr=lr, seq_len=128, eval_every=5, top_k=top_k)
    return config, data, True


def data_path(name: str, tokenizer, teacher, args: argparse.Namespace) -> tuple[Path, float]:
    """The file a row trains on and the seconds spent making it now (0 when it exists)."""
    if name == "alpaca":
        return data_dir().joinpath(*ALPACA), 0.0
    started = time.perf_counter()
    folder = args.work / ("self_text" if name == "self" else "packaged")
    config = SelfTextConfig(samples=args.samples)
    path = default_data(
        tokenizer, packaged_head_text(tokenizer), folder, teacher if name == "self" else None, "dense", config
    )
    return path, time.perf_counter() - started


def run_row(row: str, args: argparse.Namespace, tokens: torch.Tensor) -> dict:
    config, data_name, distilled = row_config(row, args)
    cpu_start = time.process_time()
    dense = load_model(None)
    student, tokenizer = load_pruned(args.work / "taylor-20")
    path, data_seconds = data_path(data_name, tokenizer, dense.model, args)
    data = load_recovery_data(path, tokenizer, student, config)

    def on_step(report) -> None:
        note = f" val {report.val_loss:.4f}" if report.val_loss is not None else ""
        print(
            f"  {row} step {report.step} loss {report.train_loss:.4f}{note} {report.tokens_per_s:.0f} tok/s", flush=True
        )

    teacher = dense.model if distilled else None
    result = recover(student, tokenizer, data, config, on_step=on_step, teacher=teacher, teacher_id="dense")
    ppl = perplexity(result.model, tokens, seq_len=128)
    record = result.record
    print(f"{row}: PPL@128 {ppl:.2f} after {record.steps} steps ({record.seconds:.0f} s)", flush=True)
    return {
        "row": row,
        "ppl128": ppl,
        "data_seconds": data_seconds,
        "recovery": record.as_dict(),
        "cpu_seconds": time.process_time() - cpu_start,  # the machine is shared: wall time is not all ours
    }


def print_table(entries: list[dict], dense_ppl: float, pruned_ppl: float) -> None:
    print("| row | minutes | steps (epochs) | tokens/s | teacher share | val loss | PPL@128 | of dense |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| dense | | | | | | {dense_ppl:.2f} | 1.00x |")
    print(f"| taylor 20%, no recovery | | | | | | {pruned_ppl:.2f} | {pruned_ppl / dense_ppl:.2f}x |")
    for e in entries:
        if "row" not in e:
            continue
        r = e["recovery"]
        share = "–" if r["teacher_share"] is None else f"{r['teacher_share']:.0%}"
        print(
            f"| {e['row']} | {r['seconds'] / 60:.1f} | {r['steps']} ({r['epochs']:.2f}) | "
            f"{r['tokens_per_s_per_process'][0]:.0f} | {share} | {r['val_loss_before']:.3f} -> "
            f"{r['val_loss_best']:.3f} | {e['ppl128']:.2f} | {e['ppl128'] / dense_ppl:.2f}x |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=128, help="self-generated texts")
    parser.add_argument("--ppl-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=OUT / "distill")
    parser.add_argument("--out", type=Path, default=OUT / "bench_distill.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not is_pruned_folder(args.work / "taylor-20"):
        cut("taylor", args, args.work / "taylor-20")
    entries = read_results(args.out)
    tag = f"{args.minutes:g}min"
    if not any(e.get("reference") for e in entries):
        dense = load_model(None)
        tokens = wiki_tokens(dense.tokenizer, args.ppl_tokens)
        pruned, _ = load_pruned(args.work / "taylor-20")
        entry = {"reference": True, "dense_ppl128": perplexity(dense.model, tokens, seq_len=128)}
        entry["pruned_ppl128"] = perplexity(pruned, tokens, seq_len=128)
        append_result(args.out, entry)
        entries = read_results(args.out)
    tokens = wiki_tokens(load_model(None).tokenizer, args.ppl_tokens)
    for row in args.rows:
        if any(e.get("row") == f"{row}@{tag}" for e in entries):
            continue
        entry = run_row(row, args, tokens)
        append_result(args.out, {**entry, "row": f"{row}@{tag}", "minutes_budget": args.minutes})
        entries = read_results(args.out)
    reference = next(e for e in entries if e.get("reference"))
    print_table(entries, reference["dense_ppl128"], reference["pruned_ppl128"])


if __name__ == "__main__":
    main()

"""Cross-check edgeprune's zero-shot multiple-choice evaluator against EleutherAI's lm-evaluation-harness.

Protocol: the first N items (file order) of the local ARC-Easy test file
(`commonsense/arc/ARC-Easy-Test.jsonl` in the data folder), the default decoder SmolLM2-135M-Instruct
as the float32 safetensors folder edgeprune converts once (`~/.cache/edgeprune/smollm2-135m-instruct`),
zero-shot, CPU, one torch thread, batch size 8, on both sides:

- lm-eval (its own venv, never a project dependency) runs the task `arc_easy_local` of
  benchmarks/lmeval_tasks/: lm-eval's `arc_easy` config verbatim (prompt "Question: {{question}}\\nAnswer:",
  choices " {text}", metrics acc and acc_norm) with `dataset_path: json` on the local file; its `process_docs`
  turns the AI2 layout into the hub's `allenai/ai2_arc` one. The YAML names the file relative to the data
  folder, so lm_eval runs with the data folder as its working directory.
- edgeprune: `load_mc_task("arc_easy", data_dir)[:N]`, `score_items(..., max_length=2048)`, `mc_metrics`.

Compared: acc and acc_norm of both; per item, that the prompt, the options and the gold index are the same,
and that the predicted option agrees (argmax of the log-likelihood, and of the log-likelihood per character);
per option, max and mean |delta log-likelihood| (lm-eval's per-sample `filtered_resps`). Each side is timed
as wall seconds including Python start-up / imports and model load (lm-eval) or model load (edgeprune).

The lm-eval venv (once):

    python3 -m venv /work/lmeval-venv
    /work/lmeval-venv/bin/pip install torch==2.13.0
    /work/lmeval-venv/bin/pip install transformers==4.57.6
    /work/lmeval-venv/bin/pip install 'lm-eval[hf]==0.4.13' torch==2.13.0 transformers==4.57.6 \\
        'huggingface-hub<1.0' accelerate==1.15.0 peft==0.21.2

The run (it calls lm_eval as below, then scores the same items with edgeprune, then compares):

    /work/venv/bin/python benchmarks/bench_lmeval.py --limit 300

which runs, with OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1, from inside the data folder:

    /work/lmeval-venv/bin/python -m lm_eval --model hf \\
        --model_args pretrained=$HOME/.cache/edgeprune/smollm2-135m-instruct,dtype=float32 \\
        --device cpu --batch_size 8 --include_path <repo>/benchmarks/lmeval_tasks --tasks arc_easy_local \\
        --limit 300 --log_samples --output_path <repo>/benchmarks/out/lmeval

`--reuse` compares against the newest lm-eval output already in benchmarks/out/lmeval instead of running it.
Writes benchmarks/out/bench_lmeval.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from edgeprune.evaluate.data import resolve_data_dir
from edgeprune.evaluate.multiple_choice import (
    DELIMITER,
    MCItem,
    load_mc_task,
    mc_metrics,
    predictions,
    score_items,
)
from edgeprune.loading import load_model, resolve_source

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "out"
TASK_DIR = BENCH / "lmeval_tasks"
TASK = "arc_easy_local"
DEFAULT_LMEVAL_PYTHON = "/work/lmeval-venv/bin/python"


def lmeval_command(python: str, model_dir: Path, limit: int, batch_size: int, output: Path) -> list[str]:
    return [
        python,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--device",
        "cpu",
        "--batch_size",
        str(batch_size),
        "--include_path",
        str(TASK_DIR),
        "--tasks",
        TASK,
        "--limit",
        str(limit),
        "--log_samples",
        "--output_path",
        str(output),
    ]


def run_lmeval(command: list[str], data_dir: Path, threads: int, log: Path) -> float:
    """Run lm_eval from inside the data folder (the task YAML's data file is relative to it); wall seconds."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    print("running:", " ".join(command), f"(cwd {data_dir}; log {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, cwd=data_dir, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"lm_eval failed (exit {done.returncode}): see {log}")
    return seconds


def newest(output: Path, pattern: str) -> Path:
    found = sorted(output.rglob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no {pattern} under {output}: run without --reuse first")
    return found[-1]


def read_lmeval(output: Path) -> tuple[dict, list[dict]]:
    """The newest results JSON and its per-document samples (sorted by doc_id)."""
    results_path = newest(output, "results_*.json")
    results = json.loads(results_path.read_text())
    stamp = results_path.stem.removeprefix("results_")
    samples_path = newest(output, f"samples_{TASK}_{stamp}.jsonl")
    samples = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    return results, sorted(samples, key=lambda s: s["doc_id"])


def compare(items: list[MCItem], ours: list[list[float]], samples: list[dict]) -> dict:
    """Same prompts, options and gold; predicted-option agreement; |delta log-likelihood| per option."""
    if len(samples) != len(items):
        raise SystemExit(
            f"lm-eval logged {len(samples)} documents, edgeprune scored {len(items)}: use the same --limit"
        )
    prompt_mismatch, gold_mismatch, deltas = [], [], []
    agree = agree_norm = 0
    disagreements = []
    for item, lls, sample, theirs in zip(items, ours, samples, lmeval_lls(samples), strict=True):
        args = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["arguments"]))]
        if [a["arg_0"] for a in args] != list(item.contexts) or [a["arg_1"] for a in args] != [
            DELIMITER + c for c in item.choices
        ]:
            prompt_mismatch.append(sample["doc_id"])
        if int(sample["target"]) != item.gold:
            gold_mismatch.append(sample["doc_id"])
        deltas += [abs(a - b) for a, b in zip(lls, theirs, strict=True)]
        ours_chosen, theirs_chosen = predictions(lls, item.choices), predictions(theirs, item.choices)
        same, same_norm = ours_chosen[0] == theirs_chosen[0], ours_chosen[1] == theirs_chosen[1]
        agree += same
        agree_norm += same_norm
        if not (same and same_norm):
            disagreements.append({"doc_id": sample["doc_id"], "edgeprune": lls, "lm_eval": theirs})
    n = len(items)
    return {
        "prompt_mismatches": prompt_mismatch,
        "gold_mismatches": gold_mismatch,
        "pred_agreement": agree / n,
        "pred_norm_agreement": agree_norm / n,
        "max_abs_delta_ll": max(deltas),
        "mean_abs_delta_ll": sum(deltas) / len(deltas),
        "n_options": len(deltas),
        "disagreements": disagreements,
    }


def lmeval_lls(samples: list[dict]) -> list[list[float]]:
    """lm-eval's log-likelihood of every option of every document (`filtered_resps`: [ll, is_greedy] pairs)."""
    return [[float(r[0]) for r in sample["filtered_resps"]] for sample in samples]


def lmeval_item_metrics(samples: list[dict]) -> dict[str, float]:
    """acc / acc_norm as lm-eval scored each logged document (its own per-sample values)."""
    n = len(samples)
    return {name: sum(float(s[name]) for s in samples) / n for name in ("acc", "acc_norm")}


def print_table(entry: dict) -> None:
    """Two Markdown tables: each side's numbers, then how they agree."""
    lm, ep, check = entry["lm_eval"], entry["edgeprune"], entry["comparison"]
    again = lm["metrics_by_edgeprune_mc_metrics"]
    wall = "-" if lm["wall_seconds"] is None else f"{lm['wall_seconds']:.0f}"
    print(f"\n| ARC-Easy test, first {entry['limit']} items | lm-eval {lm['version']} | edgeprune |")
    print("|---|---:|---:|")
    print(f"| n items | {lm['n']} | {ep['n']} |")
    for name in ("acc", "acc_norm"):
        print(
            f"| {name} (± stderr) | {lm['metrics'][f'{name},none']:.4f} ± {lm['metrics'][f'{name}_stderr,none']:.4f} "
            f"| {ep['metrics'][name]:.4f} ± {ep['metrics'][f'{name}_stderr']:.4f} |"
        )
    print(f"| wall seconds (start-up, model load, scoring) | {wall} | {ep['wall_seconds']:.0f} |")
    print("\n| agreement | value |\n|---|---:|")
    print(
        f"| same prompt, options and gold | {ep['n'] - len(set(check['prompt_mismatches'] + check['gold_mismatches']))}"
        f" / {ep['n']} items |"
    )
    print(f"| same predicted option (acc) | {check['pred_agreement']:.4f} |")
    print(f"| same predicted option (acc_norm) | {check['pred_norm_agreement']:.4f} |")
    print(f"| max abs delta log-likelihood ({check['n_options']} options) | {check['max_abs_delta_ll']:.2e} |")
    print(f"| mean abs delta log-likelihood | {check['mean_abs_delta_ll']:.2e} |")
    print(
        f"| lm-eval's log-likelihoods through edgeprune's mc_metrics: acc / acc_norm "
        f"| {again['acc']:.4f} / {again['acc_norm']:.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=300, help="first N ARC-Easy test items (file order)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: $EDGEPRUNE_DATA, else ../shared/data")
    parser.add_argument("--model", default=None, help="a local HF folder (default: the converted SmolLM2 default)")
    parser.add_argument("--lmeval-python", default=os.environ.get("LMEVAL_PYTHON", DEFAULT_LMEVAL_PYTHON))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    parser.add_argument("--max-length", type=int, default=2048, help="edgeprune's context limit in tokens")
    parser.add_argument("--reuse", action="store_true", help="read the newest lm-eval output instead of running it")
    parser.add_argument("--lmeval-output", type=Path, default=OUT / "lmeval")
    parser.add_argument("--out", type=Path, default=OUT / "bench_lmeval.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = resolve_data_dir(args.data_dir).resolve()
    model_dir = Path(resolve_source(args.model)).resolve()
    lmeval_output = args.lmeval_output.resolve()

    command = lmeval_command(args.lmeval_python, model_dir, args.limit, args.batch_size, lmeval_output)
    lmeval_seconds = None
    if not args.reuse:
        lmeval_seconds = run_lmeval(command, data_dir, args.threads, lmeval_output / "lm_eval.log")
    results, samples = read_lmeval(lmeval_output)

    start = time.perf_counter()
    loaded = load_model(str(model_dir) if args.model else None)
    loaded_at = time.perf_counter()
    items = load_mc_task("arc_easy", data_dir)[: args.limit]
    ours = score_items(loaded.model, loaded.tokenizer, items, max_length=args.max_length, batch_size=args.batch_size)
    ours_metrics = mc_metrics(ours, items)
    edgeprune_seconds = time.perf_counter() - start

    theirs = results["results"][TASK]
    check = compare(items, ours, samples)
    entry = {
        "task": "arc_easy",
        "limit": args.limit,
        "model": str(model_dir),
        "model_source_hash": loaded.source_hash,
        "data_dir": str(data_dir),
        "lm_eval": {
            "version": results.get("lm_eval_version"),
            "transformers": results.get("transformers_version"),
            "command": command,
            "model_args": results.get("config", {}).get("model_args"),
            "cwd": str(data_dir),
            "n": len(samples),
            "metrics": {k: v for k, v in theirs.items() if "," in k},
            "per_sample_metrics": lmeval_item_metrics(samples),
            "metrics_by_edgeprune_mc_metrics": mc_metrics(lmeval_lls(samples), items),
            "max_length": results.get("max_length"),
            "wall_seconds": lmeval_seconds,
            "evaluation_seconds": float(results.get("total_evaluation_time_seconds") or "nan"),
        },
        "edgeprune": {
            "n": len(items),
            "metrics": ours_metrics,
            "max_length": args.max_length,
            "load_seconds": loaded_at - start,
            "wall_seconds": edgeprune_seconds,
        },
        "comparison": check,
        "batch_size": args.batch_size,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print_table(entry)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(entry, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

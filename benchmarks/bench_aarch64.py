"""The default decoder's shipped files on the emulated Raspberry Pi 5 (aarch64, qemu) against this x86 machine.

    scripts/build_aarch64_target.sh /work/aarch64-root
    for q in int8 int4; do edgeprune export smollm2-135m --fused --quantize $q -o EXPORTS/$q; done
    edgeprune export smollm2-135m --fused -o EXPORTS/fp32
    PYTHONPATH=$PWD python benchmarks/bench_aarch64.py EXPORTS --target /work/aarch64-root \\
        [--windows 8] [--logit-tokens 64] [--new-tokens 24] [--ssh-device loopback.yaml]

The same files and the same runner (edgeprune.devices.runner, one thread) on both CPUs:
- logits of one forward over the first `--logit-tokens` held-out tokens: max |diff|, top-1 agreement, for each
  shipped file and for its float-activation twin (MatMulNBits accuracy level 0: no int8 rounding of
  activations, so the CPUs must agree to fp32 rounding), and each CPU's own activation rounding
  (|level 4 - level 0|): the shipped files may differ across CPUs by at most the sum of the two;
- greedy continuation of a prompt (`--new-tokens`), and where it first differs;
- held-out quality on the first `--windows` 128-token windows of WikiText-2 test: each quantized file's KL from
  the dense fp32 file, its perplexity and top-1 agreement, the fp32 file's perplexity, all measured on the CPU;
- with `--ssh-device` (a device file whose python is the emulated one): the remote path, upload + run + fetch of
  the int4 file's outputs over SSH, which must equal the local emulated run bit for bit.
Seconds are wall time of each runner call (emulated: functional only). Writes benchmarks/out/bench_aarch64.json;
each finished step is kept in --work, so a rerun resumes (delete it to measure again).
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import time
from pathlib import Path

import numpy as np
from bench_common import append_result, data_dir
from transformers import AutoTokenizer

from edgeprune.calibration import tokenize_text
from edgeprune.devices.profiler import LocalProfiler, ModelOutputs, profiler_for
from edgeprune.devices.profiles import get_device, load_profile
from edgeprune.evaluate.divergence import summarize, windows_of
from edgeprune.evaluate.perplexity import WIKITEXT2_TEST, wikitext2_text
from edgeprune.export.exporter import FP32_ATOL
from edgeprune.export.quantize import float_activations
from edgeprune.runtime import MODEL_FILE, eos_token_ids

OUT = Path(__file__).parent / "out" / "bench_aarch64.json"
SEQ_LEN = 128
PROMPT = "The Raspberry Pi is a series of small single-board computers"
QUANTIZED = ("int8", "int4")


def float_activations_once(source: Path, target: Path) -> Path:
    """`quantize.float_activations`, kept from an earlier (interrupted) run."""
    return target if target.is_file() else float_activations(source, target)


def timed(work: Path, name: str, call):
    """(value, seconds) of `call`, kept in `work` so an interrupted benchmark resumes past finished steps."""
    path = work / f"{name}.pkl"
    if path.is_file():
        return pickle.loads(path.read_bytes())
    start = time.perf_counter()
    found = (call(), time.perf_counter() - start)
    path.write_bytes(pickle.dumps(found))
    return found


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def logit_rows(here: dict[str, ModelOutputs], arm: dict[str, ModelOutputs], tokenizer) -> list[dict]:
    rows = []
    for name in here:
        a, b = here[name].outputs[0], arm[name].outputs[0]
        split = first_mismatch(here[name].tokens, arm[name].tokens)
        rows.append(
            {
                "file": name,
                "max_abs_logit": float(np.abs(a).max()),
                "max_abs_diff": float(np.abs(a - b).max()),
                "fp32_tolerance": FP32_ATOL * max(1.0, float(np.abs(a).max())),
                "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
                "same_greedy": split is None,
                "greedy_first_difference": split,
                "greedy_here": tokenizer.decode(here[name].tokens),
                "greedy_aarch64": tokenizer.decode(arm[name].tokens),
            }
        )
    for precision in QUANTIZED:
        exact = f"{precision} float-activations"
        for side, found in (("here", here), ("aarch64", arm)):
            rounding = float(np.abs(found[precision].outputs - found[exact].outputs).max())
            next(r for r in rows if r["file"] == precision)[f"activation_rounding_{side}"] = rounding
    return rows


def quality_rows(here_stats: list[dict], arm_stats: list[dict]) -> list[dict]:
    """fp32 from the reference's own NLL; each quantized file against it, on each CPU."""
    rows = []
    for side, stats in (("here", here_stats), ("aarch64", arm_stats)):
        results = [summarize(s, SEQ_LEN) for s in stats]
        rows.append(
            {"file": "fp32", "cpu": side, "perplexity": results[0].dense_perplexity, "windows": results[0].windows}
        )
        for precision, result in zip(QUANTIZED, results, strict=True):
            rows.append(
                {
                    "file": precision,
                    "cpu": side,
                    "kl": result.mean,
                    "kl_stderr": result.stderr,
                    "perplexity": result.perplexity,
                    "top1_agreement": result.top1_agreement,
                    "windows": result.windows,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", type=Path, help="folder with fp32/, int8/, int4/ exports of the default decoder")
    parser.add_argument("--target", type=Path, required=True, help="the folder build_aarch64_target.sh built")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--logit-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--ssh-device", type=Path, help="device file reaching the emulated python over SSH")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_aarch64"), help="finished steps, for resuming")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    here = dataclasses.replace(get_device("local"), threads=1)
    arm = dataclasses.replace(get_device("rpi5-emulated"), python=str(args.target / "bin" / "python3"))
    files = {name: args.exports / name / MODEL_FILE for name in ("fp32", *QUANTIZED)}
    for precision in QUANTIZED:
        files[f"{precision} float-activations"] = float_activations_once(
            files[precision], args.exports / precision / "model.float-activations.onnx"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.exports / "fp32")
    tokens = tokenize_text(tokenizer, wikitext2_text(data_dir() / WIKITEXT2_TEST))
    windows = windows_of(tokens, SEQ_LEN)[: args.windows].tolist()
    logit_ids = [windows[0][: args.logit_tokens]]
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    eos = eos_token_ids(args.exports / "fp32")

    def outputs(device, names):
        answers = profiler_for(device).outputs([files[n] for n in names], logit_ids, prompt, args.new_tokens, eos)
        return dict(zip(names, answers, strict=True))

    seconds = {}
    (here_out, seconds["outputs_here"]) = timed(args.work, "outputs_here", lambda: outputs(here, list(files)))
    (arm_out, seconds["outputs_aarch64"]) = timed(args.work, "outputs_aarch64", lambda: outputs(arm, list(files)))
    assert {a.machine for a in arm_out.values()} == {"aarch64"}
    candidates = [files[p] for p in QUANTIZED]
    (here_q, seconds["heldout_here"]) = timed(
        args.work, "heldout_here", lambda: LocalProfiler(here).divergence(candidates, files["fp32"], windows)
    )
    (arm_q, seconds["heldout_aarch64"]) = timed(
        args.work, "heldout_aarch64", lambda: LocalProfiler(arm).divergence(candidates, files["fp32"], windows)
    )
    entry = {
        "logits": logit_rows(here_out, arm_out, tokenizer),
        "quality": quality_rows(here_q, arm_q),
        "seconds": seconds,
        "logit_tokens": args.logit_tokens,
        "prompt": PROMPT,
        "new_tokens": args.new_tokens,
        "heldout": f"first {len(windows)} windows of {SEQ_LEN} tokens of WikiText-2 test",
    }
    if args.ssh_device:
        ssh = load_profile(args.ssh_device)
        (remote, seconds["ssh_int4_outputs"]) = timed(args.work, "ssh_int4_outputs", lambda: outputs(ssh, ["int4"]))
        local = arm_out["int4"]
        entry["ssh"] = {
            "device": ssh.ssh,
            "machine": remote["int4"].machine,
            "identical_to_local_emulated": bool(
                np.array_equal(remote["int4"].outputs, local.outputs) and remote["int4"].tokens == local.tokens
            ),
            "model": remote["int4"].model,
        }
    entry = append_result(OUT, entry)
    print(
        f"| file | max abs logit | max abs diff x86 vs aarch64 | top-1 agreement ({args.logit_tokens} positions) "
        "| activation rounding x86 / aarch64 | same greedy continuation |"
    )
    print("|---|---|---|---|---|---|")
    for row in entry["logits"]:
        rounding = (
            f"{row['activation_rounding_here']:.3g} / {row['activation_rounding_aarch64']:.3g}"
            if "activation_rounding_here" in row
            else "–"
        )
        same = "yes" if row["same_greedy"] else f"no (from token {row['greedy_first_difference']})"
        print(
            f"| {row['file']} | {row['max_abs_logit']:.1f} | {row['max_abs_diff']:.3g} | "
            f"{row['top1_agreement']:.1%} | {rounding} | {same} |"
        )
    print()
    print("| file | CPU | KL from fp32 | perplexity | top-1 agreement with fp32 |")
    print("|---|---|---|---|---|")
    for row in entry["quality"]:
        kl = f"{row['kl']:.4f} ± {row['kl_stderr']:.4f}" if "kl" in row else "–"
        top1 = f"{row['top1_agreement']:.1%}" if "top1_agreement" in row else "–"
        print(f"| {row['file']} | {row['cpu']} | {kl} | {row['perplexity']:.3f} | {top1} |")
    print()
    for row in entry["logits"]:
        print(f"{row['file']}: x86 {row['greedy_here']!r}\n{' ' * len(row['file'])}  arm {row['greedy_aarch64']!r}")
    print({k: round(v, 1) for k, v in seconds.items()}, entry.get("ssh"), "load", entry["load_average_1m"])


if __name__ == "__main__":
    main()

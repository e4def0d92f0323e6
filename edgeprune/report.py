"""The report of a run: report.json (everything), report.md (a person's summary), pareto.png.

Input is one plain dict (the run record) so the report can be rebuilt from report.json alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from edgeprune.outputs import atomic_output_file, write_atomic
from edgeprune.precisions import PRECISIONS

SUMMARY_ROWS = (
    ("params", "parameters", "{:,.0f}"),
    ("onnx_mb", "ONNX size (MB)", "{:.1f}"),
    ("latency_ms", "latency p50 (ms)", "{:.1f}"),
    ("latency_p90_ms", "latency p90 (ms)", "{:.1f}"),
    ("prefill_ms", "prefill p50 (ms)", "{:.1f}"),
    ("decode_ms_per_token", "decode p50 (ms/token)", "{:.2f}"),
    ("tokens_per_s", "tokens/s (decode, or encoder sequences)", "{:.1f}"),
    ("peak_mb", "peak memory (MB)", "{:.0f}"),
    ("divergence", "divergence from dense (held-out)", "{:.4f}"),
    ("perplexity", "perplexity (held-out)", "{:.2f}"),
    ("top1_agreement", "top-1 agreement with dense", "{:.1%}"),
)
PRECISION_COLORS = {
    "fp32": "tab:blue",
    "int8": "tab:green",
    "int8-b64": "tab:olive",
    "int8-b128": "tab:cyan",
    "int4-mixed": "tab:orange",
    "int4-fit": "tab:pink",
    "int4": "tab:purple",
    "dynamic-int8": "tab:brown",
}
assert tuple(PRECISION_COLORS) == PRECISIONS, "every precision the search can measure is drawn"


def format_value(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def candidate_label(row: dict) -> str:
    cut = f"{row['sparsity']:.1%} pruned" if row["sparsity"] else "unpruned"
    return f"{row['precision']}, {cut}"


def divergence_cell(row: dict) -> str:
    value = row.get("divergence")
    if value is None:
        return "–"
    stderr = row.get("divergence_stderr") or row.get("extra", {}).get("divergence_stderr")
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


EMULATED_NOTE = (
    "**Emulated device: functional only.** The model ran with the board's instructions under an emulator; "
    "latency, tokens/s and speedups below are the emulator's, not the board's (file size and quality carry over; "
    "peak memory includes the emulator's own)."
)


def paired_spread_lines(profile: dict) -> list[str]:
    """How far the final check's paired runs spread: a speedup budget met by less than that is met by noise."""
    final = profile.get("final", {}).get("samples", {}).get("latency_ms") or []
    dense = profile.get("dense", {}).get("samples", {}).get("latency_ms") or []
    if len(final) != len(dense) or len(final) < 2:  # not a paired (alternating) measurement
        return []
    ratios = sorted(d / f for f, d in zip(final, dense, strict=True))
    return [
        "",
        f"The final check alternated {len(ratios)} runs of each model: per-run speedups ranged "
        f"{ratios[0]:.2f}-{ratios[-1]:.2f}x (the budget uses their median). Separate comparisons of one file on "
        "one machine can differ by more than that (other processes, memory-bandwidth contention): a budget met "
        "by a few percent may be missed on a second run.",
    ]


def target_quality_lines(found: dict | None) -> list[str]:
    """The shipped quantized file's held-out quality on the ARM device beside this machine's, same windows."""
    if not found:
        return []
    here, target = found["here"], found["target"]
    rows = (
        ("divergence from dense", "mean", "{:.4f}"),
        ("perplexity", "perplexity", "{:.2f}"),
        ("dense perplexity", "dense_perplexity", "{:.2f}"),
        ("top-1 agreement with dense", "top1_agreement", "{:.1%}"),
    )
    lines = [
        "",
        f"## Quality on {found['device']} (where it will run)",
        "",
        f"The shipped file against the dense fp32 export, both run on each CPU, on the same {target['windows']} "
        f"held-out windows ({target['tokens']:,} tokens"
        + (", the first ones only: the device is emulated and slow" if found.get("emulated") else "")
        + ").",
        "",
        f"| | this machine ({here.get('machine', '?')}) | {found['device']} |",
        "|---|---|---|",
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {format_value(here.get(key), fmt)} | {format_value(target.get(key), fmt)} |")
    verdict = {
        True: "worse on the device beyond window noise",
        False: "not worse on the device beyond window noise",
        None: "one window: no noise estimate",
    }[found["worse_on_target"]]
    lines += [
        "",
        f"Device minus this machine: {found['measure']} {found['difference']:+.4f} ± "
        f"{found['difference_stderr']:.4f} (paired standard error): {verdict}.",
    ]
    return lines


def summary_markdown(record: dict) -> str:
    """What shipped and why, dense vs shipped, the budgets, and every candidate the search measured."""
    dense, final = record["dense"], record["final"]
    lines = [
        f"# edgeprune run: {record['model']} on {record['device']}",
        "",
        *([EMULATED_NOTE, ""] if record.get("profile", {}).get("final", {}).get("emulated") else []),
        f"Shipped: **{candidate_label(final)}** (`onnx/model.onnx`), criterion `{record['criterion']}`"
        f" ({1 - final['params'] / dense['params']:.1%} of all parameters removed), recovery: "
        f"{'on' if record.get('recovery') else 'off'}.",
        "",
        f"Why: {record.get('reason', '')}.",
        "",
        "| | dense | shipped | change |",
        "|---|---|---|---|",
    ]
    for key, label, fmt in SUMMARY_ROWS:
        a, b = dense.get(key), final.get(key)
        if a is None and b is None:
            continue
        change = f"{b / a:.2f}×" if a and b and key not in ("divergence", "top1_agreement") else "–"
        lines.append(f"| {label} | {format_value(a, fmt)} | {format_value(b, fmt)} | {change} |")
    lines += [
        "",
        f"Divergence: {final.get('divergence_measure') or 'kl'} of the shipped file's outputs from the dense "
        f"model's on {final.get('heldout_tokens', 0):,} held-out tokens (mean ± standard error across windows).",
        "",
        "## Budgets (final alternating measurement against dense)",
        "",
        "| budget | limit | shipped | met |",
        "|---|---|---|---|",
    ]
    for budget in record["budgets"]:
        lines.append(
            f"| {budget['kind']} | {budget['limit']:,.4g} | {budget['final_value']:,.4g} | "
            f"{'yes' if budget['met'] else 'NO'} |"
        )
    lines += paired_spread_lines(record.get("profile", {}))
    lines += target_quality_lines(record.get("target_quality"))
    lines += ["", "## Every candidate measured (in search order)", ""]
    lines.append(
        "| precision | sparsity | params | file MB | speedup vs dense (alternating) | divergence | perplexity "
        "| made by |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for probe in record["probes"]:
        extra = probe.get("extra", {})
        lines.append(
            f"| {probe.get('precision', 'fp32')} | {probe['sparsity']:.3f} | {probe['params']:,} | "
            f"{format_value(probe.get('onnx_mb'), '{:.1f}')} | {format_value(probe.get('speedup'), '{:.3f}')} | "
            f"{divergence_cell(probe)} | {format_value(extra.get('perplexity'), '{:.2f}')} | "
            f"{extra.get('method', '')}{' (refused: ' + probe['refused'] + ')' if probe.get('refused') else ''} |"
        )
    lines += ["", f"Versions: {json.dumps(record.get('versions', {}))}", ""]
    return "\n".join(lines)


def probe_speedup(probe: dict, record: dict) -> float:
    """The paired speedup the budget check uses (1 for the dense reference itself)."""
    if probe.get("precision", "fp32") == "fp32" and probe["sparsity"] == 0:
        return 1.0
    if probe.get("speedup"):
        return probe["speedup"]
    return record["dense"]["latency_ms"] / probe["latency_ms"]


def budget_lines(record: dict) -> dict[str, list[tuple[float, str]]]:
    """Budget limits in the plotted quantities: x = paired speedup (speedup and latency budgets, as the check
    computes them: latency = dense latency / paired speedup) and x = file MB (size budgets)."""
    lines: dict[str, list[tuple[float, str]]] = {"speedup": [], "onnx_mb": []}
    dense_ms = record["dense"]["latency_ms"]
    for budget in record["budgets"]:
        if budget["kind"] == "speedup":
            lines["speedup"].append((budget["limit"], f"budget: speedup >= {budget['limit']:g}"))
        elif budget["kind"] == "latency_ms":
            lines["speedup"].append((dense_ms / budget["limit"], f"budget: latency <= {budget['limit']:g} ms"))
        elif budget["kind"] == "memory_mb":
            lines["onnx_mb"].append((budget["limit"], f"budget: file <= {budget['limit']:g} MB"))
    return lines


def pareto_png(record: dict, path: Path) -> None:
    """Quality against speed and against file size for every candidate, budgets drawn in the plotted quantity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    probes = record["probes"]
    final = record["final"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), dpi=120, sharey=True)
    panels = (("speedup", "speedup over dense fp32 (alternating runs)"), ("onnx_mb", "ONNX file (MB)"))
    lines = budget_lines(record)
    for ax, (quantity, label) in zip(axes, panels, strict=True):
        for precision, color in PRECISION_COLORS.items():
            rows = sorted((p for p in probes if p.get("precision", "fp32") == precision), key=lambda p: p["sparsity"])
            if not rows:
                continue
            xs = [probe_speedup(p, record) if quantity == "speedup" else p["onnx_mb"] for p in rows]
            ys = [p.get("divergence") for p in rows]
            ax.plot(xs, ys, "o-", color=color, label=f"{precision}, joined in order of sparsity")
        x_final = final["speedup_alternating"] if quantity == "speedup" else final["onnx_mb"]
        ax.plot([x_final], [final.get("divergence")], "*", color="tab:red", markersize=16, label="shipped")
        for x, text in lines[quantity]:
            ax.axvline(x, color="tab:red", linestyle="--", label=text)
        ax.set_xlabel(label)
        ax.set_yscale("symlog", linthresh=1e-3)
    axes[1].set_xscale("log")  # the dense file is 4-5x the candidates: a linear axis crowds them together
    axes[1].xaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 3, 5)))
    axes[1].xaxis.set_major_formatter(ticker.StrMethodFormatter("{x:g}"))
    axes[1].xaxis.set_minor_formatter(ticker.NullFormatter())
    axes[0].set_ylabel("divergence from dense on held-out text (lower is better)")
    fig.suptitle(f"{record['model']} on {record['device']}: every candidate the search measured", fontsize=10)
    labelled = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(labelled.values(), labelled.keys(), fontsize=7, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.035 * math.ceil(len(labelled) / 4), 1, 1))  # the legend below both panels
    with atomic_output_file(path) as tmp:  # keeps the .png suffix matplotlib reads the format from
        fig.savefig(tmp)
    plt.close(fig)


def write_report(record: dict, out: Path) -> None:
    """report.json, report.md and pareto.png in `out`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(record, indent=2) + "\n")
    write_atomic(out / "report.md", summary_markdown(record))
    pareto_png(record, out / "pareto.png")

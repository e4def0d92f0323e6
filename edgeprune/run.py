"""The `edgeprune run` job: score once, search the sparsity that meets the budgets on a device,
recover, export, verify, profile, evaluate, report.

OUT layout: `scores.safetensors`, `search.jsonl` (resumable probe log), `pruned/` (a
load_pruned folder), `onnx/` (the deployable, torch-free folder), `report.json`,
`report.md`, `pareto.png`. Rerunning the same command in the same OUT continues: scores
and finished probes are reused, not recomputed.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from torch import nn

from edgeprune.budget import (
    SPARSITY_DECIMALS,
    Budget,
    Probe,
    ProbeLog,
    SearchResult,
    latency_target,
    search_sparsity,
    smallest_sparsity,
)
from edgeprune.calibration import load_text, sample_windows, tokenize_text
from edgeprune.checkpoint import save_pruned, versions
from edgeprune.compensate import cut_and_compensate
from edgeprune.criteria import GroupScores, ScoringInputs, score_groups
from edgeprune.devices.profiler import Profiler, ProfileResult, Workload, profiler_for
from edgeprune.devices.profiles import get_device
from edgeprune.errors import EdgepruneError
from edgeprune.evaluate import perplexity
from edgeprune.export.exporter import FP32_ATOL, INT8_FILE, check_fp32, export_model
from edgeprune.export.quantize import quantize_int8
from edgeprune.export.sliced import ffn_bias_names, ffn_initializer_names, slice_ffn, write_ffn
from edgeprune.export.verify import verify_onnx
from edgeprune.loading import LoadedModel, load_model
from edgeprune.models import FamilyAdapter, adapter_for, is_decoder
from edgeprune.report import write_report
from edgeprune.runtime import MODEL_FILE
from edgeprune.structure import LayerKeep, PruneSpec, count_parameters, cut_model, plan_widths, select_keep

HELDOUT_FRACTION = 0.2  # the tail of the calibration text, never sampled for scoring, measures perplexity


@dataclass
class RunConfig:
    """Everything that decides a run's result; two runs with equal configs share probes."""

    budgets: list[Budget]
    model: str | None = None
    device: str = "local"
    device_files: tuple[Path, ...] = ()
    criterion: str = "fluctuation"
    criterion_options: dict = field(default_factory=dict)
    targets: tuple[str, ...] = ("ffn",)  # FFN-only probes are sliced from the dense graph in seconds
    allocation: str = "uniform"
    protect_first: int = 1  # the first and last layers kept whole: at SmolLM2's 1.35x cut, held-out PPL 320 -> 172
    protect_last: int = 1
    round_to: int = 1
    quantize: str | None = None
    workload: Workload = field(default_factory=Workload)
    calibration: str | None = None
    calib_samples: int = 32
    calib_seq_len: int = 128
    eval_seq_len: int = 128
    eval_tokens: int = 8192
    max_sparsity: float = 0.8
    max_probes: int = 8
    timing_margin: float = 0.02  # probes must beat timed budgets by this fraction (measurement noise)
    runs: int = 10
    warmup: int = 2
    seed: int = 0
    recover: bool = False
    recover_options: dict = field(default_factory=dict)
    compensate: bool = True  # re-fit each cut output projection on the calibration windows (compensate.py)

    def spec(self, sparsity: float) -> PruneSpec:
        return PruneSpec(
            sparsity,
            targets=self.targets,
            protect_first=self.protect_first,
            protect_last=self.protect_last,
            round_to=self.round_to,
            allocation=self.allocation,
        )

    def settings(self, source_hash: str) -> dict:
        """What the probe log must agree on to be reused (not the probe cap nor the run count)."""
        record = asdict(self)
        for volatile in ("max_probes", "recover", "recover_options", "device_files"):
            record.pop(volatile)
        record["budgets"] = [asdict(b) for b in self.budgets]
        record["source_sha256"] = source_hash
        return record


@dataclass
class Calibration:
    """Token windows for scoring and a disjoint held-out stream for perplexity.

    `head` is the text before the held-out tail: scoring samples it, and so does the default
    recovery, so the reported perplexity stays held out.
    """

    windows: torch.Tensor
    heldout: torch.Tensor
    head: torch.Tensor


def split_calibration(tokenizer, cfg: RunConfig) -> Calibration:
    tokens = tokenize_text(tokenizer, load_text(cfg.calibration))
    cut = int(len(tokens) * (1 - HELDOUT_FRACTION))
    windows = sample_windows(tokens[:cut], cfg.calib_samples, cfg.calib_seq_len, cfg.seed)
    return Calibration(windows=windows, heldout=tokens[cut:][: cfg.eval_tokens], head=tokens[:cut])


def default_recovery_text(calib: Calibration, tokenizer, work: Path) -> Path:
    """The calibration text minus its held-out tail, as a file recovery can train on."""
    path = work / "recovery.txt"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tokenizer.decode(calib.head.tolist()), encoding="utf-8")
    tmp.replace(path)
    return path


def scoring_settings(cfg: RunConfig, source_hash: str) -> dict:
    """Everything the scores depend on: a rerun reuses them only if all of it is unchanged."""
    keys = ("criterion", "criterion_options", "calibration", "calib_samples", "calib_seq_len", "seed")
    return {**{k: getattr(cfg, k) for k in keys}, "source_sha256": source_hash}


def load_or_score(
    path: Path, model: nn.Module, adapter: FamilyAdapter, cfg: RunConfig, calib: Calibration, source_hash: str
) -> GroupScores:
    """Scores are computed once per model, criterion and calibration; a rerun reads them back."""
    settings = scoring_settings(cfg, source_hash)
    if path.is_file():
        scores = GroupScores.load(path)
        if scores.criterion == cfg.criterion and scores.settings == settings:
            scores.check_matches(model, adapter)
            return scores
    inputs = ScoringInputs(calibration=calib.windows, seed=cfg.seed, options=dict(cfg.criterion_options))
    scores = score_groups(cfg.criterion, model, adapter, inputs)
    scores.settings = settings
    scores.save(path)
    return scores


def matmul_params(model: nn.Module) -> int:
    """Weights every token multiplies through (all Linear layers, the LM head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def pruned_copy(
    model: nn.Module,
    adapter: FamilyAdapter,
    scores: GroupScores,
    spec: PruneSpec,
    calibration: torch.Tensor | None = None,
) -> tuple[nn.Module, list[LayerKeep] | None]:
    """A cut copy of the dense model and the keep-indices that made it (None at sparsity 0).

    With `calibration` windows the cut output projections are re-fit on them, layer by layer.
    """
    pruned = copy.deepcopy(model)
    if spec.sparsity == 0:
        return pruned, None
    keep = select_keep(model, adapter, scores, plan_widths(model, adapter, scores, spec))
    if calibration is None:
        cut_model(pruned, adapter, keep)
    else:
        cut_and_compensate(pruned, adapter, keep, calibration)
    return pruned, keep


def onnx_file(folder: Path, quantize: str | None) -> Path:
    return folder / (INT8_FILE if quantize == "int8" else MODEL_FILE)


def held_out_perplexity(model: nn.Module, calib: Calibration, cfg: RunConfig) -> float | None:
    if not is_decoder(model.config) or len(calib.heldout) < cfg.eval_seq_len:
        return None
    return perplexity(model, calib.heldout, seq_len=cfg.eval_seq_len)


def probe_from(
    sparsity: float,
    model: nn.Module,
    file: Path,
    result: ProfileResult,
    ppl: float | None,
    method: str,
    speedup: float | None = None,
) -> Probe:
    """A probe record; with a paired `speedup` (alternating against dense), that ratio is what budgets see."""
    return Probe(
        sparsity=sparsity,
        params=count_parameters(model),
        latency_ms=result.latency_ms.p50,
        speedup=speedup,
        onnx_mb=file.stat().st_size / 1e6,
        peak_mb=result.peak_rss_mb,
        extra={
            "perplexity": ppl,
            "latency_p90_ms": result.latency_ms.p90,
            "tokens_per_s": result.tokens_per_s or result.decode_tokens_per_s,
            "prefill_ms": result.prefill_ms.p50 if result.prefill_ms else None,
            "decode_ms_per_token": result.decode_ms_per_token.p50 if result.decode_ms_per_token else None,
            "method": method,
        },
    )


class ProbeRunner:
    """One probe: cut a copy of the dense model at s, export it, profile it, measure held-out perplexity.

    The dense model is exported once (`work/dense`, kept for the final alternating comparison).
    FFN-only probes are made by slicing that graph's initializers and verified against the
    cut PyTorch model; probes that cut heads are exported in full. Probe files are deleted
    once measured.
    """

    def __init__(self, loaded: LoadedModel, adapter, scores, cfg: RunConfig, calib, profiler: Profiler, work: Path):
        self.loaded, self.adapter, self.scores, self.cfg = loaded, adapter, scores, cfg
        self.calib, self.profiler, self.work = calib, profiler, work
        self.ffn_names: list[dict] | None = None
        self.ffn_bias_names: list[dict] | None = None

    def refit_windows(self) -> torch.Tensor | None:
        return self.calib.windows if self.cfg.compensate else None

    def export(self, model: nn.Module, folder: Path) -> Path:
        export_model(model, self.loaded.tokenizer, folder, quantize=self.cfg.quantize, overwrite=True)
        return onnx_file(folder, self.cfg.quantize)

    def dense_onnx(self) -> Path:
        folder = self.work / "dense"
        file = onnx_file(folder, self.cfg.quantize)
        return file if file.is_file() else self.export(self.loaded.model, folder)

    def sliced(self, model: nn.Module, keep: list[LayerKeep], folder: Path) -> Path:
        """The probe from the dense graph's sliced initializers, verified like a real export."""
        dense_fp32 = onnx_file(self.dense_onnx().parent, None)
        if self.ffn_names is None:
            graph = onnx.load(str(dense_fp32)).graph
            self.ffn_names = ffn_initializer_names(self.loaded.model, self.adapter, graph)
            self.ffn_bias_names = ffn_bias_names(self.ffn_names, graph)
        if self.cfg.compensate:  # re-fit weights differ from the dense ones: write them, not slices
            file = write_ffn(dense_fp32, folder / MODEL_FILE, self.ffn_names, self.ffn_bias_names, model, self.adapter)
        else:
            file = slice_ffn(dense_fp32, folder / MODEL_FILE, self.ffn_names, keep)
        check_fp32(verify_onnx(model, self.loaded.tokenizer, file), FP32_ATOL)
        return quantize_int8(file, folder / INT8_FILE) if self.cfg.quantize == "int8" else file

    def __call__(self, sparsity: float) -> Probe:
        spec = self.cfg.spec(sparsity)
        model, keep = pruned_copy(self.loaded.model, self.adapter, self.scores, spec, self.refit_windows())
        folder = self.work / f"s{sparsity:.3f}"
        if keep is None:
            file, method = self.dense_onnx(), "dense export"
        elif all(entry.heads is None for entry in keep):
            file, method = self.sliced(model, keep, folder), "sliced from dense"
        else:
            file, method = self.export(model, folder), "full export"
        ppl = held_out_perplexity(model, self.calib, self.cfg)
        if keep is None:
            return probe_from(sparsity, model, file, self.profiler.profile(file, self.cfg.workload), ppl, method)
        # alternate with the dense model so machine drift cancels out of the ratio
        comparison = self.profiler.compare(file, self.dense_onnx(), self.cfg.workload)
        probe = probe_from(sparsity, model, file, comparison.model, ppl, method, comparison.speedup)
        shutil.rmtree(folder, ignore_errors=True)
        return probe


def parameters_at(model: nn.Module, adapter: FamilyAdapter, scores: GroupScores, cfg: RunConfig) -> Callable:
    """Exact parameter count at any sparsity, from the width plan alone (no cut)."""
    total = count_parameters(model)
    layers = adapter.layers(model)
    dense_prunable = sum(adapter.prunable_params(layer) for layer in layers)

    def params(sparsity: float) -> int:
        if sparsity == 0:
            return total
        plan = plan_widths(model, adapter, scores, cfg.spec(sparsity))
        kept = sum(adapter.layer_params(layer, w) for layer, w in zip(layers, plan, strict=True))
        return total - dense_prunable + kept

    return params


def feasible_max_sparsity(model: nn.Module, adapter: FamilyAdapter, scores: GroupScores, cfg: RunConfig) -> float:
    """The largest sparsity up to --max-sparsity whose width plan leaves every layer non-empty."""

    def feasible(sparsity: float) -> bool:
        try:
            plan_widths(model, adapter, scores, cfg.spec(sparsity))
        except EdgepruneError:
            return False
        return True

    tol = 1e-3
    first_infeasible = smallest_sparsity(lambda s: not feasible(s), 0.0, cfg.max_sparsity, tol)
    if first_infeasible is None:
        return cfg.max_sparsity
    return round(first_infeasible - tol - 5e-4, SPARSITY_DECIMALS)


def ideal_latency_slope(model: nn.Module, adapter: FamilyAdapter, cfg: RunConfig) -> float:
    """Fraction of the matmul work that is prunable: latency saved per unit sparsity if time follows FLOPs."""
    layers = adapter.layers(model)
    pruned = cfg.spec(0.0).pruned_layers(len(layers))
    return sum(adapter.prunable_params(layers[i]) for i in pruned) / matmul_params(model)


def run_job(
    cfg: RunConfig, out: Path, profiler: Profiler | None = None, say: Callable[[str], None] = lambda message: None
) -> dict:
    """The whole job; returns the run record also written to OUT/report.json."""
    out = Path(out).expanduser().absolute()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    say("loading model")
    loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter_for(model.config)
    device = get_device(cfg.device, cfg.device_files)
    profiler = profiler or profiler_for(device, runs=cfg.runs, warmup=cfg.warmup)
    calib = split_calibration(tokenizer, cfg)
    say(f"scoring groups with {cfg.criterion}")
    scores = load_or_score(out / "scores.safetensors", model, adapter, cfg, calib, loaded.source_hash)
    log = ProbeLog(out / "search.jsonl", cfg.settings(loaded.source_hash))
    runner = ProbeRunner(loaded, adapter, scores, cfg, calib, profiler, work)
    say("searching the sparsity that meets the budget (each probe: cut, export, profile)")
    search = search_sparsity(
        runner,
        [budget.tightened(cfg.timing_margin) for budget in cfg.budgets],
        parameters_at(model, adapter, scores, cfg),
        log,
        max_sparsity=feasible_max_sparsity(model, adapter, scores, cfg),
        max_probes=cfg.max_probes,
        ideal_latency_slope=ideal_latency_slope(model, adapter, cfg),
    )
    return finish(cfg, out, loaded, adapter, scores, calib, runner, search, device.name, say)


def finish(cfg, out, loaded, adapter, scores, calib, runner: ProbeRunner, search: SearchResult, device, say) -> dict:
    """Cut at the chosen sparsity, recover, save, export, compare against dense, report."""
    best = search.best
    final, _ = pruned_copy(loaded.model, adapter, scores, cfg.spec(best.sparsity), runner.refit_windows())
    recovery = None
    if cfg.recover:
        from edgeprune.recover import recover_model

        say("recovering quality with LoRA")
        options = dict(cfg.recover_options)
        if options.get("data") is None:  # never the held-out tail the report's perplexity is measured on
            options["data"] = default_recovery_text(calib, loaded.tokenizer, out / "work")
            options.setdefault("val_size", 8)
        recovery = recover_model(final, loaded.tokenizer, **options)
    provenance = {
        "source": loaded.source,
        "source_sha256": loaded.source_hash,
        "criterion": cfg.criterion,
        "sparsity": best.sparsity,
        "recovery": recovery,
    }
    say("saving, exporting and verifying the final model")
    save_pruned(final, loaded.tokenizer, out / "pruned", provenance, overwrite=True)
    exported = export_model(final, loaded.tokenizer, out / "onnx", quantize=cfg.quantize, overwrite=True)
    say("profiling the final model against the dense one (alternating runs)")
    comparison = runner.profiler.compare(onnx_file(out / "onnx", cfg.quantize), runner.dense_onnx(), cfg.workload)
    final_ppl = held_out_perplexity(final, calib, cfg)
    final_probe = probe_from(
        best.sparsity, final, onnx_file(out / "onnx", cfg.quantize), comparison.model, final_ppl, "final export"
    )
    dense_probe = probe_from(
        0.0,
        loaded.model,
        runner.dense_onnx(),
        comparison.baseline,
        search.dense.extra.get("perplexity"),
        "dense export",
    )
    record = run_record(cfg, loaded, device, search, final_probe, dense_probe, comparison, exported, recovery)
    write_report(record, out)
    return record


def flat(probe: Probe) -> dict:
    """A probe as one flat dict of numbers, for tables."""
    return {k: v for k, v in asdict(probe).items() if k != "extra"} | probe.extra


def run_record(cfg, loaded, device, search, final, dense, comparison, exported, recovery) -> dict:
    final_row, dense_row = flat(final), flat(dense)
    budgets = []
    for budget in cfg.budgets:
        # the speedup that counts is the alternating one, measured in the same run as dense
        value = comparison.speedup if budget.kind == "speedup" else budget.value(final, dense)
        met = value >= budget.limit if budget.kind == "speedup" else value <= budget.limit
        budgets.append({**asdict(budget), "final_value": value, "met": met})
    return {
        "model": loaded.source,
        "device": device,
        "criterion": cfg.criterion,
        "config": cfg.settings(loaded.source_hash) | {"max_probes": cfg.max_probes, "recover": cfg.recover},
        "budgets": budgets,
        "latency_target_ms": latency_target(cfg.budgets, search.dense),
        "dense": dense_row,
        "final": final_row | {"speedup_alternating": comparison.speedup},
        "probes": [asdict(p) for p in search.probes],
        "probes_measured": search.measured,
        "export": exported.as_dict(),
        "profile": {"final": comparison.model.as_dict(), "dense": comparison.baseline.as_dict()},
        "recovery": recovery,
        "versions": versions(),
    }

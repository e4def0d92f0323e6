"""The `edgeprune run` job: score once, search the best-quality candidate (precision x sparsity)
that meets the budgets on a device, recover, export, verify, profile, evaluate, report.

OUT layout: `scores.safetensors`, `search.jsonl` (resumable probe log), `pruned/` (a
load_pruned folder, when the chosen model is pruned), `onnx/` (the deployable, torch-free
folder: one model.onnx at the chosen precision), `report.json`, `report.md`, `pareto.png`.
Rerunning the same command in the same OUT continues: scores and finished probes are reused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from edgeprune.budget import (
    AUTO_PRECISIONS,
    PRECISIONS,
    SPARSITY_DECIMALS,
    Budget,
    Probe,
    ProbeLog,
    SearchResult,
    SizeModel,
    latency_target,
    refuse_timed_budgets_on_emulation,
    search_candidates,
    size_target,
    smallest_sparsity,
)
from edgeprune.calibration import (
    REFIT_WINDOWS,
    CalibrationSettings,
    CalibrationText,
    disjoint_windows,
    read_calibration,
)
from edgeprune.checkpoint import save_pruned, versions
from edgeprune.criteria import GroupScores, score_groups, scoring_inputs
from edgeprune.criteria.base import parse_options
from edgeprune.devices.profiler import Profiler, Workload, profiler_for
from edgeprune.devices.profiles import get_device
from edgeprune.devices.target import quality_on_target
from edgeprune.errors import EdgepruneError
from edgeprune.export.activation_scaling import scaling_applies
from edgeprune.export.exporter import export_model
from edgeprune.export.fused import FfnBytes, cut_file_megabytes
from edgeprune.export.quantize import BLOCK_SIZE
from edgeprune.loading import LoadedModel, load_model, require_tokenizer
from edgeprune.models import CAUSAL_LM, FamilyAdapter, adapter_for, model_kind
from edgeprune.outputs import check_run_output, claim_run_output, local_inputs
from edgeprune.precisions import FITTED_PRECISIONS
from edgeprune.probes import ProbeRunner, measure_quality, probe_from
from edgeprune.recover.config import RecoveryConfig
from edgeprune.report import write_report
from edgeprune.runtime import MODEL_FILE
from edgeprune.structure import PruneSpec, count_parameters, plan_widths

DEFAULT_SPEEDUP = 1.3
DEFAULT_FILE_MB = 120.0


GRAPHS = ("auto", "fused", "optimum")


def default_budgets(model: str | None = None) -> list[Budget]:
    """The budget of a run given none. On the default decoder a file of at most 120 MB: ONNX Runtime's own
    recipes miss it or land far from dense (int4 fits at +17% perplexity, int4-mixed is 124 MB), the search
    weighs int4-fit (8 bits where the Fisher-weighted rounding loss per byte is highest) against cuts on the
    precisions closer to dense, and, being a size, it gives the same answer on every machine. On any other
    model a 1.3x speedup."""
    if model is None:
        return [Budget("memory_mb", DEFAULT_FILE_MB)]
    return [Budget("speedup", DEFAULT_SPEEDUP)]


def run_recovery() -> RecoveryConfig:
    """The run's recovery: 3 minutes of LoRA distillation on 128-token windows, 8 held out.

    Three, not more, so the default job stays within 10 minutes on 2 cores: at its cut (about 7% of the
    FFN neurons, re-fit) 5 minutes moved the shipped file's held-out perplexity by 1.5% (43.36 -> 42.70);
    deeper cuts gain more from longer recovery (--recover-minutes).

    LoRA beat full-parameter distillation per minute on LLM-Pruner's 20% cut (PPL 163 -> 113 in
    5.2 minutes vs -> 118 in 7.6; benchmarks/RESULTS.md, bench_distill.py).
    """
    return RecoveryConfig(method="lora", lr=1e-3, minutes=3.0, steps=None, seq_len=128, val_size=8, eval_every=5)


@dataclass
class RunConfig:
    """Everything that decides a run's result; two runs with equal configs share probes."""

    budgets: list[Budget] | None = None  # None: `default_budgets` for the model
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
    precision: str = "auto"  # auto: fp32, weight-only int8 and int4 are all candidates; else only this one
    graph: str = "auto"  # auto: onnxruntime-genai's fused graph where the family allows it, else Optimum's
    block_size: int = BLOCK_SIZE  # weight-only quantization block (inputs per scale)
    workload: Workload = field(default_factory=Workload)
    calibration: str | None = None
    calib_samples: int | None = None  # None: the criterion's own count for scoring
    refit_samples: int = REFIT_WINDOWS  # at most this many non-overlapping windows of the head for the re-fit
    calib_seq_len: int = CalibrationSettings.seq_len
    eval_seq_len: int = 128
    eval_tokens: int = 8192
    max_sparsity: float = 0.8
    max_probes: int = 8
    timing_margin: float = 0.02  # probes must beat timed budgets by this fraction (measurement noise)
    runs: int = 10
    warmup: int = 2
    seed: int = 0
    recover: bool = True  # a pruned final model is distilled from the dense one (decoders)
    recover_data: str | None = None  # None: text the dense model writes (`recover.selftext.default_data`)
    recovery: RecoveryConfig = field(default_factory=run_recovery)
    compensate: bool = True  # re-fit each cut output projection on the calibration windows (compensate.py)
    refit_target: str = "auto"  # compensate.REFIT_TARGETS: the packaged text's windows are too few for the stream
    # 4-bit candidates rounded after AWQ-style per-channel scales are folded in where the family allows
    # (export/activation_scaling.py): the same bytes closer to dense (int4-fit at 120 MB: KL 0.067 -> 0.047)
    activation_scaling: bool = True
    tokenizer: str | None = None  # --tokenizer, for a model saved without one
    timeout: float | None = None  # seconds per profiling call (None: derived from the workload)

    def __post_init__(self) -> None:
        if self.budgets is None:
            self.budgets = default_budgets(self.model)
        parse_options(self.criterion, self.criterion_options)  # an unknown criterion or option: refused before work
        if self.graph not in GRAPHS:
            raise EdgepruneError(f"unknown graph '{self.graph}': choose from {', '.join(GRAPHS)}")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise EdgepruneError(f"unknown precision '{self.precision}': choose auto or one of {', '.join(PRECISIONS)}")
        if self.precision in FITTED_PRECISIONS and size_target(self.budgets) is None:
            raise EdgepruneError(f"--precision {self.precision} fills a file-size budget: give --memory-mb")

    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions the search may ship (those made for a file budget only under one)."""
        if self.precision != "auto":
            return (self.precision,)
        sized = size_target(self.budgets) is not None
        return tuple(p for p in AUTO_PRECISIONS if sized or p not in FITTED_PRECISIONS)

    @property
    def calibration_settings(self) -> CalibrationSettings:
        return CalibrationSettings(self.calibration, self.calib_samples, self.calib_seq_len, self.seed)

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
        for volatile in ("max_probes", "recover", "recover_data", "recovery", "device_files", "timeout"):
            record.pop(volatile)
        for added, unset in (("tokenizer", None), ("activation_scaling", False)):
            if record[added] == unset:  # logs written before the option existed stay resumable
                record.pop(added)
        record["budgets"] = [asdict(b) for b in self.budgets]
        record["source_sha256"] = source_hash
        return record


@dataclass
class Calibration(CalibrationText):
    """The calibration text (its held-out tail cut to `eval_tokens`), the scoring windows and the re-fit's.

    `head` is the text before the held-out tail: scoring samples it, the re-fit reads it in
    non-overlapping windows, and so does the default recovery, so the reported perplexity stays held out.
    """

    windows: torch.Tensor
    refit: torch.Tensor


def run_calibration(tokenizer, cfg: RunConfig) -> Calibration:
    """The run's text: scoring windows and re-fit windows from the head, quality measured on the held-out tail."""
    text = read_calibration(tokenizer, cfg.calibration)
    windows = text.sample(cfg.calibration_settings)
    refit = disjoint_windows(text.head, cfg.calib_seq_len, cfg.refit_samples)
    return Calibration(head=text.head, heldout=text.heldout[: cfg.eval_tokens], windows=windows, refit=refit)


def scoring_settings(cfg: RunConfig, source_hash: str) -> dict:
    """Everything the scores depend on: a rerun reuses them only if all of it is unchanged."""
    keys = ("criterion", "criterion_options", "calibration", "calib_samples", "calib_seq_len", "seed")
    return {**{k: getattr(cfg, k) for k in keys}, "source_sha256": source_hash}


def load_or_score(
    path: Path, loaded: LoadedModel, adapter: FamilyAdapter, cfg: RunConfig, calib: Calibration
) -> GroupScores:
    """Scores are computed once per model, criterion and calibration; a rerun reads them back."""
    settings = scoring_settings(cfg, loaded.source_hash)
    if path.is_file():
        scores = GroupScores.load(path)
        if scores.criterion == cfg.criterion and scores.settings == settings:
            scores.check_matches(loaded.model, adapter)
            return scores
    inputs = scoring_inputs(cfg.criterion, loaded, cfg.calibration_settings, cfg.criterion_options, calib)
    scores = score_groups(cfg.criterion, loaded.model, adapter, inputs)
    scores.settings = settings
    scores.save(path)
    return scores


def matmul_params(model: nn.Module) -> int:
    """Weights every token multiplies through (all Linear layers, the LM head included)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


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


def file_size_at(model: nn.Module, adapter: FamilyAdapter, scores: GroupScores, cfg: RunConfig) -> SizeModel:
    """A cut file's MB predicted from its precision's unpruned probe and the width plan (FFN-only cuts of a
    graph whose unpruned probe recorded its per-layer FFN bytes; None otherwise)."""

    def size(start: Probe, sparsity: float) -> float | None:
        recorded = start.extra.get("ffn_bytes")
        if not recorded or start.onnx_mb is None or "heads" in cfg.targets:
            return None
        plan = plan_widths(model, adapter, scores, cfg.spec(sparsity))
        return cut_file_megabytes(start.onnx_mb, [FfnBytes(**layer) for layer in recorded], [w.ffn for w in plan])

    return size


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
    cfg: RunConfig,
    out: Path,
    profiler: Profiler | None = None,
    say: Callable[[str], None] = lambda message: None,
    overwrite: bool = False,
) -> RunResult:
    """The whole job; returns the run's result, also written to OUT/report.json.

    OUT is resumed when it is a run folder; `overwrite` replaces it with a fresh one, but only
    once the inputs have loaded, so a failing start never costs the previous results.
    """
    inputs = local_inputs(cfg.model, cfg.calibration, cfg.recover_data, *cfg.device_files)
    out = check_run_output(out, overwrite, inputs)
    device = get_device(cfg.device, cfg.device_files)
    refuse_timed_budgets_on_emulation(cfg.budgets, device.name, device.emulated)
    say("loading model")
    loaded = load_model(cfg.model, cfg.tokenizer)
    model, tokenizer = loaded.model, require_tokenizer(loaded.tokenizer, loaded.source, "the run's calibration")
    adapter = adapter_for(model.config)
    # probes open their files as they are, unless a --peak-mb budget must be measured as the answer will run:
    # then with pre-packed copies, each in a process with only the dense model, as in the final check
    measuring_peak = any(budget.kind == "peak_mb" for budget in cfg.budgets)
    probes = profiler or profiler_for(
        device, cfg.runs, cfg.warmup, cfg.timeout, prepacked=measuring_peak, paired=measuring_peak
    )
    final = profiler or profiler_for(device, cfg.runs, cfg.warmup, cfg.timeout)
    calib = run_calibration(tokenizer, cfg)
    claim_run_output(out, overwrite, (*inputs, loaded.folder))
    work = out / "work"
    work.mkdir(exist_ok=True)
    log = ProbeLog(out / "search.jsonl", cfg.settings(loaded.source_hash))  # other settings: refused before scoring
    say(f"scoring groups with {cfg.criterion}")
    scores = load_or_score(out / "scores.safetensors", loaded, adapter, cfg, calib)
    runner = ProbeRunner(loaded, adapter, scores, cfg, calib, probes, work, logged=log.probes)
    say(f"searching the best model that meets the budget ({', '.join(cfg.precisions)}; quantization first)")
    search = search_candidates(
        runner,
        [budget.tightened(cfg.timing_margin) for budget in cfg.budgets],
        parameters_at(model, adapter, scores, cfg),
        log,
        precisions=cfg.precisions,
        max_sparsity=feasible_max_sparsity(model, adapter, scores, cfg),
        max_probes=cfg.max_probes,
        ideal_latency_slope=ideal_latency_slope(model, adapter, cfg),
        size_at=file_size_at(model, adapter, scores, cfg),
    )
    say(search.reason)
    return finish(FinishInputs(cfg, out, loaded, adapter, scores, calib, runner, final, device.name), search, say)


@dataclass
class FinishInputs:
    """What the last step needs from the search's set-up."""

    cfg: RunConfig
    out: Path
    loaded: LoadedModel
    adapter: FamilyAdapter
    scores: GroupScores
    calib: Calibration
    runner: ProbeRunner
    profiler: Profiler  # the final check's: sessions opened as the shipped model will be
    device: str


@dataclass
class BudgetCheck:
    """One budget against the shipped model, measured alternating with dense in the final comparison."""

    kind: str
    limit: float
    final_value: float
    met: bool


@dataclass
class RunResult:
    """Everything a run decided and measured; report.py and the CLI read it (report.json is its as_dict)."""

    model: str
    device: str
    criterion: str
    config: dict
    budgets: list[BudgetCheck]
    latency_target_ms: float | None
    dense: dict
    final: dict
    candidates: list[dict]
    probes: list[dict]
    probes_measured: int
    reason: str
    export: dict
    profile: dict
    recovery: dict | None
    versions: dict
    target_quality: dict | None = None  # an ARM device's own held-out measurement of a quantized model (target.py)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def met(self) -> bool:
        return all(b.met for b in self.budgets)


def finish(inputs: FinishInputs, search: SearchResult, say: Callable[[str], None]) -> RunResult:
    """Cut at the chosen sparsity, recover, save, export at the chosen precision, compare against dense, report."""
    cfg, loaded, best = inputs.cfg, inputs.loaded, search.best
    final = inputs.runner.take_cut(best.sparsity)
    recovery = None
    if cfg.recover and best.sparsity > 0 and model_kind(final) == CAUSAL_LM:
        from edgeprune.recover import recover_model

        say(f"recovering quality by distillation from the dense model ({cfg.recovery.minutes:g} minutes)")
        recovery = recover_model(
            final,
            loaded.tokenizer,
            cfg.recovery,
            work=inputs.out / "work",
            prompt_text=loaded.tokenizer.decode(inputs.calib.head.tolist()),  # never the held-out tail
            data=cfg.recover_data,
            teacher=loaded.model,
            teacher_id=loaded.source,
            teacher_hash=loaded.source_hash,
            heldout=inputs.calib.heldout,
            eval_seq_len=cfg.eval_seq_len,
        ).record.as_dict()
        inputs.runner.scales.pop(best.sparsity, None)  # trained weights: the probe's scales no longer fit them
    if best.sparsity > 0:  # an unpruned candidate's PyTorch model is the input itself
        provenance = {
            "source": loaded.source,
            "source_sha256": loaded.source_hash,
            "criterion": cfg.criterion,
            "sparsity": best.sparsity,
            "recovery": recovery,
        }
        say("saving the pruned model")
        save_pruned(final, loaded.tokenizer, inputs.out / "pruned", provenance, overwrite=True)
    say(f"exporting and verifying the final model ({best.precision})")
    shipped = inputs.out / "onnx"
    exported = export_model(
        shipped_weights(final, best, inputs),
        loaded.tokenizer,
        shipped,
        quantize=best.precision,
        block_size=cfg.block_size,
        overwrite=True,
        fused=inputs.runner.fused,
        eight_bit=tuple(best.extra["eight_bit"]) if best.precision in FITTED_PRECISIONS else None,
    )
    say("profiling the final model against the dense one (alternating runs)")
    dense_file = inputs.runner.dense_onnx()
    comparison = inputs.profiler.compare(shipped / MODEL_FILE, dense_file, cfg.workload)
    quality = measure_quality(shipped / MODEL_FILE, loaded.model, inputs.calib, cfg)
    on_target = quality_on_target(
        inputs.profiler, best.precision, shipped / MODEL_FILE, dense_file, inputs.calib.heldout, quality, say
    )
    final_probe = probe_from(
        best.precision,
        best.sparsity,
        final,
        shipped / MODEL_FILE,
        comparison.model,
        quality,
        "final export",
        comparison.speedup,
    )
    baseline = comparison.baseline.latency_ms
    dense_probe = replace(
        search.dense, latency_ms=baseline.p50, extra={**search.dense.extra, "latency_p90_ms": baseline.p90}
    )
    result = RunResult(
        model=loaded.source,
        device=inputs.device,
        criterion=cfg.criterion,
        config=cfg.settings(loaded.source_hash) | {"max_probes": cfg.max_probes, "recover": cfg.recover},
        budgets=[check_budget(b, final_probe, dense_probe) for b in cfg.budgets],
        latency_target_ms=latency_target(cfg.budgets, dense_probe),
        dense=flat(dense_probe),
        final=flat(final_probe) | {"speedup_alternating": comparison.speedup},
        candidates=[flat(p) for p in search.candidates],
        probes=[asdict(p) for p in search.probes],
        probes_measured=search.measured,
        reason=search.reason,
        export=exported.as_dict(),
        profile={"final": comparison.model.as_dict(), "dense": comparison.baseline.as_dict()},
        recovery=recovery,
        versions=versions(),
        target_quality=on_target,
    )
    write_report(result.as_dict(), inputs.out)
    return result


def shipped_weights(final: nn.Module, best: Probe, inputs: FinishInputs) -> nn.Module:
    """The final model as its file is built from: with --activation-scaling and a 4-bit precision, a copy with the
    scales folded in (the winning probe's own when the weights were not trained since; the same function in
    float, so verified against it)."""
    if not (inputs.cfg.activation_scaling and scaling_applies(final, inputs.adapter, best.precision)):
        return final
    return inputs.runner.scaled(final, best.sparsity)


def check_budget(budget: Budget, final: Probe, dense: Probe) -> BudgetCheck:
    """The user's budget (not the search's tightened one) on the final alternating measurement."""
    return BudgetCheck(budget.kind, budget.limit, budget.value(final, dense), budget.met(final, dense))


def flat(probe: Probe) -> dict:
    """A probe as one flat dict of numbers, for tables."""
    extra = {k: v for k, v in probe.extra.items() if k not in ("ffn_bytes", "eight_bit")}  # lists, not numbers
    if "eight_bit" in probe.extra:
        extra["eight_bit_matmuls"] = len(probe.extra["eight_bit"])
    return {k: v for k, v in asdict(probe).items() if k != "extra"} | extra

"""One probe of the budget search: cut a copy of the dense model, export it (or write its weights into the dense
graph), quantize it at each precision asked for, profile it against dense, and measure its quality on held-out
text through ONNX Runtime on the very file. `run.py` drives the search and the final model; this is what each of
its candidates costs.
"""

from __future__ import annotations

import copy
import shutil
from collections import OrderedDict
from collections.abc import Container
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from torch import nn

from edgeprune.budget import Probe, size_target
from edgeprune.compensate import CompensateOptions, cut_and_compensate
from edgeprune.criteria import GroupScores
from edgeprune.devices.profiler import Profiler, ProfileResult
from edgeprune.errors import EdgepruneError
from edgeprune.evaluate.divergence import Divergence, heldout_divergence
from edgeprune.export.activation_scaling import GroupScale, choose_scales, scaling_applies, with_scales
from edgeprune.export.bit_allocation import (
    FIT_FILL,
    FIT_WINDOWS,
    Sensitivity,
    choose_eight_bit,
    graph_projections,
    projection_sensitivity,
)
from edgeprune.export.exporter import FP32_ATOL, TOLERANCES, check_fp32, check_quantized, export_model
from edgeprune.export.fused import check_fusable, ffn_bytes, write_fused_probe
from edgeprune.export.quantize import MIXED_EIGHT_BIT_BLOCK, quantize_model
from edgeprune.export.sliced import ffn_bias_names, ffn_initializer_names, slice_ffn, write_ffn
from edgeprune.export.verify import verify_onnx
from edgeprune.loading import LoadedModel
from edgeprune.models import FamilyAdapter
from edgeprune.precisions import FITTED_PRECISIONS
from edgeprune.runtime import MODEL_FILE, onnx_bytes
from edgeprune.structure import LayerKeep, PruneSpec, count_parameters, cut_model, plan_widths, select_keep

if TYPE_CHECKING:
    from edgeprune.run import Calibration, RunConfig

KEPT_CUTS = 3  # cut models the probe runner keeps in memory (540 MB each for the default decoder)


def pruned_copy(
    model: nn.Module,
    adapter: FamilyAdapter,
    scores: GroupScores,
    spec: PruneSpec,
    calibration: torch.Tensor | None = None,
    refit_target: str = "auto",
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
        cut_and_compensate(pruned, adapter, keep, calibration, CompensateOptions(target=refit_target))
    return pruned, keep


def measure_quality(file: Path, dense: nn.Module, calib: Calibration, cfg: RunConfig) -> Divergence | None:
    """Divergence from the dense model on the held-out tail, through ORT on this exact file (None: too little text)."""
    seq_len = min(cfg.eval_seq_len, getattr(dense.config, "max_position_embeddings", cfg.eval_seq_len))
    if len(calib.heldout) < seq_len:
        return None
    return heldout_divergence(file, dense, calib.heldout, seq_len=seq_len)


def probe_from(
    precision: str,
    sparsity: float,
    model: nn.Module,
    file: Path,
    result: ProfileResult,
    quality: Divergence | None,
    method: str,
    speedup: float | None = None,
) -> Probe:
    """A probe record; with a paired `speedup` (alternating against dense), that ratio is what budgets see."""
    return Probe(
        sparsity=sparsity,
        params=count_parameters(model),
        precision=precision,
        latency_ms=result.latency_ms.p50,
        speedup=speedup,
        onnx_mb=onnx_bytes(file) / 1e6,
        peak_mb=result.peak_rss_mb,
        divergence=quality.mean if quality else None,
        extra={
            "divergence_stderr": quality.stderr if quality else None,
            "divergence_measure": quality.measure if quality else None,
            "perplexity": quality.perplexity if quality else None,
            "top1_agreement": quality.top1_agreement if quality else None,
            "heldout_tokens": quality.tokens if quality else 0,
            "latency_p90_ms": result.latency_ms.p90,
            "tokens_per_s": result.tokens_per_s or result.decode_tokens_per_s,
            "prefill_ms": result.prefill_ms.p50 if result.prefill_ms else None,
            "decode_ms_per_token": result.decode_ms_per_token.p50 if result.decode_ms_per_token else None,
            "method": method,
        },
    )


class ProbeRunner:
    """One probe: cut a copy of the dense model at s, export it, quantize it, profile it, measure its quality.

    The dense model is exported once (`work/dense`, kept for the final alternating comparison).
    FFN-only probes are made by slicing that graph's initializers and verified against the
    cut PyTorch model; probes that cut heads are exported in full. Quantized probes are the
    fp32 probe through the shipping quantizer (seconds). Probe files are deleted once measured.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        adapter,
        scores,
        cfg: RunConfig,
        calib,
        profiler: Profiler,
        work: Path,
        logged: Container[tuple[str, float]] = (),
    ):
        """`logged`: (precision, sparsity) probes a resumed search replays, never measured again."""
        self.loaded, self.adapter, self.scores, self.cfg = loaded, adapter, scores, cfg
        self.calib, self.profiler, self.work, self.logged = calib, profiler, work, logged
        self.cuts: OrderedDict[float, tuple[nn.Module, list[LayerKeep] | None]] = OrderedDict()
        self.unpruned: dict[str, Probe] = {}  # quantization-only probes measured together, not yet asked for
        self.ffn_names: list[dict] | None = None
        self.ffn_bias_names: list[dict] | None = None
        self.fused = uses_fused_graph(loaded.model, cfg.graph)
        # int4-fit's, measured once on dense; also for scaled files (a list chosen on the scaled model's own was
        # as good: benchmarks/RESULTS.md, "Activation-aware scaling")
        self.sensitivity: dict[tuple[int, str], Sensitivity] | None = None
        self.scales: dict[float, list[GroupScale]] = {}  # activation-aware scales chosen per cut, by sparsity

    def projection_sensitivity(self) -> dict[tuple[int, str], Sensitivity]:
        if self.sensitivity is None:
            windows = self.calib.refit[:FIT_WINDOWS]
            self.sensitivity = projection_sensitivity(self.loaded.model, windows, self.cfg.block_size)
        return self.sensitivity

    def refit_windows(self) -> torch.Tensor | None:
        return self.calib.refit if self.cfg.compensate else None

    def cut(self, sparsity: float) -> tuple[nn.Module, list[LayerKeep] | None]:
        """The cut (and re-fit) copy at `sparsity`, for reading only (at 0 the dense model itself); the last
        few are kept, as re-fitting costs most of a probe (51 of 79 s on the default decoder) and the winner
        is usually among the last probes."""
        if sparsity == 0:
            return self.loaded.model, None
        if sparsity not in self.cuts:
            spec = self.cfg.spec(sparsity)
            self.cuts[sparsity] = pruned_copy(
                self.loaded.model, self.adapter, self.scores, spec, self.refit_windows(), self.cfg.refit_target
            )
            while len(self.cuts) > KEPT_CUTS:
                self.cuts.popitem(last=False)
        self.cuts.move_to_end(sparsity)
        return self.cuts[sparsity]

    def take_cut(self, sparsity: float) -> nn.Module:
        """The cut model at `sparsity` to change in place (recovery): no longer kept for probes."""
        if sparsity == 0:
            return copy.deepcopy(self.loaded.model)
        model, _ = self.cut(sparsity)
        del self.cuts[sparsity]
        return model

    def export(self, model: nn.Module, folder: Path) -> Path:
        export_model(model, self.loaded.tokenizer, folder, overwrite=True, fused=self.fused)
        return folder / MODEL_FILE

    def dense_onnx(self) -> Path:
        file = self.work / "dense" / MODEL_FILE
        return file if file.is_file() else self.export(self.loaded.model, file.parent)

    def sliced(self, model: nn.Module, keep: list[LayerKeep], folder: Path) -> Path:
        """The probe from the dense graph's sliced initializers, verified like a real export."""
        dense = self.dense_onnx()
        if self.ffn_names is None:
            graph = onnx.load(str(dense)).graph
            self.ffn_names = ffn_initializer_names(self.loaded.model, self.adapter, graph)
            self.ffn_bias_names = ffn_bias_names(self.ffn_names, graph)
        if self.cfg.compensate:  # re-fit weights differ from the dense ones: write them, not slices
            file = write_ffn(dense, folder / MODEL_FILE, self.ffn_names, self.ffn_bias_names, model, self.adapter)
        else:
            file = slice_ffn(dense, folder / MODEL_FILE, self.ffn_names, keep)
        check_fp32(verify_onnx(model, self.loaded.tokenizer, file), FP32_ATOL)
        return file

    def fused_probe(self, model: nn.Module, folder: Path) -> Path:
        """The cut model's weights and head counts written into the dense fused graph, verified like an export."""
        file = write_fused_probe(self.dense_onnx(), folder / MODEL_FILE, model)
        check_fp32(verify_onnx(model, self.loaded.tokenizer, file), FP32_ATOL)
        return file

    def fp32_probe(self, model: nn.Module, keep: list[LayerKeep] | None, folder: Path) -> tuple[Path, str]:
        if keep is None:
            return self.dense_onnx(), "dense export" + (" (fused)" if self.fused else "")
        if self.fused:
            return self.fused_probe(model, folder), "fused, from dense"
        if all(entry.heads is None for entry in keep):
            return self.sliced(model, keep, folder), "sliced from dense"
        return self.export(model, folder), "full export"

    def __call__(self, precision: str, sparsity: float) -> Probe:
        if sparsity > 0:
            return self.measure([precision], sparsity)[precision]
        if precision == "fp32":
            return self.dense_probe()
        if precision not in self.unpruned:
            together = [p for p in self.cfg.precisions if p != "fp32" and (p, 0.0) not in self.logged]
            self.unpruned = self.measure(together if precision in together else [precision], 0.0)
        return self.unpruned.pop(precision)

    def dense_probe(self) -> Probe:
        """The reference: the dense fp32 file, profiled alone."""
        model = self.loaded.model
        file, method = self.fp32_probe(model, None, self.work)
        quality = measure_quality(file, model, self.calib, self.cfg)
        return probe_from("fp32", 0.0, model, file, self.profiler.profile(file, self.cfg.workload), quality, method)

    def measure(self, precisions: list[str], sparsity: float) -> dict[str, Probe]:
        """Probes of these precisions at one sparsity, timed together: one alternating run of their files and
        the dense one, so each round pays for dense once (the quantization-only candidates: 6 runs, not 10)."""
        model, keep = self.cut(sparsity)
        folder = self.work / f"s{sparsity:.3f}"
        try:
            fp32, method = self.fp32_probe(model, keep, folder)
            made = {p: self.quantized(model, sparsity, fp32, method, p, folder) for p in precisions}
            # alternate with the dense model so machine drift cancels out of the ratios
            files = [q.file for q in made.values()]
            comparisons = self.profiler.compare_all(files, self.dense_onnx(), self.cfg.workload)
            widths = [self.adapter.widths(layer).ffn for layer in self.adapter.layers(model)]
            probes = {}
            for (precision, q), comparison in zip(made.items(), comparisons, strict=True):
                quality = measure_quality(q.file, self.loaded.model, self.calib, self.cfg)
                measured = comparison.model
                probe = probe_from(precision, sparsity, model, q.file, measured, quality, q.method, comparison.speedup)
                probe = replace(probe, refused=q.refused)
                if sparsity == 0 and self.fused:  # what each layer's FFN takes at this precision: cut sizes follow
                    probe.extra["ffn_bytes"] = [asdict(layer) for layer in ffn_bytes(q.file, widths)]
                if q.eight_bit is not None:  # what the final export must keep at 8 bits
                    probe.extra["eight_bit"] = list(q.eight_bit)
                probes[precision] = probe
            return probes
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def quantized(
        self, model: nn.Module, sparsity: float, fp32: Path, method: str, precision: str, folder: Path
    ) -> Quantized:
        """The fp32 probe at `precision` (with --activation-scaling, a 4-bit one from the scaled export), and why
        the final export would refuse it."""
        if precision == "fp32":
            return Quantized(fp32, method)
        folder.mkdir(parents=True, exist_ok=True)
        if self.cfg.activation_scaling and scaling_applies(model, self.adapter, precision):
            fp32, method = self.scaled_fp32(model, sparsity, folder), f"{method} + activation scaling"
        block = self.cfg.block_size
        eight_bit = self.fitted_eight_bit(fp32, folder) if precision in FITTED_PRECISIONS else None
        file = quantize_model(fp32, folder / f"model.{precision}.onnx", precision, block, eight_bit)
        refused = quantization_refusal(model, self.loaded.tokenizer, file, precision)
        return Quantized(file, f"{method} + {precision}", refused, eight_bit)

    def scaled_fp32(self, model: nn.Module, sparsity: float, folder: Path) -> Path:
        """The probe's model with activation-aware scales folded in, exported in full (its norms change too, which
        a probe written into the dense graph keeps); once per probe folder, for all its 4-bit precisions."""
        file = folder / "scaled" / MODEL_FILE
        if not file.is_file():
            self.export(self.scaled(model, sparsity), file.parent)
        return file

    def scaled(self, model: nn.Module, sparsity: float) -> nn.Module:
        """A copy of the cut at `sparsity` with activation-aware scales folded in, chosen once per cut (about a
        minute on the default decoder): the final export of an untrained cut folds the probe's own."""
        if sparsity not in self.scales:
            self.scales[sparsity] = choose_scales(model, self.adapter, self.calib.windows, self.cfg.block_size)
        return with_scales(model, self.adapter, self.scales[sparsity])

    def fitted_eight_bit(self, fp32: Path, folder: Path) -> tuple[str, ...]:
        """int4-fit's 8-bit MatMuls for this file: most loss saved per byte until the size budget is full."""
        all_four = quantize_model(fp32, folder / "model.int4-base.onnx", "int4-fit", self.cfg.block_size, ())
        room = int(size_target(self.cfg.budgets) * 1e6 * FIT_FILL) - onnx_bytes(all_four)  # deleted with the folder
        graph = onnx.load(str(fp32), load_external_data=False).graph
        sensitivity = self.projection_sensitivity()
        projections = graph_projections(graph, sensitivity, self.cfg.block_size, MIXED_EIGHT_BIT_BLOCK)
        return tuple(choose_eight_bit(projections, room))


@dataclass(frozen=True)
class Quantized:
    """A probe's file at one precision: how it was made, why the export would refuse it ("": it passes), and
    int4-fit's 8-bit MatMuls (None for the other precisions)."""

    file: Path
    method: str
    refused: str = ""
    eight_bit: tuple[str, ...] | None = None


def quantization_refusal(model: nn.Module, tokenizer, file: Path, precision: str) -> str:
    """Why the final export would refuse this quantized probe (checked as it will be), or "" when it passes."""
    try:
        check_quantized(verify_onnx(model, tokenizer, file), precision, TOLERANCES[precision])
    except EdgepruneError as err:
        return str(err).split(":")[0]
    return ""


def uses_fused_graph(model: nn.Module, graph: str) -> bool:
    """Whether the run ships onnxruntime-genai's fused graph: asked for, or (auto) the family allows it."""
    if graph == "optimum":
        return False
    if graph == "fused":
        check_fusable(model)
        return True
    try:
        check_fusable(model)
    except EdgepruneError:
        return False
    return True

"""Export an in-memory (possibly non-uniform) model to an ONNX folder that runs without torch.

Optimum's `onnx_export_from_model` traces the model object itself; reloading a pruned
folder through `main_export` would fail, because `from_pretrained` rejects per-layer
widths. Every export is verified against PyTorch before the folder appears.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from optimum.exporters.onnx import onnx_export_from_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgeprune.checkpoint import PROVENANCE, atomic_output_dir, versions
from edgeprune.errors import EdgepruneError
from edgeprune.export.graph import add_logits_to_keep
from edgeprune.export.quantize import optimize_graph, quantize_int8
from edgeprune.export.verify import VERIFY_TEXT, Verification, verify_onnx
from edgeprune.models import is_decoder
from edgeprune.runtime import MODEL_FILE
from edgeprune.structure import WIDTHS_KEY

TASKS = ("auto", "text-generation-with-past", "feature-extraction", "text-classification", "fill-mask")
INT8_FILE = "model_int8.onnx"
FP32_ATOL = 1e-4  # relative to the largest |logit|: fp32 reorderings grow with the logit scale
INT8_MIN_TOP1 = 0.5  # int8 flips near-ties; below half the positions it is a different model


@dataclass
class ExportResult:
    """What an export wrote and how well each file matches PyTorch."""

    path: Path
    task: str
    export_seconds: float
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    verification: dict[str, Verification] = field(default_factory=dict)  # "fp32" / "int8"

    def as_dict(self) -> dict:
        return {
            "path": str(self.path),
            "task": self.task,
            "export_seconds": self.export_seconds,
            "files": self.files,
            "verification": {k: v.as_dict() for k, v in self.verification.items()},
        }


def resolve_task(model: PreTrainedModel, task: str) -> str:
    """Decoders get the KV-cache graph; encoders the task their head implies."""
    if task not in TASKS:
        raise EdgepruneError(f"unknown task '{task}': choose from {', '.join(TASKS)}")
    if task != "auto":
        return task
    if is_decoder(model.config):
        return "text-generation-with-past"
    name = type(model).__name__
    if name.endswith("ForMaskedLM"):
        return "fill-mask"
    if name.endswith("ForSequenceClassification"):
        return "text-classification"
    return "feature-extraction"


def check_fp32(check: Verification, atol: float) -> None:
    limit = atol * max(1.0, check.max_abs_logit)
    if check.max_abs_diff > limit:
        raise EdgepruneError(
            f"ONNX output differs from PyTorch by {check.max_abs_diff:.2e} (> {limit:.1e}) in {check.onnx_file}: "
            "the export is wrong; report it with the model"
        )


def check_int8(check: Verification, min_top1: float) -> None:
    if check.top1_agreement < min_top1:
        raise EdgepruneError(
            f"int8 model agrees with PyTorch on top-1 for only {check.top1_agreement:.0%} of positions "
            f"(< {min_top1:.0%}): this model does not tolerate dynamic int8; ship the fp32 file"
        )


def run_optimum(model: PreTrainedModel, folder: Path, task: str) -> None:
    """Optimum's export; its refusals (unsupported task for this model) become one-line errors."""
    try:
        onnx_export_from_model(model, folder, task=task, do_validation=False)
    except (ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0][:200]
        raise EdgepruneError(
            f"Optimum cannot export {type(model).__name__} as '{task}' ({reason}): try --task auto"
        ) from None


def export_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out: Path,
    task: str = "auto",
    quantize: str | None = None,
    optimize: bool = False,
    overwrite: bool = False,
    protect: Path | None = None,
    provenance: dict | None = None,
    text: str = VERIFY_TEXT,
    atol: float = FP32_ATOL,
    min_int8_top1: float = INT8_MIN_TOP1,
) -> ExportResult:
    """Export, (optimize), verify, (quantize and verify), write tokenizer + edgeprune.json, all atomically."""
    if quantize not in (None, "int8"):
        raise EdgepruneError(f"unknown quantization '{quantize}': only int8 is supported")
    task = resolve_task(model, task)
    model.eval()
    with atomic_output_dir(Path(out), overwrite=overwrite, protect=protect) as tmp:
        start = time.perf_counter()
        run_optimum(model, tmp, task)
        seconds = time.perf_counter() - start
        fp32 = tmp / MODEL_FILE
        if task == "text-generation-with-past":
            add_logits_to_keep(fp32)
        if optimize:
            optimize_graph(fp32, tmp / "model.optimized.onnx").replace(fp32)
        result = ExportResult(path=Path(out), task=task, export_seconds=seconds)
        result.verification["fp32"] = verify_onnx(model, tokenizer, fp32, text)
        check_fp32(result.verification["fp32"], atol)
        if quantize == "int8":
            result.verification["int8"] = verify_onnx(model, tokenizer, quantize_int8(fp32, tmp / INT8_FILE), text)
            check_int8(result.verification["int8"], min_int8_top1)
        if tokenizer is not None:  # without one, verified on random ids (verify_onnx)
            tokenizer.save_pretrained(tmp)
        result.files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.suffix == ".onnx"}
        record = {
            **(provenance or {}),
            **result.as_dict(),
            "optimized": optimize,
            "layer_widths": getattr(model.config, WIDTHS_KEY, None),
            "versions": versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        record["path"] = str(Path(out))
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return result

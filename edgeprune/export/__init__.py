"""ONNX export (Optimum), verification against PyTorch, quantization (weight-only int8/int4, dynamic int8)."""

from edgeprune.export.exporter import EXPORT_TASKS, ExportResult, export_model, resolve_task
from edgeprune.export.quantize import PRECISIONS, quantize_model, quantize_weight_only
from edgeprune.export.verify import Verification, verify_onnx

__all__ = [
    "PRECISIONS",
    "EXPORT_TASKS",
    "ExportResult",
    "Verification",
    "export_model",
    "quantize_model",
    "quantize_weight_only",
    "resolve_task",
    "verify_onnx",
]

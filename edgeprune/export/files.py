"""Where an ONNX model's weights live: in `<name>_data` beside the graph, memory-mapped by ONNX Runtime.

With the weights inside model.onnx, ONNX Runtime parses the protobuf and copies every initializer out
of it: the session held 1.45x the file for fp32 and 2.5-2.7x for int8/int4 on the default decoder.
From a weights file it maps them instead (1.21x, 1.65x, 1.86x; benchmarks/RESULTS.md "Session
memory"), so every ONNX file edgeprune writes goes through `save_onnx`, and what ships is the layout
the profiler and a `--peak-mb` budget measured.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from edgeprune.runtime import onnx_files, weights_file

INLINE_BYTES = 1024  # smaller tensors (shapes, scalars) stay in the graph, where ORT reads them at load


def save_onnx(model: onnx.ModelProto, path: Path) -> Path:
    """Write the graph to `path` and its weights to `<name>_data` (the model's tensors move out of memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights_file(path).unlink(missing_ok=True)  # onnx appends to a weights file that exists
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=weights_file(path).name,
        size_threshold=INLINE_BYTES,
    )
    if weights_file(path).is_file():  # onnx creates it 0600: the weights go wherever the graph can be read
        weights_file(path).chmod(path.stat().st_mode & 0o777)
    return path


def move_onnx(source: Path, target: Path) -> Path:
    """Rename a model with its weights: the graph names its weights file, so it is re-saved, not renamed."""
    save_onnx(onnx.load(str(source)), target)
    for file in onnx_files(Path(source)):
        file.unlink()
    return Path(target)

"""Save and load pruned models: safetensors + per-layer widths in config.json, no pickle.

`load_pruned` builds the ordinary transformers class with empty weights, gives each layer
its saved widths, then assigns the saved tensors, so a checkpoint with per-layer widths
reloads exactly (plain `from_pretrained` rejects it with a size mismatch).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from edgeprune.errors import EdgepruneError
from edgeprune.loading import model_class
from edgeprune.models import adapter_for
from edgeprune.structure import WIDTHS_KEY, apply_widths, widths_from_config

PROVENANCE = "edgeprune.json"


def is_pruned_folder(folder: Path) -> bool:
    return (folder / PROVENANCE).is_file()


def versions() -> dict[str, str]:
    import onnxruntime
    import transformers

    import edgeprune

    return {
        "edgeprune": edgeprune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
    }


def refuse_existing_output(out: Path, overwrite: bool) -> Path:
    """Stop before any work when the output exists and may not be replaced; returns the absolute path."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise EdgepruneError(f"output {out} already exists: choose another -o or pass --overwrite")
    return out


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, protect: Path | None = None) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it replaces `out` in one rename.

    Refuses an existing `out` unless `overwrite`, and never writes into `protect` (the input).
    On failure the temp folder is removed and `out` is untouched.
    """
    out = Path(out).expanduser().absolute()
    if protect is not None and out.resolve() == Path(protect).expanduser().resolve():
        raise EdgepruneError(f"output {out} is the input model: choose another -o so the input stays intact")
    refuse_existing_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.replace(old)
    tmp.replace(out)
    shutil.rmtree(old, ignore_errors=True)


def save_pruned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    provenance: dict,
    overwrite: bool = False,
    protect: Path | None = None,
) -> Path:
    """Write weights (safetensors), config with widths, tokenizer and `edgeprune.json` atomically."""
    with atomic_output_dir(Path(out), overwrite=overwrite, protect=protect) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {
            **provenance,
            "layer_widths": getattr(model.config, WIDTHS_KEY, None),
            "removed_layers": getattr(model.config, "removed_layers", None),  # original indices of deleted layers
            "versions": versions(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)


def read_provenance(folder: Path) -> dict:
    path = Path(folder) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_pruned(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The saved model as its ordinary transformers class, with the saved per-layer shapes."""
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise EdgepruneError(f"{folder} is not a pruned model folder (config.json + *.safetensors expected)")
    config = AutoConfig.from_pretrained(folder)
    cls = model_class(config)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=torch.float32)
    widths = widths_from_config(config)
    if widths is not None:  # the saved widths were a valid cut, so KV groups may differ too
        apply_widths(model, adapter_for(config, prune_kv_heads=True), widths)
    state: dict[str, torch.Tensor] = {}
    for path in weights:
        state.update(load_file(str(path)))
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if not any(k.endswith(t) for t in tied)]
    model.tie_weights()
    missing += [name for name, p in model.named_parameters() if p.is_meta and name not in missing]
    if missing or result.unexpected_keys:
        raise EdgepruneError(
            f"{folder} does not match its config (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}): "
            "the folder is damaged; prune again"
        )
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)

"""Save and load pruned models: safetensors + per-layer widths in config.json, no pickle.

`load_pruned` builds the ordinary transformers class with empty weights, gives each layer
its saved widths, then assigns the saved tensors, so a checkpoint with per-layer widths
reloads exactly (plain `from_pretrained` rejects it with a size mismatch).
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from edgeprune.errors import EdgepruneError
from edgeprune.loading import load_tokenizer, model_class
from edgeprune.models import adapter_for
from edgeprune.outputs import PROVENANCE, atomic_output_dir
from edgeprune.structure import WIDTHS_KEY, apply_widths, widths_from_config


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


def save_pruned(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out: Path,
    provenance: dict,
    overwrite: bool = False,
    protect: Path | None = None,
) -> Path:
    """Write weights (safetensors), config with widths, tokenizer and `edgeprune.json` atomically."""
    with atomic_output_dir(Path(out), overwrite=overwrite, protect=protect) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:  # a model saved without one stays without one
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


def load_pruned(folder: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The saved model as its ordinary transformers class with the saved per-layer shapes; its tokenizer or None."""
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
    return model, load_tokenizer(folder)

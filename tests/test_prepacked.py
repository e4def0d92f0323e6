"""Sessions open a per-machine copy holding ONNX Runtime's pre-packed weights (memory-mapped instead of packed on
the heap), made once on first load; the results are those of the model itself. Probes, verification and quality
measurements open the file (prepacked=False); EDGEPRUNE_PREPACKED=0/1 decides for every session (conftest sets 0
for the rest of the suite)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_tokenizer, tiny_llama

from edgeprune.devices.profiler import LocalProfiler, Workload
from edgeprune.devices.profiles import get_device
from edgeprune.export import export_model
from edgeprune.export.quantize import quantize_weight_only
from edgeprune.outputs import PROVENANCE
from edgeprune.runtime import (
    COPY_ALIGNMENT,
    PREPACKED_ENV,
    OnnxModel,
    evict_prepacked,
    greedy_generate,
    prepacked_entry,
    prepacked_file,
    release_loaded_weights,
    weights_file,
)

TEXT = " ".join(f"w{(i * 37) % 89}" for i in range(40))
IDS = np.array([[3, 17, 42, 95, 0, 64, 7, 11]], dtype=np.int64)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    """The tiny Llama exported in fp32: ONNX Runtime pre-packs its MatMul weights (page-aligned blobs)."""
    root = tmp_path_factory.mktemp("prepacked")
    export_model(tiny_llama(), make_tokenizer(), root / "dense", text=TEXT)
    return root / "dense" / "model.onnx"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "prepacked"


def outputs(path: Path, prepacked: bool | None = None) -> tuple[np.ndarray, list[int]]:
    model = OnnxModel(path, prepacked=prepacked)
    return model.forward(IDS), greedy_generate(model, IDS[0].tolist(), 6, set())


def weight_mappings(weights: Path) -> list[tuple[int, int]]:
    """(resident kB, copy-on-write kB) of each of the process's mappings of `weights`."""
    found = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            inside = len(fields) == 6 and fields[5] == str(weights.resolve())
            if inside:
                found.append([0, 0])
        elif inside and fields[0] in ("Rss:", "Anonymous:"):
            found[-1][fields[0] == "Anonymous:"] = int(fields[1])
    return [(resident, private) for resident, private in found]


def prepacked_blobs(graph_file: Path) -> int:
    """Weights whose pre-packed layout ONNX Runtime saved beside them in the weights file."""
    graph = onnx.load(str(graph_file), load_external_data=False).graph
    return sum(any(e.key.startswith("prepacked") for e in init.external_data) for init in graph.initializer)


def test_outputs_identical_and_the_copy_made_once(dense, cache, monkeypatch):
    expected_logits, expected_tokens = outputs(dense, prepacked=False)
    assert not cache.exists()  # the file itself, as asked
    monkeypatch.delenv(PREPACKED_ENV)  # the default: a model opened to be used maps its copy
    logits, tokens = outputs(dense)
    np.testing.assert_array_equal(logits, expected_logits)
    assert tokens == expected_tokens
    entry = prepacked_entry(dense)
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert prepacked_blobs(entry / "model.onnx") > 0
    written = {p.name: p.stat().st_mtime_ns for p in entry.glob("model.onnx*")}
    np.testing.assert_array_equal(outputs(dense)[0], expected_logits)
    assert {p.name: p.stat().st_mtime_ns for p in entry.glob("model.onnx*")} == written  # reused, not made again


def test_changed_model_gets_its_own_copy(dense, cache, monkeypatch, tmp_path):
    """The copy is keyed by the model's bytes: other weights at the same path never open the old copy."""
    path = tmp_path / "model" / "model.onnx"
    path.parent.mkdir()
    for name in ("model.onnx", "model.onnx_data"):
        (path.parent / name).write_bytes((dense.parent / name).read_bytes())
    monkeypatch.setenv(PREPACKED_ENV, "1")
    OnnxModel(path)
    before = prepacked_entry(path)
    assert before == prepacked_entry(dense)  # the same bytes elsewhere share it
    int8 = quantize_weight_only(dense, tmp_path / "other" / "model.onnx", 8)
    for name in ("model.onnx", "model.onnx_data"):
        (int8.parent / name).replace(path.parent / name)
    expected = OnnxModel(path, prepacked=False).forward(IDS)
    monkeypatch.setenv(PREPACKED_ENV, "1")
    np.testing.assert_array_equal(OnnxModel(path).forward(IDS), expected)
    assert prepacked_entry(path) != before
    assert sorted(p.name for p in cache.iterdir()) == sorted([before.name, prepacked_entry(path).name])


def test_damaged_copy_is_made_again(dense, cache, monkeypatch):
    expected = OnnxModel(dense, prepacked=False).forward(IDS)
    monkeypatch.setenv(PREPACKED_ENV, "1")
    OnnxModel(dense)
    data = prepacked_entry(dense) / "model.onnx_data"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[: size // 3])
    np.testing.assert_array_equal(OnnxModel(dense).forward(IDS), expected)
    assert data.stat().st_size == size


def test_packing_of_another_cpu_is_repacked_not_trusted(dense, cache, monkeypatch):
    """A copy whose blobs do not match this CPU's packing (their keys hash the packed bytes): ONNX Runtime packs
    again on the heap, so the results stay right; what the cache key (CPU flags) is for is the memory."""
    expected = OnnxModel(dense, prepacked=False).forward(IDS)
    monkeypatch.setenv(PREPACKED_ENV, "1")
    OnnxModel(dense)
    graph_file = prepacked_entry(dense) / "model.onnx"
    model = onnx.load(str(graph_file), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key.startswith("prepacked"):
                key, blobs = entry.value.split("|", 1)
                entry.value = f"{key}0|{blobs}"
    onnx.save(model, str(graph_file))
    np.testing.assert_array_equal(OnnxModel(dense).forward(IDS), expected)


def test_profiler_makes_the_copy_before_measuring(dense, cache, monkeypatch):
    monkeypatch.setenv(PREPACKED_ENV, "1")
    profiler = LocalProfiler(get_device("local"), runs=2, warmup=1)
    result = profiler.profile(dense, Workload(prefill=8, decode=2))
    assert (prepacked_entry(dense) / PROVENANCE).is_file()
    assert result.session_rss_mb > 0 and result.decode_tokens_per_s > 0


def int4_copy_entry(dense: Path, tmp_path: Path, monkeypatch) -> tuple[Path, np.ndarray]:
    """The tiny model at int4 opened with a copy (its outputs checked against the file's): the copy's cache entry."""
    int4 = quantize_weight_only(dense, tmp_path / "int4" / "model.onnx", 4)
    expected = OnnxModel(int4, prepacked=False).forward(IDS)
    monkeypatch.setenv(PREPACKED_ENV, "1")
    np.testing.assert_array_equal(OnnxModel(int4).forward(IDS), expected)
    return prepacked_entry(int4), expected


def test_int4_copy_is_aligned_and_used(dense, cache, monkeypatch, tmp_path):
    """ORT 1.31 saves blobs under 1 MB at any offset and MLAS reads a packed int4 blob off its 64-byte alignment
    wrongly (NaN on this tiny model, wrong logits on pruned SmolLM2 widths): the copy's weights are realigned."""
    entry, _ = int4_copy_entry(dense, tmp_path, monkeypatch)
    assert json.loads((entry / PROVENANCE).read_text())["agrees"] is True
    assert prepacked_blobs(entry / "model.onnx") > 0
    for init in onnx.load(str(entry / "model.onnx"), load_external_data=False).graph.initializer:
        for field in init.external_data:
            offsets = [field.value] if field.key == "offset" else []
            if field.key.startswith("prepacked"):
                offsets = [blob.split(";")[0] for blob in field.value.split("|")[1:]]
            assert all(int(offset) % COPY_ALIGNMENT == 0 for offset in offsets), init.name


def test_copy_that_computes_otherwise_is_not_used(dense, cache, monkeypatch, tmp_path):
    """A copy left as ORT saved it (no onnx to realign it on a board): checked against the model when made,
    and the model itself opens instead (without a second try)."""
    monkeypatch.setattr("edgeprune.runtime.align_weights", lambda path: False)
    entry, expected = int4_copy_entry(dense, tmp_path, monkeypatch)
    assert json.loads((entry / PROVENANCE).read_text())["agrees"] is False
    assert sorted(p.name for p in entry.iterdir()) == [PROVENANCE]
    np.testing.assert_array_equal(OnnxModel(tmp_path / "int4" / "model.onnx").forward(IDS), expected)


def test_switch_and_callers_decide(dense, cache, monkeypatch):
    """EDGEPRUNE_PREPACKED=0/1 overrides every caller; unset, a caller asking for the file gets no copy."""
    monkeypatch.delenv(PREPACKED_ENV)
    OnnxModel(dense, prepacked=False)
    assert not cache.exists()
    monkeypatch.setenv(PREPACKED_ENV, "0")
    OnnxModel(dense)
    assert not cache.exists()
    monkeypatch.setenv(PREPACKED_ENV, "1")
    OnnxModel(dense, prepacked=False)
    assert (prepacked_entry(dense) / PROVENANCE).is_file()


def test_probes_open_the_file_and_shipped_models_their_copy(dense, cache, monkeypatch):
    """The profiler's runner (a fresh process) honours the profiler's choice: a search's probe makes no copy."""
    monkeypatch.delenv(PREPACKED_ENV)
    workload = Workload(prefill=8, decode=2)
    LocalProfiler(get_device("local"), runs=1, warmup=1, prepacked=False).profile(dense, workload)
    assert not cache.exists()
    LocalProfiler(get_device("local"), runs=1, warmup=1).profile(dense, workload)
    assert (prepacked_entry(dense) / PROVENANCE).is_file()


def test_eviction_keeps_the_most_recently_opened(tmp_path):
    folder = tmp_path / "prepacked"
    for age, name in enumerate(["old", "middle", "new", "newest"]):
        (folder / name).mkdir(parents=True)
        (folder / name / "model.onnx").write_bytes(b"x")
        marker = folder / name / PROVENANCE
        marker.write_text("{}")
        os.utime(marker, (1_000_000 + age, 1_000_000 + age))
    (folder / "half-written").mkdir()  # no provenance yet: another process is making it
    evict_prepacked(folder, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["half-written", "new", "newest"]


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads the process's mappings (Linux)")
@pytest.mark.parametrize("prepacked", [False, True])
def test_weight_pages_are_released_and_read_again_unchanged(dense, cache, monkeypatch, prepacked):
    """Opening a session releases the weight pages it read; a run maps what it reads again from the file, and
    releasing those too changes no output."""
    monkeypatch.setenv(PREPACKED_ENV, "1" if prepacked else "0")
    graph = prepacked_file(dense) if prepacked else dense  # what the session opens
    weights = weights_file(graph)
    model = OnnxModel(dense)
    opened = sum(resident for resident, _ in weight_mappings(weights))
    first = model.forward(IDS)
    assert sum(resident for resident, _ in weight_mappings(weights)) > opened  # the run read weights again
    assert release_loaded_weights(graph) > 0
    # every mapping holding only the file's pages is empty; one with a page of its own (if ORT wrote any) is kept
    assert all(resident == 0 for resident, private in weight_mappings(weights) if private == 0)
    np.testing.assert_array_equal(model.forward(IDS), first)

"""Run an exported folder with ONNX Runtime alone: sessions, per-layer KV caches, greedy decoding.

This is what goes on a board, so it imports only onnxruntime, numpy, the standard library
and (for text) tokenizers; never torch. Each layer's cache shape is read from the graph's
`past_key_values.*` inputs, so layers with different KV-head counts work too.

CPU sessions open a copy of the model that ONNX Runtime optimized and saved with its pre-packed weights in
the weights file, made on first load in $EDGEPRUNE_CACHE/prepacked/: the packed weights are then memory-mapped
(clean file pages the kernel can drop) instead of packed again on the heap. The shipped int4-mixed default
decoder's session peaks at 1.42x its file instead of 1.68x, 23 MB of it anonymous instead of 177, and runs
0.85-0.97x the time; the copy takes 2.3x the file on disk (benchmarks/bench_memory.py, RESULTS.md).
Every session then releases the weight pages its opening read and a run does not (`release_loaded_weights`).
A search's probes, verification and quality measurements open the file itself (`prepacked=False`): each is
opened once or twice, and the copy computes what the file does. EDGEPRUNE_PREPACKED=0 or 1 decides for every
session instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeprune.errors import EdgepruneError
from edgeprune.outputs import PROVENANCE, atomic_output_dir, cache_dir

MODEL_FILE = "model.onnx"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
LOGITS_TO_KEEP = "logits_to_keep"  # optional input added at export: 0 = every position, 1 = the last
CPU = "CPUExecutionProvider"
PREPACKED_ENV = "EDGEPRUNE_PREPACKED"  # "0"/"1": every CPU session without/with a pre-packed copy; unset: the caller's
PREPACKED_KEEP = 6  # pre-packed copies the cache holds; the least recently opened goes first
PROBE_TOKENS = 8  # a pre-packed copy is checked against its model on this many tokens when made
COPY_ALIGNMENT = 4096  # where each tensor and pre-packed blob of a copy starts: a page, as ORT aligns large ones
EXTERNAL_MIN_BYTES = "1024"  # initializers this large go to the weights file, as export/files.save_onnx does
MADV_DONTNEED = 4  # Linux: drop a range's pages from the process; the next read maps them again from the page cache
PROC_SMAPS = Path("/proc/self/smaps")
SHARED_CACHE_OP = b"GroupQueryAttention"  # reads its past and writes its present in place when both are one buffer
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def model_file(path: str | Path) -> Path:
    """The .onnx file a path names: the file itself, or an export folder's model.onnx (else its only *.onnx)."""
    path = Path(path).expanduser()
    if path.is_dir():
        graphs = [path / MODEL_FILE] if (path / MODEL_FILE).is_file() else sorted(path.glob("*.onnx"))
        if len(graphs) == 1:
            return graphs[0]
    elif path.is_file() and path.suffix == ".onnx":
        return path
    raise EdgepruneError(
        f"no ONNX model at {path}: run `edgeprune export` first, or give the .onnx file or a folder with one model.onnx"
    )


def weights_file(onnx_path: Path) -> Path:
    """Where edgeprune keeps a model's weights: `<name>_data` beside the graph (see export/files.py)."""
    return onnx_path.with_name(onnx_path.name + "_data")


def onnx_files(onnx_path: Path) -> list[Path]:
    """The .onnx file and its weights file, if it has one: what a copy, an upload or a size must include."""
    return [p for p in (onnx_path, weights_file(onnx_path)) if p.is_file()]


def onnx_bytes(onnx_path: Path) -> int:
    """Bytes on disk of a model: its graph plus its weights file."""
    return sum(file.stat().st_size for file in onnx_files(onnx_path))


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Sequential execution with a fixed intra-op thread count (0 or None: ONNX Runtime's default).

    Every session edgeprune opens (generate, the profiler's runner, evaluation, verification) comes from
    here, so a `--peak-mb` budget measures what ships. The CPU arena and ORT's initializer allocation stay
    at their defaults: turning both off changed no session's memory on SmolLM2 and cost ~4% latency; what
    ONNX Runtime holds twice is the weights inside model.onnx, and weights in a model.onnx_data file beside
    it are memory-mapped instead (session 1.45x -> 1.21x the file for fp32; benchmarks/bench_memory.py).
    """
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns on every load that logits_to_keep is overridable
    if threads:
        options.intra_op_num_threads = threads
    return options


def prepacked_wanted(
    providers: list[str] | None, options: ort.SessionOptions | None, requested: bool | None = None
) -> bool:
    """Pre-packed copies serve CPU sessions with edgeprune's own settings: EDGEPRUNE_PREPACKED=0/1 decides
    for every session; unset, the caller does (`requested`), and a model opened to be used gets one."""
    setting = os.environ.get(PREPACKED_ENV, "")
    wanted = setting == "1" if setting in ("0", "1") else requested is not False
    return wanted and options is None and (providers or [CPU]) == [CPU]


def cpu_identity() -> str:
    """What MLAS picks its weight packing by: the architecture and the CPU's feature flags (AVX2, AVX-512,
    NEON dot product...). A pre-packed copy is made for, and only used on, a CPU with the same ones."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text(errors="replace").splitlines() if cpuinfo.is_file() else []
    flags = (
        line.partition(":")[2].strip() for line in lines if line.partition(":")[0].strip() in ("flags", "Features")
    )
    return f"{platform.machine()} {next(flags, platform.processor())}"


def prepacked_entry(onnx_path: Path) -> Path:
    """The cache folder of a model's pre-packed copy: keyed by the model's bytes (graph and weights), the ONNX
    Runtime version and the CPU, so a changed model, another ORT or another CPU never reads a copy made before."""
    digest = hashlib.sha256(f"{ort.__version__}\n{cpu_identity()}\n".encode())
    for file in onnx_files(onnx_path):
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return cache_dir() / "prepacked" / digest.hexdigest()[:32]


def write_prepacked(onnx_path: Path, entry: Path, threads: int | None) -> None:
    """ONNX Runtime optimizes the model as a session would and saves it with its pre-packed weights beside
    the others in the weights file (`session.save_external_prepacked_constant_initializers`); atomic."""
    with atomic_output_dir(entry, overwrite=True) as tmp:
        options = session_options(threads)
        options.optimized_model_filepath = str(tmp / MODEL_FILE)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", weights_file(tmp / MODEL_FILE).name
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", EXTERNAL_MIN_BYTES
        )
        options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        ort.InferenceSession(str(onnx_path), options, providers=[CPU])
        provenance = {"prepacked_from": str(onnx_path), "ort_version": ort.__version__, "cpu": cpu_identity()}
        provenance["aligned"] = align_weights(tmp / MODEL_FILE)
        provenance["agrees"] = copy_agrees(onnx_path, tmp / MODEL_FILE, threads)
        if not provenance["agrees"]:  # kept as a note, so the next load opens the model without trying again
            for file in onnx_files(tmp / MODEL_FILE):
                file.unlink()
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")


def align_weights(onnx_path: Path, alignment: int = COPY_ALIGNMENT) -> bool:
    """Move every tensor and pre-packed blob of a saved copy's weights file to an `alignment` boundary.

    ONNX Runtime 1.31 aligns only blobs over 1 MB, and MLAS reads a packed int4 blob mapped off its 64-byte
    alignment wrongly: a pruned model's odd widths put most blobs there (the default job's answer: 116 of 151).
    The graph's offsets are rewritten with onnx; where onnx is not installed (a board's runtime install)
    the copy stays as saved and `copy_agrees` decides. Returns whether it aligned."""
    try:
        import onnx
    except ImportError:
        return False
    model = onnx.load(str(onnx_path), load_external_data=False)
    source = weights_file(onnx_path)
    target = source.with_name(source.name + ".aligned")
    with source.open("rb") as src, target.open("wb") as dst:

        def move(offset: str, length: str) -> str:
            dst.write(b"\0" * (-dst.tell() % alignment))
            at = dst.tell()
            src.seek(int(offset))
            dst.write(src.read(int(length)))
            return str(at)

        for init in model.graph.initializer:
            entries = {entry.key: entry for entry in init.external_data}
            if "offset" in entries:
                entries["offset"].value = move(entries["offset"].value, entries["length"].value)
            for key, entry in entries.items():
                if key.startswith("prepacked"):  # "<kernel key>|<offset>;<length>;<checksum>|..."
                    name, *blobs = entry.value.split("|")
                    fields = [blob.split(";") for blob in blobs]
                    entry.value = "|".join([name, *(";".join([move(f[0], f[1]), *f[1:]]) for f in fields)])
    target.replace(source)
    onnx.save_model(model, str(onnx_path))
    return True


def copy_agrees(onnx_path: Path, copy: Path, threads: int | None) -> bool:
    """Whether the copy computes what the model does on a few tokens: a copy left unaligned (no onnx to
    rewrite it) or a packing this check has not met is never trusted."""
    ids = np.arange(1, PROBE_TOKENS + 1, dtype=np.int64).reshape(1, -1)  # ids below 32 exist in every vocabulary
    expected = OnnxModel(onnx_path, options=session_options(threads)).forward(ids)
    got = OnnxModel(copy, options=session_options(threads)).forward(ids)
    return bool(np.allclose(got, expected, rtol=0, atol=1e-5 * float(np.abs(expected).max())))


@contextmanager
def loading(onnx_path: Path) -> Iterator[None]:
    """ORT's errors on a broken file (truncated, not ONNX) as one line naming it; they raise deep in ORT."""
    try:
        yield
    except EdgepruneError:
        raise
    except Exception as err:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, InvalidGraph...)
        reason = str(err).strip().splitlines()[0][:200]
        raise EdgepruneError(
            f"{onnx_path} is not a loadable ONNX model ({type(err).__name__}: {reason}): re-export it"
        ) from None


def prepacked_file(onnx_path: Path, threads: int | None = None) -> Path:
    """The pre-packed copy of a model for this machine, made on first use; the model itself where the copy
    does not compute what it does."""
    entry = prepacked_entry(onnx_path)
    if (entry / PROVENANCE).is_file():  # written last: an entry with it is complete
        os.utime(entry / PROVENANCE)  # opened now: the last copy evicted
    else:
        with loading(onnx_path):
            write_prepacked(onnx_path, entry, threads)
        evict_prepacked(entry.parent, PREPACKED_KEEP)
    return entry / MODEL_FILE if json.loads((entry / PROVENANCE).read_text())["agrees"] else onnx_path


def evict_prepacked(folder: Path, keep: int) -> None:
    """Keep the `keep` most recently opened copies: each is 2.3x its model on disk, and a model that changed
    (a re-export, another run's answer) never reads its old copy again. Open sessions keep their mapped files."""
    entries = [(e / PROVENANCE).stat().st_mtime for e in folder.iterdir() if (e / PROVENANCE).is_file()]
    if len(entries) <= keep:
        return
    cutoff = sorted(entries, reverse=True)[keep - 1]
    for entry in folder.iterdir():
        marker = entry / PROVENANCE
        if marker.is_file() and marker.stat().st_mtime < cutoff:
            marker.unlink()  # first: a half-removed entry reads as unmade, and is made again when asked for
            shutil.rmtree(entry, ignore_errors=True)


def release_loaded_weights(onnx_path: Path) -> int:
    """Take the weight pages that opening a session read out of the process's resident memory (Linux); returns
    the mappings released.

    ONNX Runtime maps the weights file tensor by tensor (private, writable mappings) and opening a session reads
    pages a run never reads again: on the default answer's pre-packed copy, 9.5 MB of its 203 MB session. Only
    mappings of the model's own weights file with no page of their own (no copy-on-write page: every page is
    the file's) are released, so a page a run reads is mapped again from the page cache, the same bytes:
    outputs do not change, only resident memory."""
    weights = str(weights_file(onnx_path).resolve())
    if not PROC_SMAPS.is_file() or not Path(weights).is_file():
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released, mapping = 0, None
    for line in PROC_SMAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if not fields[0].endswith(":"):  # a mapping's header: address range, permissions, offset, device, inode, path
            mapping = fields[0] if len(fields) == 6 and fields[5] == weights else None
        elif mapping and fields[0] == "Anonymous:" and fields[1] == "0":
            start, end = (int(address, 16) for address in mapping.split("-"))
            released += madvise(start, end - start, MADV_DONTNEED) == 0
    return released


def prepacked_session(onnx_path: Path, threads: int | None) -> ort.InferenceSession:
    """A session on the model's pre-packed copy; a damaged copy (a weights file cut short) is made again.

    ONNX Runtime still packs each weight at load and uses the mapped blob only where the keys (a hash of
    the packed bytes) agree, so a copy whose packing does not match this CPU costs memory, never results."""
    path = prepacked_file(onnx_path, threads)
    with loading(onnx_path):
        try:
            session = ort.InferenceSession(str(path), session_options(threads), providers=[CPU])
        except Exception:  # ORT's pybind error types: a damaged copy is made again from the model
            if path == onnx_path:
                raise
            write_prepacked(onnx_path, path.parent, threads)
            path = prepacked_file(onnx_path, threads)
            session = ort.InferenceSession(str(path), session_options(threads), providers=[CPU])
    release_loaded_weights(path)
    return session


def open_session(
    path: str | Path,
    threads: int | None = None,
    providers: list[str] | None = None,
    options: ort.SessionOptions | None = None,
    prepacked: bool | None = None,
) -> ort.InferenceSession:
    """An InferenceSession, or one line naming the broken file (a truncated or non-ONNX file raises deep in ORT).

    On the CPU with edgeprune's options the session opens the pre-packed copy unless `prepacked` is False
    (or EDGEPRUNE_PREPACKED=0); see the module's docstring."""
    onnx_path = model_file(path)
    if prepacked_wanted(providers, options, prepacked):
        return prepacked_session(onnx_path, threads)
    with loading(onnx_path):
        session = ort.InferenceSession(
            str(onnx_path), options or session_options(threads), providers=providers or [CPU]
        )
    release_loaded_weights(onnx_path)
    return session


@dataclass(frozen=True)
class CacheInput:
    """One `past_key_values.L.key|value` input: its per-layer head count and head size from the graph."""

    name: str
    heads: int
    head_dim: int
    dtype: type

    @property
    def present(self) -> str:
        return PRESENT_PREFIX + self.name[len(PAST_PREFIX) :]


def cache_inputs(session: ort.InferenceSession) -> list[CacheInput]:
    """The KV-cache inputs of a decoder graph ([batch, heads, past, head_dim] each), in graph order."""
    found = []
    for node in session.get_inputs():
        if not node.name.startswith(PAST_PREFIX):
            continue
        _, heads, _, head_dim = node.shape
        if not (isinstance(heads, int) and isinstance(head_dim, int)):
            raise EdgepruneError(f"cache input {node.name} has symbolic shape {node.shape}: re-export the model")
        found.append(CacheInput(node.name, heads, head_dim, ORT_DTYPES[node.type]))
    return found


class OnnxModel:
    """An exported encoder or decoder: builds the feeds its graph asks for and runs it."""

    def __init__(
        self,
        path: str | Path,
        threads: int | None = None,
        providers: list[str] | None = None,
        options: ort.SessionOptions | None = None,
        prepacked: bool | None = None,
    ):
        self.path = model_file(path)
        self.session = open_session(self.path, threads, providers, options, prepacked)
        overridable = self.session.get_overridable_initializers()  # inputs with defaults, e.g. logits_to_keep
        self.input_names = [node.name for node in [*self.session.get_inputs(), *overridable]]
        self.caches = cache_inputs(self.session)
        self.shares_cache = bool(self.caches) and shares_cache(self.path)
        self.output_names = [node.name for node in self.session.get_outputs()]

    @property
    def is_decoder(self) -> bool:
        return bool(self.caches)

    @property
    def vocab_size(self) -> int | None:
        """Width of the `logits` output (None for feature extraction, whose output is hidden states)."""
        first = self.session.get_outputs()[0]
        return first.shape[-1] if first.name == "logits" and isinstance(first.shape[-1], int) else None

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {c.name: np.zeros((batch, c.heads, 0, c.head_dim), dtype=c.dtype) for c in self.caches}

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Encoder forward (or a decoder forward with an empty cache): the first output, e.g. logits."""
        if self.is_decoder:
            return self.step(input_ids, self.empty_cache(input_ids.shape[0]))[0]
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
        return self.session.run(self.output_names[:1], {k: v for k, v in feeds.items() if k in self.input_names})[0]

    def step(
        self,
        input_ids: np.ndarray,
        cache: dict[str, np.ndarray],
        keep: int = 0,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One decoder call on new tokens after the cached ones: (logits, the grown cache).

        `keep` asks graphs exported with `logits_to_keep` for the last `keep` positions' logits
        only (1 is what generation needs, 0 means all); older graphs return every position.
        The mask and positions default to an unpadded batch; pass them for left-padded rows.
        """
        batch, new = input_ids.shape
        past = next(iter(cache.values())).shape[2] if cache else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past + new), dtype=np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past, past + new, dtype=np.int64), (batch, new)).copy()
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
            LOGITS_TO_KEEP: np.array([keep], dtype=np.int64),
            **cache,
        }
        names = ["logits", *(c.present for c in self.caches)]
        outputs = self.session.run(names, {k: v for k, v in feeds.items() if k in self.input_names})
        return outputs[0], {c.name: out for c, out in zip(self.caches, outputs[1:], strict=True)}


def shares_cache(onnx_path: Path) -> bool:
    """Whether the graph's attention is ONNX Runtime's GroupQueryAttention (the fused graph), which appends the
    new keys and values into its past buffer in place when past and present are bound to the same memory, as
    onnxruntime-genai runs it (`past_present_share_buffer`). The graph file's bytes are searched for the op's
    name: a board's runtime install has no onnx to parse it, and the graph file is small (weights beside it)."""
    with onnx_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as graph:
        return graph.find(SHARED_CACHE_OP) >= 0


class CacheDecoder:
    """Decoding state of one batch: feed the prompt, then one token per call; returns the last position's logits.

    Graphs whose attention shares its cache (`shares_cache`) keep one preallocated buffer per cache input,
    bound as both past and present, so a token costs no copy of the cache: the copying path moves the whole
    cache in and out of ONNX Runtime every token (at 384 positions, 35 MB per token for the default decoder,
    a third of what its int4 weights read). Other graphs take the copying path (`OnnxModel.step`).
    """

    def __init__(self, model: OnnxModel, batch: int, capacity: int, share: bool = True):
        self.model, self.batch, self.length = model, batch, 0
        self.shared = share and model.shares_cache  # share=False: the copying path, to compare
        if self.shared:
            self.binding = model.session.io_binding()
            self.buffers: dict[str, ort.OrtValue] = {}
            self.bind_buffers(capacity)
            self.binding.bind_output("logits")  # after the caches: outputs come back in binding order
            # without logits_to_keep every position's logits come back: their shape changes call by call
            self.rebind_logits = LOGITS_TO_KEEP not in model.input_names
            if not self.rebind_logits:  # an overridable initializer: bound as a value, kept alive
                self.keep = ort.OrtValue.ortvalue_from_numpy(np.array([1], dtype=np.int64))
                self.binding.bind_ortvalue_input(LOGITS_TO_KEEP, self.keep)
        else:
            self.cache = model.empty_cache(batch)

    def bind_buffers(self, capacity: int) -> None:
        """Cache buffers of `capacity` positions, holding what the old ones held (a longer run grows them)."""
        for c in self.model.caches:
            array = np.zeros((self.batch, c.heads, capacity, c.head_dim), dtype=c.dtype)
            if c.name in self.buffers:
                array[:, :, : self.length] = self.buffers[c.name].numpy()[:, :, : self.length]
            self.buffers[c.name] = ort.OrtValue.ortvalue_from_numpy(array)
            self.binding.bind_ortvalue_input(c.name, self.buffers[c.name])
            self.binding.bind_ortvalue_output(c.present, self.buffers[c.name])

    def feed(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [batch, 1, vocab] of the last of `input_ids`' positions, after the ones fed before."""
        if not self.shared:
            logits, self.cache = self.model.step(input_ids, self.cache, keep=1)
            self.length += input_ids.shape[1]
            return logits[:, -1:]
        total = self.length + input_ids.shape[1]
        capacity = next(iter(self.buffers.values())).shape()[2]
        if total > capacity:
            self.bind_buffers(max(total, 2 * capacity))
        self.binding.bind_cpu_input("input_ids", input_ids.astype(np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((self.batch, total), dtype=np.int64))
        if "position_ids" in self.model.input_names:
            positions = np.arange(self.length, total, dtype=np.int64)
            self.binding.bind_cpu_input("position_ids", np.broadcast_to(positions, input_ids.shape).copy())
        if self.rebind_logits:
            self.binding.bind_output("logits")
        self.model.session.run_with_iobinding(self.binding)
        self.length = total
        return self.binding.get_outputs()[-1].numpy()[:, -1:].copy()  # the next run may reuse its memory


def greedy_generate(model: OnnxModel, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy decoding with the KV cache: the prompt once, then one token per call."""
    if not model.is_decoder:
        raise EdgepruneError(f"{model.path} is an encoder export (no KV cache inputs): generate needs a decoder")
    if not prompt_ids:
        raise EdgepruneError("the prompt tokenized to nothing: give some text")
    ids = np.asarray([prompt_ids], dtype=np.int64)
    decoder = CacheDecoder(model, 1, len(prompt_ids) + max_new_tokens)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(decoder.feed(ids)[0, -1]))
        generated.append(token)
        if token in eos_ids:
            break
        ids = np.asarray([[token]], dtype=np.int64)
    return generated


def eos_token_ids(folder: Path) -> set[int]:
    """End-of-sequence ids from the export's generation_config.json (else config.json)."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return set(eos) if isinstance(eos, list) else {eos}
    return set()


def generate_text(
    path: str | Path, prompt: str, max_new_tokens: int = 32, threads: int | None = None
) -> tuple[str, list[int]]:
    """Tokenize with the exported tokenizer.json, decode greedily, return (new text, new token ids)."""
    from tokenizers import Tokenizer

    onnx_path = model_file(path)
    folder = onnx_path.parent
    model = OnnxModel(onnx_path, threads=threads)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise EdgepruneError(f"{folder} has no tokenizer.json: export with `edgeprune export` (it copies it)")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    prompt_ids = tokenizer.encode(prompt).ids
    new_ids = greedy_generate(model, prompt_ids, max_new_tokens, eos_token_ids(folder))
    return tokenizer.decode(new_ids, skip_special_tokens=True), new_ids

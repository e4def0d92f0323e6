"""The profiler's memory numbers belong to the model they are reported for, also when two models share the
measuring process (an alternating comparison), so a --peak-mb budget sees the probe, not probe + dense."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeprune.devices.profiler import LocalProfiler, Workload
from edgeprune.devices.profiles import get_device

BIG_TABLE_MB = 64


def embedding_graph(path, rows: int, width: int = 256) -> None:
    """A feature-extraction graph that only looks its input ids up in a [rows, width] float table."""
    table = numpy_helper.from_array(np.random.default_rng(0).random((rows, width), dtype=np.float32), "table")
    node = helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])
    graph = helper.make_graph(
        [node],
        "lookup",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", width])],
        [table],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_compared_models_report_their_own_memory(tmp_path):
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    embedding_graph(small, rows=64)
    embedding_graph(big, rows=BIG_TABLE_MB * 2**20 // (256 * 4))
    profiler = LocalProfiler(get_device("local"), runs=2, warmup=1)
    workload = Workload(sequence=8)
    comparison = profiler.compare(small, big, workload)
    alone = profiler.profile(small, workload)
    small_row, big_row = comparison.model, comparison.baseline
    assert big_row.session_rss_mb > 0.8 * BIG_TABLE_MB > small_row.session_rss_mb
    # the small model's numbers do not carry the big table loaded after it (they did: max with the final RSS)
    assert small_row.peak_rss_mb < big_row.peak_rss_mb - 0.5 * BIG_TABLE_MB
    assert small_row.rss_mb < big_row.rss_mb - 0.5 * BIG_TABLE_MB
    assert abs(small_row.peak_rss_mb - alone.peak_rss_mb) < 0.25 * BIG_TABLE_MB  # as if it ran alone

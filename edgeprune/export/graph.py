"""Graph edits after export: an optional `logits_to_keep` input in front of the decoder's lm_head.

Prefill only needs the last position's logits, but the exported graph multiplies every
position by the vocabulary matrix (49152 x 576 for SmolLM2: about a fifth of a 128-token
prefill). The added input has an initializer of 0, meaning "all positions" as in
transformers' `logits_to_keep`, so callers that feed nothing (perplexity) are unchanged;
the runtime feeds 1 for generation and profiling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeprune.export.files import save_onnx
from edgeprune.runtime import LOGITS_TO_KEEP

INT64_MAX = np.iinfo(np.int64).max


def add_logits_to_keep(path: Path) -> bool:
    """Slice the lm_head MatMul's input to its last `logits_to_keep` positions (False: no such MatMul)."""
    model = onnx.load(str(path))
    graph = model.graph
    producer = next((n for n in graph.node if "logits" in n.output), None)
    if producer is None or producer.op_type != "MatMul" or any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return False
    hidden = producer.input[0]
    sliced = f"{hidden}/last_{LOGITS_TO_KEEP}"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), LOGITS_TO_KEEP),
            numpy_helper.from_array(np.array([INT64_MAX], dtype=np.int64), f"{LOGITS_TO_KEEP}/ends"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), f"{LOGITS_TO_KEEP}/axes"),
        ]
    )
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    nodes = [
        helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{LOGITS_TO_KEEP}/starts"], name=f"{LOGITS_TO_KEEP}/Neg"),
        helper.make_node(
            "Slice",
            [hidden, f"{LOGITS_TO_KEEP}/starts", f"{LOGITS_TO_KEEP}/ends", f"{LOGITS_TO_KEEP}/axes"],
            [sliced],
            name=f"{LOGITS_TO_KEEP}/Slice",
        ),
    ]
    position = list(graph.node).index(producer)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    producer.input[0] = sliced  # no onnx.checker: it rejects ORT's contrib ops; the export's verification runs it
    save_onnx(model, path)
    return True

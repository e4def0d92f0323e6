"""Dynamic int8 of the default decoder with 8-bit vs 7-bit (`reduce_range`) weights: top-1 agreement with fp32 ORT.

    edgeprune export smollm2-135m -o /tmp/er/smol
    python benchmarks/bench_int8_saturation.py /tmp/er/smol [WORK_DIR]

x86 CPUs without VNNI multiply uint8 activations by int8 weights with VPMADDUBSW, whose int16 pair sums
saturate on full-range weights; 7-bit weights cannot saturate. Prints one JSON line per setting.
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from onnxruntime.quantization import QuantType, quantize_dynamic
from tokenizers import Tokenizer

from edgeprune.calibration import load_text
from edgeprune.export.quantize import KEEP_FP32, fp32_nodes
from edgeprune.export.verify import VERIFY_TEXT
from edgeprune.runtime import OnnxModel

CLEAR_MARGIN = 1.0  # logits: positions whose fp32 top-2 gap exceeds this are not near-ties


def main() -> None:
    folder = Path(sys.argv[1])
    work = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp(prefix="int8_saturation_"))
    source = folder / "model.onnx"
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()  # exports so far saved the verification's 64-token truncation in tokenizer.json
    ids = np.asarray([tokenizer.encode(VERIFY_TEXT + " " + load_text(None)[:3000]).ids[:256]])
    reference = OnnxModel(source, threads=2).forward(ids)[0]
    top2 = np.sort(reference, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > CLEAR_MARGIN
    for reduce_range in (False, True):
        target = work / f"int8_{7 if reduce_range else 8}bit.onnx"
        excluded = fp32_nodes(source, KEEP_FP32)
        quantize_dynamic(
            source, target, weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
            nodes_to_exclude=excluded,
        )  # fmt: skip
        got = OnnxModel(target, threads=2).forward(ids)[0]
        agree = got.argmax(-1) == reference.argmax(-1)
        row = {
            "weight_bits": 7 if reduce_range else 8,
            "positions": len(agree),
            "top1_agreement": float(agree.mean()),
            "clear_positions": int(clear.sum()),
            "top1_agreement_clear": float(agree[clear].mean()),
            "rms_error_over_max_logit": float(np.sqrt(np.mean((got - reference) ** 2)) / np.abs(reference).max()),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

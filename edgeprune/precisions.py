"""The precisions a model can ship at, named once for the search, the quantizer and the command line.

Most to least faithful. int8 in 64/128 blocks and int4 with its sensitive MatMuls at 8 bits sit between int8
and int4, and which of them is fast depends on the CPU's kernels, so the search measures them all
(`export/quantize.py` says how each is made). "dynamic-int8" (activations quantized per call) is available on
request but not tried by `auto` (slower than fp32 in decode on the CPUs measured). No imports: the command line
and the torch-free budget search read it.
"""

PRECISIONS = ("fp32", "int8", "int8-b64", "int8-b128", "int4-mixed", "int4", "dynamic-int8")
AUTO_PRECISIONS = PRECISIONS[:-1]
WEIGHT_ONLY_PRECISIONS = PRECISIONS[1:-1]

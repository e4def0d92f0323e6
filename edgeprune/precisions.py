"""The precisions a model can ship at, named once for the search, the quantizer and the command line.

Most to least faithful. int8 in 64/128 blocks and int4 with its sensitive MatMuls at 8 bits sit between int8
and int4, and which of them is fast depends on the CPU's kernels, so the search measures them all
(`export/quantize.py` says how each is made). "int4-fit" keeps at 8 bits the projections whose 4-bit rounding
costs most per byte until a file budget is full (`export/bit_allocation.py`): it exists only under a size budget
(FITTED_PRECISIONS), so `export` does not offer it. "dynamic-int8" (activations quantized per call) is available on
request but not tried by `auto` (slower than fp32 in decode on the CPUs measured). No imports: the command line
and the torch-free budget search read it.
"""

PRECISIONS = ("fp32", "int8", "int8-b64", "int8-b128", "int4-mixed", "int4-fit", "int4", "dynamic-int8")
AUTO_PRECISIONS = PRECISIONS[:-1]
WEIGHT_ONLY_PRECISIONS = PRECISIONS[1:-1]
FITTED_PRECISIONS = ("int4-fit",)  # made for a file budget: what a run with --memory-mb can ship

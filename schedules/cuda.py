"""CUDA schedule of the DCN kernels in dcngen/tvm_defs/cuda.py (thread mapping and vector width).

Forward: one thread per (output pixel, group, `vec` contiguous channels), 1-D blocks of
`threads`; each thread loads its own offsets/weights, reads every corner as one vector of
`vec` elements and accumulates in fp32 (fp64 for fp64).
Backward: one thread per (output pixel, group) over all C channels (private offset/weight
gradient reductions), atomicAdd scatter into the input gradient (fp32, or fp64 for fp64; 16-bit
dtypes through an fp32 accumulator); blocks of `threads`.

Parameters (ints; PARAM_BOUNDS; tuned values are replayed as DCNConfig.params from
the records under records/, see dcngen/records.py):
  threads  threads per block (both kernels)
  vec      channels per forward thread: a power of two that divides group_channels, at most 16
           bytes (vector_widths)
"""

from __future__ import annotations

DEFAULTS = {"threads": 128}
PARAM_BOUNDS = {"threads": (32, 1024), "vec": (1, 16)}

VECTOR_BYTES = 16  # widest CUDA vector load (float4 / 8 halves)


def vector_widths(cfg) -> tuple[int, ...]:
    """The `vec` values TVM's CUDA code generator can emit for cfg: powers of two dividing the
    group's channels, at most VECTOR_BYTES wide."""
    return tuple(v for v in (1, 2, 4, 8, 16) if cfg.group_channels % v == 0 and v * cfg.itemsize <= VECTOR_BYTES)


def default_params(cfg) -> dict:
    """Heuristic: the widest vector."""
    return {**DEFAULTS, "vec": max(vector_widths(cfg))}

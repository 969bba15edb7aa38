"""CPU (TVM llvm) schedule of the DCN kernels in dcngen/tvm_defs.py.

Forward: parallel over chunks of output pixels; per (pixel, group) a local accumulator of the
group's C channels; the P points outside, the channel loop vectorised inside.
Backward: one parallel task per (image, group) (the race-free input-gradient scatter, see
tvm_defs._backward_cpu); channel loops vectorised.

Parameters (ints; searched by tuning within PARAM_BOUNDS; tuned values are replayed as DCNConfig.params
from the records under records/, see dcngen/records.py):
  pixels_per_task  output pixels per parallel work item of the forward
  unroll_points    1 unrolls the loop over the P sampling points (forward)
  vector           1 vectorises the channel loops (forward and backward)
"""

from __future__ import annotations

DEFAULTS = {"pixels_per_task": 16, "unroll_points": 1, "vector": 1}
MAX_UNROLLED_POINTS = 25  # beyond this (kernels over 5x5) unrolling only bloats the code
PARAM_BOUNDS = {"pixels_per_task": (1, 4096), "unroll_points": (0, 1), "vector": (0, 1)}


def default_params(cfg) -> dict:
    """Heuristic parameters for `cfg` (a DCNConfig) when neither the user nor a record decides."""
    # Measured on 2 cores (fp32, G=4, C=16, 3x3): unrolling the points saves 15-25 %; chunks of
    # 16 pixels beat 1 or 4 by a few percent.
    return {**DEFAULTS, "unroll_points": int(cfg.num_points <= MAX_UNROLLED_POINTS)}

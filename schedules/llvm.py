"""CPU (TVM llvm) schedule of the DCN kernels in dcngen/tvm_defs/cpu.py.

Forward: parallel over runs of output pixels of one row; per pixel all G*P points planned in
vectorised steps (window test, corner index, mask-weighted corner weights), then per group a
local accumulator of the group's C channels, one vectorised channel loop per point.
Backward: one parallel task per (image, group) (the race-free input-gradient scatter, see
tvm_defs.cpu.backward) on zero-ringed private copies; the group's points planned per pixel,
channel loops vectorised.

Parameters (ints within PARAM_BOUNDS; `dcngen tune` searches pixels_per_task, unroll_points and
vector (dcngen/tune.py space_for); tuned values are replayed as DCNConfig.params from the records
under records/, see dcngen/records.py):
  pixels_per_task  output pixels (of one row) per parallel work item of the forward
  unroll_points    1 unrolls the loop over the P sampling points (forward)
  vector           1 vectorises the channel loops (forward and backward)
  plan_lanes       points planned per vector step (forward and backward)
"""

from __future__ import annotations

DEFAULTS = {"pixels_per_task": 16, "unroll_points": 1, "vector": 1, "plan_lanes": 16}
MAX_UNROLLED_POINTS = 25  # beyond this (kernels over 5x5) unrolling only bloats the code
PARAM_BOUNDS = {"pixels_per_task": (1, 4096), "unroll_points": (0, 1), "vector": (0, 1), "plan_lanes": (1, 64)}


def default_params(cfg) -> dict:
    """Heuristic parameters for `cfg` (a DCNConfig) when neither the user nor a record decides."""
    # Measured on 2 cores with AVX-512 (fp32, G=4, C=16, 3x3, 8x56x56 and 1x200x320): 16 plan
    # lanes (one 512-bit vector) beat 8 by 5 %; pixels per task 4..64 and unrolling the points
    # are within noise.
    return {**DEFAULTS, "unroll_points": int(cfg.num_points <= MAX_UNROLLED_POINTS)}

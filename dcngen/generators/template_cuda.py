"""Template backend, CUDA: renders templates/cuda/dcn.cu.j2 for nvcc (the tiled and tensor-core
kernels' layouts come from cuda_tiles).

Parameters (cfg.params; defaults from `default_params`):
  vec / bwd_vec        channels per thread, forward / backward (power of two); default: 16 bytes
                       of the input (forward) and of the input gradient's atomics (backward: 4
                       channels where they go through the fp32 accumulator, e.g. bf16)
  pixels / bwd_pixels  output pixels per block; threads per block = pixels * G * lanes, where
                       lanes = next_pow2(ceil(C / vec)) threads share one (pixel, group); default:
                       about 256 threads for the vec in use (the default one or the one set). The
                       launchers halve it for an output too small to load every SM evenly
                       (Mapping::block_pixels in cuda/mapping.h.j2), down to a warp's worth
  unroll / bwd_unroll  sampling points per batch, forward / backward: the 4 corner loads of every
                       point of a batch are issued before the first is used
  share                1: the lanes of a (pixel, group) locate the forward's points together, each lane
                       a different point, and read each other's sampling taps (corner weights and
                       pointers) from shared memory: a point is located once, not once per lane
  share_round          points per round of `share` (a multiple of the batch); 0: automatic, the
                       fewest locations per lane in at most SHARE_BYTES of shared memory
  stage / bwd_stage    1: a block copies its pixels' offset/mask rows into shared memory once
                       (coalesced, in 16-byte pieces of floats where the rows are aligned) instead
                       of each thread loading its 3P values (ignored where the rows would not fit
                       in 40 KB)
  atomic_dtype         1: fp16/bf16 input gradient by vector atomics in the storage dtype straight
                       into grad_x (no fp32 workspace, memset or conversion pass; lower precision);
                       0: fp32 accumulator. No effect for fp32/fp64 or in deterministic mode
  min_blocks / bwd_min_blocks  resident blocks per SM the register allocation must allow,
                       forward / backward (a register cap of 65536 / (threads * min_blocks))
  deterministic        1: input gradient accumulated in int64 fixed point (bitwise reproducible)
  bwd_tile             1: tiled backward: a block runs a bwd_tile_h x bwd_tile_w output tile of one
                       group and sums the input-gradient contributions landing in the tile's input
                       region (`bwd_halo` pixels beyond the kernel footprint) in shared memory, in
                       32-bit fixed point scaled to the tile's max|grad_out| x max|mask|, before one
                       atomic add per position; contributions beyond the region go to global memory
  bwd_tile_h / bwd_tile_w / bwd_tile_threads / bwd_halo  its tile, threads per block and margin
                       (tile default: 8x16, halved where float32's fixed-point sums or the target's
                       shared memory need it; bwd_halo, fwd_halo default: 2 |offset_scale|, at
                       least 1, lowered where the layout would not fit the target's shared memory)
  mma                  1: tensor-core forward (fp16/bf16, group_channels % 8 == 0, sm_80+): a warp
                       stages the corner rows of 8 pixels per point in shared memory (cp.async) and
                       multiplies them by the block-diagonal coefficient matrix with m16n8k16 mma,
                       fp32 accumulators; coefficients (mask x bilinear weight) rounded to the dtype;
                       pixels whose product is not finite are recomputed per point
  mma_warps            warps per block of the tensor-core forward
  fwd_mma              1: tiled forward on tensor cores (fp16/bf16, group_channels % 16 == 0,
                       sm_80+): a block stages a fwd_mma_h x fwd_mma_w output tile's input region
                       in shared memory, sums the tile's coefficients per (region position, pixel)
                       into a matrix M as bwd_mma does, and gets the output as M^T x region with
                       m16n8k16 mma (fp32 accumulators), each warp over its pixels' bands of the
                       region only; samples beyond their pixel's band (`fwd_halo`) are added per
                       point, and pixels whose product is not finite are recomputed per point
  fwd_mma_h / fwd_mma_w / fwd_mma_warps / fwd_halo  its tile, warps per block and margin
  fwd_mma_tiles        tiles per block of the tiled forward (> 1: the next tile's region is
                       copied while one is computed); 0: 4 where the second region buffer still
                       leaves room for 2 blocks per SM, else 1
  fwd_tile             1: tiled forward on CUDA cores (rows of whole 16-byte pieces, sm_80+): a block
                       copies a fwd_tile_h x fwd_tile_w output tile's input region (`fwd_halo`)
                       and its offsets and weights into shared memory, then reads each sample's
                       corners there, 16 bytes a lane, in an order free of bank conflicts for
                       64- and 32-byte rows (a pixel's lanes split the corners); samples beyond
                       the region read global memory
  fwd_tile_h / fwd_tile_w / fwd_tile_threads  its tile and threads per block (default 8x16 and
                       256, the tile halved where the target's shared memory needs it)
  fwd_tile_mma         1 (with fwd_tile=1; fp16/bf16, group_channels 16, 32 or a multiple of 64):
                       the tiled forward's sums on tensor cores. A warp takes 8 pixels; each
                       k-step of an m16n8k16 mma multiplies one point of 4 of them: their 16
                       corner rows, read from the region with ldmatrix (conflict-free: a swizzled
                       region, the pixels' pieces paired), by a column of weights per pixel (mask
                       x bilinear weight, scaled by a power of two per pixel and split into two
                       16-bit parts: about fp32 precision); fp32 accumulators. Pixels whose product
                       is not finite are recomputed per point
  half_blend           1 (fp16/bf16, the per-point forward): each sample's four corners blended in
                       the storage type (packed 16-bit FMAs of the corners by their weights x the
                       mask, rounded to the dtype), the blend added to fp32 sums: 0.72-0.77x the
                       loop's instructions (sm_90), but a sample's blend rounds to the dtype (fp16:
                       2^-11 of it) and overflows fp16 where its partial sums pass 65504. Never tuned
  bwd_mma              1: tiled backward on tensor cores (fp16/bf16, group_channels % 16 == 0,
                       sm_80+): a block stages a bwd_mma_h x bwd_mma_w output tile's input region
                       and grad_out in shared memory, sums the tile's coefficients (mask x bilinear
                       weight, rounded to the dtype) per (region position, pixel) into a matrix M,
                       and gets the input gradient as M x grad_out and the offset/mask gradients
                       from region x grad_out^T with m16n8k16 mma (fp32 accumulators); samples
                       beyond the region (`bwd_halo`), and tiles with non-finite grad_out or with
                       weights that could overflow the dtype, take the per-point path
  bwd_mma_h / bwd_mma_w / bwd_mma_warps  its tile and warps per block
"""

from __future__ import annotations

import json
import math

from ..config import DCNConfig
from ..cuda_archs import LIMITS
from ..errors import ConfigError
from ..layout import offset_layout
from ..source import KernelSource
from .cuda_tiles import (FP32_TILE_SAMPLES, MAX_STATIC_SMEM, LayoutTooLarge, acc_bytes, bwd_mma_geometry, bwd_tile_geometry, fits_twice, fitting_halo,
                         fwd_mma_geometry, fwd_tile_geometry, fwd_tile_lanes, mma_geometry)
from .jinja import render, resolve_params

BACKWARD_ZEROES_PADDING = True  # the backward writes DCNv4's padding gradient channels (zeros)

SCALAR_TYPE = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}

PARAM_BOUNDS = {
    "vec": (1, 64),
    "pixels": (1, 1024),
    "bwd_vec": (1, 64),
    "bwd_pixels": (1, 1024),
    "unroll": (0, 64),
    "bwd_unroll": (0, 64),
    "min_blocks": (0, 32),
    "bwd_min_blocks": (1, 32),
    "deterministic": (0, 1),
    "share": (0, 1),
    "share_round": (0, 64),
    "stage": (0, 1),
    "bwd_stage": (0, 1),
    "atomic_dtype": (0, 1),
    "bwd_tile": (0, 1),
    "bwd_tile_h": (1, 64),
    "bwd_tile_w": (1, 64),
    "bwd_tile_threads": (32, 1024),
    "bwd_halo": (0, 32),
    "mma": (0, 1),
    "mma_warps": (1, 32),
    "bwd_mma": (0, 1),
    "bwd_mma_h": (1, 64),
    "bwd_mma_w": (1, 64),
    "bwd_mma_warps": (1, 32),
    "fwd_mma": (0, 1),
    "fwd_mma_h": (1, 64),
    "fwd_mma_w": (1, 64),
    "fwd_mma_warps": (1, 32),
    "fwd_mma_tiles": (0, 64),
    "fwd_halo": (0, 32),
    "fwd_tile": (0, 1),
    "fwd_tile_h": (1, 64),
    "fwd_tile_w": (1, 64),
    "fwd_tile_threads": (32, 1024),
    "fwd_tile_mma": (0, 1),
    "half_blend": (0, 1),
}
MAX_THREADS = 1024
MAX_LANES = 32  # threads per (pixel, group): one warp, so its reductions are shuffles
MAX_VEC_BYTES = 128  # registers: 4 corners x vec values per thread
TARGET_THREADS = 256  # default block size to aim for
SHARE_BYTES = 16 * 1024  # shared-memory taps of a block's rounds (share), automatic round at most
STAGE_BYTES = 40 * 1024  # staged offset rows at most (STAGE_LIMIT in cuda/point_staging.h.j2)

FLAGS = ("-O3", "-std=c++17", "-lineinfo")
# host build of the emulated kernels: -O0 compiles fastest and runs the small test shapes quickly
# enough; hidden symbols, so the emulator's CUDA runtime functions are never interposed by a real
# CUDA runtime in the process
EMULATE_FLAGS = ("-O0", "-std=c++17", "-fvisibility=hidden")


def next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def lanes(cfg: DCNConfig, vec: int) -> int:
    """Threads per (pixel, group) for `vec` channels per thread."""
    return next_pow2(-(-cfg.group_channels // vec))


def _default_vec(cfg: DCNConfig, size: int) -> int:
    """16-byte vectors of `size`-byte elements where the group channels allow, never more than 32
    lanes per group, and wider where a pixel's G groups of lanes would not fit a block (up to
    MAX_VEC_BYTES)."""
    c = cfg.group_channels
    vec = min(16 // size, c & -c)  # largest power of two dividing C, capped at 16 bytes
    while lanes(cfg, vec) > MAX_LANES or (cfg.group * lanes(cfg, vec) > MAX_THREADS and 2 * vec * size <= MAX_VEC_BYTES):
        vec *= 2
    return vec


def _block_pixels(cfg: DCNConfig, vec: int) -> int:
    """Output pixels per block of the per-point kernels: about TARGET_THREADS threads, at least one pixel."""
    return max(1, TARGET_THREADS // (cfg.group * lanes(cfg, vec)))


def _halved(h: int, w: int) -> tuple[int, int]:
    """A tile with its longer side (its height where equal) halved."""
    return (h // 2, w) if h >= w and h > 1 else (h, w // 2)


def _tile_threads(h: int, w: int, n_lanes: int) -> int:
    """A tiled kernel's block: a thread per pixel and lane (n_lanes a pixel), whole warps, up to TARGET_THREADS."""
    return min(TARGET_THREADS, -(-h * w * n_lanes // 32) * 32)


def _bwd_tile_shape(cfg: DCNConfig, vec: int) -> dict[str, int]:
    """The tiled backward's default tile and block: 8x16, or for float32 the largest of 8x16, 8x8,
    4x8, ... whose pixels x points leave its fixed-point sums the bits float32 needs."""
    h, w = 8, 16
    while cfg.dtype == "float32" and h * w * cfg.num_points > FP32_TILE_SAMPLES and h * w > 1:
        h, w = _halved(h, w)
    return {"bwd_tile_h": h, "bwd_tile_w": w, "bwd_tile_threads": _tile_threads(h, w, lanes(cfg, vec))}


def _gradient_element_bytes(cfg: DCNConfig, atomic_dtype: int) -> int:
    """Bytes an input-gradient element takes in the backward's atomics: the storage dtype's with
    atomic_dtype 1 (fp16/bf16), else the fp32 (fp64) accumulator's."""
    return cfg.itemsize if atomic_dtype else max(cfg.itemsize, acc_bytes(cfg))


def _default_bwd_vec(cfg: DCNConfig, atomic_dtype: int) -> int:
    """The backward's channels per thread: 16-byte vectors of the input gradient's atomics, one
    reduction a corner, a warp's reductions covering whole 32-byte sectors. bf16 with its fp32
    accumulator: 4 channels, not the forward's 8, whose two reductions a corner each half-fill
    their sectors (the likely cause: at G4 C32 on an H200, forward + backward took 1.7x the time,
    benchmarks/RESULTS.md)."""
    return _default_vec(cfg, _gradient_element_bytes(cfg, atomic_dtype))


def default_params(cfg: DCNConfig) -> dict[str, int]:
    vec = _default_vec(cfg, cfg.itemsize)
    pixels = _block_pixels(cfg, vec)
    atomic_dtype = 1 if cfg.dtype == "float16" else 0
    bwd_vec = _default_bwd_vec(cfg, atomic_dtype)
    return {
        "vec": vec,
        "pixels": pixels,
        "bwd_vec": bwd_vec,
        "bwd_pixels": _block_pixels(cfg, bwd_vec),
        # corner loads in flight per thread: 4 x batch vectors of vec elements (~48 registers of
        # raw corners at 16-byte vectors and a batch of 3)
        "unroll": 0,  # 0: automatic (from the final vec), see _auto_batches
        "bwd_unroll": 0,
        "min_blocks": 0,  # 0: automatic, see _auto_min_blocks
        "bwd_min_blocks": 1,
        "deterministic": 0,
        # forward: per-thread offset loads (L1 hits) beat staging them (0.87-0.89x the time on an
        # H100, benchmarks/RESULTS.md); backward: staging kept
        "stage": 0,
        "bwd_stage": 1,
        "share": 0,
        "share_round": 0,  # 0: automatic, see _share_round
        # fp16: half2 vector atomics into grad_x; bf16 keeps the fp32 accumulator (8-bit mantissa)
        "atomic_dtype": atomic_dtype,
        "bwd_tile": 0,
        **_bwd_tile_shape(cfg, bwd_vec),
        # the region covers offsets up to +-2 (before offset_scale) around the kernel footprint
        "bwd_halo": max(1, math.ceil(2 * abs(cfg.offset_scale))),
        "mma": 0,
        "mma_warps": 4,
        "bwd_mma": 0,
        "bwd_mma_h": 8,
        "bwd_mma_w": 8,
        "bwd_mma_warps": 4,
        "fwd_mma": 0,
        "fwd_mma_h": 8,
        "fwd_mma_w": 8,
        "fwd_mma_warps": 2,
        "fwd_mma_tiles": 0,  # 0: automatic, see launch_params
        "fwd_halo": max(1, math.ceil(2 * abs(cfg.offset_scale))),
        "fwd_tile": 0,
        "fwd_tile_h": 8,
        "fwd_tile_w": 16,
        "fwd_tile_threads": _tile_threads(8, 16, fwd_tile_lanes(cfg)),
        "fwd_tile_mma": 0,
        "half_blend": 0,
    }


def _follow_set_vectors(cfg: DCNConfig, params: dict[str, int]) -> None:
    """Where cfg.params set a vector width but not the block sized by it, size the block for the
    width set, as default_params does for the default width (an atomic_dtype set moves the default
    backward width with it); likewise the tiled forward's block, for the tile and the lanes a pixel
    (fwd_tile_mma) in use."""
    given = cfg.param_dict
    moved = {name for name in ("vec", "bwd_vec") if name in given}
    if "atomic_dtype" in given and "bwd_vec" not in given:
        params["bwd_vec"] = _default_bwd_vec(cfg, params["atomic_dtype"])
        moved.add("bwd_vec")
    for prefix in ("", "bwd_"):
        if f"{prefix}vec" in moved and f"{prefix}pixels" not in given:
            params[f"{prefix}pixels"] = _block_pixels(cfg, params[f"{prefix}vec"])
    if "bwd_vec" in moved and "bwd_tile_threads" not in given:
        params["bwd_tile_threads"] = _tile_threads(params["bwd_tile_h"], params["bwd_tile_w"], lanes(cfg, params["bwd_vec"]))
    if "fwd_tile_threads" not in given:
        params["fwd_tile_threads"] = _tile_threads(params["fwd_tile_h"], params["fwd_tile_w"], fwd_tile_lanes(cfg, bool(params["fwd_tile_mma"])))


def _fitting_tile(cfg: DCNConfig, params: dict[str, int], kernel: str, halo: str, geometry, n_lanes: int) -> None:
    """A tiled kernel's default tile (`kernel`_h x `kernel`_w), halved until its input region fits
    the target's shared memory with the halo set in cfg.params, else with no halo at least (large
    strides and dilated kernels spread a tile's samples), its threads following where not set; a
    tile set in cfg.params is kept, and refused where it does not fit."""
    given = cfg.param_dict
    if f"{kernel}_h" in given or f"{kernel}_w" in given:
        return
    margin = params[halo] if halo in given else 0

    def fits() -> bool:
        try:
            geometry(cfg, {**params, halo: margin})
            return True
        except LayoutTooLarge:
            return False

    while params[f"{kernel}_h"] * params[f"{kernel}_w"] > 1 and not fits():
        params[f"{kernel}_h"], params[f"{kernel}_w"] = _halved(params[f"{kernel}_h"], params[f"{kernel}_w"])
        if f"{kernel}_threads" not in given:
            params[f"{kernel}_threads"] = _tile_threads(params[f"{kernel}_h"], params[f"{kernel}_w"], n_lanes)


def _batch(points: int, most: int) -> int:
    """The smallest batch that takes no more batches than batches of `most` points: as many batches,
    fewer idle slots in the last (P = 9, at most 4: 3 batches of 3, not 3 of 4 with 3 idle)."""
    batches = -(-points // most)
    return -(-points // batches)


def _auto_batches(cfg: DCNConfig, params: dict[str, int]) -> None:
    """unroll / bwd_unroll 0 -> up to ~48 registers of raw corners (forward; see _batch), 2 points
    (backward) at 16-byte vectors; one point per batch for wider vectors."""
    size = cfg.itemsize
    if params["unroll"] == 0:
        params["unroll"] = _batch(cfg.num_points, max(1, min(4, 12 // max(1, params["vec"] * size // 4))))
    if params["bwd_unroll"] == 0:
        params["bwd_unroll"] = 2 if params["bwd_vec"] * size <= 16 else 1


def _staged_row(cfg: DCNConfig) -> int:
    """acc_t elements a pixel's staged offset row takes (ROW in cuda/point_staging.h.j2): the longer
    of its offset and mask rows, rounded up to whole 16-byte pieces of 4-byte floats."""
    rows = offset_layout(cfg)
    return -(-max(rows.offset_row_channels, rows.mask_row_channels) // 4) * 4


def _shared_taps_bytes(cfg: DCNConfig) -> int:
    """Bytes of one point's taps in a shared round: 4 weights (acc_t) and 4 pointers, 16-byte aligned."""
    return -(-(4 * acc_bytes(cfg) + 4 * 8) // 16) * 16


def _share_round(cfg: DCNConfig, params: dict[str, int]) -> None:
    """share_round 0 -> the round of whole batches that takes the fewest locations per lane
    (ceil(round / lanes) a round), of equals the one of fewest rounds, within SHARE_BYTES (else one
    batch); a round set is checked."""
    if not params["share"] or _other_forward(params):  # the per-point forward's only
        params["share_round"] = 0
        return
    points, batch, n_lanes = cfg.num_points, min(params["unroll"], cfg.num_points), lanes(cfg, params["vec"])
    per_round = params["pixels"] * cfg.group * _shared_taps_bytes(cfg)
    staged = 2 * params["pixels"] * _staged_row(cfg) * acc_bytes(cfg) if params["stage"] else 0
    room = MAX_STATIC_SMEM - (staged if staged <= STAGE_BYTES else 0)
    if params["share_round"] == 0:
        rounds = range(batch, -(-points // batch) * batch + 1, batch)
        fitting = [r for r in rounds if r * per_round <= min(room, SHARE_BYTES)] or [batch]
        params["share_round"] = min(fitting, key=lambda r: (-(-r // n_lanes) * -(-points // r), -r))
    r = params["share_round"]
    if r % batch:
        raise ConfigError("params", f"share_round={r} must be a multiple of the batch of {batch} points (unroll)")
    if r * per_round > room:
        raise ConfigError("params", f"share_round={r} takes {r * per_round} bytes of shared memory for {params['pixels']} pixels a block; "
                                    f"at most {room} (lower share_round, unroll or pixels)")


def _auto_min_blocks(cfg: DCNConfig, params: dict[str, int]) -> int:
    """Forward: a 64-register cap (1024 resident threads per block-set) for kernels of at most 9
    points whose corners are at most 16-byte whole vectors in small batches; else no cap."""
    vec, batch = params["vec"], min(params["unroll"], cfg.num_points)
    threads = params["pixels"] * cfg.group * lanes(cfg, vec)
    small = vec * cfg.itemsize <= 16 and cfg.dtype != "float64" and cfg.group_channels % vec == 0
    if small and cfg.num_points <= 9 and batch * vec * cfg.itemsize <= 48 and threads <= 1024:
        return max(1, min(8, 1024 // threads))
    return 1


def automatic_register_cap(cfg: DCNConfig) -> bool:
    """Whether the forward's register cap (min_blocks) of this CUDA template config is the
    heuristic's (_auto_min_blocks), not set by the config."""
    return cfg.is_cuda and cfg.backend == "template" and "min_blocks" not in cfg.param_dict


def forward_spills(ptxas: list[dict]) -> bool:
    """Whether a ptxas report (compilers.cuda.parse_ptxas) shows the per-point forward spilling."""
    return any(k["kernel"] == "dcn_forward_kernel" and (k["spill_stores"] or k["spill_loads"]) for k in ptxas)


def _other_forward(params: dict[str, int]) -> str | None:
    """The parameter that runs a forward other than the per-point one (the tensor-core or the tiled
    forwards, in the order cuda/dcn.cu.j2 picks them; fwd_tile_mma runs within fwd_tile), None where
    the per-point forward runs."""
    return next((name for name in ("mma", "fwd_mma", "fwd_tile") if params[name]), None)


def _check(cfg: DCNConfig, params: dict[str, int]) -> dict:
    """Reject parameter combinations the shell cannot run; returns the launch geometry."""
    size = cfg.itemsize
    widest = MAX_LANES * MAX_VEC_BYTES // size
    if cfg.group_channels > widest:
        raise ConfigError("group_channels", f"{cfg.group_channels} channels per group is more than the CUDA kernels take in {cfg.dtype}: "
                          f"at most {widest} ({MAX_LANES} threads of {MAX_VEC_BYTES // size} channels); the CPU kernels take any number")
    if params["half_blend"]:
        if cfg.dtype not in ("float16", "bfloat16"):
            raise ConfigError("params", f"half_blend=1 blends in a 16-bit storage type; {cfg.dtype} has none (use float16/bfloat16)")
        other = _other_forward(params)
        if other:
            raise ConfigError("params", f"half_blend=1 is the per-point forward's; {other}=1 runs another forward (drop one)")
        if params["vec"] % 2:
            raise ConfigError("params", f"half_blend=1 blends pairs of channels; vec={params['vec']} has none (vec >= 2)")
    geometry = {}
    for prefix in ("", "bwd_"):
        vec, pixels = params[f"{prefix}vec"], params[f"{prefix}pixels"]
        if vec & (vec - 1):
            raise ConfigError("params", f"{prefix}vec={vec} must be a power of two")
        if vec * size > MAX_VEC_BYTES:
            raise ConfigError("params", f"{prefix}vec={vec} is {vec * size} bytes of {cfg.dtype} per thread; at most {MAX_VEC_BYTES}")
        n_lanes = lanes(cfg, vec)
        if n_lanes > MAX_LANES:
            raise ConfigError("params", f"{prefix}vec={vec} needs {n_lanes} threads per group for group_channels={cfg.group_channels}; at most {MAX_LANES} (raise {prefix}vec)")
        threads = pixels * cfg.group * n_lanes
        if threads > MAX_THREADS:
            raise ConfigError(
                "params" if cfg.params else "group",
                f"{prefix}pixels={pixels} x group={cfg.group} x {n_lanes} lanes = {threads} threads per block; at most {MAX_THREADS}",
            )
        geometry[f"{prefix or 'fwd_'}threads"] = threads  # at most: the launchers halve it for small outputs
        geometry[f"{prefix or 'fwd_'}lanes"] = n_lanes
    return geometry


def _check_register_caps(cfg: DCNConfig, params: dict[str, int], geometry: dict) -> None:
    """Reject a per-point kernel's register cap (resident blocks per SM) that asks for more threads
    than the target's SM holds: ptxas would ignore it, so the parameter would silently do nothing."""
    limit = LIMITS[cfg.arch].threads_per_sm
    caps = []
    if not _other_forward(params):
        caps.append(("min_blocks", geometry["fwd_threads"]))
    if not (params["bwd_tile"] or params["bwd_mma"]):
        caps.append(("bwd_min_blocks", geometry["bwd_threads"]))
    for name, threads in caps:
        if params[name] * threads > limit:
            raise ConfigError("params", f"{name}={params[name]} blocks of {threads} threads is more than the {limit} threads an {cfg.arch} "
                                        f"SM holds (ptxas would ignore the register cap); at most {max(1, limit // threads)}")


def launch_params(cfg: DCNConfig) -> tuple[dict[str, int], dict]:
    """cfg.params over the defaults, with the automatic ones filled in, and the launch geometry;
    raises ConfigError for a combination the kernels cannot run."""
    params = resolve_params(cfg, default_params(cfg), PARAM_BOUNDS)
    _follow_set_vectors(cfg, params)
    geometry = _check(cfg, params)
    if params["mma"]:
        geometry["mma"] = mma_geometry(cfg, params)
    if params["fwd_mma"]:
        params["fwd_halo"] = fitting_halo(cfg, {**params, "fwd_mma_tiles": params["fwd_mma_tiles"] or 1}, "fwd_halo", fwd_mma_geometry)
        if params["fwd_mma_tiles"] == 0:
            params["fwd_mma_tiles"] = 4 if fits_twice(lambda: fwd_mma_geometry(cfg, {**params, "fwd_mma_tiles": 4})) else 1
        geometry["fwd_mma"] = fwd_mma_geometry(cfg, params)
    if params["fwd_tile"] or params["fwd_tile_mma"]:
        _fitting_tile(cfg, params, "fwd_tile", "fwd_halo", fwd_tile_geometry, fwd_tile_lanes(cfg, bool(params["fwd_tile_mma"])))
        params["fwd_halo"] = fitting_halo(cfg, params, "fwd_halo", fwd_tile_geometry)
        geometry["fwd_tile"] = fwd_tile_geometry(cfg, params)
    _auto_batches(cfg, params)
    _share_round(cfg, params)
    if params["min_blocks"] == 0:
        params["min_blocks"] = _auto_min_blocks(cfg, params)
    _check_register_caps(cfg, params, geometry)
    if params["bwd_tile"]:
        _fitting_tile(cfg, params, "bwd_tile", "bwd_halo", bwd_tile_geometry, lanes(cfg, params["bwd_vec"]))
        params["bwd_halo"] = fitting_halo(cfg, params, "bwd_halo", bwd_tile_geometry)
        geometry["bwd_tile"] = bwd_tile_geometry(cfg, params)
    if params["bwd_mma"]:
        params["bwd_halo"] = fitting_halo(cfg, params, "bwd_halo", bwd_mma_geometry)
        geometry["bwd_mma"] = bwd_mma_geometry(cfg, params)
    return params, geometry


def kernel_block(kernel: str, launch: dict) -> tuple[int, int] | None:
    """A kernel's threads and dynamic shared memory (bytes) per block, at most (the launchers halve
    the per-point kernels' blocks for small outputs), from launch_params' geometry (an artifact's
    meta "launch"); None for the helper kernels (conversion, bounds)."""
    per_point = {"dcn_forward_kernel": "fwd_threads", "dcn_backward_kernel": "bwd_threads"}
    staged = {"dcn_forward_tiled_kernel": "fwd_tile", "dcn_forward_tile_mma_kernel": "fwd_tile", "dcn_forward_tiled_mma_kernel": "fwd_mma",
              "dcn_backward_tiled_kernel": "bwd_tile", "dcn_backward_mma_kernel": "bwd_mma"}
    if kernel in per_point:
        return launch[per_point[kernel]], 0
    if kernel == "dcn_forward_mma_kernel":
        return 32 * launch["mma"]["warps"], 0  # its staging is static shared memory
    if kernel in staged:
        return launch[staged[kernel]]["threads"], launch[staged[kernel]]["smem_bytes"]
    return None


def entry_align(cfg: DCNConfig, forward_vec: int, backward_vec: int, grad_vec: int) -> dict[str, int]:
    """The byte alignment the tvm-ffi entry points (cuda/ffi_entry.h.j2) require of x and out, of x
    and grad_out, and of the gradients: their vector accesses of `*_vec` elements, at most 16 bytes."""
    def align(vec: int) -> int:
        return min(16, vec * cfg.itemsize)

    return {"forward": align(forward_vec), "backward": align(backward_vec), "grads": align(grad_vec)}


def generate(cfg: DCNConfig, *, emulate: bool = False) -> KernelSource:
    """The CUDA source of `cfg` for nvcc; with `emulate`, the same kernels and launchers on the SIMT
    emulator (templates/cuda/emulator.h.j2) for the host C++ compiler, working on CPU tensors."""
    if not cfg.is_cuda:
        raise ConfigError("target", f"the CUDA template needs a cuda target, got {cfg.target!r}")
    params, geometry = launch_params(cfg)
    # the tensor-core and tiled kernels copy x (and fwd_mma, fwd_tile store out) in 16-byte pieces
    fwd_vec = 16 if _other_forward(params) else params["vec"]
    bwd_vec = 16 if params["bwd_mma"] else params["bwd_vec"]
    text = render(
        "cuda/dcn.cu.j2",
        cfg,
        scalar_type=SCALAR_TYPE[cfg.dtype],
        params=params,
        mma=geometry.get("mma"),
        fwd_mma=geometry.get("fwd_mma"),
        fwd_tile=geometry.get("fwd_tile"),
        bwd_tile=geometry.get("bwd_tile"),
        bwd_mma=geometry.get("bwd_mma"),
        emulate=emulate,
        stage_bytes=STAGE_BYTES,
        stage_row=_staged_row(cfg),
        entry_align=entry_align(cfg, fwd_vec, bwd_vec, bwd_vec),
    )
    return KernelSource(
        config=cfg,
        language="cuda_emulated" if emulate else "cuda",
        text=text,
        flags=EMULATE_FLAGS if emulate else (*FLAGS, f"-arch={cfg.arch}"),
        params=tuple(sorted(params.items())),
        extra=json.dumps({"launch": geometry}),
    )

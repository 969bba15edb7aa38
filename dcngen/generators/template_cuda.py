"""Template backend, CUDA: renders templates/cuda/dcn.cu.j2 for nvcc.

Parameters (cfg.params; defaults from `default_params`):
  vec / bwd_vec        channels per thread, forward / backward (power of two)
  pixels / bwd_pixels  output pixels per block; threads per block = pixels * G * lanes, where
                       lanes = next_pow2(ceil(C / vec)) threads share one (pixel, group)
  unroll / bwd_unroll  sampling points per batch, forward / backward: the 4 corner loads of every
                       point of a batch are issued before the first is used
  stage / bwd_stage    1: a block copies its pixels' offset/mask rows into shared memory once
                       (coalesced) instead of each thread loading its 3P values (ignored where the
                       rows would not fit in 40 KB)
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
from ..errors import ConfigError
from ..source import KernelSource
from .jinja import render, resolve_params

BACKWARD_ZEROES_PADDING = True  # the backward writes DCNv4's padding gradient channels (zeros)

SCALAR_TYPE = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}
DL_DTYPE = {"float32": "kDLFloat, 32, 1", "float64": "kDLFloat, 64, 1", "float16": "kDLFloat, 16, 1", "bfloat16": "kDLBfloat, 16, 1"}
ITEMSIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}

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
}
MAX_THREADS = 1024
MAX_SMEM = 227 * 1024  # dynamic shared memory per block on sm_90 (sm_80: 163 KB; checked at launch)
MAX_VEC_BYTES = 128  # registers: 4 corners x vec values per thread
TARGET_THREADS = 256  # default block size to aim for

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


def _default_vec(cfg: DCNConfig) -> int:
    """16-byte vectors where the group channels allow, never more than 32 lanes per group."""
    size = ITEMSIZE[cfg.dtype]
    c = cfg.group_channels
    vec = min(16 // size, c & -c)  # largest power of two dividing C, capped at 16 bytes
    while lanes(cfg, vec) > 32:
        vec *= 2
    return vec


def default_params(cfg: DCNConfig) -> dict[str, int]:
    vec = _default_vec(cfg)
    per_pixel = cfg.group * lanes(cfg, vec)
    pixels = max(1, TARGET_THREADS // per_pixel) if per_pixel <= MAX_THREADS else 1
    return {
        "vec": vec,
        "pixels": pixels,
        "bwd_vec": vec,
        "bwd_pixels": pixels,
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
        # fp16: half2 vector atomics into grad_x; bf16 keeps the fp32 accumulator (8-bit mantissa)
        "atomic_dtype": 1 if cfg.dtype == "float16" else 0,
        "bwd_tile": 0,
        "bwd_tile_h": 8,
        "bwd_tile_w": 16,
        "bwd_tile_threads": 256,
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
    }


MMA_PIXELS = 8  # output pixels per warp: the N of m16n8k16
MAX_STATIC_SMEM = 48 * 1024


def _check_tensor_cores(cfg: DCNConfig, what: str, multiple: int, why: str) -> None:
    """What every tensor-core kernel needs: 16-bit inputs, sm_80+, group_channels % multiple == 0 (`why`)."""
    if cfg.dtype not in ("float16", "bfloat16"):
        raise ConfigError("params", f"{what} multiplies 16-bit inputs on tensor cores; {cfg.dtype} has no such mma (use float16/bfloat16)")
    if int(cfg.arch[3:]) < 80:
        raise ConfigError("params", f"{what} needs cp.async and the m16n8k16 mma of sm_80 or newer; the target is {cfg.arch}")
    if cfg.group_channels % multiple:
        raise ConfigError("params", f"{what} {why}: group_channels={cfg.group_channels} must be a multiple of {multiple}")


def mma_geometry(cfg: DCNConfig, params: dict[str, int]) -> dict[str, int]:
    """The tensor-core forward's shared-memory layout, in 16-bit elements per warp (the template
    declares exactly this); rejects configs its instructions or layout cannot run."""
    _check_tensor_cores(cfg, "mma=1", 8, "copies corner rows in 16-byte pieces")
    chunks = cfg.group_channels // 8  # 16-byte pieces per corner row
    row = (chunks | 1) * 8  # a staged row spans an odd number of 16-byte pieces: conflict-free ldmatrix
    rows = 4 * MMA_PIXELS  # corner rows per point
    buffer = rows * row
    stage = 2 * buffer + 8  # double-buffered, plus the 8 channels the last 16-channel tile reads past C
    smem = params["mma_warps"] * stage * 2
    if smem > MAX_STATIC_SMEM:
        raise ConfigError("params", f"mma_warps={params['mma_warps']} stages {smem // 1024} KB of corner rows per block; at most {MAX_STATIC_SMEM // 1024} KB (fewer mma_warps)")
    return {"warps": params["mma_warps"], "pixels": MMA_PIXELS, "chunks": chunks, "row": row, "rows": rows, "tiles": -(-cfg.group_channels // 16),
            "buffer": buffer, "stage": stage, "smem_bytes": smem}


def _register_target(threads: int, smem: int) -> int:
    """Resident blocks per SM for __launch_bounds__: as many as `smem` bytes of shared memory per
    block allow (228 KB per SM, 1 KB reserved per block), never so many that fewer than 128
    registers per thread remain."""
    return max(1, min((228 * 1024) // (smem + 1024), (65536 // 128) // threads))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def tile_region(cfg: DCNConfig, tile_h: int, tile_w: int, halo: int) -> dict[str, int]:
    """Input region of a tile_h x tile_w output tile: origin (reg_y0, reg_x0) relative to
    (ho0 * stride - pad, wo0 * stride - pad) and size (reg_h, reg_w), holding all four corners of
    every sample whose offset moves it at most `halo` pixels from its kernel position."""
    region = {}
    for axis, size, k, d, stride, tile in (("y", "reg_h", cfg.kernel_size[0], cfg.dilation[0], cfg.stride[0], tile_h),
                                           ("x", "reg_w", cfg.kernel_size[1], cfg.dilation[1], cfg.stride[1], tile_w)):
        half = (d * (k - 1)) >> 1
        centers = [half + (j * d - half) * cfg.offset_scale for j in range(k)]
        lo, hi = math.floor(min(centers)) - halo, math.floor(max(centers)) + halo + 1
        region[f"reg_{axis}0"] = lo
        region[size] = (tile - 1) * stride + hi - lo + 1
    return region


def bwd_tile_geometry(cfg: DCNConfig, params: dict[str, int] | None = None) -> dict[str, int]:
    """The tiled backward's geometry (cfg.params over the defaults unless `params` is given);
    rejects parameter combinations it cannot run."""
    if params is None:
        params = resolve_params(cfg, default_params(cfg), PARAM_BOUNDS)
    if params["deterministic"]:
        raise ConfigError("params", "bwd_tile=1 sums in shared memory, then adds with float atomics: not deterministic; drop one of them")
    if cfg.dtype == "float64":
        raise ConfigError("params", "bwd_tile=1 sums in 32-bit fixed point, too coarse for float64; use it with float32/float16/bfloat16")
    threads = params["bwd_tile_threads"]
    if threads % 32:
        raise ConfigError("params", f"bwd_tile_threads={threads} must be a multiple of 32")
    tile_h, tile_w = params["bwd_tile_h"], params["bwd_tile_w"]
    region = tile_region(cfg, tile_h, tile_w, params["bwd_halo"])
    stride = cfg.group_channels + 1  # ints per region position: consecutive positions start on different banks
    elems = region["reg_h"] * region["reg_w"] * stride
    smem = elems * 4
    if smem > MAX_SMEM:
        raise ConfigError("params", f"bwd_tile {tile_h}x{tile_w} with bwd_halo {params['bwd_halo']} needs {smem // 1024} KB of shared memory; at most {MAX_SMEM // 1024} KB")
    # sums of up to tile_h * tile_w * P contributions of at most 2^bits each stay below 2^30
    fixed_bits = 30 - math.ceil(math.log2(tile_h * tile_w * cfg.num_points))
    # register cap: 512 resident threads per SM where shared memory allows (the per-point backward's
    # occupancy) for kernels of at most 9 points in whole vectors; others run uncapped
    small = cfg.group_channels % params["bwd_vec"] == 0 and cfg.num_points <= 9
    min_blocks = _register_target(threads, smem) if small else 1
    return {"tile_h": tile_h, "tile_w": tile_w, "threads": threads, "min_blocks": min_blocks, "stride": stride, "elems": elems, "smem_bytes": smem,
            "fixed_bits": fixed_bits,
            "halo": params["bwd_halo"], **region}


def _mma_staging(cfg: DCNConfig, tile_h: int, tile_w: int, halo: int) -> tuple[dict[str, int], int, int, int]:
    """What both tiled tensor-core kernels stage for a tile: its region, the region's rows padded to
    whole 16-row mma steps, 16-bit elements per staged x row (16 bytes of padding spread the rows
    over the banks) and per pixel's offsets and weights (odd: a warp's pixels on distinct banks)."""
    region = tile_region(cfg, tile_h, tile_w, halo)
    return region, _round_up(region["reg_h"] * region["reg_w"], 16), cfg.group_channels + 8, 3 * cfg.num_points | 1


def bwd_mma_geometry(cfg: DCNConfig, params: dict[str, int]) -> dict[str, int]:
    """The tensor-core backward's tile, region and shared-memory layout (the template declares
    exactly this); rejects configs it cannot run."""
    _check_tensor_cores(cfg, "bwd_mma=1", 16, "multiplies 16-channel steps")
    c = cfg.group_channels
    if params["deterministic"] or params["bwd_tile"]:
        raise ConfigError("params", "bwd_mma=1 is its own backward: drop deterministic / bwd_tile")
    tile_h, tile_w = params["bwd_mma_h"], params["bwd_mma_w"]
    pixels = tile_h * tile_w
    if pixels % 16:
        raise ConfigError("params", f"bwd_mma_h x bwd_mma_w = {pixels} pixels; the mma's k-steps need a multiple of 16")
    threads = 32 * params["bwd_mma_warps"]
    region, rows, x_stride, om_stride = _mma_staging(cfg, tile_h, tile_w, params["bwd_halo"])
    chunk = 32 if pixels % 32 == 0 else 16  # pixels per pass of the region x grad_out^T product
    # M's rows, then the tile's grad_x rows: C values of the input-gradient accumulator (the dtype
    # with atomic_dtype=1, else fp32)
    m_stride = max(pixels, c if params["atomic_dtype"] else 2 * c) + 8
    d_stride = chunk + 8  # floats: a half-warp's float2 stores of a D fragment hit distinct banks
    x_bytes, go_bytes = rows * x_stride * 2, pixels * x_stride * 2
    union_bytes = max(rows * m_stride * 2, rows * d_stride * 4)  # M, then the dot products
    info_bytes = pixels * cfg.num_points * 16
    smem = x_bytes + go_bytes + union_bytes + info_bytes + _round_up(pixels * om_stride * 2, 16)  # then the offsets' gradients
    if smem > MAX_SMEM:
        raise ConfigError("params", f"bwd_mma {tile_h}x{tile_w} with bwd_halo {params['bwd_halo']} needs {smem // 1024} KB of shared memory; at most {MAX_SMEM // 1024} KB")
    min_blocks = _register_target(threads, smem)  # without one, ptxas picked 80 registers and spilled
    return {"tile_h": tile_h, "tile_w": tile_w, "pixels": pixels, "threads": threads, "min_blocks": min_blocks, "rows": rows, "chunk": chunk,
            "x_stride": x_stride, "m_stride": m_stride, "d_stride": d_stride, "x_offset": 0, "go_offset": x_bytes,
            "m_offset": x_bytes + go_bytes, "info_offset": x_bytes + go_bytes + union_bytes, "om_offset": x_bytes + go_bytes + union_bytes + info_bytes,
            "om_stride": om_stride, "smem_bytes": smem, "halo": params["bwd_halo"],
            **region}


def fwd_mma_geometry(cfg: DCNConfig, params: dict[str, int]) -> dict[str, int]:
    """The tiled tensor-core forward's tile, region and shared-memory layout (the template declares
    exactly this); rejects configs it cannot run."""
    _check_tensor_cores(cfg, "fwd_mma=1", 16, "stages and multiplies 16-channel steps")
    c = cfg.group_channels
    if params["mma"]:
        raise ConfigError("params", "fwd_mma=1 and mma=1 are two tensor-core forwards: drop one of them")
    tile_h, tile_w = params["fwd_mma_h"], params["fwd_mma_w"]
    pixels = tile_h * tile_w
    warps = params["fwd_mma_warps"]
    if pixels % (16 * warps):
        raise ConfigError("params", f"fwd_mma_h x fwd_mma_w = {pixels} pixels must split into whole 16-pixel m-tiles over fwd_mma_warps={warps} warps")
    threads = 32 * warps
    region, rows, x_stride, om_stride = _mma_staging(cfg, tile_h, tile_w, params["fwd_halo"])
    m_stride = pixels + 8
    out_stride = c + 8  # floats: a quarter-warp's float2 stores of a fragment row hit distinct banks
    # a region buffer holds the tile's x, then its fp32 output rows; a second one takes the next
    # tile's region while this one is computed
    buffer_bytes = _round_up(max(rows * x_stride * 2, pixels * out_stride * 4), 16)
    buffers = 2 if params["fwd_mma_tiles"] > 1 else 1
    m_offset = buffers * buffer_bytes
    pos_offset = m_offset + rows * m_stride * 2
    om_offset = pos_offset + _round_up(pixels * cfg.num_points * 2, 16)  # each sample's row of M (int16)
    smem = om_offset + _round_up(pixels * om_stride * 2, 16)
    if smem > MAX_SMEM:
        raise ConfigError("params", f"fwd_mma {tile_h}x{tile_w} with fwd_halo {params['fwd_halo']} and {buffers} region buffers needs "
                                    f"{smem // 1024} KB of shared memory; at most {MAX_SMEM // 1024} KB")
    return {"tile_h": tile_h, "tile_w": tile_w, "threads": threads, "warp_tiles": pixels // 16 // warps, "min_blocks": _register_target(threads, smem),
            "tiles": params["fwd_mma_tiles"], "buffers": buffers, "rows": rows, "x_stride": x_stride, "m_stride": m_stride, "out_stride": out_stride,
            "buffer_bytes": buffer_bytes, "m_offset": m_offset, "pos_offset": pos_offset, "om_offset": om_offset, "om_stride": om_stride,
            "smem_bytes": smem, "halo": params["fwd_halo"], **region}


def _fits_twice(geometry) -> bool:
    """Whether geometry() (a layout) is accepted and leaves room for 2 resident blocks per SM."""
    try:
        return geometry()["min_blocks"] >= 2
    except ConfigError:
        return False


def _auto_batches(cfg: DCNConfig, params: dict[str, int]) -> None:
    """unroll / bwd_unroll 0 -> ~48 registers of raw corners (forward), 2 points (backward) at
    16-byte vectors; one point per batch for wider vectors."""
    size = ITEMSIZE[cfg.dtype]
    if params["unroll"] == 0:
        params["unroll"] = max(1, min(cfg.num_points, 4, 12 // max(1, params["vec"] * size // 4)))
    if params["bwd_unroll"] == 0:
        params["bwd_unroll"] = 2 if params["bwd_vec"] * size <= 16 else 1


def _auto_min_blocks(cfg: DCNConfig, params: dict[str, int]) -> int:
    """Forward: a 64-register cap (1024 resident threads per block-set) for kernels of at most 9
    points whose corners are at most 16-byte whole vectors in small batches; else no cap."""
    vec, batch = params["vec"], min(params["unroll"], cfg.num_points)
    threads = params["pixels"] * cfg.group * lanes(cfg, vec)
    small = vec * ITEMSIZE[cfg.dtype] <= 16 and cfg.dtype != "float64" and cfg.group_channels % vec == 0
    if small and cfg.num_points <= 9 and batch * vec * ITEMSIZE[cfg.dtype] <= 48 and threads <= 1024:
        return max(1, min(8, 1024 // threads))
    return 1


def _check(cfg: DCNConfig, params: dict[str, int]) -> dict:
    """Reject parameter combinations the shell cannot run; returns the launch geometry."""
    size = ITEMSIZE[cfg.dtype]
    geometry = {}
    for prefix in ("", "bwd_"):
        vec, pixels = params[f"{prefix}vec"], params[f"{prefix}pixels"]
        if vec & (vec - 1):
            raise ConfigError("params", f"{prefix}vec={vec} must be a power of two")
        if vec * size > MAX_VEC_BYTES:
            raise ConfigError("params", f"{prefix}vec={vec} is {vec * size} bytes of {cfg.dtype} per thread; at most {MAX_VEC_BYTES}")
        n_lanes = lanes(cfg, vec)
        if n_lanes > 32:
            raise ConfigError("params", f"{prefix}vec={vec} needs {n_lanes} threads per group for group_channels={cfg.group_channels}; at most 32 (raise {prefix}vec)")
        threads = pixels * cfg.group * n_lanes
        if threads > MAX_THREADS:
            raise ConfigError(
                "params" if cfg.params else "group",
                f"{prefix}pixels={pixels} x group={cfg.group} x {n_lanes} lanes = {threads} threads per block; at most {MAX_THREADS}",
            )
        geometry[f"{prefix or 'fwd_'}threads"] = threads
        geometry[f"{prefix or 'fwd_'}lanes"] = n_lanes
    return geometry


def launch_params(cfg: DCNConfig) -> tuple[dict[str, int], dict]:
    """cfg.params over the defaults, with the automatic ones filled in, and the launch geometry;
    raises ConfigError for a combination the kernels cannot run."""
    params = resolve_params(cfg, default_params(cfg), PARAM_BOUNDS)
    geometry = _check(cfg, params)
    if params["mma"]:
        geometry["mma"] = mma_geometry(cfg, params)
    if params["fwd_mma"]:
        if params["fwd_mma_tiles"] == 0:
            params["fwd_mma_tiles"] = 4 if _fits_twice(lambda: fwd_mma_geometry(cfg, {**params, "fwd_mma_tiles": 4})) else 1
        geometry["fwd_mma"] = fwd_mma_geometry(cfg, params)
    _auto_batches(cfg, params)
    if params["min_blocks"] == 0:
        params["min_blocks"] = _auto_min_blocks(cfg, params)
    if params["bwd_tile"]:
        geometry["bwd_tile"] = bwd_tile_geometry(cfg, params)
    if params["bwd_mma"]:
        geometry["bwd_mma"] = bwd_mma_geometry(cfg, params)
    return params, geometry


def generate(cfg: DCNConfig, *, emulate: bool = False) -> KernelSource:
    """The CUDA source of `cfg` for nvcc; with `emulate`, the same kernels and launchers on the SIMT
    emulator (templates/cuda/emulator.h.j2) for the host C++ compiler, working on CPU tensors."""
    if not cfg.is_cuda:
        raise ConfigError("target", f"the CUDA template needs a cuda target, got {cfg.target!r}")
    params, geometry = launch_params(cfg)
    text = render(
        "cuda/dcn.cu.j2",
        cfg,
        scalar_type=SCALAR_TYPE[cfg.dtype],
        dl_dtype=DL_DTYPE[cfg.dtype],
        itemsize=ITEMSIZE[cfg.dtype],
        params=params,
        mma=geometry.get("mma"),
        fwd_mma=geometry.get("fwd_mma"),
        bwd_tile=geometry.get("bwd_tile"),
        bwd_mma=geometry.get("bwd_mma"),
        emulate=emulate,
    )
    return KernelSource(
        config=cfg,
        language="cuda_emulated" if emulate else "cuda",
        text=text,
        flags=EMULATE_FLAGS if emulate else (*FLAGS, f"-arch={cfg.arch}"),
        params=tuple(sorted(params.items())),
        extra=json.dumps({"launch": geometry}),
    )

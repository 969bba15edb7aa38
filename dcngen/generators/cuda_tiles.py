"""Launch geometry and shared-memory layouts of the CUDA template's tensor-core and tiled kernels
(mma, fwd_mma, fwd_tile, bwd_tile, bwd_mma): each function returns what the template declares for one of
them, from the config and the resolved parameters, and raises ConfigError for a combination the
kernel cannot run."""

from __future__ import annotations

import math

from ..config import DCNConfig
from ..cuda_archs import LIMITS, REGISTERS_PER_SM, SMEM_RESERVED_PER_BLOCK
from ..errors import ConfigError

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


def _register_target(cfg: DCNConfig, threads: int, smem: int, registers: int = 128) -> int:
    """Resident blocks per SM for __launch_bounds__: as many as the target's shared memory and
    thread slots allow for blocks of `threads` threads and `smem` bytes, never so many that fewer
    than `registers` registers per thread remain."""
    limits = LIMITS[cfg.arch]
    by_smem = limits.smem_per_sm // (smem + SMEM_RESERVED_PER_BLOCK)
    return max(1, min(by_smem, limits.threads_per_sm // threads, REGISTERS_PER_SM // registers // threads))


class LayoutTooLarge(ConfigError):
    """A layout needs more shared memory per block than the target has."""


def _static_bytes(n: int) -> int:
    """Shared memory a kernel declares statically (__shared__ arrays), as ptxas lays it out."""
    return _round_up(n, 16)


def _check_smem(cfg: DCNConfig, smem: int, static: int, what: str, smaller: str) -> None:
    """Rejects a layout of `smem` dynamic bytes per block (`what` names it) that, with the kernel's
    `static` bytes, passes the target's limit; `smaller` names the parameters that shrink it."""
    limit = LIMITS[cfg.arch].smem_per_block
    if smem + static > limit:
        raise LayoutTooLarge("params", f"{what} needs {(smem + static) // 1024} KB of shared memory per block; {cfg.arch} allows at most "
                                       f"{limit // 1024} KB (lower {smaller})")


def fitting_halo(cfg: DCNConfig, params: dict[str, int], halo: str, geometry) -> int:
    """params[halo], or where the config leaves it to the default, the largest halo up to it for
    which geometry(cfg, params) fits the target's shared memory (0 at least; samples beyond a
    smaller halo take the per-point path). A bisection: a layout only grows with its halo, and a
    huge offset_scale gives a huge default halo."""
    value = params[halo]

    def fits(h: int) -> bool:
        try:
            geometry(cfg, {**params, halo: h})
            return True
        except LayoutTooLarge:
            return False

    if halo in cfg.param_dict or fits(value):
        return value
    if not fits(0):
        return 0  # the caller's geometry() says why
    fitting, too_large = 0, value
    while too_large - fitting > 1:
        middle = (fitting + too_large) // 2
        fitting, too_large = (middle, too_large) if fits(middle) else (fitting, middle)
    return fitting


def _points_stride(cfg: DCNConfig) -> int:
    """Elements per pixel of a tile's staged offsets and weights (3P, made odd: a warp's pixels on
    distinct banks)."""
    return 3 * cfg.num_points | 1


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def acc_bytes(cfg: DCNConfig) -> int:
    """Bytes of the kernels' accumulation type: fp64 for fp64, else fp32."""
    return 8 if cfg.dtype == "float64" else 4


def tile_region(cfg: DCNConfig, tile_h: int, tile_w: int, halo: int) -> dict[str, int]:
    """Input region of a tile_h x tile_w output tile: origin (reg_y0, reg_x0) relative to
    (ho0 * stride - pad, wo0 * stride - pad) and size (reg_h, reg_w), holding all four corners of
    every sample whose offset moves it at most `halo` pixels from its kernel position."""
    region = {}
    for axis, size, k, d, half, stride, tile in (("y", "reg_h", cfg.kernel_size[0], cfg.dilation[0], cfg.half_window[0], cfg.stride[0], tile_h),
                                                 ("x", "reg_w", cfg.kernel_size[1], cfg.dilation[1], cfg.half_window[1], cfg.stride[1], tile_w)):
        centers = [half + (j * d - half) * cfg.offset_scale for j in range(k)]
        lo, hi = math.floor(min(centers)) - halo, math.floor(max(centers)) + halo + 1
        region[f"reg_{axis}0"] = lo
        region[size] = (tile - 1) * stride + hi - lo + 1
    return region


# The tiled backward's fixed-point bits per contribution that float32 sums need: its error is a
# fraction 2^-bits of the tile's bound per contribution; at 18 bits (8x16 tiles of 21 points)
# fuzzed fp32 input gradients missed float32's tolerance, at 19 and more they met it.
FP32_FIXED_BITS = 21
FP32_TILE_SAMPLES = 1 << (30 - FP32_FIXED_BITS)  # pixels x points per tile that leave those bits


def bwd_tile_geometry(cfg: DCNConfig, params: dict[str, int]) -> dict[str, int]:
    """The tiled backward's geometry; rejects parameter combinations it cannot run."""
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
    # the region's sums, then each pixel's offsets and weights (floats)
    om_offset, om_stride = _round_up(elems * 4, 16), _points_stride(cfg)
    smem, static = om_offset + tile_h * tile_w * om_stride * 4, _static_bytes(2 * 4)  # the template's bt_bound[2]
    _check_smem(cfg, smem, static, f"bwd_tile {tile_h}x{tile_w} with bwd_halo {params['bwd_halo']}", "bwd_tile_h, bwd_tile_w or bwd_halo")
    # sums of up to tile_h * tile_w * P contributions of at most 2^bits each stay below 2^30
    fixed_bits = 30 - math.ceil(math.log2(tile_h * tile_w * cfg.num_points))
    if cfg.dtype == "float32" and fixed_bits < FP32_FIXED_BITS:
        raise ConfigError("params", f"bwd_tile {tile_h}x{tile_w} sums {tile_h * tile_w} pixels x {cfg.num_points} points of float32 in 32-bit fixed point, "
                                    f"{fixed_bits} bits each; float32 needs {FP32_FIXED_BITS} (at most {FP32_TILE_SAMPLES} pixel-points per tile: smaller "
                                    f"bwd_tile_h / bwd_tile_w)")
    # register cap: 512 resident threads per SM where shared memory allows (the per-point backward's
    # occupancy) for kernels of at most 9 points in whole vectors; others run uncapped
    small = cfg.group_channels % params["bwd_vec"] == 0 and cfg.num_points <= 9
    min_blocks = _register_target(cfg, threads, smem + static) if small else 1
    return {"tile_h": tile_h, "tile_w": tile_w, "threads": threads, "min_blocks": min_blocks, "stride": stride, "elems": elems,
            "om_offset": om_offset, "om_stride": om_stride, "smem_bytes": smem, "static_bytes": static, "fixed_bits": fixed_bits,
            "halo": params["bwd_halo"], **region}


def _swizzled_row(data: int, pad: int, short: bool = False) -> tuple[int, int]:
    """Bytes per shared row of `data` bytes that mma fragments read (and write) 8 rows at a time, and
    whether its 16-byte units are swizzled (the template's swizzled_row_byte): a row of whole
    128-byte lines, or with `short` (rows only ldmatrix reads) one of 64 or 32 bytes, is stored
    unpadded with its units permuted by row; any other row is padded by `pad` bytes, which shifts
    consecutive rows onto other banks."""
    return (data, 1) if data % 128 == 0 or (short and data in (32, 64)) else (data + pad, 0)


def _mma_staging(cfg: DCNConfig, tile_h: int, tile_w: int, halo: int) -> tuple[dict[str, int], int, tuple[int, int], int]:
    """What both tiled tensor-core kernels stage for a tile: its region, the region's rows padded to
    whole 16-row mma steps, the bytes of a staged x row and whether it is swizzled (rows that
    ldmatrix reads, and cp.async writes a 16-byte piece a lane), and the elements per pixel's offsets
    and weights."""
    region = tile_region(cfg, tile_h, tile_w, halo)
    x_row = _swizzled_row(cfg.group_channels * 2, 16, short=True)
    return region, _round_up(region["reg_h"] * region["reg_w"], 16), x_row, _points_stride(cfg)


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
    region, rows, (x_row, x_swizzle), om_stride = _mma_staging(cfg, tile_h, tile_w, params["bwd_halo"])
    chunk = 32 if pixels % 32 == 0 else 16  # pixels per pass of the region x grad_out^T product
    # M's rows, then the tile's grad_x rows: C values of the input-gradient accumulator (the dtype
    # with atomic_dtype=1, else fp32); then D's rows of a pass's pixels (floats)
    m_row, m_swizzle = _swizzled_row(max(pixels, c if params["atomic_dtype"] else 2 * c) * 2, 16)
    d_row, d_swizzle = _swizzled_row(chunk * 4, 32)  # padded: a half-warp's float2 stores of a D fragment on distinct banks
    x_bytes, go_bytes = rows * x_row, pixels * x_row  # the region's x rows; the tile's grad_out rows, laid out alike
    union_bytes = rows * max(m_row, d_row)  # M, then the dot products
    info_bytes = pixels * cfg.num_points * 16
    smem = x_bytes + go_bytes + union_bytes + info_bytes + _round_up(pixels * om_stride * 2, 16)  # then the offsets' gradients
    static = _static_bytes(4 + pixels // chunk * 8)  # the template's bm_fallback and bm_span
    _check_smem(cfg, smem, static, f"bwd_mma {tile_h}x{tile_w} with bwd_halo {params['bwd_halo']}", "bwd_mma_h, bwd_mma_w or bwd_halo")
    min_blocks = _register_target(cfg, threads, smem + static)  # without one, ptxas picked 80 registers and spilled
    return {"tile_h": tile_h, "tile_w": tile_w, "pixels": pixels, "threads": threads, "min_blocks": min_blocks, "rows": rows, "chunk": chunk,
            "x_row": x_row, "x_swizzle": x_swizzle, "m_row": m_row, "m_swizzle": m_swizzle, "d_row": d_row, "d_swizzle": d_swizzle, "x_offset": 0, "go_offset": x_bytes,
            "m_offset": x_bytes + go_bytes, "info_offset": x_bytes + go_bytes + union_bytes, "om_offset": x_bytes + go_bytes + union_bytes + info_bytes,
            "om_stride": om_stride, "smem_bytes": smem, "static_bytes": static, "halo": params["bwd_halo"],
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
    region, rows, (x_row, x_swizzle), om_stride = _mma_staging(cfg, tile_h, tile_w, params["fwd_halo"])
    m_stride = pixels + 8
    out_stride = c + 8  # floats: a quarter-warp's float2 stores of a fragment row hit distinct banks
    # a region buffer holds the tile's x, then its fp32 output rows; a second one takes the next
    # tile's region while this one is computed
    buffer_bytes = _round_up(max(rows * x_row, pixels * out_stride * 4), 16)
    buffers = 2 if params["fwd_mma_tiles"] > 1 else 1
    m_offset = buffers * buffer_bytes
    pos_offset = m_offset + rows * m_stride * 2
    om_offset = pos_offset + _round_up(pixels * cfg.num_points * 2, 16)  # each sample's row of M (int16)
    smem = om_offset + _round_up(pixels * om_stride * 2, 16)
    static = _static_bytes((2 + pixels) * 4)  # the template's fm_slow[2] and fm_redo[PIXELS]
    _check_smem(cfg, smem, static, f"fwd_mma {tile_h}x{tile_w} with fwd_halo {params['fwd_halo']} and {buffers} region buffers",
                "fwd_mma_h, fwd_mma_w or fwd_halo" + (", or fwd_mma_tiles=1" if buffers > 1 else ""))
    return {"tile_h": tile_h, "tile_w": tile_w, "threads": threads, "warp_tiles": pixels // 16 // warps,
            "min_blocks": _register_target(cfg, threads, smem + static),
            "tiles": params["fwd_mma_tiles"], "buffers": buffers, "rows": rows, "x_row": x_row, "x_swizzle": x_swizzle, "m_stride": m_stride, "out_stride": out_stride,
            "buffer_bytes": buffer_bytes, "m_offset": m_offset, "pos_offset": pos_offset, "om_offset": om_offset, "om_stride": om_stride,
            "smem_bytes": smem, "static_bytes": static, "halo": params["fwd_halo"], **region}


# fwd_tile_mma: a warp takes 8 pixels, 4 lanes a pixel (each k-step of its mma: one point of 4 of them)
FWD_TILE_MMA_LANES = 4


def _corner_split(row_bytes: int) -> int:
    """Lanes of a pixel that split a sample's four corners in the tiled SIMT forward, each reading
    all pieces of its corners: 2 (a column each) for 64-byte rows, 4 (a corner each) for 32-byte
    rows, where a dense region puts consecutive positions on different halves / quarters of the
    banks; else 1 (a lane a 16-byte piece of all four corners)."""
    return {64: 2, 32: 4}.get(row_bytes, 1)


def fwd_tile_lanes(cfg: DCNConfig, mma: bool = False) -> int:
    """Threads of a pixel in the tiled forward: with `mma` (fwd_tile_mma), FWD_TILE_MMA_LANES that
    locate its samples; else one a corner set where they split a sample's corners, or one a
    16-byte piece of the row, a power of two."""
    if mma:
        return FWD_TILE_MMA_LANES
    row = cfg.group_channels * cfg.itemsize
    split = _corner_split(row)
    return split if split > 1 else 1 << (max(1, row // 16) - 1).bit_length()


def fwd_tile_geometry(cfg: DCNConfig, params: dict[str, int]) -> dict[str, int]:
    """The tiled forward's tile, lanes, region and shared-memory layout, on CUDA cores or with
    fwd_tile_mma on tensor cores (the template declares exactly this); rejects configs it cannot run."""
    mma = bool(params["fwd_tile_mma"])
    if mma:
        if not params["fwd_tile"]:
            raise ConfigError("params", "fwd_tile_mma=1 is a mode of the tiled forward: set fwd_tile=1 too")
        _check_tensor_cores(cfg, "fwd_tile_mma=1", 16, "multiplies 16-channel steps")
        if cfg.group_channels not in (16, 32) and cfg.group_channels % 64:
            raise ConfigError("params", f"fwd_tile_mma=1 pairs the 16-byte pieces of a row in halves of the banks: group_channels={cfg.group_channels} "
                                        f"must be 16, 32 or a multiple of 64")
    if int(cfg.arch[3:]) < 80:
        raise ConfigError("params", f"fwd_tile=1 copies its input region with the cp.async of sm_80 or newer; the target is {cfg.arch}")
    row = cfg.group_channels * cfg.itemsize
    if row % 16:
        raise ConfigError("params", f"fwd_tile=1 copies and reads rows in 16-byte pieces: group_channels={cfg.group_channels} x {cfg.itemsize} bytes "
                                    f"must be a multiple of 16")
    if params["mma"] or params["fwd_mma"]:
        raise ConfigError("params", "fwd_tile=1, fwd_mma=1 and mma=1 are three forwards: keep one of them")
    split, lanes = _corner_split(row), fwd_tile_lanes(cfg, mma)
    if lanes > 32:
        raise ConfigError("params", f"fwd_tile=1 gives a lane 16 bytes of a row: group_channels={cfg.group_channels} in {cfg.dtype} needs {lanes} lanes; "
                                    f"at most 32 (use fwd_tile=0)")
    threads = params["fwd_tile_threads"]
    if threads % 32:
        raise ConfigError("params", f"fwd_tile_threads={threads} must be a multiple of 32")
    tile_h, tile_w = params["fwd_tile_h"], params["fwd_tile_w"]
    region = tile_region(cfg, tile_h, tile_w, params["fwd_halo"])
    if row == 32:  # 2 mod 4 positions a region row: a sample's corners on 4 different quarters of the banks
        region["reg_w"] += (2 - region["reg_w"]) % 4
    positions = region["reg_h"] * region["reg_w"]
    # fwd_tile_mma: zeros after the region, the four corners of a sample that adds nothing
    zero_rows = region["reg_w"] + 2 if mma else 0
    acc = acc_bytes(cfg)
    # acc_t a pixel: (dx, dy, m, unused) a point, in 16-byte pieces: an odd number of them, so that
    # the reads of a quarter-warp's 4 pixels (fwd_tile: 2 lanes a pixel, the same point) lie on 4
    # different quarters of the banks; with fwd_tile_mma 4 mod 8, so that those of its 2 pixels (4
    # lanes a pixel, 4 consecutive points) lie on the two halves
    pieces = cfg.num_points * 4 * acc // 16
    om_stride = (pieces + (4 - pieces) % 8 if mma else pieces | 1) * 16 // acc
    om_offset = _round_up((positions + zero_rows) * row, 16)
    scratch_offset = om_offset + tile_h * tile_w * om_stride * acc
    # fwd_tile_mma, per warp: its pixels' sample records, then their fp32 output rows. A record is 5
    # words (a key, 4 of weights), kept as 5 planes of [pixels][record_stride] words, each pixel's
    # points in a row that a k-step group reads 2 at a time (8 bytes; nvcc merges two such reads
    # into one of 16 bytes where 4 points remain). record_stride is an odd number of 16-byte units,
    # so that the 8 pixels' rows start on 8 different quarters of the banks (a round of records
    # written: 1 wavefront a plane); plane_stride is 8 words mod 32, so that the weight words a
    # half-warp reads (2 pixels x 4 planes, 8 bytes each) and a quarter-warp reads (4 planes, 16
    # bytes each) lie on different banks: a wavefront each, the fewest.
    pixels = 32 // FWD_TILE_MMA_LANES
    record_stride = 4 * (-(-cfg.num_points // 4) | 1)
    # out_stride: a staged output row of whole pieces, unpadded (ftm_slot turns its pieces)
    plane_stride, out_stride = pixels * record_stride + 8, cfg.group_channels
    scratch = (5 * plane_stride * 4 + pixels * out_stride * 4) if mma else 0
    smem = scratch_offset + threads // 32 * scratch
    _check_smem(cfg, smem, 0, f"fwd_tile {tile_h}x{tile_w} with fwd_halo {params['fwd_halo']}", "fwd_tile_h, fwd_tile_w or fwd_halo")
    # at least 80 registers: fp16 C32's 32 accumulators and 16 of raw corners run spill-free in them
    return {"tile_h": tile_h, "tile_w": tile_w, "threads": threads, "lanes": lanes, "split": split, "mma": int(mma),
            "min_blocks": _register_target(cfg, threads, smem, 80), "zero_rows": zero_rows, "om_offset": om_offset, "om_stride": om_stride,
            "scratch_offset": scratch_offset, "scratch_bytes": scratch, "record_stride": record_stride, "plane_stride": plane_stride,
            "out_stride": out_stride,
            "smem_bytes": smem, "static_bytes": 0, "halo": params["fwd_halo"], **region}


def fits_twice(geometry) -> bool:
    """Whether geometry() (a layout) is accepted and leaves room for 2 resident blocks per SM."""
    try:
        return geometry()["min_blocks"] >= 2
    except ConfigError:
        return False

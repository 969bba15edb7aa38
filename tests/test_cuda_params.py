"""CUDA template launch parameters, chosen in Python (no nvcc, no GPU): the default vector width,
block size, point batches and register caps, the tiled backward's tile, the shared-memory limits
of each architecture and the layouts' fit to them, halos lowered to the largest that fits."""

from __future__ import annotations

import re

import pytest

from dcngen.config import DCNConfig
from dcngen.cuda_archs import KB, LIMITS, SMEM_RESERVED_PER_BLOCK, resident_warps
from dcngen.errors import ConfigError
from dcngen.generators import generate
from dcngen.generators.cuda_tiles import LayoutTooLarge, bwd_mma_geometry, fwd_mma_geometry
from dcngen.generators.template_cuda import default_params, entry_align, launch_params


def cfg(dtype="float16", c=32, k=3, g=4, target="cuda:sm_90", **kw) -> DCNConfig:
    return DCNConfig(group=g, group_channels=c, kernel_size=k, padding=k // 2 if isinstance(k, int) else 0, dtype=dtype, target=target, **kw)


def test_architecture_limits_are_the_programming_guides():
    """Shared memory a block may opt in to, per SM, and resident threads per SM (CUDA C++
    Programming Guide, compute-capability table), and the 1 KB the runtime reserves per block."""
    table = {arch: (lim.smem_per_block // KB, lim.smem_per_sm // KB, lim.threads_per_sm, lim.blocks_per_sm) for arch, lim in LIMITS.items()}
    assert table == {"sm_75": (64, 64, 1024, 16), "sm_80": (163, 164, 2048, 32), "sm_86": (99, 100, 1536, 16), "sm_87": (163, 164, 1536, 16),
                     "sm_89": (99, 100, 1536, 24), "sm_90": (227, 228, 2048, 32), "sm_100": (227, 228, 2048, 32), "sm_103": (227, 228, 2048, 32),
                     "sm_120": (99, 100, 1536, 24)}
    assert SMEM_RESERVED_PER_BLOCK == 1024


@pytest.mark.parametrize("arch, threads, registers, smem, warps, limit", [
    # as the H200's Nsight Compute counted them (waves of blocks) for fp16 G4 C32 at N64 56x56
    ("sm_90", 256, 63, 0, 32, "registers"),  # the default forward: 4 blocks
    ("sm_90", 256, 80, 57408, 24, "registers"),  # fwd_tile: 3 blocks
    ("sm_90", 128, 123, 102816, 8, "shared memory"),  # bwd_mma: 2 blocks
    ("sm_90", 64, 96, 98064, 4, "shared memory"),  # fwd_mma: 2 blocks
    ("sm_86", 32, 16, 0, 16, "blocks"),
    ("sm_86", 1024, 32, 0, 32, "threads"),
])
def test_theoretical_occupancy(arch, threads, registers, smem, warps, limit):
    """Registers go to a warp 256 at a time; each block keeps 1 KB of shared memory besides its own."""
    assert resident_warps(arch, threads, registers, smem) == (warps, limit)


@pytest.mark.parametrize("dtype, c, g, vec, lanes", [
    ("float16", 32, 4, 8, 4),  # 16 bytes
    ("float32", 32, 4, 4, 8),
    ("float32", 24, 4, 4, 8),  # 16 bytes divide C: 6 lanes, rounded up to 8
    ("float16", 12, 4, 4, 4),  # the largest power of two dividing C
    ("float16", 8, 4, 8, 1),
    ("float64", 64, 4, 2, 32),  # exactly 32 lanes: no wider vector needed
    ("float16", 66, 1, 4, 32),  # 2 channels dividing C would need 33 lanes
    ("float32", 32, 128, 4, 8),  # 128 groups x 8 lanes: exactly one block of 1024
    ("float32", 32, 129, 8, 4),  # one group more: wider vectors
    ("float32", 32, 1100, 32, 1),  # widened up to 128 bytes a thread, no further
])
def test_default_vector_width(dtype, c, g, vec, lanes):
    """16-byte vectors dividing C, widened while a group needs more than 32 lanes or a pixel's
    groups more than 1024 threads, up to 128 bytes a thread."""
    config = cfg(dtype, c, g=g)
    assert default_params(config)["vec"] == default_params(config)["bwd_vec"] == vec
    if g <= 1024:
        geometry = launch_params(config)[1]
        assert geometry["fwd_lanes"] == geometry["bwd_lanes"] == lanes


@pytest.mark.parametrize("dtype, c, g, pixels", [("float16", 32, 4, 16), ("float32", 32, 4, 8), ("float16", 8, 4, 64), ("float64", 64, 4, 2),
                                                 ("float32", 16, 64, 1), ("float32", 32, 128, 1)])
def test_default_block_aims_at_256_threads(dtype, c, g, pixels):
    """pixels = 256 // (G x lanes), at least 1 (a pixel's groups of lanes can fill a block alone)."""
    params = default_params(cfg(dtype, c, g=g))
    assert params["pixels"] == params["bwd_pixels"] == pixels


@pytest.mark.parametrize("params, pixels, bwd_pixels", [
    ({"vec": 1, "bwd_vec": 1}, 1, 1),  # 32 lanes x 5 groups = 160 threads a pixel (with 16-byte vectors' 12 pixels: 1920)
    ({"vec": 2}, 3, 12),  # 16 lanes x 5 groups: 3 pixels; the backward keeps its default width and block
    ({"vec": 1, "pixels": 3}, 3, 12),  # a block set with the width is kept
])
def test_blocks_follow_a_vector_width_that_is_set(params, pixels, bwd_pixels):
    """A vector width set without its block gets the block the default rule gives that width
    (about 256 threads), not the default width's, which could pass 1024 threads."""
    launch, geometry = launch_params(cfg("float16", 32, g=5, params=params))
    assert (launch["pixels"], launch["bwd_pixels"]) == (pixels, bwd_pixels)
    assert geometry["fwd_threads"] <= 1024 and geometry["bwd_threads"] <= 1024


def test_tiled_backward_tile_shrinks_to_fit_shared_memory():
    """A tile of stride-3, dilated samples whose default 8x16 region does not fit even without a halo
    is halved until it does (with the halo set, if any; then the halo is the largest that fits); a tile
    that is set is refused."""
    spread = dict(k=(6, 4), stride=3, dilation=(3, 1), offset_scale=1.3)
    params, geometry = launch_params(cfg("bfloat16", 32, g=1, params={"bwd_tile": 1}, **spread))
    assert (params["bwd_tile_h"], params["bwd_tile_w"], params["bwd_tile_threads"]) == (8, 8, 256)
    assert geometry["bwd_tile"]["smem_bytes"] <= LIMITS["sm_90"].smem_per_block
    params = launch_params(cfg("bfloat16", 32, g=1, params={"bwd_tile": 1, "bwd_halo": 4}, **spread))[0]
    assert (params["bwd_tile_h"], params["bwd_tile_w"], params["bwd_halo"]) == (4, 8, 4)  # fits the halo that is set
    with pytest.raises(ConfigError, match="bwd_tile 8x16 with bwd_halo 0 needs .* KB of shared memory per block"):
        launch_params(cfg("bfloat16", 32, g=1, params={"bwd_tile": 1, "bwd_tile_w": 16}, **spread))


@pytest.mark.parametrize("config, unroll, bwd_unroll", [
    (cfg("float16"), 3, 2),  # 16-byte vectors: 12 // 4 = 3 points per batch; backward 2
    (cfg("float32"), 3, 2),
    (cfg("float16", params={"vec": 2, "bwd_vec": 2}), 3, 2),  # narrow vectors: up to 4 points, but 9 take 3 batches either way
    (cfg("float16", k=(3, 3), remove_center=True, params={"vec": 2, "bwd_vec": 2}), 4, 2),  # 8 points: 2 x 4
    (cfg("float16", k=5, params={"vec": 2, "bwd_vec": 2}), 4, 2),  # 25 points: 7 batches either way
    (cfg("float16", k=(1, 5), params={"vec": 2, "bwd_vec": 2}), 3, 2),  # 5 points: 2 batches of 3, not 4 + 1
    (cfg("float16", params={"vec": 16, "bwd_vec": 16}), 1, 1),  # 32 bytes: one point per batch
    (cfg("float32", 64, params={"vec": 32, "bwd_vec": 32}), 1, 1),  # 128 bytes
    (cfg("float16", k=1), 1, 2),  # never more points than the kernel has
    (cfg("float16", k=(1, 2)), 2, 2),
])
def test_automatic_point_batches(config, unroll, bwd_unroll):
    params = launch_params(config)[0]
    assert (params["unroll"], params["bwd_unroll"]) == (unroll, bwd_unroll)


@pytest.mark.parametrize("config, min_blocks", [
    (cfg("float16"), 4),  # 256 threads, 3 points x 16 bytes = 48 bytes a batch (the limit): 1024 // 256
    (cfg("float16", target="cuda:sm_75"), 4),  # the heuristic does not depend on the architecture
    (cfg("float16", params={"pixels": 1}), 8),  # 16 threads: at most 8 blocks
    (cfg("float16", params={"pixels": 32}), 2),
    (cfg("float16", k=(3, 3), remove_center=True), 4),  # 8 points
    (cfg("float16", k=(2, 5)), 1),  # 10 points: more than 9, uncapped
    (cfg("float16", k=5), 1),
    (cfg("float16", params={"unroll": 4}), 1),  # 4 x 16 bytes a batch: more than 48
    (cfg("float16", params={"vec": 16}), 1),  # 32-byte vectors
    (cfg("float16", 20, params={"vec": 8, "bwd_vec": 8}), 1),  # a partial vector at the tail
    (cfg("float64", 16), 1),
])
def test_automatic_forward_register_cap(config, min_blocks):
    """min_blocks=0 (default): 1024 resident threads' worth of blocks (at most 8) for small kernels
    (<= 9 points, whole vectors of <= 16 bytes, <= 48 bytes a batch, not float64); else 1."""
    assert launch_params(config)[0]["min_blocks"] == min_blocks


@pytest.mark.parametrize("config, share_round", [
    (cfg("float16"), 3),  # 4 lanes, 9 points in batches of 3: rounds of 3 (3 locations a lane, as rounds of 9)
    (cfg("float32"), 9),  # 8 lanes: one round, 2 locations a lane (as rounds of 6 and 3; rounds of 3: 3)
    (cfg("float32", params={"vec": 1}), 9),  # 32 lanes: one location each
    (cfg("float16", k=7), 3),  # 64 (pixel, group)s of 48-byte taps: 16 KB holds 5 points, so one batch of 3
    (cfg("float16", k=7, params={"pixels": 64}), 3),  # not even a batch within 16 KB: one batch (36 KB)
    (cfg("float16", params={"share": 0}), 0),
    (cfg("float16", params={"mma": 1, "share": 1}), 0),  # the per-point forward's only
])
def test_automatic_share_round(config, share_round):
    config = config if "share" in config.param_dict else config.replace(params={**config.param_dict, "share": 1})
    assert launch_params(config)[0]["share_round"] == share_round


@pytest.mark.parametrize("params, match", [
    ({"share": 1, "share_round": 4}, "multiple of the batch of 3"),
    ({"share": 1, "unroll": 1, "share_round": 64, "pixels": 64}, "shared memory"),
])
def test_invalid_share_rounds_rejected(params, match):
    with pytest.raises(ConfigError, match=match) as e:
        launch_params(cfg("float16", k=9, params=params))
    assert e.value.field == "params"


@pytest.mark.parametrize("config, tile, threads", [
    (cfg("float16", k=7), (8, 16), 256),  # 16-bit dtypes keep 8x16
    (cfg("float32", 16, k=3), (4, 8), 128),  # 8x16 x 9 points passes 512 pixel-points: 8x8, then 4x8
    (cfg("float32", 16, k=3, remove_center=True), (8, 8), 256),  # 8x8 x 8 points = 512, the limit
    (cfg("float32", 16, k=(1, 2)), (8, 16), 256),
    (cfg("float32", 16, k=4), (4, 8), 128),  # 4x8 x 16 = 512
    (cfg("float32", 16, k=5), (4, 4), 64),
    (cfg("float32", 4, k=23), (1, 1), 32),  # 529 points: down to one pixel; a whole warp
])
def test_default_tiled_backward_tile(config, tile, threads):
    """The largest of 8x16, 8x8, 4x8, 4x4, ... (halving the height first when it is not smaller)
    with at most 512 pixel-points for float32; a thread per pixel and lane, in whole warps, <= 256."""
    params = default_params(config)
    assert (params["bwd_tile_h"], params["bwd_tile_w"], params["bwd_tile_threads"]) == (*tile, threads)


@pytest.mark.parametrize("scale, halo", [(1.0, 2), (0.3, 1), (0.0, 1), (1.25, 3), (-2.0, 4)])
def test_default_halos_cover_offsets_of_two(scale, halo):
    """bwd_halo and fwd_halo: 2 |offset_scale| rounded up, at least 1."""
    params = default_params(cfg(offset_scale=scale))
    assert params["bwd_halo"] == params["fwd_halo"] == halo


def test_input_gradient_atomics_in_the_storage_dtype_for_float16_only():
    assert {d: default_params(cfg(d))["atomic_dtype"] for d in ("float16", "bfloat16", "float32", "float64")} == {
        "float16": 1, "bfloat16": 0, "float32": 0, "float64": 0}


@pytest.mark.parametrize("dtype, params, bwd_vec, bwd_pixels", [
    ("bfloat16", {}, 4, 8),  # fp32 accumulator: 4 channels (16 bytes of atomics), not the forward's 8
    ("bfloat16", {"atomic_dtype": 1}, 8, 16),  # bf16 atomics: 8 channels, the block following
    ("float16", {}, 8, 16),  # half2 atomics by default
    ("float16", {"atomic_dtype": 0}, 4, 8),
    ("bfloat16", {"atomic_dtype": 1, "bwd_vec": 2}, 2, 4),  # a width that is set is kept
    ("float32", {}, 4, 8),
])
def test_backward_vector_width_is_16_bytes_of_its_atomics(dtype, params, bwd_vec, bwd_pixels):
    """The backward's default width makes a lane's input-gradient atomics one 16-byte reduction a
    corner in the accumulator's type (fp32 unless atomic_dtype=1), so a warp's cover whole sectors."""
    launch, geometry = launch_params(cfg(dtype, 32, params=params))
    assert launch["vec"] == 16 // cfg(dtype).itemsize
    assert (launch["bwd_vec"], launch["bwd_pixels"]) == (bwd_vec, bwd_pixels)
    assert geometry["bwd_threads"] == 256


@pytest.mark.parametrize("dtype, params, match", [
    ("float32", {"half_blend": 1}, "16-bit storage type; float32 has none"),
    ("float64", {"half_blend": 1}, "float64 has none"),
    ("float16", {"half_blend": 1, "fwd_tile": 1}, "per-point forward's; fwd_tile=1"),
    ("bfloat16", {"half_blend": 1, "mma": 1}, "per-point forward's; mma=1"),
    ("float16", {"half_blend": 1, "vec": 1}, "pairs of channels; vec=1"),
])
def test_half_blend_refuses_what_it_cannot_blend(dtype, params, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        launch_params(cfg(dtype, params=params))


def test_half_blend_is_never_tuned():
    """It trades precision for speed: the user's choice, not the search's."""
    from dcngen import search

    assert "half_blend" not in search.space_for(cfg("float16")).values


@pytest.mark.parametrize("kernel", ["mma", "fwd_mma", "bwd_mma"])
def test_tensor_cores_from_sm_80(kernel):
    """sm_80 is the first architecture of the tensor-core kernels (sm_75 is refused)."""
    assert kernel in launch_params(cfg(target="cuda:sm_80", params={kernel: 1}))[1]
    with pytest.raises(ConfigError, match="sm_80 or newer; the target is sm_75"):
        launch_params(cfg(target="cuda:sm_75", params={kernel: 1}))


@pytest.mark.parametrize("tile, chunk", [((4, 4), 16), ((8, 8), 32), ((4, 12), 16), ((2, 8), 16), ((4, 8), 32)])
def test_tensor_core_backward_tiles_of_whole_16_pixel_steps(tile, chunk):
    """bwd_mma takes any tile of a multiple of 16 pixels (32 a pass where they divide it), and
    refuses one pixel more or fewer."""
    h, w = tile
    geometry = launch_params(cfg(params={"bwd_mma": 1, "bwd_mma_h": h, "bwd_mma_w": w}))[1]["bwd_mma"]
    assert geometry["pixels"] == h * w and geometry["chunk"] == chunk
    for other in ((h, w + 1), (h, w - 1)):
        with pytest.raises(ConfigError, match="multiple of 16"):
            launch_params(cfg(params={"bwd_mma": 1, "bwd_mma_h": other[0], "bwd_mma_w": other[1]}))


def test_tiled_forward_takes_4_tiles_where_two_blocks_still_fit():
    """fwd_mma_tiles=0 (default): 4 tiles (two region buffers) where that layout leaves room for 2
    blocks per SM, else 1 (one buffer); an explicit value is kept."""
    for target, c, tiles in (("cuda:sm_90", 32, 4), ("cuda:sm_80", 32, 4), ("cuda:sm_86", 32, 1), ("cuda:sm_90", 64, 4)):
        config = cfg(c=c, g=2, target=target, offset_scale=1.0, params={"fwd_mma": 1})
        params, geometry = launch_params(config)
        four = fwd_mma_geometry(config, {**params, "fwd_mma_tiles": 4})
        assert params["fwd_mma_tiles"] == tiles == (4 if four["min_blocks"] >= 2 else 1), (target, c)
        assert geometry["fwd_mma"]["buffers"] == (2 if tiles > 1 else 1)
    explicit = launch_params(cfg(params={"fwd_mma": 1, "fwd_mma_tiles": 1}))
    assert explicit[0]["fwd_mma_tiles"] == 1 and explicit[1]["fwd_mma"]["buffers"] == 1
    assert launch_params(cfg(params={"fwd_mma": 1, "fwd_mma_tiles": 2}))[1]["fwd_mma"]["buffers"] == 2


def test_blocks_per_sm_count_the_runtimes_reserve():
    """sm_86, bwd_mma C32 3x3, halo 1: 2 blocks of 49.4 KB would fit the SM's 100 KB, but not with
    the 1 KB the runtime keeps per block: the register target is 1 block."""
    config = cfg(c=32, g=1, target="cuda:sm_86", params={"bwd_mma": 1, "bwd_halo": 1})
    layout = launch_params(config)[1]["bwd_mma"]
    used = layout["smem_bytes"] + layout["static_bytes"]
    assert 2 * used <= 100 * KB < 2 * (used + SMEM_RESERVED_PER_BLOCK)
    assert layout["min_blocks"] == 1
    # sm_90's 228 KB per SM holds 4 such blocks with their reserve
    assert launch_params(config.replace(target="cuda:sm_90"))[1]["bwd_mma"]["min_blocks"] == 228 * KB // (used + SMEM_RESERVED_PER_BLOCK) == 4


def test_shared_memory_per_block_limit_is_inclusive():
    """bwd_tile 14x14, halo 0, C 109, a 1x1 kernel: a 15x15 region of 110 ints, the tile's 196 x 3
    floats of offsets and weights and 16 static bytes are exactly sm_86's 99 KB and fit; one channel
    more does not; sm_75 (64 KB) refuses it, sm_80 (163 KB) takes it."""
    params = {"bwd_tile": 1, "bwd_tile_h": 14, "bwd_tile_w": 14, "bwd_halo": 0}
    exact = cfg(c=109, k=1, g=1, target="cuda:sm_86", params=params)
    layout = launch_params(exact)[1]["bwd_tile"]
    assert (layout["reg_h"], layout["reg_w"]) == (15, 15) and layout["smem_bytes"] + layout["static_bytes"] == 99 * KB
    with pytest.raises(LayoutTooLarge, match="sm_86 allows at most 99 KB"):
        launch_params(exact.replace(group_channels=110))
    with pytest.raises(LayoutTooLarge, match="sm_75 allows at most 64 KB"):
        launch_params(exact.replace(target="cuda:sm_75"))
    launch_params(exact.replace(target="cuda:sm_80"))


HALO_CASES = [("bwd_mma", "cuda:sm_86", 2.0), ("bwd_mma", "cuda:sm_90", 5.0), ("bwd_mma", "cuda:sm_90", 10.0), ("bwd_tile", "cuda:sm_75", 3.0),
              ("bwd_tile", "cuda:sm_80", 10.0), ("bwd_tile", "cuda:sm_90", 10.0), ("fwd_mma", "cuda:sm_86", 3.0), ("fwd_mma", "cuda:sm_90", 5.0)]


@pytest.mark.parametrize("kernel, target, scale", HALO_CASES, ids=[f"{k}-{t[5:]}-s{s:g}" for k, t, s in HALO_CASES])
def test_default_halo_is_the_largest_that_fits(kernel, target, scale):
    """Left to the default (2 |offset_scale|), a tiled kernel's halo is lowered to the largest whose
    layout fits the target's shared memory: it fits, and one more would not."""
    from dcngen.generators.cuda_tiles import bwd_tile_geometry

    geometry, halo = {"bwd_mma": (bwd_mma_geometry, "bwd_halo"), "bwd_tile": (bwd_tile_geometry, "bwd_halo"),
                      "fwd_mma": (fwd_mma_geometry, "fwd_halo")}[kernel]
    config = cfg(c=32, target=target, offset_scale=scale, params={kernel: 1})
    params, layouts = launch_params(config)
    assert 0 <= params[halo] < default_params(config)[halo] and layouts[kernel]["halo"] == params[halo]
    one_buffer = {**params, "fwd_mma_tiles": 1}  # the tiled forward's halo is fitted before its tile count
    geometry(config, one_buffer)
    with pytest.raises(LayoutTooLarge):
        geometry(config, {**one_buffer, halo: params[halo] + 1})
    # a halo the config sets is kept, or refused where it does not fit the tile (the tiled backward's
    # default tile shrinks to fit it: one that is set does not)
    assert launch_params(config.replace(params={kernel: 1, halo: params[halo]}))[0][halo] == params[halo]
    tile = {"bwd_tile_h": params["bwd_tile_h"], "bwd_tile_w": params["bwd_tile_w"]} if kernel == "bwd_tile" else {}
    with pytest.raises(LayoutTooLarge, match=f"with {halo} {params[halo] + 1}"):
        launch_params(config.replace(params={kernel: 1, halo: params[halo] + 1, **tile}))
    if tile:
        smaller = launch_params(config.replace(params={kernel: 1, halo: params[halo] + 1}))[0]
        assert smaller[halo] == params[halo] + 1 and smaller["bwd_tile_h"] * smaller["bwd_tile_w"] < params["bwd_tile_h"] * params["bwd_tile_w"]


@pytest.mark.parametrize("kernel, halo", [("bwd_mma", "bwd_halo"), ("bwd_tile", "bwd_halo"), ("fwd_mma", "fwd_halo")])
def test_a_layout_too_large_even_without_a_halo_names_halo_0(kernel, halo):
    """offset_scale 20 spreads the kernel footprint past sm_90's shared memory: the error is about
    the layout at halo 0, the smallest there is."""
    with pytest.raises(LayoutTooLarge, match=f"with {halo} 0[ ,]"):
        launch_params(cfg(c=32, offset_scale=20.0, params={kernel: 1}))


def test_entry_points_require_the_alignment_of_their_vectors():
    """x/out, grad_out and the gradients must be aligned to the entry points' vectors, at most 16
    bytes; the tensor-core kernels copy x in 16-byte pieces whatever vec is."""
    assert entry_align(cfg("float16"), 8, 2, 1) == {"forward": 16, "backward": 4, "grads": 2}
    assert entry_align(cfg("float32"), 8, 4, 1) == {"forward": 16, "backward": 16, "grads": 4}
    assert entry_align(cfg("float64"), 1, 2, 4) == {"forward": 8, "backward": 16, "grads": 16}

    def aligns(config):
        m = re.search(r"kForwardAlign = (\d+), kBackwardAlign = (\d+), kGradAlign = (\d+);", generate(config).text)
        return tuple(int(v) for v in m.groups())

    assert aligns(cfg("float16", params={"vec": 2, "bwd_vec": 4})) == (4, 8, 8)
    assert aligns(cfg("float16", params={"vec": 2, "bwd_vec": 4, "fwd_mma": 1, "bwd_mma": 1})) == (16, 16, 16)
    assert aligns(cfg("float16", params={"vec": 2, "bwd_vec": 4, "mma": 1})) == (16, 8, 8)


def test_emulated_builds_are_named_apart():
    """The SIMT-emulator build of a CUDA config (host C++, CPU tensors) has its own artifact name,
    language and flags beside the nvcc build's."""
    from dcngen.generators import template_cuda

    config = cfg()
    real, emulated = template_cuda.generate(config), template_cuda.generate(config, emulate=True)
    assert real.name == "dcnv4_float16_sm_90_template" and real.language == "cuda" and "-arch=sm_90" in real.flags
    assert emulated.name == "dcnv4_float16_sm_90_template_emulated" and emulated.language == "cuda_emulated"
    assert emulated.suffix == ".cc" and "-arch=sm_90" not in emulated.flags

"""The CUDA template's kernels and launchers, run on the SIMT emulator (templates/cuda/emulator.h.j2)
on the CPU against the float64 reference, outputs NaN-poisoned: thread mapping, channel tails,
point batches, shared-memory staging, points located once per (pixel, group), the warp-shuffle
reductions, every input-gradient accumulation mode (fp32 workspace, native fp16/bf16 atomics,
int64 fixed point) with the sm_90 vector reductions and the sm_80 atomics (the target's code paths
run), DCNv4's padding gradient, the tiled backward, the tensor-core forwards and backward, the
forward's 64-bit index path, the launch sizes and the memory trace, without a GPU."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import assert_offset_views_served, needs_cuda_toolkit

from dcngen.compilers.alignment import copy_on_boundary
from dcngen.config import DCNConfig
from dcngen.kernels import emulated_kernel
from dcngen.verify import TOLERANCE, verify_kernel

pytestmark = needs_cuda_toolkit


def cuda(**kw) -> DCNConfig:
    return DCNConfig(target="cuda:sm_90", **kw)


CASES = {
    "v4-fp32": cuda(group=4, group_channels=16),
    "v4-fp16-native-atomics": cuda(group=4, group_channels=32, dtype="float16"),
    "v4-fp16-fp32-accumulator": cuda(group=2, group_channels=16, dtype="float16", params={"atomic_dtype": 0}),
    "v4-fp16-sm80-atomics": DCNConfig(target="cuda:sm_80", group=4, group_channels=16, dtype="float16"),  # pre-sm_90 scatter
    "v4-bf16-sm80-native-atomics-vec2": DCNConfig(target="cuda:sm_80", group=2, group_channels=16, dtype="bfloat16", params={"atomic_dtype": 1, "bwd_vec": 2}),
    "v4-bf16-5x5-idle-lane": cuda(group=2, group_channels=24, dtype="bfloat16", kernel_size=5, padding=2),
    "v4-bf16-native-atomics": cuda(group=2, group_channels=16, dtype="bfloat16", params={"atomic_dtype": 1}),
    "v3-fp32-stride-dilation-rc": cuda(op="dcnv3", group=3, group_channels=8, stride=2, dilation=2, padding=2, remove_center=True, offset_scale=0.5),
    "v3-bf16-deterministic-3x5": cuda(op="dcnv3", group=2, group_channels=8, dtype="bfloat16", kernel_size=(3, 5), padding=(1, 2), params={"deterministic": 1}),
    "v4-fp32-tail-staged": cuda(group=2, group_channels=20, params={"stage": 1, "bwd_stage": 0, "vec": 8, "bwd_vec": 2}),
    "v4-fp32-32-lanes": cuda(group=2, group_channels=32, params={"vec": 1, "bwd_vec": 1}),
    "v3-fp16-ragged-batches": cuda(op="dcnv3", group=4, group_channels=12, dtype="float16", params={"unroll": 2, "bwd_unroll": 4}),
    "v3-fp64-7x7": cuda(op="dcnv3", group=1, group_channels=16, dtype="float64", kernel_size=7, padding=3),
    "v4-fp32-129-groups": cuda(group=129, group_channels=32),  # default vec widened to 8: 516 threads per pixel
    # the forward with points located once per (pixel, group) (share=1): rounds of taps in shared
    # memory, idle lanes, channel tails, whole-warp groups, rounds shorter than the last
    "shared-fp16": cuda(group=4, group_channels=32, dtype="float16", params={"share": 1}),
    "shared-v3-bf16-5x5-idle-lane-staged": cuda(op="dcnv3", group=2, group_channels=24, dtype="bfloat16", kernel_size=5, padding=2,
                                                params={"share": 1, "stage": 1}),
    "shared-v3-fp32-32-lanes-stride-dilation-rc": cuda(op="dcnv3", group=3, group_channels=32, stride=2, dilation=2, padding=2, remove_center=True,
                                                       offset_scale=0.5, params={"share": 1, "vec": 1}),
    "shared-fp32-tail-short-rounds": cuda(group=2, group_channels=20, params={"share": 1, "vec": 8, "unroll": 2, "share_round": 4}),
    "shared-fp64-7x7": cuda(group=1, group_channels=16, dtype="float64", kernel_size=7, padding=3, params={"share": 1}),
    # the forward with each sample blended in the storage type (half_blend=1): packed 16-bit FMAs
    "half-blend-fp16": cuda(group=4, group_channels=32, dtype="float16", params={"half_blend": 1}),
    "half-blend-v3-bf16-5x5-c20-shared-staged": cuda(op="dcnv3", group=2, group_channels=20, dtype="bfloat16", kernel_size=5, padding=2,
                                                     params={"half_blend": 1, "share": 1, "stage": 1, "vec": 8}),
    # the tiled backward (bwd_tile=1): fixed-point sums in shared memory, global fallbacks
    "tiled-fp16": cuda(group=4, group_channels=32, dtype="float16", params={"bwd_tile": 1}),
    "tiled-fp32-4x4-tiles": cuda(group=2, group_channels=16, params={"bwd_tile": 1, "bwd_tile_h": 4, "bwd_tile_w": 4, "bwd_tile_threads": 64}),
    "tiled-v3-stride-dilation-rc": cuda(op="dcnv3", group=3, group_channels=8, stride=2, dilation=2, padding=2, remove_center=True, offset_scale=0.5,
                                        dtype="bfloat16", params={"bwd_tile": 1}),
    "tiled-tail-no-halo": cuda(group=2, group_channels=20, dtype="float16", params={"bwd_tile": 1, "bwd_halo": 0, "bwd_vec": 8}),
    # the tiled tensor-core forward and backward (fwd_mma=1, bwd_mma=1): coefficient matrix, mma
    # products over the region (the forward's over its warps' bands), per-point paths; the forward
    # with 4 (automatic), 3 (the last block short) and 1 tiles per block; the backward's grad_out
    # fragments held in registers (C16, C32) or, at C96, loaded at each use, its M and D rows
    # swizzled (rows of 128 bytes and more) or padded (C16 with a 4x4 tile: 64-byte rows)
    "mma-tiled-fp16": cuda(group=4, group_channels=32, dtype="float16", params={"fwd_mma": 1, "bwd_mma": 1}),
    "mma-tiled-v3-bf16-stride-dilation-rc-no-halo": cuda(op="dcnv3", group=2, group_channels=16, dtype="bfloat16", stride=2, dilation=2, padding=2,
                                                         remove_center=True, offset_scale=0.5,
                                                         params={"fwd_mma": 1, "fwd_halo": 0, "fwd_mma_tiles": 3, "bwd_mma": 1, "bwd_halo": 0,
                                                                 "bwd_mma_h": 4, "bwd_mma_w": 4}),
    "mma-tiled-fp16-sm80-fp32-accumulator-c96-5x5": DCNConfig(target="cuda:sm_80", group=1, group_channels=96, dtype="float16", kernel_size=5, padding=2,
                                                              params={"fwd_mma": 1, "fwd_mma_h": 4, "fwd_mma_w": 8, "fwd_mma_warps": 1, "fwd_mma_tiles": 1, "bwd_mma": 1,
                                                                      "atomic_dtype": 0, "bwd_mma_h": 4, "bwd_mma_w": 8, "bwd_mma_warps": 2}),
    # the tiled SIMT forward (fwd_tile=1): a pixel's corners split over its lanes by column (64-byte
    # rows) and by corner (32-byte rows, a widened region) or not split (16-byte pieces of longer
    # rows, an idle lane at C24 bf16), samples beyond the region from global memory (no halo), a
    # tile's pixels over two passes of its threads, dilation / remove_center, stride, fp64
    "tiled-forward-fp16": cuda(group=4, group_channels=32, dtype="float16", params={"fwd_tile": 1}),
    "tiled-forward-fp16-c16-dilation-rc": cuda(group=3, group_channels=16, dtype="float16", dilation=2, padding=2, remove_center=True,
                                               offset_scale=0.5, params={"fwd_tile": 1}),
    "tiled-forward-fp32-c32-no-halo-4x4": cuda(group=2, group_channels=32, params={"fwd_tile": 1, "fwd_halo": 0, "fwd_tile_h": 4, "fwd_tile_w": 4,
                                                                                    "fwd_tile_threads": 64}),
    "tiled-forward-bf16-c24-5x5-sm80": DCNConfig(target="cuda:sm_80", group=2, group_channels=24, dtype="bfloat16", kernel_size=5, padding=2,
                                                 params={"fwd_tile": 1, "fwd_tile_threads": 96}),
    "tiled-forward-v3-fp64-7x7-stride2": cuda(op="dcnv3", group=1, group_channels=16, dtype="float64", kernel_size=7, stride=2, padding=3, params={"fwd_tile": 1}),
    # the tiled forward on tensor cores (fwd_tile_mma=1): swizzled 64- and 128-byte rows, 32-byte rows
    # in a widened region, samples beyond the region (no halo), 25 points (records over 7 rounds),
    # a tile's pixels over two passes of its threads, dilation / remove_center, stride
    "tile-mma-fp16": cuda(group=4, group_channels=32, dtype="float16", params={"fwd_tile": 1, "fwd_tile_mma": 1}),
    "tile-mma-v3-bf16-c16-dilation-rc-no-halo": cuda(op="dcnv3", group=3, group_channels=16, dtype="bfloat16", dilation=2, padding=2, remove_center=True,
                                                     offset_scale=0.5, params={"fwd_tile": 1, "fwd_tile_mma": 1, "fwd_halo": 0}),
    "tile-mma-fp16-c64-5x5-sm80-4x4": DCNConfig(target="cuda:sm_80", group=2, group_channels=64, dtype="float16", kernel_size=5, padding=2,
                                                params={"fwd_tile": 1, "fwd_tile_mma": 1, "fwd_tile_h": 4, "fwd_tile_w": 4, "fwd_tile_threads": 32}),
    "tile-mma-bf16-stride2": cuda(group=2, group_channels=32, dtype="bfloat16", stride=2, params={"fwd_tile": 1, "fwd_tile_mma": 1}),
    # the tensor-core forward (mma=1): cp.async staging, ldmatrix, m16n8k16 mma, lane-shared points
    "mma-fp16": cuda(group=4, group_channels=32, dtype="float16", params={"mma": 1}),
    "mma-bf16-c24-5x5": cuda(group=3, group_channels=24, dtype="bfloat16", kernel_size=5, padding=2, params={"mma": 1}),
    "mma-v3-fp16-c64-stride-dilation-rc": cuda(op="dcnv3", group=2, group_channels=64, dtype="float16", stride=2, dilation=2, padding=2,
                                              remove_center=True, offset_scale=0.5, params={"mma": 1, "mma_warps": 2}),
    "mma-bf16-c8-1x1": cuda(group=2, group_channels=8, dtype="bfloat16", kernel_size=1, padding=0, params={"mma": 1, "mma_warps": 1}),
}


@pytest.fixture(scope="module")
def kernels() -> dict:
    """Every case's emulated artifact, built two at a time (one host compile each)."""

    def one(cfg):
        try:
            return emulated_kernel(cfg)
        except Exception as e:  # reported by the test of that case
            return e

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CASES, pool.map(one, CASES.values())))


@pytest.mark.parametrize("name", CASES)
def test_emulated_kernel_matches_reference(kernels, name):
    cfg, kernel = CASES[name], kernels[name]
    if isinstance(kernel, Exception):
        raise kernel
    shapes = ((2, 9, 11), (1, 5, 4)) + (((1, 21, 19),) if {"bwd_tile", "bwd_mma", "mma", "fwd_mma", "fwd_tile"} & set(cfg.param_dict) else ())  # several tiles
    for seed, (n, h, w) in enumerate(shapes):
        errors = verify_kernel(cfg, kernel, n, h, w, seed=seed)
        assert all(e < TOLERANCE[cfg.dtype] for e in errors.values()), f"{name} {(n, h, w)}: {errors}"


@pytest.mark.parametrize("name", ["v4-fp32", "v4-fp16-native-atomics", "v3-fp32-stride-dilation-rc", "v3-bf16-deterministic-3x5",
                                  "v4-fp32-tail-staged"])
def test_per_point_kernels_in_the_smaller_blocks_of_a_large_device(kernels, name, monkeypatch):
    """On a device with many multiprocessors the per-point launchers shrink their blocks for a small
    output (down to a warp's worth of threads, the last warp partial where a pixel's threads do not
    divide 32): staging, shuffles and the grid still cover every output and gradient."""
    monkeypatch.setenv("DCN_EMULATE_SMS", "4096")
    cfg = CASES[name]
    for seed, (n, h, w) in enumerate(((2, 9, 11), (1, 5, 4))):
        errors = verify_kernel(cfg, kernels[name], n, h, w, seed=seed)
        assert all(e < TOLERANCE[cfg.dtype] for e in errors.values()), f"{name} {(n, h, w)}: {errors}"


@pytest.mark.parametrize("name", ["v4-fp32", "v4-fp16-native-atomics", "v3-fp16-ragged-batches", "v3-fp64-7x7", "shared-fp16",
                                  "shared-fp32-tail-short-rounds"])
def test_forward_64_bit_index_path(kernels, name, monkeypatch):
    """The per-point forward's 64-bit index instance (images past 2^31 elements on a GPU), run on
    small images with DCN_EMULATE_WIDE: the reference's results, and the 32-bit instance's bit for bit."""
    import torch

    from dcngen.verify import TORCH_DTYPE, random_problem

    cfg = CASES[name]
    tensors = random_problem(cfg, 2, 9, 11, seed=4).op_inputs(TORCH_DTYPE[cfg.dtype])
    args = (*tensors, tensors[1]) if cfg.op == "dcnv4" else tensors  # DCNv4: offsets and weights in one tensor
    outs = []
    for wide in (False, True):
        if wide:
            monkeypatch.setenv("DCN_EMULATE_WIDE", "1")
        out = torch.full((2, *cfg.output_size(9, 11), cfg.channels), float("nan"), dtype=tensors[0].dtype)
        kernels[name].forward(*args, out)
        outs.append(out)
    assert not outs[1].isnan().any() and torch.equal(outs[0], outs[1])
    errors = verify_kernel(cfg, kernels[name], 1, 5, 4, seed=1)
    assert all(e < TOLERANCE[cfg.dtype] for e in errors.values()), errors


@pytest.mark.parametrize("name", ["tiled-fp16", "mma-tiled-fp16"])
def test_tiled_backward_matches_the_per_point_one_on_hostile_values(kernels, name):
    """Tiles whose bound is not finite (inf grad_out, NaN weight) take the per-point fallback, and
    NaN / inf / huge offsets sample nothing: NaNs land where the per-point backward puts them and
    every finite value agrees."""
    import torch

    from dcngen.verify import TORCH_DTYPE, poisoned_call, random_problem

    tiled = CASES[name]
    per_point = tiled.replace(params=())
    kernel = emulated_kernel(per_point)
    x, om = random_problem(tiled, 1, 21, 19, seed=5).op_inputs(TORCH_DTYPE[tiled.dtype])
    om[0, 2, 3, 0] = float("nan")  # an x offset
    om[0, 15, 9, 5] = float("inf")  # a y offset
    om[0, 7, 7, 3] = -6e4
    om[0, 12, 2, 2 * tiled.num_points + 1] = float("nan")  # a weight: its tile's bound is NaN
    go = torch.randn(1, 21, 19, tiled.channels).to(x.dtype)
    go[0, 18, 17, 5] = float("inf")
    results = [[t.double() for t in poisoned_call(tiled, k, (x, om), go)[1:3]] for k in (kernels[name], kernel)]
    for a, b in zip(*results):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        finite = a.isfinite()
        assert torch.allclose(a[finite], b[finite], rtol=4e-3, atol=4e-3 * b[finite].abs().max().item())


def test_tiled_forward_grid_follows_the_device(kernels, monkeypatch):
    """fwd_mma's launcher gives a block up to fwd_mma_tiles tiles, but launches a block per tile on
    a device with more multiprocessors than that would keep busy: the same bits either way."""
    import torch

    from dcngen.verify import TORCH_DTYPE, random_problem

    cfg = CASES["mma-tiled-fp16"]
    x, om = random_problem(cfg, 2, 19, 21, seed=11).op_inputs(TORCH_DTYPE[cfg.dtype])
    outs = []
    for sms in ("1", "4096"):
        monkeypatch.setenv("DCN_EMULATE_SMS", sms)
        out = torch.full((2, 19, 21, cfg.channels), float("nan"), dtype=x.dtype)
        kernels["mma-tiled-fp16"].forward(x, om, om, out)
        outs.append(out)
    assert not outs[0].isnan().any() and torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("seed", range(4))
def test_tiled_backward_bound_covers_every_pixel(kernels, seed, monkeypatch):
    """One pixel per tile with grad_out 1e5 times the others': the tiled backward's fixed-point
    scale must come from the max over all of the tile's pixels (every warp's share), else that
    pixel's contributions overflow. Each seed runs the warps in another order."""
    import torch

    from dcngen.generators.template_cuda import launch_params
    from dcngen.verify import TORCH_DTYPE, poisoned_call, random_problem

    tiled = CASES["tiled-fp16"]
    tile = launch_params(tiled)[1]["bwd_tile"]
    per_point = emulated_kernel(tiled.replace(params=()))
    monkeypatch.setenv("DCN_EMULATE_SEED", str(seed))
    rng = torch.Generator().manual_seed(seed)
    x, om = random_problem(tiled, 1, 21, 19, seed=seed).op_inputs(TORCH_DTYPE[tiled.dtype])
    go = torch.randn(1, 21, 19, tiled.channels, generator=rng) * 1e-2
    for y0 in range(0, 21, tile["tile_h"]):
        for x0 in range(0, 19, tile["tile_w"]):
            row = y0 + int(torch.randint(min(tile["tile_h"], 21 - y0), (1,), generator=rng))
            col = x0 + int(torch.randint(min(tile["tile_w"], 19 - x0), (1,), generator=rng))
            go[0, row, col] *= 1e5
    tiled_gx, expected = (poisoned_call(tiled, k, (x, om), go)[1].double() for k in (kernels["tiled-fp16"], per_point))
    assert torch.allclose(tiled_gx, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_tiled_backward_tiny_grad_out_beside_large_weights(kernels):
    """float32 grad_out near 2^-110 beside DCNv4 weights near 2^20: the fixed-point scale that maps
    their products' bound to 2^BITS (2^110 here) would turn a weight alone into inf, and the sums
    into garbage. Such tiles take the global atomics; the result agrees with the per-point backward."""
    import torch

    from dcngen.layout import offset_layout
    from dcngen.verify import poisoned_call, random_problem

    tiled = CASES["tiled-fp32-4x4-tiles"]
    per_point = emulated_kernel(tiled.replace(params=()))
    x, om = random_problem(tiled, 1, 9, 11, seed=3).op_inputs(torch.float32)
    lay, p = offset_layout(tiled), tiled.num_points
    for g in range(tiled.group):
        start = g * lay.mask_group_stride + lay.mask_base
        om[..., start : start + p] *= 2.0**20
    go = torch.randn(1, 9, 11, tiled.channels, generator=torch.Generator().manual_seed(3)) * 2.0**-110
    tiled_gx, expected = (poisoned_call(tiled, k, (x, om), go)[1].double() for k in (kernels["tiled-fp32-4x4-tiles"], per_point))
    assert expected.abs().max() > 0 and torch.allclose(tiled_gx, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["mma-fp16", "mma-tiled-fp16", "shared-fp16", "shared-fp32-tail-short-rounds", "tiled-forward-fp16",
                                  "tiled-forward-fp16-c16-dilation-rc", "tiled-forward-fp32-c32-no-halo-4x4"])
def test_other_forwards_match_the_per_point_one_on_hostile_values(kernels, name):
    """NaN / inf / huge offsets and NaN / huge weights: the tensor-core forwards, the tiled one and
    the one with shared point locations put NaN where the per-point forward does, never read off
    the image, and agree elsewhere (the shared one bitwise: the same sums in the same order)."""
    import torch

    from dcngen.verify import TORCH_DTYPE, random_problem

    other = CASES[name]
    per_point = emulated_kernel(other.replace(params=()))
    x, om = random_problem(other, 1, 13, 17, seed=7).op_inputs(TORCH_DTYPE[other.dtype])
    p = other.num_points
    om[0, 2, 3, 0] = float("nan")
    om[0, 5, 9, 7] = float("inf")
    om[0, 7, 7, 3] = -6e4
    om[0, 12, 2, 2 * p + 1] = float("nan")  # a weight
    om[0, 3, 8, 2 * p:3 * p] = float("nan")  # all of group 0's weights at a pixel
    om[0, 9, 16, 3 * p + 4] = 6e4
    outs = []
    for k in (kernels[name], per_point):
        out = torch.full((1, 13, 17, other.channels), float("nan"), dtype=x.dtype)
        k.forward(x, om, om, out)
        outs.append(out.double())
    a, b = outs
    assert a.isnan().any() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
    finite = a.isfinite()
    assert torch.allclose(a[finite], b[finite], rtol=4e-3, atol=4e-3 * b[finite].abs().max().item())
    if "share" in other.param_dict:
        assert torch.equal(a[finite], b[finite])


def test_emulated_kernel_checks_its_tensors(kernels):
    import torch

    cfg, kernel = CASES["v4-fp32"], kernels["v4-fp32"]
    x = torch.randn(1, 4, 4, cfg.channels)
    om = torch.randn(1, 4, 4, cfg.padded_offset_mask_channels)
    with pytest.raises(Exception, match="G\\*C"):
        kernel.forward(x[..., :-1].contiguous(), om, om, torch.empty(1, 4, 4, cfg.channels - 1))
    out = torch.empty(1, 4, 4, cfg.channels)
    with pytest.raises(Exception, match="rows must hold at least 108 and 108 channels"):  # would read past the rows
        kernel.forward(x, om[..., :100].contiguous(), om[..., :100].contiguous(), out)
    with pytest.raises(Exception, match="x must be contiguous"):  # would read the wrong pixels
        kernel.forward(torch.randn(1, 4, 8, cfg.channels)[:, :, ::2], om, om, out)


@pytest.mark.parametrize("name", ["v4-fp32", "mma-tiled-fp16", "v3-bf16-deterministic-3x5"])
def test_empty_image_with_padding_gives_zero_offset_gradients(kernels, name):
    """H = 0 with padding 2 leaves output pixels, all of whose points sample outside: every offset
    and weight gradient is zero (an early return left them unwritten)."""
    import torch

    from dcngen.verify import TORCH_DTYPE, poisoned_call

    cfg = CASES[name].replace(padding=2)
    kernel = emulated_kernel(cfg)
    dtype = TORCH_DTYPE[cfg.dtype]
    ho, wo = cfg.output_size(0, 5)
    x = torch.randn(1, 0, 5, cfg.channels, dtype=dtype)
    if cfg.op == "dcnv4":
        tensors = (x, torch.randn(1, ho, wo, cfg.padded_offset_mask_channels, dtype=dtype))
    else:
        tensors = (x, torch.randn(1, ho, wo, 2 * cfg.group * cfg.num_points, dtype=dtype), torch.randn(1, ho, wo, cfg.group * cfg.num_points, dtype=dtype))
    out, grad_x, grad_offset, grad_mask = poisoned_call(cfg, kernel, tensors, torch.randn(1, ho, wo, cfg.channels, dtype=dtype))
    assert grad_x.numel() == 0 and (out == 0).all() and (grad_offset == 0).all() and (grad_mask == 0).all()


def test_cli_verify_emulate(kernels):
    from typer.testing import CliRunner

    from dcngen.cli import app

    result = CliRunner().invoke(app, ["verify", "--target", "cuda:sm_90", "--group-channels", "16", "--emulate"])
    assert result.exit_code == 0, result.output
    assert "SIMT emulator, 3 warp orders" in result.output and result.output.count("PASS") == 3
    result = CliRunner().invoke(app, ["verify", "--emulate"])
    assert result.exit_code == 2 and "--emulate" in result.output


@pytest.mark.parametrize("name, cfg, size, target", [
    # the tiled backward's 32-bit sums: a 4x4 tile of 8 points, 128 contributions to one position
    # (23 bits each: rounded by a float-to-int conversion), and of 9 points, 144 contributions (22
    # bits: rounded by the FMA that adds 1.5 x 2^23)
    ("tiled", cuda(group=2, group_channels=16, remove_center=True, params={"bwd_tile": 1, "bwd_tile_h": 4, "bwd_tile_w": 4,
                                                                          "bwd_tile_threads": 64, "bwd_halo": 3}), 4, 2),
    ("tiled-fma-rounding", cuda(group=2, group_channels=16, params={"bwd_tile": 1, "bwd_tile_h": 4, "bwd_tile_w": 4, "bwd_tile_threads": 64,
                                                                    "bwd_halo": 3}), 4, 2),
    # the deterministic backward's 64-bit sums past the 52-bit cap: 24 x 24 x 15 = 8640 contributions
    ("deterministic", cuda(group=1, group_channels=8, kernel_size=(3, 5), padding=(1, 2), params={"deterministic": 1}), 24, 12),
])
def test_fixed_point_sums_keep_their_headroom_at_the_worst_case(name, cfg, size, target):
    """Every point of every pixel samples one input pixel, exactly on it, with same-signed weights and
    grad_out near the bound: the fixed-point input-gradient sum of that pixel reaches its largest
    value, which the scale must leave room for (a scale one or two bits too fine wraps it)."""
    import torch

    from dcngen import reference
    from dcngen.verify import TOLERANCE, poisoned_call, reference_errors

    kernel = emulated_kernel(cfg)
    g, p = cfg.group, cfg.num_points
    loc = reference.sampling_locations(cfg, torch.zeros(1, size, size, g, p, 2, dtype=torch.float64))
    offset = (target - loc).reshape(1, size, size, g * p * 2)  # offset_scale 1: every sample at (target, target)
    mask = torch.full((1, size, size, g * p), 0.99, dtype=torch.float64)
    x = torch.randn(1, size, size, cfg.channels, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    tensors = (x.float(), reference.pack_offset_mask(cfg, offset, mask).float())
    grad_out = torch.full((1, size, size, cfg.channels), 0.99)
    out, grad_x, grad_offset, _ = poisoned_call(cfg, kernel, tensors, grad_out)
    errors = reference_errors(cfg, tensors, grad_out, out, (grad_x, grad_offset))
    assert all(e < TOLERANCE[cfg.dtype] for e in errors.values()), f"{name}: {errors}"


def test_tiled_backward_with_tiny_gradients(kernels):
    """grad_out and weights of 1e-18 (bound 1e-35): a fixed-point scale 2^(bits - e2) past float's
    range would be inf, so such tiles sum in global memory (float32 holds the values themselves)."""
    import dataclasses

    from dcngen.verify import TORCH_DTYPE, poisoned_call, random_problem, reference_errors

    cfg = CASES["tiled-fp32-4x4-tiles"]
    problem = random_problem(cfg, 1, 21, 19, seed=2)
    problem = dataclasses.replace(problem, mask=problem.mask * 1e-18, grad_out=problem.grad_out * 1e-18)
    tensors = problem.op_inputs(TORCH_DTYPE[cfg.dtype])
    grad_out = problem.grad_out.float()
    out, grad_x, grad_offset, _ = poisoned_call(cfg, kernels["tiled-fp32-4x4-tiles"], tensors, grad_out)
    errors = reference_errors(cfg, tensors, grad_out, out, (grad_x, grad_offset))
    assert all(e < TOLERANCE[cfg.dtype] for e in errors.values()), errors


# the deterministic backward, as in test_hostile's fixed-point configs
DETERMINISTIC = cuda(group=2, group_channels=16, params={"deterministic": 1})


@pytest.mark.parametrize("pixel, group", [("interior", 0), ("last", 1)])
def test_deterministic_bound_covers_every_point(pixel, group):
    """One in-window point with a weight 1e6 times the others' (at an interior pixel of the first
    image in the first group, or at the last pixel in the last group): the fixed-point scale must
    come from the max over every (pixel, group, point), else that point's contributions overflow
    the int64 sums."""
    import dataclasses

    import torch

    from dcngen.verify import TORCH_DTYPE, poisoned_call, random_problem, reference_errors

    cfg = DETERMINISTIC
    problem = random_problem(cfg, 2, 9, 11, seed=4)
    n, ho, wo = (0, 4, 5) if pixel == "interior" else (1, 8, 10)  # the last pixel's centre sample is still inside
    centre = cfg.points.index((cfg.kernel_size[1] // 2, cfg.kernel_size[0] // 2))
    offset, mask = problem.offset.clone(), problem.mask.clone()
    offset[n, ho, wo, group, centre] = torch.tensor([0.375, 0.625], dtype=torch.float64)
    mask[n, ho, wo, group, centre] = 1e6
    problem = dataclasses.replace(problem, offset=offset, mask=mask)
    tensors = problem.op_inputs(TORCH_DTYPE[cfg.dtype])
    grad_out = problem.grad_out.float()
    out, grad_x, grad_offset, _ = poisoned_call(cfg, emulated_kernel(cfg), tensors, grad_out)
    errors = reference_errors(cfg, tensors, grad_out, out, (grad_x, grad_offset))
    assert all(e < TOLERANCE[cfg.dtype] for e in errors.values()), errors


def test_deterministic_backward_with_a_nan_grad_out():
    """A NaN in grad_out makes the deterministic bound NaN: every input gradient the reference makes
    NaN is NaN (a NaN contribution rounded to an integer is a finite garbage value), and the offset
    and weight gradients match the reference, NaNs included."""
    import torch

    from dcngen import reference
    from dcngen.verify import TORCH_DTYPE, poisoned_call, random_problem

    cfg = DETERMINISTIC
    problem = random_problem(cfg, 1, 9, 11, seed=6)
    tensors = problem.op_inputs(TORCH_DTYPE[cfg.dtype])
    grad_out = problem.grad_out.float()
    grad_out[0, 4, 5, 3] = float("nan")
    _, grad_x, grad_offset, _ = poisoned_call(cfg, emulated_kernel(cfg), tensors, grad_out)
    ref = [t.double().requires_grad_() for t in tensors]
    reference.dcnv4(cfg, *ref).backward(grad_out.double())
    assert ref[0].grad.isnan().any() and grad_x[ref[0].grad.isnan()].isnan().all()
    expected = ref[1].grad
    assert torch.equal(grad_offset.isnan(), expected.isnan())
    finite = expected.isfinite()
    assert torch.allclose(grad_offset[finite].double(), expected[finite], rtol=1e-4, atol=1e-4 * expected[finite].abs().max().item())


@pytest.mark.parametrize("cfg", [cuda(group=2, group_channels=16, dtype="float16"), cuda(op="dcnv3", group=2, group_channels=8)], ids=["v4-fp16", "v3-fp32"])
def test_offset_views_are_served(cfg):
    """The entry points require 16-byte aligned x, out, grad_out and grad_x (vector accesses): views
    that start part-way into their storage go through aligned copies, outputs copied back."""
    assert_offset_views_served(emulated_kernel(cfg), cfg)


def test_memory_trace_of_the_default_forward(tmp_path, monkeypatch):
    """The trace of a real kernel (fp16 G4 C32: 4 lanes a (pixel, group), 2 pixels a warp): each
    warp's output store covers its 2 pixels' 512 contiguous bytes, 4 lines; each of its 27 offset
    and weight loads has all 32 lanes; a corner load touches at most one line per (pixel, group)."""
    import json

    import torch

    cfg = CASES["v4-fp16-native-atomics"]
    n, h, w = 1, 16, 16

    # 256-byte aligned like CUDA allocations: the rows start on line boundaries
    x = copy_on_boundary(torch.randn(n, h, w, cfg.channels).half())
    om = copy_on_boundary((torch.rand(n, h, w, 112) * 4 - 2).half())
    out = copy_on_boundary(torch.empty(n, h, w, cfg.channels, dtype=torch.float16))
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("DCN_EMULATE_TRACE", str(path))
    emulated_kernel(cfg).forward(x, om, om, out)
    (launch,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert launch["kernel"] == "dcn_forward_kernel"
    traffic = {t["label"]: t for t in launch["traffic"]}
    warps = n * h * w * cfg.group * 4 // 32
    assert traffic["output rows"]["instructions"] == warps and traffic["output rows"]["lines"] == 4 * warps
    offsets = traffic["offsets and weights"]
    assert offsets["instructions"] == 27 * warps and offsets["lanes"] == 32 * 27 * warps
    corners = traffic["corner rows"]
    assert 0 < corners["instructions"] <= 36 * warps and corners["lines"] <= 8 * corners["instructions"]
    assert corners["bytes"] == 16 * corners["lanes"]


@pytest.mark.parametrize("group_channels, dtype, mma", [(32, "float16", 0), (16, "float16", 0), (32, "float32", 0), (16, "float32", 0),
                                                        (32, "float16", 1), (16, "bfloat16", 1), (64, "float16", 1)])
def test_tiled_forward_reads_its_region_without_bank_conflicts(tmp_path, monkeypatch, group_channels, dtype, mma):
    """fwd_tile's 16-byte region reads serve a warp's 512 bytes in 4 wavefronts (one a
    quarter-warp, the fewest), wherever the samples lie: 64-byte rows (corners split by column),
    32-byte rows (by corner) and 128-byte rows (not split). So do fwd_tile_mma's ldmatrix reads (an
    8x8 matrix a wavefront: 64- and 128-byte rows swizzled, 32-byte rows in a widened region, the
    odd pixels' pieces in the other half of the slots). Every sample is made to lie in its tile's
    region (no padding, offsets under half a pixel, whole tiles), so every read has all 32 lanes,
    and offsets in [0.05, 0.45) keep any two pixels of a warp off the same corner (a shared word
    would count once), with stride 2 for fwd_tile_mma, whose adjacent pixels read at once.
    Corners on random banks would take about 5 wavefronts an instruction. fwd_tile_mma's sample
    records are written a wavefront a plane, and read 2 points (8 bytes) a lane at a time in 2
    wavefronts, a half-warp each, the fewest; its staged output rows take a wavefront a store of 4
    pixels' fragment rows, and a wavefront a quarter-warp's 16-byte reads (a lane a piece of 8
    channels; ftm_slot's turns; rows padded by 4 floats instead took 2 a store)."""
    import json

    import torch

    from dcngen.verify import TORCH_DTYPE

    stride = 1 + mma
    cfg = DCNConfig(group=2, group_channels=group_channels, dtype=dtype, stride=stride, padding=0, offset_scale=1.0, target="cuda:sm_90",
                    params={"fwd_tile": 1, "fwd_tile_mma": mma})
    n, ho, wo = 1, 8, 16  # one whole tile a group
    gen = torch.Generator().manual_seed(5)
    x = copy_on_boundary(torch.randn(n, (ho - 1) * stride + 3, (wo - 1) * stride + 3, cfg.channels, generator=gen).to(TORCH_DTYPE[dtype]))
    om = copy_on_boundary((torch.rand(n, ho, wo, cfg.min_offset_mask_channels, generator=gen) * 0.4 + 0.05).to(TORCH_DTYPE[dtype]))
    out = copy_on_boundary(torch.empty(n, ho, wo, cfg.channels, dtype=TORCH_DTYPE[dtype]))
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("DCN_EMULATE_TRACE", str(path))
    emulated_kernel(cfg).forward(x, om, om, out)
    (launch,) = [json.loads(line) for line in path.read_text().splitlines()]
    traffic = {t["label"]: t for t in launch["traffic"]}
    reads = traffic["ldmatrix" if mma else "corner rows (region)"]
    assert reads["bytes"] == 4 * ho * wo * cfg.group * cfg.num_points * cfg.group_channels * x.element_size()
    assert reads["lanes"] == 32 * reads["instructions"] and reads["wavefronts"] == 4 * reads["instructions"]
    if mma:  # its sample records: a wavefront a plane written; read 2 points at a time, a wavefront a half-warp
        written, read = traffic["sample records"], traffic["sample records (read)"]
        assert written["wavefronts"] == written["instructions"] and read["wavefronts"] == 2 * read["instructions"]
        # its staged output rows: a fragment row of 4 pixels a store, 128 bytes, a wavefront; read in
        # 16-byte halves, a wavefront a quarter-warp
        written, read = traffic["output rows (staged)"], traffic["output rows (staged, read)"]
        assert written["lanes"] == 32 * written["instructions"] and written["wavefronts"] == written["instructions"]
        assert read["lanes"] == 8 * min(4, group_channels // 8) * read["instructions"] and read["wavefronts"] == 4 * read["instructions"]


@pytest.mark.parametrize("name", ["mma-tiled-fp16", "mma-tiled-fp16-sm80-fp32-accumulator-c96-5x5"])
def test_tensor_core_backward_rows_without_bank_conflicts(kernels, tmp_path, monkeypatch, name):
    """bwd_mma's coefficient matrix M, the tile's input-gradient rows written over it and the dot
    products D lie in rows of whole 128-byte lines here (fp16 sums of 64 pixels; float sums of 96
    channels; 32 pixels' floats), unpadded and swizzled: every ldmatrix of M (and of the x and
    grad_out rows: swizzled at C32, padded at C96) takes 4 wavefronts, the fewest for 512 bytes,
    and the mma fragments' stores take one wavefront for each 128 bytes (a 32-bit pair of fp16 sums
    a lane: 1; a float2 a lane: 2).
    Unswizzled, M's rows of 128 bytes would put a matrix's 8 rows on the same banks (8
    wavefronts)."""
    import json

    import torch

    from dcngen.generators.template_cuda import launch_params
    from dcngen.verify import TORCH_DTYPE

    cfg = CASES[name]
    geometry = launch_params(cfg)[1]["bwd_mma"]
    assert geometry["m_swizzle"] and geometry["d_swizzle"]
    dtype = TORCH_DTYPE[cfg.dtype]
    n, h, w = 1, 9, 11
    gen = torch.Generator().manual_seed(12)
    x, grad_out = (copy_on_boundary(torch.randn(n, h, w, cfg.channels, generator=gen).to(dtype)) for _ in range(2))
    om = copy_on_boundary((torch.rand(n, h, w, cfg.min_offset_mask_channels, generator=gen) * 3 - 1.5).to(dtype))
    grads = [copy_on_boundary(torch.zeros(t.shape, dtype=dtype)) for t in (x, om)]
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("DCN_EMULATE_TRACE", str(path))
    kernels[name].backward(x, om, om, grad_out, grads[0], grads[1], grads[1])
    launches = [json.loads(line) for line in path.read_text().splitlines()]
    (launch,) = [one for one in launches if one["kernel"] == "dcn_backward_mma_kernel"]
    traffic = {t["label"]: t for t in launch["traffic"] if t["space"] == "shared"}
    ldmatrix, rows, dots = traffic["ldmatrix"], traffic["input-gradient rows (staged)"], traffic["dot products"]
    assert ldmatrix["lanes"] == 32 * ldmatrix["instructions"] and ldmatrix["wavefronts"] == 4 * ldmatrix["instructions"]
    pair = 2 * (4 if cfg.param_dict.get("atomic_dtype") == 0 else 2)  # bytes a lane stores: two sums
    for stores, lane_bytes in ((rows, pair), (dots, 8)):
        assert stores["lanes"] == 32 * stores["instructions"] and stores["wavefronts"] == stores["instructions"] * 32 * lane_bytes // 128


@pytest.mark.parametrize("name", ["mma-tiled-fp16", "mma-tiled-fp16-sm80-fp32-accumulator-c96-5x5"])
def test_tensor_core_forward_reads_its_output_rows_without_bank_conflicts(kernels, tmp_path, monkeypatch, name):
    """fwd_mma's staged output rows (C + 8 floats apart) are read in 16-byte halves, the second first
    where the piece's bit 2 differs from the pixel's parity: a quarter-warp's 8 reads lie on
    different banks, at most a wavefront a quarter-warp (all in the same order: 2 at C32 and C96)."""
    import json

    import torch

    from dcngen.verify import TORCH_DTYPE

    cfg = CASES[name]
    dtype = TORCH_DTYPE[cfg.dtype]
    n, h, w = 1, 9, 11
    gen = torch.Generator().manual_seed(13)
    x = copy_on_boundary(torch.randn(n, h, w, cfg.channels, generator=gen).to(dtype))
    om = copy_on_boundary((torch.rand(n, h, w, cfg.min_offset_mask_channels, generator=gen) * 3 - 1.5).to(dtype))
    out = copy_on_boundary(torch.empty(n, h, w, cfg.channels, dtype=dtype))
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("DCN_EMULATE_TRACE", str(path))
    kernels[name].forward(x, om, om, out)
    (launch,) = [one for one in map(json.loads, path.read_text().splitlines()) if one["kernel"] == "dcn_forward_tiled_mma_kernel"]
    reads = next(t for t in launch["traffic"] if t["label"] == "output rows (staged, read)")
    assert reads["instructions"] > 0 and 8 * reads["wavefronts"] <= reads["lanes"] + 7 * reads["instructions"], reads


def test_tiled_tensor_core_forward_reads_zero_rows_without_bank_conflicts(tmp_path, monkeypatch):
    """fwd_tile_mma's samples beyond its region or off the window read their corners from the zero
    rows, through a key whose parity bits agree with its position's as a located sample's do: its
    ldmatrix reads still take 4 wavefronts (an 8x8 matrix each) at 64-byte rows, whatever the
    other pixel of the matrix reads. Offsets up to 3 pixels with a halo of 1 and padding put many
    samples there."""
    import json

    import torch

    cfg = DCNConfig(group=2, group_channels=32, dtype="float16", target="cuda:sm_90", params={"fwd_tile": 1, "fwd_tile_mma": 1, "fwd_halo": 1})
    n, h, w = 1, 8, 16
    gen = torch.Generator().manual_seed(6)
    x = copy_on_boundary(torch.randn(n, h, w, cfg.channels, generator=gen).half())
    om = copy_on_boundary((torch.rand(n, h, w, cfg.min_offset_mask_channels, generator=gen) * 6 - 3).half())
    out = copy_on_boundary(torch.empty(n, h, w, cfg.channels, dtype=torch.float16))
    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv("DCN_EMULATE_TRACE", str(path))
    emulated_kernel(cfg).forward(x, om, om, out)
    (launch,) = [json.loads(line) for line in path.read_text().splitlines()]
    reads = {t["label"]: t for t in launch["traffic"]}["ldmatrix"]
    assert reads["lanes"] == 32 * reads["instructions"] and reads["wavefronts"] == 4 * reads["instructions"]


def test_tiled_forward_on_tensor_cores_keeps_tiny_weights_precise():
    """fwd_tile_mma's weights are 16-bit high and low parts, scaled per pixel by a power of two: with
    masks of 1e-6 in fp16, where every weight lies in fp16's subnormal range, unscaled parts would
    put the output 5 % off; scaled, it is as close to the float64 reference as its own rounding
    allows (x of 100s keeps the output itself in fp16's normal range)."""
    import torch

    from dcngen import reference
    from dcngen.verify import rel_err

    cfg = DCNConfig(group=2, group_channels=32, dtype="float16", offset_scale=1.0, target="cuda:sm_90", params={"fwd_tile": 1, "fwd_tile_mma": 1})
    n, h, w = 1, 9, 11
    gen = torch.Generator().manual_seed(3)
    x = copy_on_boundary((torch.randn(n, h, w, cfg.channels, generator=gen) * 100).half())
    offset = torch.rand(n, h, w, cfg.group * cfg.num_points * 2, generator=gen) * 4 - 2
    mask = torch.randn(n, h, w, cfg.group * cfg.num_points, generator=gen) * 1e-6
    om = copy_on_boundary(reference.pack_offset_mask(cfg, offset, mask, cfg.min_offset_mask_channels).half())
    out = copy_on_boundary(torch.full((n, h, w, cfg.channels), float("nan"), dtype=torch.float16))
    emulated_kernel(cfg).forward(x, om, om, out)
    expected = reference.dcnv4(cfg, x.double(), om.double())
    assert rel_err(out, expected) < 2e-3  # 3e-4 here; 5e-2 unscaled


@pytest.mark.parametrize("name, aligned_width, loads_per_pixel", [("v4-fp16-native-atomics", 112, 27), ("v4-bf16-5x5-idle-lane", 152, 37 + 2)])
def test_offset_rows_staged_in_pieces(kernels, tmp_path, monkeypatch, name, aligned_width, loads_per_pixel):
    """The backward stages its blocks' offset rows (bwd_stage=1) a piece of 4 elements at a time
    (one 8-byte load, one 16-byte store of floats) where the rows start on 8-byte boundaries, the
    elements past the last whole piece one at a time; rows 2 elements narrower go element by
    element. The points' gradients, left over the staged rows, go out the same way (a piece: one
    16-byte load of floats, one 8-byte store), a quarter-warp's loads of 8 consecutive pieces
    without a bank conflict (at most a wavefront a quarter-warp). The trace counts the staging
    loads and the gradient stores of each, and both give the same gradients, bit for bit."""
    import json

    import torch

    from dcngen.verify import TORCH_DTYPE

    cfg = CASES[name]
    dtype = TORCH_DTYPE[cfg.dtype]
    n, h, w = 1, 6, 7
    gen = torch.Generator().manual_seed(11)
    x = copy_on_boundary(torch.randn(n, h, w, cfg.channels, generator=gen).to(dtype))
    grad_out = copy_on_boundary(torch.randn(n, h, w, cfg.channels, generator=gen).to(dtype))
    om = torch.rand(n, h, w, aligned_width, generator=gen) * 5 - 2.5
    om[..., cfg.min_offset_mask_channels :] = 0
    results = []
    for width, loads in ((aligned_width, loads_per_pixel), (aligned_width - 2, cfg.min_offset_mask_channels)):
        rows = copy_on_boundary(om[..., :width].to(dtype).contiguous())
        grads = [copy_on_boundary(torch.full(t.shape, float("nan"), dtype=dtype)) for t in (x, rows)]
        grads[1][..., cfg.min_offset_mask_channels :] = 0
        path = tmp_path / f"trace{width}.jsonl"
        monkeypatch.setenv("DCN_EMULATE_TRACE", str(path))
        kernels[name].backward(x, rows, rows, grad_out, grads[0], grads[1], grads[1])
        staging = [t for line in path.read_text().splitlines() for t in json.loads(line)["traffic"]
                   if t["label"] == "offset rows (staging)" and t["space"] == "global"]
        assert sum(t["lanes"] for t in staging) == n * h * w * loads, width
        assert sum(t["bytes"] for t in staging) == n * h * w * cfg.min_offset_mask_channels * x.element_size()
        stores = [t for line in path.read_text().splitlines() for t in json.loads(line)["traffic"]
                  if t["label"] == "point gradients" and t["space"] == "global"]
        span, piece = cfg.min_offset_mask_channels, 4
        assert sum(t["lanes"] for t in stores) == n * h * w * (span // piece + span % piece if width % piece == 0 else span), width
        assert sum(t["bytes"] for t in stores) == n * h * w * span * x.element_size()
        reads = [t for line in path.read_text().splitlines() for t in json.loads(line)["traffic"] if t["label"] == "point gradients (staged, read)"]
        lanes, instructions, wavefronts = (sum(t[k] for t in reads) for k in ("lanes", "instructions", "wavefronts"))
        assert instructions > 0 and 8 * wavefronts <= lanes + 7 * instructions, (width, lanes, instructions, wavefronts)
        results.append([grads[0], grads[1][..., : cfg.min_offset_mask_channels]])
    assert not results[0][0].isnan().any() and not results[0][1].isnan().any()
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_l1_traffic_script_counts_a_forward_and_backward(kernels):
    """benchmarks/l1_traffic.py, whose counts benchmarks/RESULTS.md quotes for changes no GPU has
    timed, runs a config's forward and backward on the emulator and prints each launch's traced
    accesses and its L1 cycles a point in both models (the config of a case above: its build is
    cached)."""
    import subprocess
    import sys
    from pathlib import Path

    assert not isinstance(kernels["v4-fp16-native-atomics"], Exception)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "l1_traffic.py"
    out = subprocess.run([sys.executable, str(script), "--dtype", "float16", "--group", "4", "--group-channels", "32", "--offset-scale", "1",
                          "--shape", "1x8x8", "--backward"], capture_output=True, text=True, check=True).stdout
    forward, backward = out.split("\ndcn_forward_kernel: ")[1].split("\ndcn_backward_kernel: ")
    assert "corner rows" in forward and "output rows" in forward and forward.count("cycles a point") == 2
    for label in ("corner rows", "input-gradient reductions", "point gradients (staged)", "output-gradient rows"):
        assert label in backward, label
    assert "cycles a point" in backward

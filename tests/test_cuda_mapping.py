"""The CUDA shell's thread mapping (templates/cuda/mapping.h.j2), run on the CPU: every output
element is written by exactly one thread, for awkward shapes and indices past 2^31."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from dcngen.config import DCNConfig
from dcngen.generators.jinja import render

CXX = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")


def harness(tmp_path: Path, cfg: DCNConfig, vec: int, pixels: int) -> Path:
    """Build the mapping check of `cfg` with `vec` channels per thread and `pixels` per block."""
    src = tmp_path / f"check_{cfg.group}_{cfg.group_channels}_{vec}_{pixels}.cc"
    src.write_text(render("cuda/mapping_check.cc.j2", cfg, vec=vec, pixels=pixels))
    exe = src.with_suffix("")
    subprocess.run([CXX, "-std=c++17", "-O2", str(src), "-o", str(exe)], check=True, capture_output=True)
    return exe


def run(exe: Path, *args) -> str:
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


# (group, group_channels, vec, pixels): whole vectors, a tail (C % vec != 0), idle lanes
# (ceil(C/vec) not a power of two), one lane per group, 32 lanes per group.
MAPPINGS = [(4, 32, 8, 16), (4, 20, 8, 5), (3, 24, 8, 7), (5, 16, 16, 3), (2, 64, 2, 1), (7, 16, 4, 9)]


@pytest.mark.parametrize("group,channels,vec,pixels", MAPPINGS)
def test_every_output_element_once(tmp_path, group, channels, vec, pixels):
    cfg = DCNConfig(group=group, group_channels=channels)
    exe = harness(tmp_path, cfg, vec, pixels)
    # pixels per image not a multiple of the pixels per block; stride-2 style odd sizes; 1x1.
    for n, ho, wo in [(3, 7, 9), (2, 28, 28), (5, 1, 1), (1, 13, 5)]:
        run(exe, "full", n, ho, wo)
        # the smaller blocks of a device with more multiprocessors than the output's blocks
        for sms in (7, 132, 4096):
            run(exe, "full", n, ho, wo, sms)


def block_pixels(exe: Path, n: int, ho: int, wo: int, sms: int) -> int:
    return int(run(exe, "blocks", n, ho, wo, sms).split("block_pixels ")[1])


def test_small_outputs_spread_over_every_multiprocessor(tmp_path):
    """G4 C32 at 16-byte fp16 vectors (4 lanes a pixel-group, 16 pixels a block) on 132
    multiprocessors: the benchmark shapes keep 16 pixels a block; the small ones halve it until
    the blocks load the multiprocessors evenly."""
    exe = harness(tmp_path, DCNConfig(group=4, group_channels=32), 8, 16)
    sizes = {(64, 56, 56): 16, (64, 28, 28): 16, (1, 200, 320): 16, (1, 100, 160): 16, (1, 50, 80): 16,
             (64, 7, 7): 8,  # 196 blocks of 16: 2 on some multiprocessors, 1 on the others
             (1, 25, 40): 8,  # 63 blocks of 16 would leave 69 of 132 idle
             (1, 8, 8): 2, (1, 1, 1): 2}  # down to one warp (2 pixels of 16 threads)
    assert {shape: block_pixels(exe, *shape, 132) for shape in sizes} == sizes
    assert block_pixels(exe, 1, 25, 40, 0) == 16  # a device that does not say: PIXELS


def test_stride_two_output_size(tmp_path):
    """Launch sizes come from the output: a stride-2 output of a 57x45 input."""
    cfg = DCNConfig(group=4, group_channels=16, stride=2, padding=1)
    ho, wo = cfg.output_size(57, 45)
    assert (ho, wo) == (29, 23)
    run(harness(tmp_path, cfg, 8, 10), "full", 3, ho, wo)


def test_indices_past_2_pow_31(tmp_path):
    """N*Ho*Wo*G*lanes crosses 2^31 (and 2^32): spot-check threads around the boundaries."""
    cfg = DCNConfig(group=4, group_channels=32)
    exe = harness(tmp_path, cfg, 8, 16)
    n, ho, wo = 3000, 200, 320  # 1.92e8 pixels x 16 threads = 3.07e9 threads
    total = n * ho * wo * 4 * 4
    assert total > 2**31
    rng = random.Random(0)
    spots = [0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1, 2**32, 2**32 + 17, total - 1, total - 16]
    spots += [rng.randrange(total) for _ in range(2000)]
    run(exe, "spot", n, ho, wo, *spots)
    # the pixel index itself past 2^31 (2.56e9 pixels)
    n2 = 40000
    total2 = n2 * ho * wo * 16
    spots2 = [total2 - 1, 16 * (2**31 - 1), 16 * 2**31, 16 * 2**31 + 5] + [rng.randrange(total2) for _ in range(2000)]
    run(exe, "spot", n2, ho, wo, *spots2)


# Tiled backward: (config fields, params, output shapes (N, Ho, Wo)); the input is a little larger.
TILES = [
    (dict(group=4, group_channels=32, offset_scale=2.0, dtype="float16"), {}, [(2, 56, 56), (1, 13, 29), (3, 1, 1)]),
    (dict(group=3, group_channels=16, dtype="float32"), {"bwd_tile_h": 5, "bwd_tile_w": 7, "bwd_tile_threads": 96}, [(2, 11, 23), (1, 5, 7)]),
    (dict(group=2, group_channels=20, dtype="bfloat16", kernel_size=5, padding=2, offset_scale=0.7), {"bwd_halo": 1}, [(1, 17, 9)]),
    (dict(op="dcnv3", group=2, group_channels=8, dtype="float16", kernel_size=(3, 5), padding=(1, 2)), {"bwd_tile_w": 32}, [(2, 9, 40)]),
    (dict(group=4, group_channels=16, dtype="float16", stride=2, padding=2, dilation=2, remove_center=True, offset_scale=-1.5), {"bwd_tile_h": 4}, [(2, 15, 12)]),
]


def check_tiles(tmp_path: Path, cfg: DCNConfig, tile: dict, lanes: int, shapes) -> None:
    """Build the tile mapping check of `tile` (a geometry dict) and run it on each output shape
    (N, Ho, Wo) of an input a little larger than the output needs."""
    src = tmp_path / "tile_check.cc"
    src.write_text(render("cuda/tile_check.cc.j2", cfg, tile=tile, lanes=lanes))
    exe = tmp_path / "tile_check"
    subprocess.run([CXX, "-std=c++17", "-O2", str(src), "-o", str(exe)], check=True, capture_output=True)
    for n, ho, wo in shapes:
        out = run(exe, n, ho, wo, ho * cfg.stride[0] + 2, wo * cfg.stride[1] + 3)
        assert int(out.split()[-5]) > 0, out  # some samples were checked


@pytest.mark.parametrize("case", range(len(TILES)))
def test_tiled_backward_mapping(tmp_path, case):
    """Every (pixel, group, lane) visited once; samples within the halo have all corners in their
    pixel's band of the region."""
    from dcngen.generators.template_cuda import launch_params

    fields, params, shapes = TILES[case]
    cfg = DCNConfig(**fields, target="cuda:sm_90", params={"bwd_tile": 1, **params})
    geometry = launch_params(cfg)[1]
    check_tiles(tmp_path, cfg, geometry["bwd_tile"], geometry["bwd_lanes"], shapes)


# Tiled forwards: (kernel, config fields, params, output shapes (N, Ho, Wo)).
FORWARD_TILES = [
    ("fwd_mma", dict(group=4, group_channels=32, dtype="float16"), {}, [(2, 56, 56), (1, 13, 29)]),
    ("fwd_mma", dict(op="dcnv3", group=2, group_channels=16, dtype="bfloat16", kernel_size=(5, 3), stride=2, padding=(2, 1), dilation=(1, 2), offset_scale=-0.7),
     {"fwd_mma_h": 4, "fwd_mma_w": 8, "fwd_halo": 1}, [(2, 9, 17)]),
    ("fwd_tile", dict(group=4, group_channels=32, offset_scale=2.0, dtype="float16"), {}, [(2, 56, 56), (1, 13, 29), (3, 1, 1)]),
    ("fwd_tile", dict(group=3, group_channels=16, dtype="float16", kernel_size=(3, 5), stride=2, padding=(1, 2), offset_scale=0.7),  # widened region
     {"fwd_tile_h": 5, "fwd_tile_w": 7, "fwd_tile_threads": 96}, [(2, 11, 23)]),
    ("fwd_tile", dict(op="dcnv3", group=2, group_channels=24, dtype="float32", kernel_size=5, padding=2), {"fwd_halo": 1}, [(1, 17, 9)]),
]


@pytest.mark.parametrize("case", range(len(FORWARD_TILES)))
def test_tiled_forward_mapping(tmp_path, case):
    """The tiled forwards' tiles (the tensor-core one: a thread per pixel; the SIMT one: its lanes a
    pixel): every (pixel, lane) visited once; samples within the halo have all corners in their
    pixel's band of the region."""
    from dcngen.generators.template_cuda import launch_params

    kernel, fields, params, shapes = FORWARD_TILES[case]
    cfg = DCNConfig(**fields, target="cuda:sm_90", params={kernel: 1, **params})
    tile = launch_params(cfg)[1][kernel]
    check_tiles(tmp_path, cfg, tile, tile.get("lanes", 1), shapes)

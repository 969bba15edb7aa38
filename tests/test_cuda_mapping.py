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

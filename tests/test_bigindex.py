"""Flat indices past 2^31 elements.

1. The sampling core's index helpers (offset_index / mask_index) and `locate`, rendered from
   templates/common/dcn_core.h.j2 and compiled into a small host program, at pixel indices and
   strides whose products cross 2^31 and 2^32.
2. A real CPU forward whose input and output hold more than 2^31 bfloat16 elements (4 GiB each),
   with samples that read past element 2^31 from pixels before it and write past it from reads
   before it. Skipped when the machine has less than 12 GiB available.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from dcngen.config import DCNConfig
from dcngen.generators.jinja import render
from dcngen.layout import offset_layout

BIG_PIXELS = [0, 1, (1 << 31) - 1, 1 << 31, (1 << 31) + 7, (1 << 32) + 12345, (1 << 40) + 3]
STRIDES = [3, 112, 1000003]

HARNESS = r"""
#include <cstdio>
#include <initializer_list>
{core}
int main() {{
  using namespace dcn;
  const long long pixels[] = {{{pixels}}};
  const long long strides[] = {{{strides}}};
  for (long long p : pixels)
    for (long long s : strides)
      for (int g : {{0, G - 1}})
        for (int k : {{0, P - 1}})
          std::printf("%lld %lld %d %d %lld %lld\n", p, s, g, k, (long long)offset_index(p, s, g, k), (long long)mask_index(p, s, g, k));
  // locate() on a huge image: output coordinates near 2^15 and an image of 2^16 x 2^16 pixels
  const Sample a = locate(40000, 50000, 0, acc_t(0.25), acc_t(0.5), 65536, 65536);
  std::printf("S %d %d %d\n", int(a.inside), a.y0, a.x0);
  const Sample b = locate(0, 0, 0, acc_t(1e30), acc_t(-1e30), 65536, 65536);
  std::printf("S %d %d %d\n", int(b.inside), b.y0, b.x0);
  return 0;
}}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("op", ["dcnv4", "dcnv3"])
def test_core_index_math_is_64_bit(tmp_path, op):
    cfg = DCNConfig(op=op, group=7, group_channels=16, kernel_size=(3, 3), padding=1, dtype="float32")
    core = render("common/dcn_core.h.j2", cfg)
    src = tmp_path / "harness.cc"
    src.write_text(HARNESS.format(core=core, pixels=", ".join(f"{p}LL" for p in BIG_PIXELS), strides=", ".join(f"{s}LL" for s in STRIDES)))
    exe = tmp_path / "harness"
    build = subprocess.run(["g++", "-std=c++17", "-O1", "-fsanitize=undefined", "-fno-sanitize-recover=all", str(src), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "runtime error" not in run.stderr, run.stderr
    lay = offset_layout(cfg)
    lines = run.stdout.splitlines()
    rows = [line.split() for line in lines if not line.startswith("S ")]
    assert len(rows) == len(BIG_PIXELS) * len(STRIDES) * 4
    for p, s, g, k, oi, mi in ((int(v) for v in r) for r in rows):
        assert oi == p * s + g * lay.offset_group_stride + lay.offset_base + 2 * k
        assert mi == p * s + g * lay.mask_group_stride + lay.mask_base + k
    samples = [line.split()[1:] for line in lines if line.startswith("S ")]
    # point 0 is (i, j) = (0, 0), half extent 1: px = 50000 - 1 + 1 + (-1 + 0.25) = 49999.25, py = 39999.5
    assert samples[0] == ["1", "39999", "49999"]
    assert samples[1][0] == "0"


def _mem_available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


@pytest.mark.skipif(_mem_available_gib() < 12, reason="needs 12 GiB of free memory (two 4 GiB bfloat16 tensors)")
def test_forward_across_2_31_elements():
    import dcngen.ops as ops

    g, c = 1, 1024
    n, h, w = 1, 1024, 2056  # N*H*W*G*C = 2_155_872_256 > 2^31
    assert n * h * w * g * c > 2**31
    x = torch.empty(n, h, w, c, dtype=torch.bfloat16)
    # exact small integers in bf16 (<= 256): value = (13x + 3c) % 128 + y % 128, one pass per row
    table = ((13 * torch.arange(w).view(w, 1) + 3 * torch.arange(c).view(1, c)) % 128).to(torch.bfloat16)
    for y in range(h):
        torch.add(table, float(y % 128), out=x[0, y])
    om = torch.zeros(n, h, w, 8, dtype=torch.bfloat16)
    om[..., 2] = 1  # weight 1, zero offsets: out == x
    # offsets exactly representable in bf16 (8 significant bits): 2048 and 1020
    om[0, 0, 0, 0], om[0, 0, 0, 1] = 2048, 1020  # the first pixel reads pixel (1020, 2048), past element 2^31
    om[0, h - 1, w - 1, 0], om[0, h - 1, w - 1, 1] = -2048, -1020  # the last pixel (written past 2^31) reads (3, 7)
    om[0, h - 2, 5, 0] = -3  # one more read of a far-back pixel from past the boundary
    assert (1020 * w + 2048) * c > 2**31
    out = ops.dcnv4(x, om, kernel_size=1, padding=0, group=g, group_channels=c)
    assert out.shape == x.shape
    assert torch.equal(out[0, 0, 0], x[0, 1020, 2048])
    assert torch.equal(out[0, h - 1, w - 1], x[0, 3, 7])
    assert torch.equal(out[0, h - 2, 5], x[0, h - 2, 2])
    boundary_row = (2**31 // c) // w
    lo = boundary_row - 2
    expect = x[0, lo:].clone()
    expect[-1, -1] = x[0, 3, 7]
    expect[-2, 5] = x[0, h - 2, 2]
    assert torch.equal(out[0, lo:], expect)
    assert torch.equal(out[0, 1:8], x[0, 1:8])

"""The sampling core's float16 storage conversions (templates/common/dcn_core.h.j2, used by the CPU
kernels), compiled on the host and checked against the compiler's own _Float16 conversions: every
one of the 65,536 half values to float, and every one of the 2^32 float values to half (round to
nearest even, subnormals, overflow to inf; a NaN stays a NaN of the same sign)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from dcngen.config import DCNConfig
from dcngen.generators.jinja import render

CHECK = r"""
#include "core.h"
#include <cmath>
#include <cstdio>
using namespace dcn;

int main() {
  long bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const f16_t h{uint16_t(b)};
    _Float16 native;
    memcpy(&native, &h.bits, sizeof native);
    const float got = to_acc(h), want = float(native);
    if (float_to_bits(got) != float_to_bits(want) && !(std::isnan(got) && std::isnan(want)) && bad++ < 5)
      printf("to_acc %04x: %08x, want %08x\n", b, float_to_bits(got), float_to_bits(want));
  }
  for (uint64_t b = 0; b < (uint64_t(1) << 32); ++b) {
    const float f = bits_to_float(uint32_t(b));
    const uint16_t got = from_acc<f16_t>(f).bits;
    const _Float16 native = static_cast<_Float16>(f);
    uint16_t want;
    memcpy(&want, &native, sizeof want);
    const bool same_nan = std::isnan(f) && (got & 0x7e00u) == 0x7e00u && (got & 0x8000u) == (want & 0x8000u);
    if (got != want && !same_nan && bad++ < 10) printf("from_acc %08x: %04x, want %04x\n", uint32_t(b), got, want);
  }
  printf("%ld mismatches\n", bad);
  return bad != 0;
}
"""


def test_float16_conversions_match_the_compilers_for_every_value(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("needs a host C++ compiler")
    (tmp_path / "core.h").write_text(render("common/dcn_core.h.j2", DCNConfig(dtype="float16")))
    (tmp_path / "check.cc").write_text(CHECK)
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-march=native", "check.cc", "-o", "check"], cwd=tmp_path, capture_output=True, text=True)
    if build.returncode and "_Float16" in build.stderr:
        pytest.skip(f"{cxx} has no _Float16 to compare with")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(tmp_path / "check")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout

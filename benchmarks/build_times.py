"""Host build times with and without the precompiled tvm-ffi headers (dcngen/compilers/precompiled_header.py).

Builds fresh configs (each a new offset_scale, so each compiles) into a temporary cache, pairs of
one build with the precompiled headers and one without, the order alternating, and prints the
median of each side and of the paired ratios. The precompiled headers are made before the pairs.

    python benchmarks/build_times.py [--pairs 8] [--kind cpu|emulated]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from dcngen.build import build
from dcngen.config import DCNConfig
from dcngen.generators import generate
from dcngen.generators.template_cuda import generate as generate_cuda


def source(kind: str, i: int):
    cfg = DCNConfig(group=4, group_channels=16, offset_scale=1.0 + i / 1000, dtype="float16" if kind == "emulated" else "float32",
                    target="cuda:sm_90" if kind == "emulated" else "cpu")
    return generate_cuda(cfg, emulate=True) if kind == "emulated" else generate(cfg)


def timed_build(kind: str, i: int, precompiled: bool) -> float:
    os.environ["DCNGEN_PRECOMPILED_HEADER"] = "1" if precompiled else "0"
    src = source(kind, i)
    start = time.perf_counter()
    art = build(src)
    elapsed = time.perf_counter() - start
    assert ("-include" in art.meta["cflags"]) == precompiled, art.meta["cflags"]
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--kind", choices=("cpu", "emulated"), default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcngen-build-times-") as cache:
        os.environ["DCNGEN_CACHE"] = cache
        os.environ["DCNGEN_PRECOMPILED_HEADER"] = "1"
        for i in range(2):  # a flag set's second build precompiles the headers
            build(source(args.kind, i))
        with_pch, without, ratios = [], [], []
        for p in range(args.pairs):
            first = p % 2 == 0
            a = timed_build(args.kind, 2 + 2 * p, precompiled=first)
            b = timed_build(args.kind, 3 + 2 * p, precompiled=not first)
            on, off = (a, b) if first else (b, a)
            with_pch.append(on)
            without.append(off)
            ratios.append(on / off)
        print(f"{args.kind} builds, {args.pairs} pairs: with the precompiled headers {statistics.median(with_pch):.2f} s, "
              f"without {statistics.median(without):.2f} s (medians); median paired ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()

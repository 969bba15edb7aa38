"""Template CPU kernels vs the PyTorch baseline (dcngen.baseline, grid_sample), same run, paired ratios.

    python benchmarks/bench_cpu.py [--rounds 7] [--op dcnv4] [--target cpu:x86-64-v3]

Shapes: N=8 56x56 and N=1 200x320, G=4, C=16, 3x3, float32; forward and forward+backward.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from dcngen.bench import benchmark_config
from dcngen.config import DCNConfig
from dcngen.cpu_isas import cpuinfo

SHAPES = [(8, 56, 56), (1, 200, 320)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--op", default="dcnv4", choices=["dcnv4", "dcnv3"])
    parser.add_argument("--backend", default="template")
    parser.add_argument("--target", default="cpu", help="cpu (this CPU) or a named x86-64 level, e.g. cpu:x86-64-v3")
    args = parser.parse_args()
    print(f"# {cpuinfo().get('model name') or platform.processor()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print("| op | shape | pass | kernel ms | PyTorch ms | speedup (median of paired ratios) |")
    print("|---|---|---|---|---|---|")
    for n, h, w in SHAPES:
        cfg = DCNConfig(op=args.op, group=4, group_channels=16, kernel_size=3, dtype="float32", backend=args.backend, target=args.target)
        for name, c in benchmark_config(cfg, n, h, w, rounds=args.rounds).items():
            print(f"| {args.op} {args.backend} {args.target} | {n}x{h}x{w} | {name} | {c.candidate_ms:.2f} | {c.baseline_ms:.2f} | {c.speedup:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

"""Memory traffic of the CUDA template kernels, counted on the SIMT emulator (no GPU needed).

Runs a config's forward (and with --backward its backward) on the emulator with
DCN_EMULATE_TRACE set and prints, per kernel launch and traced access, what its warp instructions
ask of an SM's L1/shared-memory data path:

    python benchmarks/l1_traffic.py --dtype float16 --group 4 --group-channels 32 --param mma=1

- global accesses: distinct 128-byte lines and 32-byte sectors per warp instruction;
- shared accesses (staged values, cp.async destinations, ldmatrix): wavefronts, the most distinct
  4-byte words one of the 32 banks serves per instruction.

Summed per (pixel, group, point) over the traced accesses, they give the cycles an SM's L1 needs at
least, in two models of what it serves a cycle for global accesses: one 128-byte line, or four
32-byte sectors (shared accesses: one wavefront either way). `--sms` and `--clock` turn them into a
lower bound on the time of the benchmark shape (`--bench-shape`, default N64 56x56). Which model
holds, a card's profile says: Nsight Compute's L1/TEX throughput of a kernel timed there against
these counts. Traced: the corner, output and output-gradient rows, offsets and weights and their
gradients (global or staged), cp.async, ldmatrix, the tiled forward's coefficient matrix and staged
output rows, the backward's input-gradient reductions, the tiled backward's fixed-point sums (each
32-bit shared atomic an access) and the tensor-core backward's coefficient matrix, sample records,
dot products and staged input-gradient rows, and the clearing of shared buffers; not traced: a few
words a block (flags, spans, marks of pixels to redo). The input-gradient reductions' bytes are also
printed apart: atomics are done in L2, which bounded the default backward on an H100. Inputs are
256-byte aligned like CUDA allocations, offsets drawn as in benchmarks/gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import make_inputs  # noqa: E402  (puts the checkout on the path, as for config_flags)
from config_flags import add_config_flags, config_from_flags  # noqa: E402

from dcngen.compilers.alignment import copy_on_boundary  # noqa: E402
from dcngen.config import DCNConfig  # noqa: E402
from dcngen.verify import TORCH_DTYPE  # noqa: E402
from dcngen.kernels import emulated_kernel  # noqa: E402


def traced_launches(cfg: DCNConfig, n: int, h: int, w: int, reach: int, backward: bool) -> list[dict]:
    """The trace lines (one per launch) of cfg's forward, and backward if asked, on the emulator."""
    kernel = emulated_kernel(cfg)
    x, oms = make_inputs(cfg, n, h, w, TORCH_DTYPE[cfg.dtype], reach=reach, device="cpu")
    x, oms = copy_on_boundary(x), [copy_on_boundary(t) for t in oms]
    offset, mask = (oms[0], oms[0]) if cfg.op == "dcnv4" else oms
    ho, wo = cfg.output_size(h, w)
    out = copy_on_boundary(torch.empty(n, ho, wo, cfg.channels, dtype=TORCH_DTYPE[cfg.dtype]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "trace.jsonl")
        os.environ["DCN_EMULATE_TRACE"] = str(path)
        try:
            kernel.forward(x, offset, mask, out)
            if backward:
                grad_out = copy_on_boundary(torch.randn(out.shape).to(TORCH_DTYPE[cfg.dtype]))
                grads = [torch.empty_like(t) for t in (x, offset, mask)]
                kernel.backward(x, offset, mask, grad_out, *grads)
        finally:
            del os.environ["DCN_EMULATE_TRACE"]
        return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(ap)
    ap.add_argument("--shape", default="1x48x48", help="NxHxW emulated (the figures are per sampling point)")
    ap.add_argument("--reach", type=int, default=2, help="offsets drawn within [-reach, reach)")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--bench-shape", default="64x56x56")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--clock", type=float, default=1.98, help="SM clock in GHz (default: the H100/H200 SXM maximum)")
    args = ap.parse_args()

    cfg = config_from_flags(args)
    n, h, w = (int(v) for v in args.shape.split("x"))
    ho, wo = cfg.output_size(h, w)
    points = n * ho * wo * cfg.group * cfg.num_points
    bn, bh, bw = (int(v) for v in args.bench_shape.split("x"))
    bho, bwo = cfg.output_size(bh, bw)
    bench_points = bn * bho * bwo * cfg.group * cfg.num_points
    print(f"{cfg.key}: {args.shape}, offsets within +-{args.reach}, {points} (pixel, group, point) triples")
    for launch in traced_launches(cfg, n, h, w, args.reach, args.backward):
        print(f"\n{launch['kernel']}: {launch['blocks']} blocks of {launch['threads']} threads")
        print(f"  {'access':<28} {'space':<6} {'instr':>8} {'B/instr':>8} {'lines':>6} {'sectors':>7} {'wavefr':>6} {'wavefronts/point':>16}")
        by_lines = by_sectors = 0.0  # the two models of a global access: a line, or four sectors, a cycle
        for t in sorted(launch["traffic"], key=lambda t: -t["wavefronts"]):
            per_instr = lambda v: v / t["instructions"] if t["instructions"] else 0.0  # noqa: E731
            shared = t["space"] == "shared"
            lines = f"{'':>6}" if shared else f"{per_instr(t['lines']):6.1f}"
            sectors = f"{'':>7}" if shared else f"{per_instr(t['sectors']):7.1f}"
            print(f"  {t['label']:<28} {t['space']:<6} {t['instructions']:>8} {per_instr(t['bytes']):8.0f} {lines} {sectors} "
                  f"{per_instr(t['wavefronts']):6.1f} {t['wavefronts'] / points:16.2f}")
            by_lines += t["wavefronts"]
            by_sectors += t["wavefronts"] if shared else t["sectors"] / 4
        for model, total in (("a line", by_lines), ("four sectors", by_sectors)):
            bound_us = total / points * bench_points / args.sms / (args.clock * 1e3)
            print(f"  L1 serving {model} a cycle: {total / points:.2f} cycles a point; {args.bench_shape} on {args.sms} SMs at {args.clock} GHz "
                  f"takes at least {bound_us:.0f} us")
        reduced = sum(t["bytes"] for t in launch["traffic"] if t["label"] == "input-gradient reductions")
        if reduced:  # atomics are done in L2, past the L1
            print(f"  reductions (done in L2): {reduced / points:.0f} bytes a point; {reduced / points * bench_points / 1e9:.2f} GB at {args.bench_shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TVM-CPU kernels next to the template-CPU kernels and the PyTorch baseline (DCNv4, 3x3, fp32).

Kernel level (artifact forward/backward on preallocated tensors; no autograd around the
kernels); the baseline (dcngen.baseline) runs under autograd. Sides are timed alternately, `--rounds` pairs;
reported: median ms per side and the median of the paired ratios.

    python benchmarks/bench_tvm_cpu.py [--rounds 9] [--op dcnv4|dcnv3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from dcngen import baseline, build
from dcngen.bench import compare
from dcngen.config import DCNConfig
from dcngen.generators import generate

SHAPES = ((8, 56, 56), (1, 200, 320))


def kernel(cfg: DCNConfig):
    return build.load(build.build(generate(cfg)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--op", default="dcnv4", choices=("dcnv4", "dcnv3"))
    ap.add_argument("--threads", type=int, default=0, help="threads of both backends and the baseline (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
        torch.set_num_threads(args.threads)  # the template kernels follow torch
    base = DCNConfig(op=args.op, group=4, group_channels=16, dtype="float32")
    tvm_k, tmpl_k = kernel(base.replace(backend="tvm")), kernel(base.replace(backend="template"))
    print(f"# {args.op} G=4 C=16 3x3 fp32, torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print("| shape | pass | tvm ms | template ms | PyTorch ms | template/tvm | PyTorch/tvm |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for n, h, w in SHAPES:
        g, c, p = base.group, base.group_channels, base.num_points
        x = torch.randn(n, h, w, g * c, generator=gen)
        offset = torch.rand(n, h, w, g, p, 2, generator=gen) * 4 - 2
        mask = torch.randn(n, h, w, g, p, generator=gen)
        grad_out = torch.randn(n, h, w, g * c, generator=gen)
        out, gx = torch.empty(n, h, w, g * c), torch.empty_like(x)
        if args.op == "dcnv4":
            om = torch.nn.functional.pad(torch.cat((offset.flatten(-2), mask), -1).reshape(n, h, w, -1), (0, base.padded_offset_mask_channels - 3 * g * p)).contiguous()
            ins, grads = (x, om, om), (torch.zeros_like(om),) * 2
            ref_fn = lambda t: baseline.dcnv4(base, *t)  # noqa: E731
            ref_ins = (x, om)
        else:
            off, msk = offset.reshape(n, h, w, -1).contiguous(), mask.reshape(n, h, w, -1).contiguous()
            ins, grads = (x, off, msk), (torch.empty_like(off), torch.empty_like(msk))
            ref_fn = lambda t: baseline.dcnv3(base, *t)  # noqa: E731
            ref_ins = (x, off, msk)

        def fwd(k):
            return lambda: k.forward(*ins, out)

        def train(k):
            def run():
                k.forward(*ins, out)
                k.backward(*ins, grad_out, gx, *grads)
            return run

        def ref_fwd():
            with torch.no_grad():
                ref_fn(ref_ins)

        leaves = [t.clone().requires_grad_() for t in ref_ins]

        def ref_train():
            ref_fn(leaves).backward(grad_out)

        for name, tvm_side, tmpl_side, ref_side in (("forward", fwd(tvm_k), fwd(tmpl_k), ref_fwd),
                                                     ("forward+backward", train(tvm_k), train(tmpl_k), ref_train)):
            vs_tmpl = compare(tvm_side, tmpl_side, rounds=args.rounds)
            vs_ref = compare(tvm_side, ref_side, rounds=max(3, args.rounds // 3))
            print(f"| {n}x{h}x{w} | {name} | {vs_tmpl.candidate_ms:.2f} | {vs_tmpl.baseline_ms:.2f} | {vs_ref.baseline_ms:.2f} "
                  f"| {vs_tmpl.speedup:.2f} | {vs_ref.speedup:.2f} |", flush=True)


if __name__ == "__main__":
    main()

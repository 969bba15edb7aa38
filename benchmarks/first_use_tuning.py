"""What tuning on first use (DCNGEN_AUTOTUNE, dcngen/autotune.py) costs and buys on this machine.

Into an empty, temporary records folder: the seconds of the first op call of a config (which tunes
it within the budget), then the kernel it chose against the default parameters, forward+backward,
alternating, with the median of the paired ratios (default time / tuned time; 1.0 where the tune
kept the default).

    python benchmarks/first_use_tuning.py --budget 60 --shape 8x56x56 [--op dcnv4 --group 4 --group-channels 16 --kernel-size 3 --dtype float32 --device cpu]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from dcngen import ops, records
from dcngen.bench import compare
from dcngen.config import DCNConfig
from dcngen.kernels import kernel_for, target_of
from dcngen.verify import TORCH_DTYPE, random_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=60.0, help="DCNGEN_AUTOTUNE seconds")
    parser.add_argument("--shape", default="8x56x56", help="N x H x W")
    parser.add_argument("--op", default="dcnv4")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--group-channels", type=int, default=16)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=15, help="paired rounds of the comparison")
    args = parser.parse_args()
    n, h, w = (int(v) for v in args.shape.split("x"))
    device = torch.device(args.device)
    cfg = DCNConfig(op=args.op, group=args.group, group_channels=args.group_channels, kernel_size=args.kernel_size,
                    padding=args.kernel_size // 2, dtype=args.dtype, target=target_of(device))
    problem = random_problem(cfg, n, h, w)
    tensors = [t.requires_grad_() for t in problem.op_inputs(TORCH_DTYPE[cfg.dtype], device)]
    grad_out = problem.grad_out.to(dtype=TORCH_DTYPE[cfg.dtype], device=device)
    kernel_for(cfg)  # the default kernel built before the clock starts (not by an op call, which reads DCNGEN_AUTOTUNE)

    with tempfile.TemporaryDirectory() as folder:
        os.environ.update(DCNGEN_RECORDS=folder, DCNGEN_AUTOTUNE=str(args.budget))
        start = time.perf_counter()
        getattr(ops, cfg.op)(*tensors, **cfg.op_kwargs).backward(grad_out)
        first_call = time.perf_counter() - start
        del os.environ["DCNGEN_AUTOTUNE"]
        record = records.lookup(cfg, (n, h, w))
    if record is None:
        raise SystemExit(f"no record after the first call ({first_call:.1f} s): the tune failed (see its warning)")
    tuned, default = record["best"]["params"], record["default"]["params"]

    def step(params):
        return lambda: ops.run_config(cfg.replace(params=tuple(params.items())), *tensors).backward(grad_out)

    c = compare(step(tuned), step(default), rounds=args.rounds, device=device.type)
    print(f"{cfg.key} at {args.shape}, budget {args.budget:g} s: first call {first_call:.1f} s "
          f"({len(record['candidates'])} candidates timed, {record.get('failed', 0)} failed)")
    print(f"  tuned   {records.best_changes(record)}: {c.candidate_ms:.3f} ms")
    print(f"  default: {c.baseline_ms:.3f} ms")
    if record.get("confirm"):
        who = "the tune kept the default; its best other candidate" if tuned == default else "the tune's choice"
        print(f"  {who}, re-timed against the default: {records.retimed(record)}")
    else:
        print("  the tune kept the default: no other candidate beat it")
    print(f"  default / tuned, median of {args.rounds} paired ratios: {c.speedup:.3f}")


if __name__ == "__main__":
    main()

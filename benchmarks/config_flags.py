"""The config flags of the scripts that analyse one CUDA template build without a GPU
(sass_loops.py, l1_traffic.py): DCNv4 G4 C32 3x3 fp16 at offset_scale 2 for sm_90 by default."""

from __future__ import annotations

import argparse

from dcngen.config import DCNConfig


def add_config_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--op", default="dcnv4")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--group-channels", type=int, default=32)
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--offset-scale", type=float, default=2.0)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--param", action="append", default=[], help="generator parameter NAME=INT (repeatable)")


def config_from_flags(args: argparse.Namespace) -> DCNConfig:
    """The CUDA config the flags name ("same" padding)."""
    params = {name: int(value) for name, value in (p.split("=", 1) for p in args.param)}
    return DCNConfig(op=args.op, group=args.group, group_channels=args.group_channels, kernel_size=args.kernel_size, padding=args.kernel_size // 2,
                     offset_scale=args.offset_scale, dtype=args.dtype, target=f"cuda:{args.arch}", params=params)

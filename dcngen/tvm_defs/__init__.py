"""TVM definitions of the DCNv3/DCNv4 forward and backward (docs/SPEC.md sections 1-3).

Every definition goes through ONE sampling helper, `sampling.locate`, which turns an output pixel, a
point index and a learned (dx, dy) into the window test, the four corners (clamped indices
that are always safe to read) and their bilinear weights, zero for corners outside the image.
The CPU shells (`cpu`) call it vectorised over a pixel's points and then run channel loops on
the plan; the CUDA shells (`cuda`) call it per thread. `ir` holds the IR-building helpers they share.

Tensors seen by the TVM functions (symbolic N, H, W, Ho, Wo; one artifact serves all shapes):
- x:   (N, H, W, G*C)
- DCNv4: om (N, Ho, Wo, Cpad) packed offsets/weights, Cpad >= G*P*3 a runtime size
- DCNv3: off (N, Ho, Wo, G*P*2) as [g][k][x, y]; msk (N, Ho, Wo, G*P) as [g][k]
- out / grad_out / grad_x: (N, Ho, Wo, G*C) / (N, Ho, Wo, G*C) / (N, H, W, G*C)

Each function is a `te.extern` whose body is TensorIR written with TVM's IR builder: the
input gradient is a data-dependent scatter-add that TE cannot express, and a pure TE forward
copies the sampling math into every corner term (TE has no let-binding that survives block
region analysis), which made compiles take tens of seconds. The shells (`cpu.forward`,
`cpu.backward`, `cuda.forward`, `cuda.backward`) fix the loop structure per target and read its
tunable knobs (chunking, vectorisation, unrolling, plan width, threads per block, channels per
thread) from the parameters chosen by `schedules/<llvm|cuda>.py`. See `cpu.backward` and
`cuda.backward` for why each scatter is race-free.
"""

from __future__ import annotations

import tvm
from tvm import te, tirx

from ..config import DCNConfig
from . import cpu, cuda
from .ir import Shapes, acc_dtype, shapes
from .sampling import offset_placeholders


def _extern(cfg: DCNConfig, name: str, inputs, outputs, body):
    """te.extern over `outputs` = [(name, shape, dtype)] -> PrimFunc with global symbol `name`."""
    bufs = [tirx.decl_buffer(shape, dt, nm) for nm, shape, dt in outputs]
    # Inputs without symbolic element offsets: the CUDA kernels then take only data pointers and
    # the shape variables, which our own launcher supplies.
    in_bufs = [tirx.decl_buffer(t.shape, t.dtype, t.op.name, elem_offset=0) for t in inputs]
    res = te.extern([b.shape for b in bufs], inputs, body, dtype=[b.dtype for b in bufs], in_buffers=in_bufs, out_buffers=bufs, name=f"dcn_{name}")
    res = list(res) if isinstance(res, (list, tuple)) else [res]
    return te.create_prim_func([*inputs, *res]).with_attr("global_symbol", name)


def _inputs(cfg: DCNConfig, s: Shapes):
    x = te.placeholder((s.N, s.H, s.W, cfg.channels), cfg.dtype, name="x")
    return x, offset_placeholders(cfg, s)


def forward(cfg: DCNConfig, params: dict) -> tvm.tirx.PrimFunc:
    """Forward PrimFunc `forward(x, om | off, msk, out)`; out (N, Ho, Wo, G*C) fully written."""
    s = shapes()
    x, offs = _inputs(cfg, s)
    out = [("out", (s.N, s.Ho, s.Wo, cfg.channels), cfg.dtype)]
    shell = cuda.forward if cfg.is_cuda else cpu.forward
    return _extern(cfg, "forward", [x, *offs], out, lambda ins, outs: shell(cfg, params, s, ins, outs))


def backward(cfg: DCNConfig, params: dict) -> tvm.tirx.PrimFunc:
    """Backward PrimFunc `backward(x, om | off, msk, gout, gx, gom | goff, gmsk[, gxacc])`.

    gx (N, H, W, G*C) is fully written; offset/weight gradients are written for every point of
    every group (zero for out-of-window points); DCNv4 padding channels are left untouched.
    CUDA fp16/bf16 adds gxacc, an fp32 (N, H, W, G*C) workspace the launcher provides.
    """
    s = shapes()
    G, C = cfg.group, cfg.group_channels
    x, offs = _inputs(cfg, s)
    gout = te.placeholder((s.N, s.Ho, s.Wo, G * C), cfg.dtype, name="gout")
    outs = [("gx", (s.N, s.H, s.W, G * C), cfg.dtype)]
    outs += [("g" + t.name, t.shape, cfg.dtype) for t in offs]
    if cfg.is_cuda and acc_dtype(cfg.dtype) != cfg.dtype:
        outs.append(("gxacc", (s.N, s.H, s.W, G * C), "float32"))
    shell = cuda.backward if cfg.is_cuda else cpu.backward
    return _extern(cfg, "backward", [x, *offs, gout], outs, lambda ins, outs_: shell(cfg, params, s, ins, outs_))

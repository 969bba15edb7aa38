"""TVM definitions of the DCNv3/DCNv4 forward and backward (SPEC.md sections 1-3).

Every definition goes through ONE sampling helper, `locate`, which turns an output pixel, a
point index and a learned (dx, dy) into the window test, the four corners (clamped indices
that are always safe to read) and their bilinear weights, zero for corners outside the image.

Tensors seen by the TVM functions (symbolic N, H, W, Ho, Wo; one artifact serves all shapes):
- x:   (N, H, W, G*C)
- DCNv4: om (N, Ho, Wo, Cpad) packed offsets/weights, Cpad >= G*P*3 a runtime size
- DCNv3: off (N, Ho, Wo, G*P*2) as [g][k][x, y]; msk (N, Ho, Wo, G*P) as [g][k]
- out / grad_out / grad_x: (N, Ho, Wo, G*C) / (N, Ho, Wo, G*C) / (N, H, W, G*C)

Each function is a `te.extern` whose body is TensorIR written with TVM's IR builder: the
input gradient is a data-dependent scatter-add that TE cannot express, and a pure TE forward
copies the sampling math into every corner term (TE has no let-binding that survives block
region analysis), which made compiles take tens of seconds. The shells below (`_forward_cpu`,
`_backward_cpu`, `_forward_cuda`, `_backward_cuda`) fix the loop structure per target and read
its tunable knobs (chunking, vectorisation, unrolling, threads per block, channels per thread)
from the parameters chosen by `schedules/<llvm|cuda>.py`. See `_backward_cpu` and
`_backward_cuda` for why each scatter is race-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import tvm
from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from .config import DCNConfig
from .layout import offset_layout


def acc_dtype(dtype: str) -> str:
    """Accumulation type: fp64 for fp64, fp32 for everything else."""
    return "float64" if dtype == "float64" else "float32"


@dataclass(frozen=True)
class Shapes:
    """The symbolic sizes shared by every function of one artifact."""

    N: tvm.tirx.Var
    H: tvm.tirx.Var
    W: tvm.tirx.Var
    Ho: tvm.tirx.Var
    Wo: tvm.tirx.Var
    Cpad: tvm.tirx.Var


def shapes() -> Shapes:
    return Shapes(*(te.var(name) for name in ("N", "H", "W", "Ho", "Wo", "Cpad")))


class Corner(NamedTuple):
    y: tvm.tirx.PrimExpr  # clamped into [0, H-1]: always a legal address
    x: tvm.tirx.PrimExpr  # clamped into [0, W-1]
    valid: tvm.tirx.PrimExpr  # inside the window and inside the image
    weight: tvm.tirx.PrimExpr  # bilinear weight, 0 when not valid


class Sample(NamedTuple):
    inside: tvm.tirx.PrimExpr  # -1 < py < H and -1 < px < W (False for NaN)
    ly: tvm.tirx.PrimExpr
    lx: tvm.tirx.PrimExpr
    corners: tuple[Corner, Corner, Corner, Corner]  # 00, 01, 10, 11 (row y, column x)


def _same(v):
    return v


def locate(cfg: DCNConfig, acc: str, H, W, ho, wo, k, dx, dy, bind=_same) -> Sample:
    """Point k's bilinear sample at output pixel (ho, wo) with learned offset (dx, dy) (acc dtype).

    Kernel order: width index i outer, height index j inner; with remove_center the centre is
    skipped. Out-of-window points get four zero weights, so callers need no branch.
    `bind` names intermediate values (T.bind in imperative bodies) so expressions stay small.
    """
    kh, kw = cfg.kernel_size
    (sh, sw), (ph, pw), (dh, dw) = cfg.stride, cfg.padding, cfg.dilation
    half_h, half_w = (dh * (kh - 1)) >> 1, (dw * (kw - 1)) >> 1
    if cfg.remove_center:
        center = (kw // 2) * kh + kh // 2
        k = tirx.Select(k >= center, k + 1, k)
    i, j = tirx.floordiv(k, kh), tirx.floormod(k, kh)
    f = lambda v: tirx.Cast(acc, v)  # noqa: E731
    scale = tirx.const(cfg.offset_scale, acc)
    px = bind(f(wo * sw - pw + half_w) + (f(i * dw - half_w) + dx) * scale)
    py = bind(f(ho * sh - ph + half_h) + (f(j * dh - half_h) + dy) * scale)
    one, zero = tirx.const(1, acc), tirx.const(0, acc)
    inside = bind(tirx.all(py > tirx.const(-1, acc), py < f(H), px > tirx.const(-1, acc), px < f(W)))
    # floor only where inside: px, py are then bounded, so the integer conversion is defined
    # (NaN or huge offsets never reach it).
    fy = tirx.Select(inside, tirx.floor(py), zero)
    fx = tirx.Select(inside, tirx.floor(px), zero)
    y0, x0 = bind(tirx.Cast("int32", fy)), bind(tirx.Cast("int32", fx))
    ly, lx = bind(py - fy), bind(px - fx)
    hy, hx = bind(one - ly), bind(one - lx)

    def corner(y, x, w):
        valid = bind(tirx.all(inside, y >= 0, y <= H - 1, x >= 0, x <= W - 1))
        clamp = lambda v, hi: bind(tirx.max(tirx.min(v, hi - 1), 0))  # noqa: E731
        return Corner(clamp(y, H), clamp(x, W), valid, bind(tirx.Select(valid, w, zero)))

    corners = (corner(y0, x0, hy * hx), corner(y0, x0 + 1, hy * lx), corner(y0 + 1, x0, ly * hx), corner(y0 + 1, x0 + 1, ly * lx))
    return Sample(inside, ly, lx, corners)


# ---- where offsets and weights live ----------------------------------------------------------
def _point_reader(cfg: DCNConfig, acc: str, offset, mask):
    """(n, ho, wo, g, k) -> (dx, dy, m) in acc dtype, for the op's offset/mask buffers or tensors."""
    lay = offset_layout(cfg)

    def read(n, ho, wo, g, k):
        oi = g * lay.offset_group_stride + lay.offset_base + 2 * k
        mi = g * lay.mask_group_stride + lay.mask_base + k
        return (tirx.Cast(acc, offset[n, ho, wo, oi]), tirx.Cast(acc, offset[n, ho, wo, oi + 1]), tirx.Cast(acc, mask[n, ho, wo, mi]))

    return read


def offset_placeholders(cfg: DCNConfig, s: Shapes) -> list[te.Tensor]:
    """DCNv4: [om (N, Ho, Wo, Cpad)]; DCNv3: [off (N, Ho, Wo, G*P*2), msk (N, Ho, Wo, G*P)]."""
    g, p = cfg.group, cfg.num_points
    if cfg.op == "dcnv4":
        return [te.placeholder((s.N, s.Ho, s.Wo, s.Cpad), cfg.dtype, name="om")]
    return [te.placeholder((s.N, s.Ho, s.Wo, g * p * 2), cfg.dtype, name="off"), te.placeholder((s.N, s.Ho, s.Wo, g * p), cfg.dtype, name="msk")]


def _offset_and_mask(cfg: DCNConfig, tensors):
    return (tensors[0], tensors[0]) if cfg.op == "dcnv4" else (tensors[0], tensors[1])


def _local_scope(cfg: DCNConfig) -> str:
    """Scope of small per-thread buffers: "local" (registers) on CUDA; on llvm "global", which
    TVM turns into a stack alloca for constant sizes ("local" becomes a heap workspace call)."""
    return "local" if cfg.is_cuda else "global"


def _alloc(cfg: DCNConfig, shape, dtype):
    return T.buffer_proxy(T.alloc_buffer(shape, dtype, scope=_local_scope(cfg)))


def _scalar_binder(cfg: DCNConfig):
    """The imperative `bind`: keep a value in a one-element per-thread buffer, return its load.

    Not T.bind: TVM's simplifier substitutes bound variables back into their uses, and the
    window tests then blow compile times up to tens of seconds; a buffer load is opaque to it
    and free after LLVM / NVCC register promotion. Booleans are stored as int32.
    """

    def bind(value):
        if str(value.ty) == "bool":
            buf = _alloc(cfg, (1,), "int32")
            buf[0] = tirx.Cast("int32", value)
            return buf[0] != 0
        buf = _alloc(cfg, (1,), str(value.ty))
        buf[0] = value
        return buf[0]

    return bind


def _locate_point(cfg, acc, s: Shapes, read, n, ho, wo, g, k):
    """Read point k's offset and weight and sample it; every intermediate kept in a local scalar."""
    bind = _scalar_binder(cfg)
    dx, dy, m = (bind(v) for v in read(n, ho, wo, g, k))
    return locate(cfg, acc, s.H, s.W, ho, wo, k, dx, dy, bind=bind), m


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
    """Forward PrimFunc `forward(x, om | off, msk, out)`; out (N, Ho, Wo, G, C) fully written."""
    s = shapes()
    x, offs = _inputs(cfg, s)
    out = [("out", (s.N, s.Ho, s.Wo, cfg.channels), cfg.dtype)]
    shell = _forward_cuda if cfg.is_cuda else _forward_cpu
    return _extern(cfg, "forward", [x, *offs], out, lambda ins, outs: shell(cfg, params, s, ins, outs))


def backward(cfg: DCNConfig, params: dict) -> tvm.tirx.PrimFunc:
    """Backward PrimFunc `backward(x, om | off, msk, gout, gx, gom | goff, gmsk[, gxacc])`.

    gx (N, H, W, G, C) is fully written; offset/weight gradients are written for every point of
    every group (zero for out-of-window points); DCNv4 padding channels are left untouched.
    CUDA fp16/bf16 adds gxacc, an fp32 (N, H, W, G, C) workspace the launcher provides.
    """
    s = shapes()
    G, C = cfg.group, cfg.group_channels
    x, offs = _inputs(cfg, s)
    gout = te.placeholder((s.N, s.Ho, s.Wo, G * C), cfg.dtype, name="gout")
    outs = [("gx", (s.N, s.H, s.W, G * C), cfg.dtype)]
    outs += [("g" + t.name, t.shape, cfg.dtype) for t in offs]
    if cfg.is_cuda and acc_dtype(cfg.dtype) != cfg.dtype:
        outs.append(("gxacc", (s.N, s.H, s.W, G * C), "float32"))
    shell = _backward_cuda if cfg.is_cuda else _backward_cpu
    return _extern(cfg, "backward", [x, *offs, gout], outs, lambda ins, outs_: shell(cfg, params, s, ins, outs_))


# Index arithmetic below uses truncdiv/truncmod: every operand is a non-negative index, and
# TVM's floordiv on symbolic extents of unknown sign emits sign-fixing branches per division.


def _proxies(bufs):
    return [T.buffer_proxy(b) for b in bufs]


# ---- CPU shells ---------------------------------------------------------------------------------
def _forward_cpu(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
    """Parallel over chunks of `pixels_per_task` output pixels; per (pixel, group) a local
    accumulator of C channels; points outside, channels vectorised inside."""
    G, C, P = cfg.group, cfg.group_channels, cfg.num_points
    acc = acc_dtype(cfg.dtype)
    ins, (out,) = _proxies(ins), _proxies(outs)
    x, offs = ins[0], ins[1:]
    read = _point_reader(cfg, acc, *_offset_and_mask(cfg, offs))
    chan = T.vectorized if params["vector"] else T.serial
    points = T.unroll if params["unroll_points"] else T.serial
    chunk = params["pixels_per_task"]
    total = s.N * s.Ho * s.Wo
    with IRBuilder() as ib:
        with T.parallel(0, tirx.truncdiv(total + chunk - 1, chunk)) as task:
            with T.serial(0, chunk) as inner:
                pix = task * chunk + inner
                with T.If(pix < total):
                    with T.Then():
                        n = tirx.truncdiv(pix, s.Ho * s.Wo)
                        ho = tirx.truncmod(tirx.truncdiv(pix, s.Wo), s.Ho)
                        wo = tirx.truncmod(pix, s.Wo)
                        with T.serial(0, G) as g:
                            a = _alloc(cfg, (C,), acc)
                            with chan(0, C) as c:
                                a[c] = tirx.const(0, acc)
                            with points(0, P) as k:
                                smp, m = _locate_point(cfg, acc, s, read, n, ho, wo, g, k)
                                w = [_scalar_binder(cfg)(m * q.weight) for q in smp.corners]
                                with chan(0, C) as c:
                                    a[c] = a[c] + sum(wq * tirx.Cast(acc, x[n, q.y, q.x, g * C + c]) for wq, q in zip(w, smp.corners))
                            with chan(0, C) as c:
                                out[n, ho, wo, g * C + c] = tirx.Cast(cfg.dtype, a[c])
    return ib.get()


def _point_grads(cfg, acc, smp: Sample, value, grad, C, red, vector: bool = False):
    """red[0..2] <- sum_c grad(c) * (B_c, dB/dlx, dB/dly) for one point (value(q, c): corner q's
    value at channel c, zero when not valid). vector: per-channel terms in a vectorised loop,
    then a short serial sum (TIR cannot vectorise a loop-carried reduction)."""
    q00, q01, q10, q11 = smp.corners
    bind = _scalar_binder(cfg)
    one, zero = tirx.const(1, acc), tirx.const(0, acc)
    hy, hx = bind(one - smp.ly), bind(one - smp.lx)

    def terms(v, gc):
        return (gc * (q00.weight * v[0] + q01.weight * v[1] + q10.weight * v[2] + q11.weight * v[3]),
                gc * (hy * (v[1] - v[0]) + smp.ly * (v[3] - v[2])),
                gc * (hx * (v[2] - v[0]) + smp.lx * (v[3] - v[1])))

    for i in range(3):
        red[i] = zero
    if vector:
        t = _alloc(cfg, (3, C), acc)
        with T.vectorized(0, C) as c:
            for i, term in enumerate(terms([value(q, c) for q in smp.corners], grad(c))):
                t[i, c] = term
        with T.serial(0, C) as c:
            for i in range(3):
                red[i] = red[i] + t[i, c]
    else:
        with T.serial(0, C) as c:
            for i, term in enumerate(terms([bind(value(q, c)) for q in smp.corners], bind(grad(c)))):
                red[i] = red[i] + term


def _store_point_grads(cfg, acc, goff, gmsk, n, ho, wo, g, k, m, red):
    """dL/ddx = s*m*red[1], dL/ddy = s*m*red[2], dL/dm = red[0] into the op's gradient buffers."""
    lay = offset_layout(cfg)
    sm = tirx.const(cfg.offset_scale, acc) * m
    oi = g * lay.offset_group_stride + lay.offset_base + 2 * k
    mi = g * lay.mask_group_stride + lay.mask_base + k
    goff[n, ho, wo, oi] = tirx.Cast(cfg.dtype, sm * red[1])
    goff[n, ho, wo, oi + 1] = tirx.Cast(cfg.dtype, sm * red[2])
    gmsk[n, ho, wo, mi] = tirx.Cast(cfg.dtype, red[0])


def _backward_cpu(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
    """One parallel task per (image, group), looping over all of that image's output pixels.

    Race-freedom: task (n, g) is the only writer of grad_x[n, :, :, g, :] and of group g's
    offset/weight gradients of image n, so the scatter-add into grad_x needs no atomics and the
    result does not depend on the number of threads. fp32/fp64 accumulate in grad_x itself;
    bf16 accumulates in a private fp32 plane (H, W, C) allocated inside the task.
    """
    G, C, P = cfg.group, cfg.group_channels, cfg.num_points
    acc = acc_dtype(cfg.dtype)
    direct = acc == cfg.dtype
    ins, outs = _proxies(ins), _proxies(outs)
    x, offs, gout = ins[0], ins[1:-1], ins[-1]
    gx, gofs = outs[0], outs[1:]
    read = _point_reader(cfg, acc, *_offset_and_mask(cfg, offs))
    goff, gmsk = _offset_and_mask(cfg, gofs)
    zero = tirx.const(0, acc)
    chan = T.vectorized if params["vector"] else T.serial
    with IRBuilder() as ib:
        with T.parallel(0, s.N * G) as task:
            n = tirx.truncdiv(task, G)
            g = tirx.truncmod(task, G)
            if direct:
                plane, at = gx, (lambda y, xx, c: (n, y, xx, g * C + c))
            else:
                plane = T.buffer_proxy(T.alloc_buffer((s.H, s.W, C), acc, scope="global"))
                at = lambda y, xx, c: (y, xx, c)  # noqa: E731
            red = _alloc(cfg, (3,), acc)
            go = _alloc(cfg, (C,), acc)
            with T.serial(0, s.H) as y:
                with T.serial(0, s.W) as xx:
                    with chan(0, C) as c:
                        plane[at(y, xx, c)] = zero
            with T.serial(0, s.Ho) as ho:
                with T.serial(0, s.Wo) as wo:
                    with chan(0, C) as c:
                        go[c] = tirx.Cast(acc, gout[n, ho, wo, g * C + c])
                    with T.serial(0, P) as k:
                        smp, m = _locate_point(cfg, acc, s, read, n, ho, wo, g, k)
                        _point_grads(cfg, acc, smp, lambda q, c: tirx.Select(q.valid, tirx.Cast(acc, x[n, q.y, q.x, g * C + c]), zero), lambda c: go[c], C, red, vector=bool(params["vector"]))
                        # Invalid corners have weight 0 and a clamped (legal) index: adding 0 is harmless.
                        for q in smp.corners:
                            mw = _scalar_binder(cfg)(m * q.weight)
                            with chan(0, C) as c:
                                plane[at(q.y, q.x, c)] = plane[at(q.y, q.x, c)] + go[c] * mw
                        _store_point_grads(cfg, acc, goff, gmsk, n, ho, wo, g, k, m, red)
            if not direct:
                with T.serial(0, s.H) as y:
                    with T.serial(0, s.W) as xx:
                        with chan(0, C) as c:
                            gx[n, y, xx, g * C + c] = tirx.Cast(cfg.dtype, plane[y, xx, c])
    return ib.get()


# ---- CUDA shells --------------------------------------------------------------------------------
def _threads(total, threads: int):
    """Bind a 1-D grid of `threads`-wide blocks over `total` work items; yields (frames, tid)."""
    bx, tx = te.thread_axis("blockIdx.x"), te.thread_axis("threadIdx.x")
    frames = [T.attr(bx, "thread_extent", tirx.truncdiv(total + threads - 1, threads)), T.attr(tx, "thread_extent", threads)]
    return frames, bx * threads + tx


def _forward_cuda(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
    """One thread per (pixel, group, `vec` contiguous channels), as the official DCNv4 kernel:
    each thread reads its own P offsets/weights, accumulates `vec` channels in fp32 registers
    and loads/stores them as vectors."""
    G, C, P = cfg.group, cfg.group_channels, cfg.num_points
    vec = params["vec"]
    acc = acc_dtype(cfg.dtype)
    ins, (out,) = _proxies(ins), _proxies(outs)
    x, offs = ins[0], ins[1:]
    read = _point_reader(cfg, acc, *_offset_and_mask(cfg, offs))
    chunks = C // vec
    total = s.N * s.Ho * s.Wo * G * chunks
    with IRBuilder() as ib:
        frames, tid = _threads(total, params["threads"])
        with T.frame_scope(frames):
            with T.If(tid < total):
                with T.Then():
                    cc = tirx.truncmod(tid, chunks)
                    g = tirx.truncmod(tirx.truncdiv(tid, chunks), G)
                    pix = tirx.truncdiv(tid, chunks * G)
                    n = tirx.truncdiv(pix, s.Ho * s.Wo)
                    ho = tirx.truncmod(tirx.truncdiv(pix, s.Wo), s.Ho)
                    wo = tirx.truncmod(pix, s.Wo)
                    a = _alloc(cfg, (vec,), acc)
                    with T.unroll(0, vec) as v:
                        a[v] = tirx.const(0, acc)
                    with T.serial(0, P) as k:
                        smp, m = _locate_point(cfg, acc, s, read, n, ho, wo, g, k)
                        w = [_scalar_binder(cfg)(m * q.weight) for q in smp.corners]
                        corner_vals = []
                        for q in smp.corners:
                            cv = _alloc(cfg, (vec,), cfg.dtype)
                            with T.vectorized(0, vec) as v:
                                cv[v] = x[n, q.y, q.x, g * C + cc * vec + v]
                            corner_vals.append(cv)
                        with T.unroll(0, vec) as v:
                            a[v] = a[v] + sum(wq * tirx.Cast(acc, cv[v]) for wq, cv in zip(w, corner_vals))
                    res = _alloc(cfg, (vec,), cfg.dtype)
                    with T.unroll(0, vec) as v:
                        res[v] = tirx.Cast(cfg.dtype, a[v])
                    with T.vectorized(0, vec) as v:
                        out[n, ho, wo, g * C + cc * vec + v] = res[v]
    return ib.get()


def _atomic_add(buf, index, value):
    T.evaluate(T.call_intrin(str(value.ty), "tirx.cuda.atomic_add", T.address_of(buf[index]), value))


def _backward_cuda(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
    """Three kernels on one stream: zero the input-gradient accumulator; one thread per
    (pixel, group) computing its P offset/weight gradients privately (all C channels in the
    thread, so no cross-thread reduction) and scatter-adding m * w_q * g_c into the accumulator;
    for fp16/bf16 convert the fp32 accumulator into grad_x.

    Race-freedom: many (pixel, point) pairs hit the same input pixel, so the scatter uses
    atomicAdd (fp32 for fp32/fp16/bf16 storage, fp64 for fp64); every other store has exactly
    one writing thread. Kernels on one stream run in order, so the zeroing completes first.
    """
    G, C, P = cfg.group, cfg.group_channels, cfg.num_points
    acc = acc_dtype(cfg.dtype)
    ins, outs = _proxies(ins), _proxies(outs)
    x, offs, gout = ins[0], ins[1:-1], ins[-1]
    gx = outs[0]
    gofs = outs[1 : 1 + len(offs)]
    gacc_buf = outs[-1] if len(outs) > 1 + len(offs) else gx
    read = _point_reader(cfg, acc, *_offset_and_mask(cfg, offs))
    goff, gmsk = _offset_and_mask(cfg, gofs)
    zero = tirx.const(0, acc)
    threads = params["threads"]
    n_x = s.N * s.H * s.W * G * C
    with IRBuilder() as ib:
        with T.seq_scope():
            frames, tid = _threads(n_x, threads)
            with T.frame_scope(frames):
                with T.If(tid < n_x):
                    with T.Then():
                        gacc_buf[_unflatten(tid, (s.N, s.H, s.W, G * C))] = zero
            total = s.N * s.Ho * s.Wo * G
            frames, tid = _threads(total, threads)
            with T.frame_scope(frames):
                with T.If(tid < total):
                    with T.Then():
                        g = tirx.truncmod(tid, G)
                        pix = tirx.truncdiv(tid, G)
                        n = tirx.truncdiv(pix, s.Ho * s.Wo)
                        ho = tirx.truncmod(tirx.truncdiv(pix, s.Wo), s.Ho)
                        wo = tirx.truncmod(pix, s.Wo)
                        red = _alloc(cfg, (3,), acc)
                        with T.serial(0, P) as k:
                            smp, m = _locate_point(cfg, acc, s, read, n, ho, wo, g, k)
                            _point_grads(cfg, acc, smp, lambda q, c: tirx.Select(q.valid, tirx.Cast(acc, x[n, q.y, q.x, g * C + c]), zero),
                                         lambda c: tirx.Cast(acc, gout[n, ho, wo, g * C + c]), C, red)
                            for q in smp.corners:
                                mw = _scalar_binder(cfg)(m * q.weight)
                                with T.If(q.valid):
                                    with T.Then():
                                        with T.serial(0, C) as c:
                                            _atomic_add(gacc_buf, (n, q.y, q.x, g * C + c), tirx.Cast(acc, gout[n, ho, wo, g * C + c]) * mw)
                            _store_point_grads(cfg, acc, goff, gmsk, n, ho, wo, g, k, m, red)
            if gacc_buf is not gx:
                frames, tid = _threads(n_x, threads)
                with T.frame_scope(frames):
                    with T.If(tid < n_x):
                        with T.Then():
                            idx = _unflatten(tid, (s.N, s.H, s.W, G * C))
                            gx[idx] = tirx.Cast(cfg.dtype, gacc_buf[idx])
    return ib.get()


def _unflatten(flat, shape):
    """Row-major flat index -> index tuple of `shape`."""
    idx = []
    for extent in reversed(shape[1:]):
        idx.append(tirx.truncmod(flat, extent))
        flat = tirx.truncdiv(flat, extent)
    idx.append(flat)
    return tuple(reversed(idx))

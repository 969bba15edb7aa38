"""CUDA shells of the TVM definitions: a thread per work item (schedules/cuda.py sets threads per
block and channels per thread); TVM emits their CUDA source, which dcngen builds with nvcc."""

from __future__ import annotations

from tvm import te, tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..config import DCNConfig
from .ir import Shapes, acc_dtype, alloc, proxies, scalar_binder
from .sampling import (
    Sample,
    bilinear_terms,
    locate_point,
    offset_and_mask,
    point_reader,
    store_point_grads,
)


def _threads(total, threads: int):
    """Bind a 1-D grid of `threads`-wide blocks over `total` work items; yields (frames, tid)."""
    bx, tx = te.thread_axis("blockIdx.x"), te.thread_axis("threadIdx.x")
    frames = [T.attr(bx, "thread_extent", tirx.truncdiv(total + threads - 1, threads)), T.attr(tx, "thread_extent", threads)]
    return frames, bx * threads + tx


def forward(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
    """One thread per (pixel, group, `vec` contiguous channels), as the official DCNv4 kernel:
    each thread reads its own P offsets/weights, accumulates `vec` channels in fp32 registers (fp64
    for fp64) and loads/stores them as vectors."""
    G, C, P = cfg.group, cfg.group_channels, cfg.num_points
    vec = params["vec"]
    acc = acc_dtype(cfg.dtype)
    ins, (out,) = proxies(ins), proxies(outs)
    x, offs = ins[0], ins[1:]
    read = point_reader(cfg, acc, *offset_and_mask(cfg, offs))
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
                    a = alloc(cfg, (vec,), acc)
                    with T.unroll(0, vec) as v:
                        a[v] = tirx.const(0, acc)
                    with T.serial(0, P) as k:
                        smp, m = locate_point(cfg, acc, s, read, n, ho, wo, g, k)
                        w = [scalar_binder(cfg)(m * q.weight) for q in smp.corners]
                        corner_vals = []
                        for q in smp.corners:
                            cv = alloc(cfg, (vec,), cfg.dtype)
                            with T.vectorized(0, vec) as v:
                                cv[v] = x[n, q.y, q.x, g * C + cc * vec + v]
                            corner_vals.append(cv)
                        with T.unroll(0, vec) as v:
                            a[v] = a[v] + sum(wq * tirx.Cast(acc, cv[v]) for wq, cv in zip(w, corner_vals))
                    res = alloc(cfg, (vec,), cfg.dtype)
                    with T.unroll(0, vec) as v:
                        res[v] = tirx.Cast(cfg.dtype, a[v])
                    with T.vectorized(0, vec) as v:
                        out[n, ho, wo, g * C + cc * vec + v] = res[v]
    return ib.get()


def _atomic_add(buf, index, value):
    T.evaluate(T.call_intrin(str(value.ty), "tirx.cuda.atomic_add", T.address_of(buf[index]), value))


def backward(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
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
    ins, outs = proxies(ins), proxies(outs)
    x, offs, gout = ins[0], ins[1:-1], ins[-1]
    gx = outs[0]
    gofs = outs[1 : 1 + len(offs)]
    gacc_buf = outs[-1] if len(outs) > 1 + len(offs) else gx
    read = point_reader(cfg, acc, *offset_and_mask(cfg, offs))
    goff, gmsk = offset_and_mask(cfg, gofs)
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
                        red = alloc(cfg, (3,), acc)
                        with T.serial(0, P) as k:
                            smp, m = locate_point(cfg, acc, s, read, n, ho, wo, g, k)
                            _point_grads(cfg, acc, smp, lambda q, c: tirx.Select(q.valid, tirx.Cast(acc, x[n, q.y, q.x, g * C + c]), zero),
                                         lambda c: tirx.Cast(acc, gout[n, ho, wo, g * C + c]), C, red)
                            for q in smp.corners:
                                mw = scalar_binder(cfg)(m * q.weight)
                                with T.If(q.valid):
                                    with T.Then():
                                        with T.serial(0, C) as c:
                                            _atomic_add(gacc_buf, (n, q.y, q.x, g * C + c), tirx.Cast(acc, gout[n, ho, wo, g * C + c]) * mw)
                            store_point_grads(cfg, acc, goff, gmsk, n, ho, wo, g, k, m, red)
            if gacc_buf is not gx:
                frames, tid = _threads(n_x, threads)
                with T.frame_scope(frames):
                    with T.If(tid < n_x):
                        with T.Then():
                            idx = _unflatten(tid, (s.N, s.H, s.W, G * C))
                            gx[idx] = tirx.Cast(cfg.dtype, gacc_buf[idx])
    return ib.get()


def _point_grads(cfg, acc, smp: Sample, value, grad, C, red):
    """red[0..2] <- sum_c grad(c) * (B_c, dB/dlx, dB/dly) for one point (value(q, c): corner q's
    value at channel c, zero when not valid); one thread, serial over the channels (CUDA)."""
    bind = scalar_binder(cfg)
    one, zero = tirx.const(1, acc), tirx.const(0, acc)
    hy, hx = bind(one - smp.ly), bind(one - smp.lx)
    for i in range(3):
        red[i] = zero
    with T.serial(0, C) as c:
        v, gc = [bind(value(q, c)) for q in smp.corners], bind(grad(c))
        terms = bilinear_terms(gc, v, [q.weight for q in smp.corners], smp.ly, smp.lx, hy, hx)
        for i in range(3):
            red[i] = red[i] + terms[i]


def _unflatten(flat, shape):
    """Row-major flat index -> index tuple of `shape`."""
    idx = []
    for extent in reversed(shape[1:]):
        idx.append(tirx.truncmod(flat, extent))
        flat = tirx.truncdiv(flat, extent)
    idx.append(flat)
    return tuple(reversed(idx))

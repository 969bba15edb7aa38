"""CPU (llvm) shells of the TVM definitions: each pixel's points planned in one vectorised pass
(`_planner`), then vectorised channel loops over the plan. Parameters from schedules/llvm.py."""

from __future__ import annotations

from typing import NamedTuple

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from ..config import DCNConfig
from ..layout import offset_layout
from .ir import Shapes, acc_dtype, alloc, proxies
from .sampling import (
    bilinear_terms,
    locate,
    offset_and_mask,
    point_index,
    store_point_grads,
)

# Index arithmetic below uses truncdiv/truncmod: every operand is a non-negative index, and
# TVM's floordiv on symbolic extents of unknown sign emits sign-fixing branches per division.



class Plan(NamedTuple):
    """The sampling plan of Q points of one output pixel (CPU), arrays indexed [corner, q] or [q].

    Filled in one vectorised pass before the channel loops, so those loops only load and
    multiply-add: no window tests, floors or index clamps per channel or per point. Corner
    indices are affine in corner 00's (the unclamped floor). In x they may lie outside the
    tensor where a corner is not read: they are only used where `ok` holds, or where `full`
    says all do. The backward's ringed slices give every corner a legal slot instead.
    """

    at: object  # (Q,) int32: flat index of corner 00's first channel (+ _corner_steps): into x of the
    #             point's group; for `grads` into the zero-ringed slices of _ringed
    ok: object  # (4, Q) int32: nonzero where the corner is read (in the window and in the image)
    full: object  # (1, lanes) int32: AND over the vector steps of "all four corners read"; see _all_read (not `grads`)
    w: object  # (4, Q) acc: bilinear weight, times the point's weight m unless planned for `grads`; 0 where not ok
    m: object  # (Q,) acc: the point's weight, 0 outside the window (`grads` only)
    ly: object  # (Q,) acc: fractional parts, 0 outside the window (`grads` only)
    lx: object  # (Q,) acc


MAX_UNROLLED_PLAN_STEPS = 8  # beyond this (many groups) the plan's vector steps stay a loop


def _padded(q: int, lanes: int) -> int:
    return -(-q // lanes) * lanes


def _lane_binder(cfg: DCNConfig, lanes: int, sample):
    """`bind` for a vectorised pass over `lanes` lanes: each bound value gets a row of a
    (rows, lanes) scratch array (stored at the lane, loaded back), so expressions stay small
    without T.bind (see `scalar_binder`); small enough for the stack, where LLVM keeps it in
    registers. `sample(bind)` is first called with a counting bind to size the rows (it must
    then only build expressions); returns bind_at(lane) -> the storing bind. Booleans are kept
    as int32."""
    rows: dict[str, int] = {}

    def kind(value):
        return "int32" if str(value.ty) == "bool" else str(value.ty)

    def count(value):
        rows[kind(value)] = rows.get(kind(value), 0) + 1
        return value

    sample(count)
    scratch = {dt: alloc(cfg, (n, lanes), dt) for dt, n in rows.items()}

    def bind_at(lane):
        used = dict.fromkeys(rows, 0)

        def bind(value):
            dt = kind(value)
            row, used[dt] = used[dt], used[dt] + 1
            if dt == str(value.ty):
                scratch[dt][row, lane] = value
                return scratch[dt][row, lane]
            scratch[dt][row, lane] = tirx.Cast(dt, value)
            return scratch[dt][row, lane] != 0

        return bind

    return bind_at


def _staged_rows(cfg: DCNConfig, acc: str, offs, g0, groups: int, lanes: int):
    """Local copies of one output pixel's offsets and weights of groups g0 .. g0+groups-1.

    Returns (stage(n, ho, wo): copy them with contiguous vector loads, read(g, k) -> (dx, dy, m)
    for group g0 + g). The plan's per-lane reads then hit a small local row at constant
    offsets instead of gathering from the tensor.
    """
    lay = offset_layout(cfg)
    offset, mask = offset_and_mask(cfg, offs)
    spans = [(offset, lay.offset_group_stride)]
    if cfg.op != "dcnv4":  # DCNv4 packs offsets and weights in one row per group
        spans.append((mask, lay.mask_group_stride))
    rows = [alloc(cfg, (groups * stride,), cfg.dtype) for _, stride in spans]
    off_row, mask_row = rows[0], rows[-1]

    def stage(n, ho, wo):
        for row, (src, stride) in zip(rows, spans):
            _copy(row, lambda j: src[n, ho, wo, g0 * stride + j], groups * stride, lanes)

    def read(g, k):
        oi, mi = point_index(cfg, g, k)
        return tirx.Cast(acc, off_row[oi]), tirx.Cast(acc, off_row[oi + 1]), tirx.Cast(acc, mask_row[mi])

    return stage, read


def _copy(dst, src, length: int, lanes: int):
    """dst[j] = src(j) for j < length: vector steps of `lanes`, then one shorter step."""
    full, rest = divmod(length, lanes)
    if full:
        with T.serial(0, full) as blk:
            with T.vectorized(0, lanes) as i:
                dst[blk * lanes + i] = src(blk * lanes + i)
    if rest:
        with T.vectorized(0, rest) as i:
            dst[full * lanes + i] = src(full * lanes + i)


def _mask(cond):
    """cond as int32 -1 / 0 (a vector compare mask as it is, without the shift a 0/1 needs)."""
    return tirx.Select(cond, tirx.const(-1, "int32"), tirx.const(0, "int32"))


def _planner(cfg, acc, s: Shapes, offs, g0, groups: int, lanes: int, grads: bool):
    """Allocate the plan of the points q = (g - g0)*P + k of groups g0 .. g0+groups-1 (and its
    scratch); returns (plan, fill) where fill(n, ho, wo) plans output pixel (n, ho, wo) and
    returns whether all its corners are read (see _all_read). `grads`: the backward's plan.

    fill runs `lanes` points per vector step over the padded range, steps unrolled (so each
    lane's group and point, and its offset/weight addresses, are constants); padding lanes
    repeat the last point (their reads stay legal) and are never used.
    """
    P, GC, C = cfg.num_points, cfg.channels, cfg.group_channels
    Q, q_pad = groups * P, _padded(groups * P, lanes)
    zero = tirx.const(0, acc)
    i32, f = (lambda shape: alloc(cfg, shape, "int32")), (lambda shape: alloc(cfg, shape, acc))
    plan = Plan(i32((q_pad,)), i32((4, q_pad)), i32((1, lanes)), f((4, q_pad)), f((q_pad,)), f((q_pad,)), f((q_pad,)))
    stage, read = _staged_rows(cfg, acc, offs, g0, groups, lanes)

    def sample(ho, wo, q, bind):
        qr = tirx.min(q, Q - 1)
        g, k = tirx.truncdiv(qr, P), tirx.truncmod(qr, P)
        dx, dy, m = (bind(v) for v in read(g, k))
        return g0 + g, m, locate(cfg, acc, s.H, s.W, ho, wo, k, dx, dy, bind=bind)

    any_ = tirx.const(0, "int32")
    bind_at = _lane_binder(cfg, lanes, lambda bind: sample(any_, any_, any_, bind))
    steps = T.unroll if q_pad // lanes <= MAX_UNROLLED_PLAN_STEPS else T.serial

    def fill(n, ho, wo):
        stage(n, ho, wo)
        if not grads:
            with T.vectorized(0, lanes) as lane:
                plan.full[0, lane] = tirx.const(-1, "int32")
        with steps(0, q_pad // lanes) as blk:
            with T.vectorized(0, lanes) as lane:
                q = blk * lanes + lane
                g, m, smp = sample(ho, wo, q, bind_at(lane))
                if grads:  # see _ringed
                    y, x = tirx.Select(smp.inside, smp.y0 + 1, s.H + 1), tirx.Select(smp.inside, smp.x0 + 1, 0)
                    plan.at[q] = (y * (s.W + 2) + x) * C
                    plan.m[q] = tirx.Select(smp.inside, m, zero)
                    plan.ly[q] = tirx.Select(smp.inside, smp.ly, zero)  # NaN / inf outside: 0 * NaN
                    plan.lx[q] = tirx.Select(smp.inside, smp.lx, zero)
                    for r, c in enumerate(smp.corners):
                        plan.w[r, q] = c.weight
                else:
                    plan.at[q] = ((n * s.H + smp.y0) * s.W + smp.x0) * GC + g * C
                    for r, c in enumerate(smp.corners):
                        plan.ok[r, q] = _mask(c.valid)
                        plan.w[r, q] = tirx.Select(c.valid, m * c.weight, zero)
                    all_four = _mask(tirx.all(*(c.valid for c in smp.corners)))
                    plan.full[0, lane] = tirx.bitwise_and(plan.full[0, lane], all_four)
        return None if grads else _all_read(plan, lanes)

    return plan, fill


def _corner_steps(W, row: int):
    """Offsets of corners 00, 01, 10, 11 from corner 00 in a (.., W, row) layout."""
    return (0, row, W * row, W * row + row)


def _corner_value(acc, xf, at, ok, c, reads: str):
    """Channel c of a corner at flat index `at` (-1 / 0 `ok`: whether the corner is read), by
    what the point's corners `reads`:
    "all"     every corner: a plain load;
    "masked"  an unread corner loads x's first channels instead (its weight is 0), branch-free:
              exact unless those hold inf / NaN (0 * inf), which leaves a non-finite sum;
    "exact"   an unread corner is not loaded (a branch per corner: the rare redo of such sums).
    `at` of an unread corner may be out of bounds."""
    if reads == "all":
        return tirx.Cast(acc, xf[at + c])
    if reads == "masked":
        return tirx.Cast(acc, xf[tirx.bitwise_and(at, ok) + c])
    return tirx.if_then_else(ok != 0, tirx.Cast(acc, xf[at + c]), tirx.const(0, acc))


def _all_read(plan: Plan, lanes: int):
    """Nonzero where every corner of every planned point is read (padding lanes repeat a point);
    folds plan.full in place."""
    _fold_lanes(plan.full, 1, lanes, T.vectorized, tirx.bitwise_and)
    return plan.full[0, 0] != 0


def _finite(a, t, C: int, chan):
    """Whether a[4, 0..C) are all finite, by their exponent bits (float tests such as x != x or
    0 * x != 0 are folded away by TVM's simplifier). t: (1, C) scratch of int32/int64 as a's
    width."""
    exponent = tirx.const(0x7FF << 52 if t.dtype == "int64" else 0xFF << 23, t.dtype)
    with chan(0, C) as c:
        t[0, c] = tirx.bitwise_and(tirx.reinterpret(t.dtype, a[4, c]), exponent)
    _fold_lanes(t, 1, C, chan, tirx.max)
    return t[0, 0] != exponent


def _flat(buf, size):
    """A 1-D view of `buf`'s data (flat index arithmetic computed once in the plan)."""
    return T.buffer_proxy(T.decl_buffer((size,), buf.dtype, data=buf.data))


def forward(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
    """Parallel over runs of `pixels_per_task` output pixels of one row (no divisions per pixel).
    Per pixel: plan all G*P points in one vectorised pass, then per group a local accumulator of
    C channels and per point one vectorised channel loop acc += sum over corners of w * x.

    One branch per pixel picks the channel loops: plain loads where every corner of every point
    is read (the interior), else "masked" loads (see _corner_value), redone "exact" for a group
    whose sum is not finite. Per pixel, not per point: border points come in runs there, not in
    the unpredictable patterns of small images."""
    G, C, P = cfg.group, cfg.group_channels, cfg.num_points
    acc = acc_dtype(cfg.dtype)
    x_buf = ins[0]
    ins, (out,) = proxies(ins), proxies(outs)
    chan = T.vectorized if params["vector"] else T.serial
    points = T.unroll if params["unroll_points"] else T.serial
    chunk, lanes = params["pixels_per_task"], params["plan_lanes"]
    col_blocks = tirx.truncdiv(s.Wo + chunk - 1, chunk)
    with IRBuilder() as ib:
        with T.parallel(0, s.N * s.Ho * col_blocks) as task:
            xf = _flat(x_buf, s.N * s.H * s.W * cfg.channels)
            plan, fill_plan = _planner(cfg, acc, s, ins[1:], 0, G, lanes, grads=False)
            a, t = alloc(cfg, (5, C), acc), alloc(cfg, (1, C), "int64" if acc == "float64" else "int32")
            steps = _corner_steps(s.W, cfg.channels)

            def accumulate(g, reads):
                """a[4] <- group g's sum; one accumulator per corner: four independent chains."""
                for r in range(4):
                    with chan(0, C) as c:
                        a[r, c] = tirx.const(0, acc)
                # the rare exact redo rolled: unrolled, LLVM keeps the masked pass's loads for it
                with (T.serial if reads == "exact" else points)(0, P) as k:
                    q = g * P + k
                    with chan(0, C) as c:
                        for r, step in enumerate(steps):
                            a[r, c] = a[r, c] + plan.w[r, q] * _corner_value(acc, xf, plan.at[q] + step, plan.ok[r, q], c, reads)
                with chan(0, C) as c:
                    a[4, c] = (a[0, c] + a[1, c]) + (a[2, c] + a[3, c])

            row = tirx.truncdiv(task, col_blocks)
            n, ho = tirx.truncdiv(row, s.Ho), tirx.truncmod(row, s.Ho)
            with T.serial(0, chunk) as inner:
                wo = tirx.truncmod(task, col_blocks) * chunk + inner
                with T.If(wo < s.Wo):
                    with T.Then():
                        all_read = fill_plan(n, ho, wo)
                        with T.serial(0, G) as g:
                            with T.If(all_read):
                                with T.Then():
                                    accumulate(g, "all")
                                with T.Else():
                                    accumulate(g, "masked")
                                    with T.If(tirx.Not(_finite(a, t, C, chan))):
                                        with T.Then():
                                            accumulate(g, "exact")
                            with chan(0, C) as c:
                                out[n, ho, wo, g * C + c] = tirx.Cast(cfg.dtype, a[4, c])
    return ib.get()


def _fold_lanes(t, rows: int, length: int, chan, op=lambda a, b: a + b):
    """t[i, 0] <- op over c < length of t[i, c], for i < rows: a fixed tree of vectorised halvings
    (a horizontal reduction TIR cannot vectorise as a loop-carried one; deterministic order)."""
    while length > 1:
        half = length // 2
        for i in range(rows):
            with chan(0, half) as c:
                t[i, c] = op(t[i, c], t[i, c + length - half])
        length -= half


def backward(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
    """One parallel task per (image, group), looping over all of that image's output pixels.

    The task copies its slice of x into a private zero-ringed slice (see `_ringed`) and
    scatter-adds into a private gradient slice of the same shape, converted into grad_x at the
    end: both dense (the group's channels in x are strided by G*C), and every corner of every
    point has a legal address, so the point loop has no tests. Per pixel the group's P points
    are planned in one vectorised pass; per point one vectorised channel pass computes the three
    sums (a fixed halving tree reduces them) and four vectorised scatter-adds follow.

    Race-freedom: task (n, g) is the only writer of its private slices, of grad_x[n, :, :, g, :]
    and of group g's offset/weight gradients of image n, so the scatter-add needs no atomics
    and the result does not depend on the number of threads.
    """
    G, C, P = cfg.group, cfg.group_channels, cfg.num_points
    acc = acc_dtype(cfg.dtype)
    ins, outs = proxies(ins), proxies(outs)
    x, offs, gout = ins[0], ins[1:-1], ins[-1]
    gx, gofs = outs[0], outs[1:]
    goff, gmsk = offset_and_mask(cfg, gofs)
    zero = tirx.const(0, acc)
    chan = T.vectorized if params["vector"] else T.serial
    size = (s.H + 3) * (s.W + 2) * C
    with IRBuilder() as ib:
        with T.parallel(0, s.N * G) as task:
            n = tirx.truncdiv(task, G)
            g = tirx.truncmod(task, G)
            reads = [*_group_rows(cfg, g, *offset_and_mask(cfg, offs)), (gout, g * C, C)]
            writes = _group_rows(cfg, g, goff, gmsk)
            xr = T.buffer_proxy(T.alloc_buffer((size,), acc, scope="global"))
            gr = T.buffer_proxy(T.alloc_buffer((size,), acc, scope="global"))
            plan, fill_plan = _planner(cfg, acc, s, offs, g, 1, params["plan_lanes"], grads=True)
            t = alloc(cfg, (3, C), acc)
            go = alloc(cfg, (C,), acc)

            def copy_in(at, y, xx, inner, c):
                xr[at + c] = tirx.Select(inner, tirx.Cast(acc, x[n, y, xx, g * C + c]), zero)
                gr[at + c] = zero

            def copy_out(at, y, xx, inner, c):
                with T.If(inner):
                    with T.Then():
                        gx[n, y, xx, g * C + c] = tirx.Cast(cfg.dtype, gr[at + c])

            _ringed(s, C, chan, copy_in)
            with T.serial(0, s.Ho) as ho:
                with T.serial(0, s.Wo) as wo:
                    with chan(0, C) as c:
                        go[c] = tirx.Cast(acc, gout[n, ho, wo, g * C + c])
                    last = (s.N - n) * s.Ho * s.Wo - ho * s.Wo - 1  # the buffers' last pixel, from (n, ho, 0)
                    for rows, ahead, write in ((reads, READ_AHEAD, 0), (writes, WRITE_AHEAD, 1)):
                        for buf, first, length in rows:
                            _prefetch(buf, n, ho, tirx.min(wo + ahead, last), first, length, cfg.itemsize, write)
                    fill_plan(n, ho, wo)
                    with T.serial(0, P) as k:  # rolled: the unrolled body overflows the uop cache
                        m = plan.m[k]
                        _point_sums(cfg, acc, s, xr, plan, k, go, t, chan)
                        store_point_grads(cfg, acc, goff, gmsk, n, ho, wo, g, k, m, [t[i, 0] for i in range(3)])
                        for r, step in enumerate(_corner_steps(s.W + 2, C)):
                            mw = m * plan.w[r, k]
                            at = plan.at[k] + step
                            with chan(0, C) as c:
                                gr[at + c] = gr[at + c] + go[c] * mw
            _ringed(s, C, chan, copy_out)
    return ib.get()


# The backward prefetches each pixel's rows this many output pixels ahead: without, it took
# 1.10-1.56x the time (fp32, 3x3, G4 C16-C32); 8 or 32 pixels ahead instead of 16 were no faster.
READ_AHEAD, WRITE_AHEAD = 16, 8


def _group_rows(cfg: DCNConfig, g, offset, mask) -> list:
    """[(buffer, first, length)]: group g's part of a pixel's offset and weight rows (or of their
    gradients'): DCNv4's one packed run, DCNv3's two."""
    P = cfg.num_points
    first_offset, first_weight = point_index(cfg, g, 0)
    if cfg.op == "dcnv4":
        return [(offset, first_offset, 3 * P)]
    return [(offset, first_offset, 2 * P), (mask, first_weight, P)]


def _prefetch(buf, n, ho, wo, first, length: int, itemsize: int, write: int):
    """Hint the cache lines of buf[n, ho, wo, first : first + length] (CPU; write: 1 where they are
    to be written): one prefetch every 64 bytes and one at the end. wo may pass the row's end: the
    flat index reaches the next pixels'."""
    for i in sorted({*range(0, length, max(1, 64 // itemsize)), length - 1}):
        address = tirx.address_of(buf[n, ho, wo, first + i])
        T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, *(tirx.const(v, "int32") for v in (write, 3, 1))))


def _ringed(s: Shapes, C: int, chan, body):
    """Visit a zero-ringed (H + 3, W + 2, C) slice: image pixel (y, x) at row y + 1, column x + 1;
    rows 0, H + 1, H + 2 and columns 0, W + 1 are the ring. Inside the window every corner of a
    point lies in rows 0 .. H + 1 and columns 0 .. W + 1; rows H + 1, H + 2 hold the 2x2 block
    that points outside the window are sent to (see `_planner`). body(at, y, x, inner, c) per
    slot: `at` its flat index of channel 0, (y, x) its image pixel (clamped), inner: a real pixel."""
    with T.serial(0, s.H + 3) as py:
        with T.serial(0, s.W + 2) as px:
            inner = tirx.all(py >= 1, py <= s.H, px >= 1, px <= s.W)
            y, xx = tirx.max(tirx.min(py - 1, s.H - 1), 0), tirx.max(tirx.min(px - 1, s.W - 1), 0)
            with chan(0, C) as c:
                body((py * (s.W + 2) + px) * C, y, xx, inner, c)


def _point_sums(cfg, acc, s: Shapes, xr, plan: Plan, q, go, t, chan):
    """t[0..2, 0] <- sum_c go[c] * (B_c, dB_c/dlx, dB_c/dly) of planned point q (x's ringed slice xr)."""
    C = cfg.group_channels
    one = tirx.const(1, acc)
    w = [plan.w[r, q] for r in range(4)]
    ly, lx = plan.ly[q], plan.lx[q]
    with chan(0, C) as c:
        v = [xr[plan.at[q] + step + c] for step in _corner_steps(s.W + 2, C)]
        for i, term in enumerate(bilinear_terms(go[c], v, w, ly, lx, one - ly, one - lx)):
            t[i, c] = term
    _fold_lanes(t, 3, C, chan)

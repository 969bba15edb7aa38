"""TVM definitions of the DCNv3/DCNv4 forward and backward (docs/SPEC.md sections 1-3).

Every definition goes through ONE sampling helper, `locate`, which turns an output pixel, a
point index and a learned (dx, dy) into the window test, the four corners (clamped indices
that are always safe to read) and their bilinear weights, zero for corners outside the image.
The CPU shells call it vectorised over a pixel's points (`_planner`) and then run channel
loops on the plan; the CUDA shells call it per thread.

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
its tunable knobs (chunking, vectorisation, unrolling, plan width, threads per block, channels
per thread)
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
    y0: tvm.tirx.PrimExpr  # floor(py) inside the window (so in [-1, H-1]), 0 outside
    x0: tvm.tirx.PrimExpr  # floor(px) likewise, in [-1, W-1]


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
    half_h, half_w = cfg.half_window
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
    if cfg.offset_scale == 0:  # (grid + NaN) * 0 is NaN, outside the window; the simplifier folds it to 0
        inside = bind(tirx.all(inside, tirx.isfinite(dx), tirx.isfinite(dy)))
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
    return Sample(inside, ly, lx, corners, y0, x0)


# ---- where offsets and weights live ----------------------------------------------------------
def _point_index(cfg: DCNConfig, g, k):
    """(index of point k's x offset, index of its weight) in group g's part of a pixel's row."""
    lay = offset_layout(cfg)
    return g * lay.offset_group_stride + lay.offset_base + 2 * k, g * lay.mask_group_stride + lay.mask_base + k


def _point_reader(cfg: DCNConfig, acc: str, offset, mask):
    """(n, ho, wo, g, k) -> (dx, dy, m) in acc dtype, for the op's offset/mask buffers or tensors."""

    def read(n, ho, wo, g, k):
        oi, mi = _point_index(cfg, g, k)
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
    """Forward PrimFunc `forward(x, om | off, msk, out)`; out (N, Ho, Wo, G*C) fully written."""
    s = shapes()
    x, offs = _inputs(cfg, s)
    out = [("out", (s.N, s.Ho, s.Wo, cfg.channels), cfg.dtype)]
    shell = _forward_cuda if cfg.is_cuda else _forward_cpu
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
    shell = _backward_cuda if cfg.is_cuda else _backward_cpu
    return _extern(cfg, "backward", [x, *offs, gout], outs, lambda ins, outs_: shell(cfg, params, s, ins, outs_))


# Index arithmetic below uses truncdiv/truncmod: every operand is a non-negative index, and
# TVM's floordiv on symbolic extents of unknown sign emits sign-fixing branches per division.


def _proxies(bufs):
    return [T.buffer_proxy(b) for b in bufs]


# ---- CPU shells ---------------------------------------------------------------------------------
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
    without T.bind (see `_scalar_binder`); small enough for the stack, where LLVM keeps it in
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
    scratch = {dt: _alloc(cfg, (n, lanes), dt) for dt, n in rows.items()}

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
    offset, mask = _offset_and_mask(cfg, offs)
    spans = [(offset, lay.offset_group_stride)]
    if cfg.op != "dcnv4":  # DCNv4 packs offsets and weights in one row per group
        spans.append((mask, lay.mask_group_stride))
    rows = [_alloc(cfg, (groups * stride,), cfg.dtype) for _, stride in spans]
    off_row, mask_row = rows[0], rows[-1]

    def stage(n, ho, wo):
        for row, (src, stride) in zip(rows, spans):
            _copy(row, lambda j: src[n, ho, wo, g0 * stride + j], groups * stride, lanes)

    def read(g, k):
        oi, mi = _point_index(cfg, g, k)
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
    i32, f = (lambda shape: _alloc(cfg, shape, "int32")), (lambda shape: _alloc(cfg, shape, acc))
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


def _forward_cpu(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
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
    ins, (out,) = _proxies(ins), _proxies(outs)
    chan = T.vectorized if params["vector"] else T.serial
    points = T.unroll if params["unroll_points"] else T.serial
    chunk, lanes = params["pixels_per_task"], params["plan_lanes"]
    col_blocks = tirx.truncdiv(s.Wo + chunk - 1, chunk)
    with IRBuilder() as ib:
        with T.parallel(0, s.N * s.Ho * col_blocks) as task:
            xf = _flat(x_buf, s.N * s.H * s.W * cfg.channels)
            plan, fill_plan = _planner(cfg, acc, s, ins[1:], 0, G, lanes, grads=False)
            a, t = _alloc(cfg, (5, C), acc), _alloc(cfg, (1, C), "int64" if acc == "float64" else "int32")
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


def _bilinear_terms(gc, v, w, ly, lx, hy, hx) -> tuple:
    """One channel's (gc * B, gc * dB/dlx, gc * dB/dly) (docs/SPEC.md section 1 gradients): corner
    values v and weights w in the order 00, 01, 10, 11, fractions (ly, lx), hy = 1 - ly, hx = 1 - lx."""
    return (gc * (w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3]),
            gc * (hy * (v[1] - v[0]) + ly * (v[3] - v[2])),
            gc * (hx * (v[2] - v[0]) + lx * (v[3] - v[1])))


def _point_grads(cfg, acc, smp: Sample, value, grad, C, red):
    """red[0..2] <- sum_c grad(c) * (B_c, dB/dlx, dB/dly) for one point (value(q, c): corner q's
    value at channel c, zero when not valid); one thread, serial over the channels (CUDA)."""
    bind = _scalar_binder(cfg)
    one, zero = tirx.const(1, acc), tirx.const(0, acc)
    hy, hx = bind(one - smp.ly), bind(one - smp.lx)
    for i in range(3):
        red[i] = zero
    with T.serial(0, C) as c:
        v, gc = [bind(value(q, c)) for q in smp.corners], bind(grad(c))
        terms = _bilinear_terms(gc, v, [q.weight for q in smp.corners], smp.ly, smp.lx, hy, hx)
        for i in range(3):
            red[i] = red[i] + terms[i]


def _store_point_grads(cfg, acc, goff, gmsk, n, ho, wo, g, k, m, red):
    """dL/ddx = s*m*red[1], dL/ddy = s*m*red[2], dL/dm = red[0] into the op's gradient buffers."""
    sm = tirx.const(cfg.offset_scale, acc) * m
    oi, mi = _point_index(cfg, g, k)
    goff[n, ho, wo, oi] = tirx.Cast(cfg.dtype, sm * red[1])
    goff[n, ho, wo, oi + 1] = tirx.Cast(cfg.dtype, sm * red[2])
    gmsk[n, ho, wo, mi] = tirx.Cast(cfg.dtype, red[0])


def _fold_lanes(t, rows: int, length: int, chan, op=lambda a, b: a + b):
    """t[i, 0] <- op over c < length of t[i, c], for i < rows: a fixed tree of vectorised halvings
    (a horizontal reduction TIR cannot vectorise as a loop-carried one; deterministic order)."""
    while length > 1:
        half = length // 2
        for i in range(rows):
            with chan(0, half) as c:
                t[i, c] = op(t[i, c], t[i, c + length - half])
        length -= half


def _backward_cpu(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
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
    ins, outs = _proxies(ins), _proxies(outs)
    x, offs, gout = ins[0], ins[1:-1], ins[-1]
    gx, gofs = outs[0], outs[1:]
    goff, gmsk = _offset_and_mask(cfg, gofs)
    zero = tirx.const(0, acc)
    chan = T.vectorized if params["vector"] else T.serial
    size = (s.H + 3) * (s.W + 2) * C
    with IRBuilder() as ib:
        with T.parallel(0, s.N * G) as task:
            n = tirx.truncdiv(task, G)
            g = tirx.truncmod(task, G)
            reads = [*_group_rows(cfg, g, *_offset_and_mask(cfg, offs)), (gout, g * C, C)]
            writes = _group_rows(cfg, g, goff, gmsk)
            xr = T.buffer_proxy(T.alloc_buffer((size,), acc, scope="global"))
            gr = T.buffer_proxy(T.alloc_buffer((size,), acc, scope="global"))
            plan, fill_plan = _planner(cfg, acc, s, offs, g, 1, params["plan_lanes"], grads=True)
            t = _alloc(cfg, (3, C), acc)
            go = _alloc(cfg, (C,), acc)

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
                        _store_point_grads(cfg, acc, goff, gmsk, n, ho, wo, g, k, m, [t[i, 0] for i in range(3)])
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
    first_offset, first_weight = _point_index(cfg, g, 0)
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
        for i, term in enumerate(_bilinear_terms(go[c], v, w, ly, lx, one - ly, one - lx)):
            t[i, c] = term
    _fold_lanes(t, 3, C, chan)


# ---- CUDA shells --------------------------------------------------------------------------------
def _threads(total, threads: int):
    """Bind a 1-D grid of `threads`-wide blocks over `total` work items; yields (frames, tid)."""
    bx, tx = te.thread_axis("blockIdx.x"), te.thread_axis("threadIdx.x")
    frames = [T.attr(bx, "thread_extent", tirx.truncdiv(total + threads - 1, threads)), T.attr(tx, "thread_extent", threads)]
    return frames, bx * threads + tx


def _forward_cuda(cfg: DCNConfig, params: dict, s: Shapes, ins, outs):
    """One thread per (pixel, group, `vec` contiguous channels), as the official DCNv4 kernel:
    each thread reads its own P offsets/weights, accumulates `vec` channels in fp32 registers (fp64
    for fp64) and loads/stores them as vectors."""
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

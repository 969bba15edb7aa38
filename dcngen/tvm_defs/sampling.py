"""The sampling core of every TVM definition (docs/SPEC.md sections 1-3): where a point's offsets
and weight live, `locate` (window test, corners, bilinear weights) and the per-channel gradient terms."""

from __future__ import annotations

from typing import NamedTuple

import tvm
from tvm import te, tirx

from ..config import DCNConfig
from ..layout import offset_layout
from .ir import Shapes, scalar_binder


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


def point_index(cfg: DCNConfig, g, k):
    """(index of point k's x offset, index of its weight) in group g's part of a pixel's row."""
    lay = offset_layout(cfg)
    return g * lay.offset_group_stride + lay.offset_base + 2 * k, g * lay.mask_group_stride + lay.mask_base + k


def point_reader(cfg: DCNConfig, acc: str, offset, mask):
    """(n, ho, wo, g, k) -> (dx, dy, m) in acc dtype, for the op's offset/mask buffers or tensors."""

    def read(n, ho, wo, g, k):
        oi, mi = point_index(cfg, g, k)
        return (tirx.Cast(acc, offset[n, ho, wo, oi]), tirx.Cast(acc, offset[n, ho, wo, oi + 1]), tirx.Cast(acc, mask[n, ho, wo, mi]))

    return read


def offset_placeholders(cfg: DCNConfig, s: Shapes) -> list[te.Tensor]:
    """DCNv4: [om (N, Ho, Wo, Cpad)]; DCNv3: [off (N, Ho, Wo, G*P*2), msk (N, Ho, Wo, G*P)]."""
    g, p = cfg.group, cfg.num_points
    if cfg.op == "dcnv4":
        return [te.placeholder((s.N, s.Ho, s.Wo, s.Cpad), cfg.dtype, name="om")]
    return [te.placeholder((s.N, s.Ho, s.Wo, g * p * 2), cfg.dtype, name="off"), te.placeholder((s.N, s.Ho, s.Wo, g * p), cfg.dtype, name="msk")]


def offset_and_mask(cfg: DCNConfig, tensors):
    return (tensors[0], tensors[0]) if cfg.op == "dcnv4" else (tensors[0], tensors[1])


def locate_point(cfg, acc, s: Shapes, read, n, ho, wo, g, k):
    """Read point k's offset and weight and sample it; every intermediate kept in a local scalar."""
    bind = scalar_binder(cfg)
    dx, dy, m = (bind(v) for v in read(n, ho, wo, g, k))
    return locate(cfg, acc, s.H, s.W, ho, wo, k, dx, dy, bind=bind), m


def bilinear_terms(gc, v, w, ly, lx, hy, hx) -> tuple:
    """One channel's (gc * B, gc * dB/dlx, gc * dB/dly) (docs/SPEC.md section 1 gradients): corner
    values v and weights w in the order 00, 01, 10, 11, fractions (ly, lx), hy = 1 - ly, hx = 1 - lx."""
    return (gc * (w[0] * v[0] + w[1] * v[1] + w[2] * v[2] + w[3] * v[3]),
            gc * (hy * (v[1] - v[0]) + ly * (v[3] - v[2])),
            gc * (hx * (v[2] - v[0]) + lx * (v[3] - v[1])))


def store_point_grads(cfg, acc, goff, gmsk, n, ho, wo, g, k, m, red):
    """dL/ddx = s*m*red[1], dL/ddy = s*m*red[2], dL/dm = red[0] into the op's gradient buffers."""
    sm = tirx.const(cfg.offset_scale, acc) * m
    oi, mi = point_index(cfg, g, k)
    goff[n, ho, wo, oi] = tirx.Cast(cfg.dtype, sm * red[1])
    goff[n, ho, wo, oi + 1] = tirx.Cast(cfg.dtype, sm * red[2])
    gmsk[n, ho, wo, mi] = tirx.Cast(cfg.dtype, red[0])

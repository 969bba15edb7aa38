"""ONNX export of models that contain `dcngen::dcnv4` / `dcngen::dcnv3`.

Each op becomes one standard ONNX `DeformConv` (opset 19) in its depthwise ones-weight form
(docs/SPEC.md section 5), so the model runs in any runtime that implements it (onnxruntime's CPU
provider does):

    X (N, H, W, G*C) --Transpose--> (N, G*C, H, W)
    W = ones (G*C, 1, kh, kw), group = G*C, offset_group = G, no bias
    offsets: our point order (kernel-width index i outer) and (dx, dy) pairs are gathered into
             ONNX's row-major points (k = j*kw + i) and (dy, dx) pairs; a removed centre point
             becomes a point with zero offset and zero mask; for offset_scale s != 1,
             dy' = s*dy + (s-1)*(j*dh - Dh) and dx' = s*dx + (s-1)*(i*dw - Dw)
    output (N, G*C, Ho, Wo) --Transpose--> (N, Ho, Wo, G*C)

How: torch 2.13's default exporter (`torch.onnx.export(..., dynamo=True)`) takes a
`custom_translation_table` mapping `torch.ops.dcngen.dcnv4.default` (and `.dcnv3.default`) to a
Python function written with `onnxscript.opset19`; the exporter calls it with symbolic tensors
for the tensor arguments and plain Python values for the ints/floats/bools, so the index and
bias constants are computed in Python. `export()` below passes that table; use
`translation_table()` to call `torch.onnx.export` yourself. This is the supported path.

The legacy TorchScript exporter (dynamo=False, deprecated) also works after
`register_torchscript_symbolics()`, which registers the same translation through
`torch.onnx.register_custom_op_symbolic("dcngen::dcnv4", ...)` (the DeformConv then carries an
explicit zero bias).

Needs `pip install dcngen[onnx]` (onnx, onnxscript; onnxruntime to run the result).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch

from . import ops  # noqa: F401  (defines the ops translated here)
from .config import DCNConfig

OPSET = 19


def _config(op_name, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale, remove_center) -> DCNConfig:
    return DCNConfig(
        op=op_name, group=group, group_channels=group_channels, kernel_size=(kernel_h, kernel_w), stride=(stride_h, stride_w),
        padding=(pad_h, pad_w), dilation=(dilation_h, dilation_w), offset_scale=offset_scale, remove_center=bool(remove_center),
    )


def _gather_plan(cfg: DCNConfig) -> tuple[np.ndarray, np.ndarray]:
    """For ONNX point k = j*kw + i: the index into our points (P means "the zero point") and the
    additive (dy, dx, mask) term (kh*kw, 3) of the offset_scale transform."""
    kh, kw = cfg.kernel_size
    dh, dw = cfg.dilation
    half_h, half_w = cfg.half_window
    ours = {pt: k for k, pt in enumerate(cfg.points)}
    s = cfg.offset_scale
    index, bias = [], []
    for j in range(kh):
        for i in range(kw):
            index.append(ours.get((i, j), cfg.num_points))
            bias.append(((s - 1) * (j * dh - half_h), (s - 1) * (i * dw - half_w), 0.0))
    return np.asarray(index, dtype=np.int64), np.asarray(bias, dtype=np.float64)


def _deform_conv(op, cfg: DCNConfig, input, offset, mask):
    """input (N, H, W, G*C); offset (N, Ho, Wo, G, P, 2) as (x, y); mask (N, Ho, Wo, G, P, 1) -> (N, Ho, Wo, G*C).

    `op` is `onnxscript.opset19` or the TorchScript shim `_GraphOps`.
    """
    g, c = cfg.group, cfg.group_channels
    kh, kw = cfg.kernel_size
    ints = lambda v: op.Constant(value_ints=[int(a) for a in v])  # noqa: E731
    index, shift_table = _gather_plan(cfg)

    points = op.Concat(offset, op.CastLike(mask, offset), axis=-1)  # (N, Ho, Wo, G, P, 3): dx, dy, m
    if cfg.remove_center:  # append a zero point for the centre
        points = op.Pad(points, ints([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]))
    points = op.Gather(points, ints(index), axis=4)  # (N, Ho, Wo, G, kh*kw, 3), row-major points
    points = op.Gather(points, ints([1, 0, 2]), axis=5)  # dy, dx, m
    if cfg.offset_scale != 1.0:
        s = cfg.offset_scale
        scale = op.CastLike(op.Constant(value_floats=[s, s, 1.0]), points)
        shift = op.CastLike(op.Constant(value_floats=[float(v) for v in shift_table.reshape(-1)]), points)
        points = op.Add(op.Mul(points, scale), op.Reshape(shift, ints([kh * kw, 3])))
    to_nchw = lambda t: op.Transpose(op.Reshape(t, ints([0, 0, 0, -1])), perm=[0, 3, 1, 2])  # noqa: E731
    off = to_nchw(op.Slice(points, ints([0]), ints([2]), ints([5])))
    msk = to_nchw(op.Slice(points, ints([2]), ints([3]), ints([5])))
    weight = op.Expand(op.CastLike(op.Constant(value_float=1.0), points), ints([g * c, 1, kh, kw]))
    bias = op.Expand(op.CastLike(op.Constant(value_float=0.0), points), ints([g * c])) if getattr(op, "explicit_bias", False) else None
    (sh, sw), (ph, pw), (dh, dw) = cfg.stride, cfg.padding, cfg.dilation
    out = op.DeformConv(
        op.Transpose(input, perm=[0, 3, 1, 2]), weight, off, bias, msk,
        dilations=[dh, dw], group=g * c, kernel_shape=[kh, kw], offset_group=g, pads=[ph, pw, ph, pw], strides=[sh, sw],
    )
    return op.Transpose(out, perm=[0, 2, 3, 1])


def _dcnv4(op, input, offset_mask, *args):
    cfg = _config("dcnv4", *args)
    g, p = cfg.group, cfg.num_points
    ints = lambda v: op.Constant(value_ints=[int(a) for a in v])  # noqa: E731
    packed = op.Reshape(op.Slice(offset_mask, ints([0]), ints([3 * g * p]), ints([3])), ints([0, 0, 0, g, -1]))
    offset = op.Reshape(op.Slice(packed, ints([0]), ints([2 * p]), ints([4])), ints([0, 0, 0, g, -1, 2]))
    mask = op.Reshape(op.Slice(packed, ints([2 * p]), ints([3 * p]), ints([4])), ints([0, 0, 0, g, -1, 1]))
    return _deform_conv(op, cfg, input, offset, mask)


def _dcnv3(op, input, offset, mask, *args):
    cfg = _config("dcnv3", *args)
    g = cfg.group
    ints = lambda v: op.Constant(value_ints=[int(a) for a in v])  # noqa: E731
    return _deform_conv(op, cfg, input, op.Reshape(offset, ints([0, 0, 0, g, -1, 2])), op.Reshape(mask, ints([0, 0, 0, g, -1, 1])))


def dcnv4_to_onnx(input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale, remove_center, backend="template"):
    """Translation of `dcngen::dcnv4`: input (N, H, W, G*C), offset_mask (N, Ho, Wo, >= G*P*3)."""
    from onnxscript import opset19

    return _dcnv4(opset19, input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)


def dcnv3_to_onnx(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale, remove_center, backend="template"):
    """Translation of `dcngen::dcnv3`: input (N, H, W, G*C), offset (N, Ho, Wo, G*P*2), mask (N, Ho, Wo, G*P)."""
    from onnxscript import opset19

    return _dcnv3(opset19, input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels, offset_scale, remove_center)


class _GraphOps:
    """`op.Name(*inputs, **attributes)` emitting nodes into a TorchScript ONNX graph `g`.

    This exporter has no empty optional input, so DeformConv gets an explicit zero bias.
    """

    explicit_bias = True

    def __init__(self, g):
        self._g = g

    def __getattr__(self, name: str):
        def emit(*inputs, **attrs):
            if name == "Constant":
                ((key, value),) = attrs.items()
                dtype = torch.int64 if key == "value_ints" else torch.float32
                return self._g.op("Constant", value_t=torch.tensor(value, dtype=dtype))
            suffixed = {}
            for key, value in attrs.items():
                first = value[0] if isinstance(value, (list, tuple)) else value
                suffixed[f"{key}_{'f' if isinstance(first, float) else 'i'}"] = value
            return self._g.op(name, *inputs, **suffixed)

        return emit


_SYMBOLIC_ARGS = ("v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "i", "i", "f", "b", "s")


def register_torchscript_symbolics(opset_version: int = OPSET) -> None:
    """Register the ops for the legacy exporter (`torch.onnx.export(..., dynamo=False)`)."""
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args(*_SYMBOLIC_ARGS)
    def dcnv4_symbolic(g, input, offset_mask, kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, remove_center, backend):
        return _dcnv4(_GraphOps(g), input, offset_mask, kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, remove_center)

    @symbolic_helper.parse_args("v", *_SYMBOLIC_ARGS)
    def dcnv3_symbolic(g, input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, remove_center, backend):
        return _dcnv3(_GraphOps(g), input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, remove_center)

    torch.onnx.register_custom_op_symbolic("dcngen::dcnv4", dcnv4_symbolic, opset_version)
    torch.onnx.register_custom_op_symbolic("dcngen::dcnv3", dcnv3_symbolic, opset_version)


def translation_table() -> dict[Callable, Callable]:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)`."""
    return {torch.ops.dcngen.dcnv4.default: dcnv4_to_onnx, torch.ops.dcngen.dcnv3.default: dcnv3_to_onnx}


def export(model: torch.nn.Module, args: tuple, path: str | os.PathLike | None = None, *, opset_version: int = OPSET, **kwargs: Any):
    """`torch.onnx.export` (dynamo exporter, opset >= 19) with the dcngen translations added.

    Returns the ONNXProgram; with `path` it is also saved there. Extra keyword arguments go to
    torch.onnx.export (e.g. kwargs=, dynamic_shapes=, input_names=, custom_translation_table=).
    """
    if opset_version < OPSET:
        raise ValueError(f"DeformConv needs ONNX opset >= {OPSET}, got {opset_version}")
    table = translation_table()
    table.update(kwargs.pop("custom_translation_table", None) or {})
    kwargs.setdefault("verbose", False)
    return torch.onnx.export(model, args, path, dynamo=True, opset_version=opset_version, custom_translation_table=table, **kwargs)

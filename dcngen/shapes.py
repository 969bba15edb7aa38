"""What tensors an op takes for a config (docs/SPEC.md layouts): checked the same way by the ops,
the reference and the baseline. Each check raises InputError naming the tensor and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import DCNConfig
from .errors import InputError


def tensor_names(op: str) -> tuple[str, ...]:
    return ("input", "offset_mask") if op == "dcnv4" else ("input", "offset", "mask")


def format_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_metas(op: str, metas: Sequence[tuple]) -> None:
    """Each tensor's (shape, dtype, device, layout), input first: dense, 4-D, input's dtype and device."""
    _, dtype, device, _ = metas[0]
    for name, (shape, t_dtype, t_device, layout) in zip(tensor_names(op), metas):
        if layout != torch.strided:
            raise InputError(f"{name} must be a dense (strided) tensor, got layout {layout}")
        if len(shape) != 4:
            raise InputError(f"{name} must be 4-D and channels-last, got shape {format_shape(shape)}")
        if t_dtype != dtype:
            raise InputError(f"{name} has dtype {t_dtype} but input has {dtype}; all tensors must share one dtype")
        if t_device != device:
            raise InputError(f"{name} is on {t_device} but input is on {device}; all tensors must share one device")


def check_shapes(op: str, cfg: DCNConfig, input_shape: Sequence[int], point_shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """input (N, H, W, G*C) and the offset_mask (DCNv4) or offset and mask (DCNv3) shapes, all 4-D,
    for `op` with cfg's geometry; returns the output's (Ho, Wo)."""
    n, h, w, channels = input_shape
    if channels != cfg.channels:
        raise InputError(f"input must be (N, H, W, group*group_channels) = (N, H, W, {cfg.channels}), got {format_shape(input_shape)}")
    ho, wo = cfg.output_size(h, w)
    if ho <= 0 or wo <= 0:
        (kh, kw), (dh, dw), (ph, pw) = cfg.kernel_size, cfg.dilation, cfg.padding
        raise InputError(f"a {kh}x{kw} kernel (dilation {dh}x{dw}, padding {ph}x{pw}) does not fit an input of {h}x{w}")
    g, p = cfg.group, cfg.num_points
    if op == "dcnv4":
        (shape,) = point_shapes
        if tuple(shape[:3]) != (n, ho, wo) or shape[3] < 3 * g * p:
            raise InputError(f"offset_mask must be (N, Ho, Wo, >= group*points*3) = ({n}, {ho}, {wo}, >= {3 * g * p}), got {format_shape(shape)}")
    else:
        for name, shape, last, what in zip(("offset", "mask"), point_shapes, (2 * g * p, g * p), ("group*points*2", "group*points")):
            if tuple(shape) != (n, ho, wo, last):
                raise InputError(f"{name} must be (N, Ho, Wo, {what}) = ({n}, {ho}, {wo}, {last}), got {format_shape(shape)}")
    return ho, wo


def tensor_metas(op: str, tensors: Sequence) -> list[tuple]:
    """Each tensor's (shape, dtype, device, layout), input first; InputError naming one that is no tensor."""
    for name, t in zip(tensor_names(op), tensors):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return [(t.shape, t.dtype, t.device, t.layout) for t in tensors]


def check_tensors(op: str, cfg: DCNConfig, input: torch.Tensor, *point_tensors: torch.Tensor) -> None:
    """check_metas and check_shapes on tensors: input, then offset_mask (DCNv4) or offset and mask (DCNv3)."""
    check_metas(op, tensor_metas(op, (input, *point_tensors)))
    check_shapes(op, cfg, input.shape, [t.shape for t in point_tensors])

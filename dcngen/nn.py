"""Drop-in `DCNv4` / `DCNv3` modules (docs/SPEC.md sections 2 and 3) running on the generated kernels.

Constructor arguments, defaults, attribute and parameter names, initialisation and forward order
follow the official modules, so their state_dicts load with `strict=True`. Unlike the official
DCNv4 module there is no group-channel restriction and any kernel size works. Where no kernel can
be built for the input's device and dtype, the module warns once and runs `dcngen.reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import constant_, xavier_uniform_

from . import ops, reference
from .config import DCNConfig, as_int, as_pair
from .errors import BuildError, ConfigError, InputError, NoKernelError, warn

__all__ = ["DCNv4", "DCNv3"]

_warned: set[tuple] = set()


def _run(cfg: DCNConfig, kernel, fallback, *tensors: torch.Tensor) -> torch.Tensor:
    """`kernel(*tensors)`; where no kernel can exist for them (no compiler to build it, or a device
    without dcngen kernels), warn once and use `fallback`. Other errors (a bad setting or record,
    bad tensors) are raised: a silent fallback would hide them behind a large slowdown.

    Under torch.compile the kernel op is traced as is (fallback decisions are made eagerly).
    """
    if torch.compiler.is_compiling():
        return kernel(*tensors)
    try:
        return kernel(*tensors)
    except (BuildError, NoKernelError) as err:
        try:
            out = fallback(*tensors)
        except Exception:
            raise err from None  # the reference cannot run either: the kernel's error explains why
        key = (cfg.op, tensors[0].device.type, tensors[0].dtype, type(err).__name__)
        if key not in _warned:
            _warned.add(key)
            warn(f"dcngen: no {cfg.op} kernel for {tensors[0].dtype} on {tensors[0].device} "
                 f"({type(err).__name__}: {str(err).splitlines()[0]}); using the slower PyTorch reference")
        return out


def _gate(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, group_channels: int) -> torch.Tensor:
    """Center feature scale: sigmoid(y @ weight.T + bias) (..., G) repeated to (..., G*group_channels)."""
    a = F.linear(y, weight, bias).sigmoid()
    return a.unsqueeze(-1).expand(*a.shape, group_channels).flatten(-2)


class _ToChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C) view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


def _norm(channels: int, norm_layer: str, **factory) -> nn.Sequential:
    """Channels-first in, channels-last out, with the official module's layer positions."""
    if norm_layer == "LN":
        return nn.Sequential(_ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6, **factory))
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels, **factory), _ToChannelsLast())
    raise ValueError(f"norm_layer must be 'LN' or 'BN', got {norm_layer!r}")


def _act(act_layer: str) -> nn.Module:
    layers = {"GELU": nn.GELU, "ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True)}
    if act_layer not in layers:
        raise ValueError(f"act_layer must be one of {', '.join(layers)}, got {act_layer!r}")
    return layers[act_layer]()


def _geometry(channels, kernel_size, stride, pad, dilation, group):
    channels, group = as_int("channels", channels), as_int("group", group)
    for name, value in (("channels", channels), ("group", group)):
        if value < 1:
            raise ConfigError(name, f"must be a positive int, got {value}")
    if channels % group != 0:
        raise ValueError(f"channels must be divisible by group, but got {channels} and {group}")
    return dict(
        group=group, group_channels=channels // group, kernel_size=as_pair("kernel_size", kernel_size),
        stride=as_pair("stride", stride), padding=as_pair("pad", pad), dilation=as_pair("dilation", dilation),
    )


def _dw_kernel(value) -> tuple[int, int]:
    """dw_kernel_size as (kh, kw): positive and odd, so the depthwise convolution (padding (k-1)/2)
    keeps the image size the offsets are computed at."""
    kernel = as_pair("dw_kernel_size", value)
    if min(kernel) < 1 or kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
        raise ConfigError("dw_kernel_size", f"must be positive and odd (the depthwise convolution keeps the image size), got {value}")
    return kernel


def _check_input(input: torch.Tensor, layout: str, channels: int) -> None:
    """input has the rank of `layout` ('(N, L, C)' or '(N, H, W, C)') and `channels` last."""
    if not isinstance(input, torch.Tensor):
        raise InputError(f"input must be a torch.Tensor {layout}, got {type(input).__name__}")
    if input.dim() != layout.count(",") + 1 or input.shape[-1] != channels:
        raise InputError(f"input must be {layout} with C = {channels}, got shape {tuple(input.shape)}")


def _check_same_size(cfg: DCNConfig, h: int, w: int) -> None:
    if cfg.output_size(h, w) != (h, w):
        ho, wo = cfg.output_size(h, w)
        raise ValueError(
            f"the module computes offsets at input resolution, so the output must keep it: "
            f"a {h}x{w} input gives {ho}x{wo} with kernel {cfg.kernel_size}, stride {cfg.stride}, "
            f"pad {cfg.padding}, dilation {cfg.dilation}"
        )


class DCNv4(nn.Module):
    """DCNv4 module. forward(input (N, L, C), shape=(H, W) or None (square)) -> (N, L, C).

    Parameters: `value_proj` (C -> C), `offset_mask` (C -> ceil(3*G*P/8)*8), `offset_mask_dw`
    (depthwise conv, with dw_kernel_size), `output_proj` (C -> C), and with center_feature_scale
    `center_feature_scale_proj_weight` (G, C) / `center_feature_scale_proj_bias` (G,).
    `backend` picks the kernel generator; `device` and `dtype` are where and in what the parameters
    are created, as for torch.nn modules; other keyword arguments are accepted and ignored, as by the
    official module.
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size=3,
        stride=1,
        pad=1,
        dilation=1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
        backend: str = "template",
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        geo = _geometry(channels, kernel_size, stride, pad, dilation, group)
        self._cfg = DCNConfig(op="dcnv4", offset_scale=offset_scale, remove_center=bool(remove_center), backend=backend, **geo)
        self.channels, self.kernel_size, self.stride, self.pad, self.dilation = channels, kernel_size, stride, pad, dilation
        self.group, self.group_channels = group, channels // group
        self.offset_scale = offset_scale
        self.dw_kernel_size = dw_kernel_size
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.without_pointwise = without_pointwise
        self.backend = backend
        self.K = group * self._cfg.num_points

        if dw_kernel_size is not None:
            dwk = _dw_kernel(dw_kernel_size)
            self.offset_mask_dw = nn.Conv2d(channels, channels, dwk, stride=1, padding=(dwk[0] // 2, dwk[1] // 2), groups=channels, **factory)
        self.offset_mask = nn.Linear(channels, self._cfg.padded_offset_mask_channels, **factory)
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels, **factory)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias, **factory)
        self._reset_parameters()
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels, **factory))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, **factory))

    def _reset_parameters(self) -> None:
        constant_(self.offset_mask.weight.data, 0.0)
        constant_(self.offset_mask.bias.data, 0.0)
        if not self.without_pointwise:
            xavier_uniform_(self.value_proj.weight.data)
            constant_(self.value_proj.bias.data, 0.0)
            xavier_uniform_(self.output_proj.weight.data)
            if self.output_proj.bias is not None:
                constant_(self.output_proj.bias.data, 0.0)

    def forward(self, input: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        _check_input(input, "(N, L, C)", self.channels)
        n, length, c = input.shape
        if shape is not None:
            h, w = shape
        else:
            h = w = int(length**0.5)  # traceable with a symbolic length (math.isqrt is not); exact for perfect squares
        if h * w != length:
            raise ValueError(f"input has L={length} tokens, which is not H*W for shape {(h, w)}; pass shape=(H, W)")
        _check_same_size(self._cfg, h, w)

        x = input if self.without_pointwise else self.value_proj(input)
        x = x.reshape(n, h, w, self.channels)  # sizes, not -1: a batch of 0 has no size to infer
        if self.dw_kernel_size is not None:
            om_input = self.offset_mask_dw(input.reshape(n, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(n, length, c)
        else:
            om_input = input
        offset_mask = self.offset_mask(om_input).reshape(n, h, w, self.offset_mask.out_features)

        cfg = self._cfg
        args = cfg.op_kwargs
        y = _run(cfg, lambda a, b: ops.dcnv4(a, b, **args), lambda a, b: reference.dcnv4(cfg, a, b), x, offset_mask)

        if self.center_feature_scale:
            a = _gate(y, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias, self.group_channels)
            y = y * (1 - a) + x * a
        y = y.reshape(n, length, self.channels)
        if not self.without_pointwise:
            y = self.output_proj(y)
        return y


class DCNv3(nn.Module):
    """DCNv3 module. forward(input (N, H, W, C)) -> (N, H, W, C).

    Parameters: `input_proj`, `output_proj` (C -> C), `dw_conv` = Sequential(depthwise Conv2d,
    norm (Sequential), activation), `offset` (C -> G*P*2), `mask` (C -> G*P; softmax over the P
    points of each group), and with center_feature_scale `center_feature_scale_proj_weight` (G, C)
    / `center_feature_scale_proj_bias` (G,) applied to the dw_conv branch. `device` and `dtype` are
    where and in what the parameters are created, as for torch.nn modules.
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size=3,
        dw_kernel_size: int | None = None,
        stride=1,
        pad=1,
        dilation=1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
        backend: str = "template",
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        geo = _geometry(channels, kernel_size, stride, pad, dilation, group)
        if remove_center and (geo["kernel_size"][0] % 2 == 0 or geo["kernel_size"][1] % 2 == 0):
            raise ValueError("remove_center is only compatible with odd kernel size.")
        self._cfg = DCNConfig(op="dcnv3", offset_scale=offset_scale, remove_center=bool(remove_center), backend=backend, **geo)
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.channels, self.kernel_size, self.stride, self.pad, self.dilation = channels, kernel_size, stride, pad, dilation
        self.dw_kernel_size = dw_kernel_size
        self.group, self.group_channels = group, channels // group
        self.offset_scale = offset_scale
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.backend = backend

        dwk = _dw_kernel(dw_kernel_size)
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=dwk, stride=1, padding=(dwk[0] // 2, dwk[1] // 2), groups=channels, **factory),
            _norm(channels, norm_layer, **factory),
            _act(act_layer),
        )
        points = self._cfg.num_points
        self.offset = nn.Linear(channels, group * points * 2, **factory)
        self.mask = nn.Linear(channels, group * points, **factory)
        self.input_proj = nn.Linear(channels, channels, **factory)
        self.output_proj = nn.Linear(channels, channels, **factory)
        self._reset_parameters()
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels, **factory))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, **factory))

    def _reset_parameters(self) -> None:
        for layer in (self.offset, self.mask):
            constant_(layer.weight.data, 0.0)
            constant_(layer.bias.data, 0.0)
        for layer in (self.input_proj, self.output_proj):
            xavier_uniform_(layer.weight.data)
            constant_(layer.bias.data, 0.0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_input(input, "(N, H, W, C)", self.channels)
        n, h, w, _ = input.shape
        _check_same_size(self._cfg, h, w)
        # The depthwise branch is traced first: on the CPU, Inductor (torch 2.13) lays out the 4-D
        # tensors computed from the graph's inputs before its last convolution as NCHW channels-last,
        # which fails on the projection's (N, H, W, C) view once H and W are dynamic.
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))  # (N, H, W, C)
        x = self.input_proj(input)
        offset = self.offset(x1)
        p = self._cfg.num_points
        mask = F.softmax(self.mask(x1).reshape(n, h, w, self.group, p), -1).reshape(n, h, w, self.group * p).to(x.dtype)
        offset = offset.to(x.dtype)

        cfg = self._cfg
        args = cfg.op_kwargs
        y = _run(
            cfg, lambda a, b, m: ops.dcnv3(a, b, m, **args), lambda a, b, m: reference.dcnv3(cfg, a, b, m),
            x, offset.contiguous(), mask.contiguous(),
        )
        if self.center_feature_scale:
            a = _gate(x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias, self.group_channels)
            y = y * (1 - a) + x * a
        return self.output_proj(y)

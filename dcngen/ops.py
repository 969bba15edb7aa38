"""Torch custom ops `dcngen::dcnv4` / `dcngen::dcnv3` (+ their backward ops) and the public functions.

Layouts (docs/SPEC.md): channels-last. input (N, H, W, G*C); DCNv4 offset_mask (N, Ho, Wo, >= G*P*3)
packed per group as [x0 y0 ... x(P-1) y(P-1) m0 ... m(P-1)]; DCNv3 offset (N, Ho, Wo, G*P*2) and
mask (N, Ho, Wo, G*P). Output (N, Ho, Wo, G*C). One argument order from the public function to
the op schema to the generated kernel; one input check shared by the real op and its fake.
"""

from __future__ import annotations

import enum
import functools
from typing import Sequence

import torch
import torch.autograd.forward_ad as forward_ad
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from .autotune import ensure_tuned
from .config import DTYPES, SPATIAL_MAX, DCNConfig, as_bool, as_int, as_number, as_pair
from .errors import InputError, NoKernelError
from .generators import backward_zeroes_padding
from .kernels import kernel_for, target_of
from .shapes import check_metas, check_shapes, format_shape, tensor_metas

_TORCH_DTYPES = {getattr(torch, name): name for name in DTYPES}  # the config's dtype names are torch's


@functools.lru_cache(maxsize=1024)
def _config(op, kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, remove_center, backend, dtype, target) -> DCNConfig:
    return DCNConfig(
        op=op, group=group, group_channels=group_channels, kernel_size=(kh, kw), stride=(sh, sw), padding=(ph, pw),
        dilation=(dh, dw), offset_scale=offset_scale, remove_center=remove_center, dtype=dtype, target=target, backend=backend,
    )


def check_inputs(op: str, args: Sequence, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> DCNConfig:
    """Validate the tensors against the op's arguments; returns the kernel's DCNConfig.

    args: (kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, remove_center, backend).
    Raises InputError naming the tensor and what was expected. The outcome depends only on the
    arguments and each tensor's (shape, dtype, device, layout): for plain tensors (concrete sizes) it
    is remembered, which saves 0.05-0.1 ms a call when the caches are cold.
    """
    tensors = (input, offset) if op == "dcnv4" else (input, offset, mask)
    if type(input) is torch.Tensor and type(offset) is torch.Tensor and type(mask) is torch.Tensor:
        return _check_remembered(op, tuple(args), *[(t.shape, t.dtype, t.device, t.layout) for t in tensors])
    return _check(op, tuple(args), *tensor_metas(op, tensors))


def _check(op: str, args: tuple, *metas: tuple) -> DCNConfig:
    """check_inputs on each tensor's (shape, dtype, device, layout): input, then offset_mask (DCNv4) or offset and mask (DCNv3)."""
    kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, offset_scale, remove_center, backend = args
    check_metas(op, metas)
    input_shape, dtype, device, _ = metas[0]
    if dtype not in _TORCH_DTYPES:
        raise InputError(f"input dtype {dtype} is not supported; use one of {', '.join(map(str, _TORCH_DTYPES))}")
    try:
        target = "cpu" if device.type == "meta" else target_of(device)  # meta: shapes only, no kernel runs
    except ValueError as e:
        raise NoKernelError(str(e)) from None
    cfg = _config(op, kh, kw, sh, sw, ph, pw, dh, dw, group, group_channels, float(offset_scale), bool(remove_center), backend, _TORCH_DTYPES[dtype], target)
    ho, wo = check_shapes(op, cfg, input_shape, [m[0] for m in metas[1:]])
    h, w = input_shape[1:3]
    if max(h, w, ho, wo) > SPATIAL_MAX:
        raise InputError(f"input {h}x{w} (output {ho}x{wo}): heights and widths must be below 2^31 (the kernels index rows and columns in 32 bits)")
    return cfg


_check_remembered = functools.lru_cache(maxsize=1024)(_check)


def check_backward_inputs(op: str, args: Sequence, grad_output: torch.Tensor, input: torch.Tensor, offset: torch.Tensor,
                          mask: torch.Tensor) -> DCNConfig:
    """check_inputs, and grad_output against the output those inputs give: (N, Ho, Wo, G*C) of
    input's dtype and device, dense. Raises InputError naming what was expected."""
    cfg = check_inputs(op, args, input, offset, mask)
    if not isinstance(grad_output, torch.Tensor):
        raise InputError(f"grad_output must be a torch.Tensor, got {type(grad_output).__name__}")
    n, h, w, _ = input.shape
    expect = (n, *cfg.output_size(h, w), cfg.channels)
    if grad_output.layout != torch.strided:
        raise InputError(f"grad_output must be a dense (strided) tensor, got layout {grad_output.layout}")
    if tuple(grad_output.shape) != expect:
        raise InputError(f"grad_output must be the output's shape (N, Ho, Wo, group*group_channels) = {format_shape(expect)}, got {format_shape(grad_output.shape)}")
    if grad_output.dtype != input.dtype or grad_output.device != input.device:
        raise InputError(f"grad_output must be {input.dtype} on {input.device} like input, got {grad_output.dtype} on {grad_output.device}")
    return cfg


def _refuse_tangents(*tensors: torch.Tensor) -> None:
    """Forward-mode AD (torch.autograd.forward_ad) has no formula here, and PyTorch's custom ops
    take none: its dual inputs would give an output without tangent. Refuse them instead."""
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError("dcngen's ops do not support forward-mode AD (no tangent flows through them): "
                                  "use reverse mode (backward(), torch.autograd.grad)")


def _forward(cfg: DCNConfig, input, offset, mask):
    _refuse_tangents(input, offset, mask)
    n, h, w, _ = input.shape
    ho, wo = cfg.output_size(h, w)
    if input.numel() == 0:  # an empty batch, or an empty image that padding gives outputs: every point samples outside
        return input.new_zeros((n, ho, wo, cfg.channels))
    ensure_tuned(cfg, (n, h, w), input.device)
    kernel = kernel_for(cfg, (n, h, w))
    input, offset, mask = input.contiguous(), offset.contiguous(), mask.contiguous()
    if hasattr(kernel, "forward_new"):  # the library allocates the output: about 0.03 ms less a call with cold caches
        return kernel.forward_new(input, offset, mask)
    out = input.new_empty((n, ho, wo, cfg.channels))
    kernel.forward(input, offset, mask, out)
    return out


def _backward(cfg: DCNConfig, grad_out, input, offset, mask, packed: bool):
    """(grad_input, grad_offset, grad_mask); for DCNv4 (packed) grad_offset is grad_mask."""
    input, offset, grad_out = input.contiguous(), offset.contiguous(), grad_out.contiguous()
    grad_input = torch.empty_like(input)
    if packed:
        mask = offset
        grad_mask = grad_offset = torch.empty_like(offset)
        if not backward_zeroes_padding(cfg):  # a strided zero_: about 0.5 ms at 8x56x56 with cold caches
            grad_offset[..., cfg.min_offset_mask_channels :].zero_()
    else:
        mask = mask.contiguous()
        grad_offset, grad_mask = torch.empty_like(offset), torch.empty_like(mask)
    if cfg.is_cuda and cfg.backend == "template" and torch.are_deterministic_algorithms_enabled():
        cfg = cfg.replace(params=(("deterministic", 1),))  # no float atomics: bitwise repeatable
    if grad_out.numel() and input.numel():
        kernel_for(cfg, tuple(input.shape[:3])).backward(input, offset, mask, grad_out, grad_input, grad_offset, grad_mask)
    else:  # nothing flows back from an empty output, nor to points that all sample outside an empty image
        for t in (grad_input, grad_offset, grad_mask):
            t.zero_()
    return grad_input, grad_offset, grad_mask


_ARGS = (
    "int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
    "int group, int group_channels, float offset_scale, bool remove_center, str backend"
)

torch.library.define("dcngen::dcnv4", f"(Tensor input, Tensor offset_mask, {_ARGS}) -> Tensor")
torch.library.define("dcngen::dcnv4_backward", f"(Tensor grad_output, Tensor input, Tensor offset_mask, {_ARGS}) -> (Tensor, Tensor)")
torch.library.define("dcngen::dcnv3", f"(Tensor input, Tensor offset, Tensor mask, {_ARGS}) -> Tensor")
torch.library.define("dcngen::dcnv3_backward", f"(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, {_ARGS}) -> (Tensor, Tensor, Tensor)")


def _dcnv4_impl(input, offset_mask, *args):
    return _forward(check_inputs("dcnv4", args, input, offset_mask, offset_mask), input, offset_mask, offset_mask)


torch.library.impl("dcngen::dcnv4", "CompositeExplicitAutograd")(_dcnv4_impl)


def _dcnv4_backward_impl(grad_output, input, offset_mask, *args):
    cfg = check_backward_inputs("dcnv4", args, grad_output, input, offset_mask, offset_mask)
    grad_input, grad_offset_mask, _ = _backward(cfg, grad_output, input, offset_mask, None, packed=True)
    return grad_input, grad_offset_mask


torch.library.impl("dcngen::dcnv4_backward", "CompositeExplicitAutograd")(_dcnv4_backward_impl)


def _dcnv3_impl(input, offset, mask, *args):
    return _forward(check_inputs("dcnv3", args, input, offset, mask), input, offset, mask)


torch.library.impl("dcngen::dcnv3", "CompositeExplicitAutograd")(_dcnv3_impl)


def _dcnv3_backward_impl(grad_output, input, offset, mask, *args):
    return _backward(check_backward_inputs("dcnv3", args, grad_output, input, offset, mask), grad_output, input, offset, mask, packed=False)


torch.library.impl("dcngen::dcnv3_backward", "CompositeExplicitAutograd")(_dcnv3_backward_impl)


def _fake_output(op, input, offset, mask, args):
    cfg = check_inputs(op, args, input, offset, mask)
    n, h, w, _ = input.shape
    ho, wo = cfg.output_size(h, w)
    return input.new_empty((n, ho, wo, cfg.channels))


@torch.library.register_fake("dcngen::dcnv4")
def _dcnv4_fake(input, offset_mask, *args):
    return _fake_output("dcnv4", input, offset_mask, offset_mask, args)


@torch.library.register_fake("dcngen::dcnv3")
def _dcnv3_fake(input, offset, mask, *args):
    return _fake_output("dcnv3", input, offset, mask, args)


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """An empty contiguous tensor like `t`: the backward's gradients are contiguous whatever the
    inputs' strides (_backward makes its inputs contiguous first)."""
    return t.new_empty(t.shape)


@torch.library.register_fake("dcngen::dcnv4_backward")
def _dcnv4_backward_fake(grad_output, input, offset_mask, *args):
    check_backward_inputs("dcnv4", args, grad_output, input, offset_mask, offset_mask)
    return _contiguous_like(input), _contiguous_like(offset_mask)


@torch.library.register_fake("dcngen::dcnv3_backward")
def _dcnv3_backward_fake(grad_output, input, offset, mask, *args):
    check_backward_inputs("dcnv3", args, grad_output, input, offset, mask)
    return _contiguous_like(input), _contiguous_like(offset), _contiguous_like(mask)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[: ctx.num_tensors])
    ctx.args = inputs[ctx.num_tensors :]


def _dcnv4_setup(ctx, inputs, output):
    ctx.num_tensors = 2
    _setup(ctx, inputs, output)


def _dcnv3_setup(ctx, inputs, output):
    ctx.num_tensors = 3
    _setup(ctx, inputs, output)


def _grad(op_backward, backward_impl):
    """The ops' autograd formula: the backward op, or (eager, see _route) its implementation."""

    def backward(ctx, grad_output):
        tensors = ctx.saved_tensors
        run = backward_impl if _route(grad_output, *tensors) is _Route.KERNEL else op_backward
        grads = run(grad_output, *tensors, *ctx.args)
        return (*grads, *([None] * len(ctx.args)))

    return backward


_dcnv4_grad = _grad(torch.ops.dcngen.dcnv4_backward, _dcnv4_backward_impl)
_dcnv3_grad = _grad(torch.ops.dcngen.dcnv3_backward, _dcnv3_backward_impl)
torch.library.register_autograd("dcngen::dcnv4", _dcnv4_grad, setup_context=_dcnv4_setup)
torch.library.register_autograd("dcngen::dcnv3", _dcnv3_grad, setup_context=_dcnv3_setup)


def _second_order(op: str):
    """Autograd of a backward op: differentiating it is not supported, and says so (PyTorch's
    fallback for an op without a formula warns and gives zeros)."""

    def backward(ctx, *grads):
        raise NotImplementedError(f"dcngen {op}: second-order gradients (differentiating its backward) are not supported")

    return backward


torch.library.register_autograd("dcngen::dcnv4_backward", _second_order("dcnv4"))
torch.library.register_autograd("dcngen::dcnv3_backward", _second_order("dcnv3"))


def _eager_function(name: str, impl, setup, grad) -> type[torch.autograd.Function]:
    """An autograd.Function running an op's implementation with the op's autograd formula (setup
    and grad, as registered above): eager autograd without the dispatcher (see _route)."""

    def forward(ctx, *inputs):
        setup(ctx, inputs, None)
        return impl(*inputs)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(grad)})


_DCNv4Function = _eager_function("DCNv4Function", _dcnv4_impl, _dcnv4_setup, _dcnv4_grad)
_DCNv3Function = _eager_function("DCNv3Function", _dcnv3_impl, _dcnv3_setup, _dcnv3_grad)


class _Route(enum.Enum):
    KERNEL = "the implementation, directly"
    FUNCTION = "the implementation under an autograd.Function with the op's formula"
    OP = "the registered op, through the dispatcher"


def _route(input: torch.Tensor, *tensors: torch.Tensor) -> _Route:
    """How a public call, or the autograd formula, runs an op.

    The dispatcher adds Python kernels (autograd, the implementation) costing about 0.03 ms a call
    with warm caches and 0.1-0.3 ms with cold ones (about 0.5 ms a training step). Eager calls on
    plain CPU/CUDA tensors need none of what it brings beyond autograd: so a call goes through the
    registered op only when anything else acts on its dispatch (autocast, torch.compile or export,
    TorchScript tracing, functorch transforms, dispatch or function modes, tensor subclasses, the
    profiler). Otherwise it runs the implementation directly, or, where inputs need gradients (or a
    backward builds a graph), under an autograd.Function with the same formula. Every route runs the
    same checks and kernels and gives the same result."""
    if torch.compiler.is_compiling():
        return _Route.OP
    if torch._C._are_functorch_transforms_active():
        _refuse_functorch_autodiff()
        return _Route.OP
    if (torch._C._get_tracing_state() or torch.autograd._profiler_enabled() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return _Route.OP
    if type(input) is not torch.Tensor or not (input.is_cpu or input.is_cuda) or torch.is_autocast_enabled("cpu" if input.is_cpu else "cuda"):
        return _Route.OP
    if any(type(t) is not torch.Tensor for t in tensors):
        return _Route.OP
    if torch.is_grad_enabled() and (input.requires_grad or any(t.requires_grad for t in tensors)):
        return _Route.FUNCTION
    return _Route.KERNEL


def _refuse_functorch_autodiff() -> None:
    """torch.func's differentiating transforms do not see through PyTorch's custom ops: jvp and
    jacfwd would return zero tangents, grad, vjp and jacrev fail with an error about
    autograd.Function. Say so; torch.func.vmap works."""
    if any(i.key() in (TransformType.Jvp, TransformType.Grad) for i in retrieve_all_functorch_interpreters()):
        raise NotImplementedError("torch.func.grad / vjp / jacrev / jvp / jacfwd cannot differentiate dcngen's ops (PyTorch's "
                                  "custom ops do not support them): use torch.autograd (backward(), torch.autograd.grad); "
                                  "torch.func.vmap works")


def _op_args(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center, backend) -> tuple:
    (kh, kw), (sh, sw) = as_pair("kernel_size", kernel_size), as_pair("stride", stride)
    (ph, pw), (dh, dw) = as_pair("padding", padding), as_pair("dilation", dilation)
    return (kh, kw, sh, sw, ph, pw, dh, dw, as_int("group", group), as_int("group_channels", group_channels),
            as_number("offset_scale", offset_scale), as_bool("remove_center", remove_center), str(backend))


def dcnv4(
    input: torch.Tensor,
    offset_mask: torch.Tensor,
    kernel_size=3,
    stride=1,
    padding=1,
    dilation=1,
    group: int = 4,
    group_channels: int = 16,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    backend: str = "template",
) -> torch.Tensor:
    """DCNv4. input (N, H, W, G*C), offset_mask (N, Ho, Wo, >= G*P*3) packed -> (N, Ho, Wo, G*C).

    Channels of offset_mask past G*P*3 are ignored (and get zero gradient). Spatial arguments take
    an int or (h, w). The kernel for this configuration is built on first use and cached.
    """
    args = _op_args(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center, backend)
    route = _route(input, offset_mask)
    if route is _Route.KERNEL:
        return _dcnv4_impl(input, offset_mask, *args)
    if route is _Route.FUNCTION:
        return _DCNv4Function.apply(input, offset_mask, *args)
    return torch.ops.dcngen.dcnv4(input, offset_mask, *args)


def dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    kernel_size=3,
    stride=1,
    padding=1,
    dilation=1,
    group: int = 4,
    group_channels: int = 16,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    backend: str = "template",
) -> torch.Tensor:
    """DCNv3. input (N, H, W, G*C), offset (N, Ho, Wo, G*P*2) as [g][k][x, y], mask (N, Ho, Wo, G*P)
    -> (N, Ho, Wo, G*C). The mask is used as given (the DCNv3 module applies the softmax)."""
    args = _op_args(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center, backend)
    route = _route(input, offset, mask)
    if route is _Route.KERNEL:
        return _dcnv3_impl(input, offset, mask, *args)
    if route is _Route.FUNCTION:
        return _DCNv3Function.apply(input, offset, mask, *args)
    return torch.ops.dcngen.dcnv3(input, offset, mask, *args)
from . import autocast  # noqa: E402,F401  (registers the Autocast kernels of the ops above)


class _FixedConfig(torch.autograd.Function):
    """The op for one exact DCNConfig, generator params included (tuning and verification)."""

    @staticmethod
    def forward(ctx, cfg: DCNConfig, input, offset, mask):
        ctx.cfg = cfg
        ctx.save_for_backward(input, offset, mask)
        return _forward(cfg, input, offset, mask)

    @staticmethod
    def backward(ctx, grad_output):
        input, offset, mask = ctx.saved_tensors
        packed = ctx.cfg.op == "dcnv4"
        grad_input, grad_offset, grad_mask = _backward(ctx.cfg, grad_output, input, offset, mask, packed=packed)
        return None, grad_input, grad_offset, None if packed else grad_mask


def run_config(cfg: DCNConfig, input: torch.Tensor, *offsets: torch.Tensor) -> torch.Tensor:
    """Run the kernel of exactly `cfg` (params and target included; with params, no tuning-record
    lookup) with autograd. A cuda target must be the tensors' GPU's architecture.

    DCNv4: run_config(cfg, input, offset_mask); DCNv3: run_config(cfg, input, offset, mask).
    """
    offset, mask = (offsets[0], offsets[0]) if cfg.op == "dcnv4" else offsets
    args = (*cfg.kernel_size, *cfg.stride, *cfg.padding, *cfg.dilation, cfg.group, cfg.group_channels, cfg.offset_scale,
            cfg.remove_center, cfg.backend)
    checked = check_inputs(cfg.op, args, input, offset, mask)
    if checked.is_cuda != cfg.is_cuda or (cfg.is_cuda and checked.target != cfg.target):
        raise InputError(f"the tensors are on {input.device} (target {checked.target}), but the config's target is {cfg.target}")
    return _FixedConfig.apply(checked.replace(params=cfg.params, target=cfg.target), input, offset, mask)

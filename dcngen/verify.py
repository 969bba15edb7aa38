"""Check a built kernel against the float64 reference on random, border-crossing inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import reference
from .config import DTYPES, DCNConfig

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}
TORCH_DTYPE = {name: getattr(torch, name) for name in DTYPES}  # the config's dtype names are torch's


@dataclass(frozen=True)
class Problem:
    """One op call's inputs in float64 (x, offset, mask, grad_out) plus the config.

    x (N, H, W, G*C); offset (N, Ho, Wo, G, P, 2) as (x, y); mask (N, Ho, Wo, G, P);
    grad_out (N, Ho, Wo, G*C).
    """

    cfg: DCNConfig
    x: torch.Tensor
    offset: torch.Tensor
    mask: torch.Tensor
    grad_out: torch.Tensor

    def op_inputs(self, dtype: torch.dtype, device="cpu") -> tuple[torch.Tensor, ...]:
        """The op's tensors: DCNv4 (x, offset_mask), DCNv3 (x, offset, mask)."""
        n, ho, wo = self.offset.shape[:3]
        offset, mask = self.offset.reshape(n, ho, wo, -1), self.mask.reshape(n, ho, wo, -1)  # DCNv3's layout
        tensors = (self.x, reference.pack_offset_mask(self.cfg, offset, mask)) if self.cfg.op == "dcnv4" else (self.x, offset, mask)
        return tuple(t.to(dtype=dtype, device=device).contiguous() for t in tensors)


def random_problem(cfg: DCNConfig, n: int, h: int, w: int, *, offset_range: float = 2.5, seed: int = 0) -> Problem:
    """Random inputs whose samples land up to `offset_range` pixels from the dilation grid (so they
    cross the borders) and never on a pixel line, whatever the offset scale: the sample's fractional
    part is k/8 with k in 1..7, which keeps it 1/8 px away from where the offset gradient jumps, in
    every dtype."""
    gen = torch.Generator().manual_seed(seed)
    g, p = cfg.group, cfg.num_points
    ho, wo = cfg.output_size(h, w)
    whole = torch.randint(-int(offset_range), int(offset_range) + 1, (n, ho, wo, g, p, 2), generator=gen)
    shift = (whole + torch.randint(1, 8, (n, ho, wo, g, p, 2), generator=gen) / 8).double()
    grid = reference.kernel_grid(cfg, dtype=torch.float64)
    s = cfg.offset_scale
    # location = base + (grid + offset) * s = base + round(grid * s) + shift
    offset = shift if s == 0 else ((grid * s).round() - grid * s + shift) / s
    x = torch.randn(n, h, w, g * cfg.group_channels, generator=gen, dtype=torch.float64)
    mask = torch.randn(n, ho, wo, g, p, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(n, ho, wo, g * cfg.group_channels, generator=gen, dtype=torch.float64)
    return Problem(cfg, x, offset, mask, grad_out)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|; inf if `actual` has a non-finite value."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(actual).all():
        return float("inf")
    if not expected.numel():
        return 0.0
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def run_op(cfg: DCNConfig, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Call the public op of cfg.op on `tensors` with cfg's arguments; with cfg.params, or a target
    other than the op's for the tensors' device, exactly cfg's kernel (ops.run_config)."""
    from . import ops
    from .kernels import target_of

    if cfg.params or cfg.target != target_of(tensors[0].device):
        return ops.run_config(cfg, *tensors)
    return getattr(ops, cfg.op)(*tensors, **cfg.op_kwargs)


def run_reference(cfg: DCNConfig, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return getattr(reference, cfg.op)(cfg, *tensors)


def verify(cfg: DCNConfig, n: int = 2, h: int = 9, w: int = 11, *, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """Max relative error of the forward output and of every gradient vs the float64 reference.

    Returns {"output": e, "grad_input": e, "grad_offset_mask": e} (DCNv4) or {..., "grad_offset": e,
    "grad_mask": e} (DCNv3). Compare with TOLERANCE[cfg.dtype].
    """
    problem = random_problem(cfg, n, h, w, seed=seed)
    dtype = TORCH_DTYPE[cfg.dtype]
    ours = [t.requires_grad_() for t in problem.op_inputs(dtype, device)]
    grad_out = problem.grad_out.to(dtype=dtype, device=device)
    out = run_op(cfg, tuple(ours))
    out.backward(grad_out)
    return reference_errors(cfg, ours, grad_out, out, [t.grad for t in ours])


def verify_kernel(cfg: DCNConfig, kernel, n: int = 2, h: int = 9, w: int = 11, *, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    """Like `verify`, but calls a loaded kernel's `forward`/`backward` directly (no op, no
    autograd) with every output poisoned with NaN first, so an element a kernel leaves unwritten
    fails. DCNv4's offset_mask gradient is checked in all its channels, padding (zeros) included,
    when the kernel writes them (generators.backward_zeroes_padding); else the padding is zeroed
    first, as the op does. Same keys as `verify`."""
    problem = random_problem(cfg, n, h, w, seed=seed)
    dtype = TORCH_DTYPE[cfg.dtype]
    tensors = problem.op_inputs(dtype, device)
    grad_out = problem.grad_out.to(dtype=dtype, device=device)
    out, grad_x, grad_offset, grad_mask = poisoned_call(cfg, kernel, tensors, grad_out)
    grads = (grad_x, grad_offset) if cfg.op == "dcnv4" else (grad_x, grad_offset, grad_mask)
    return reference_errors(cfg, tensors, grad_out, out, grads)


def reference_errors(cfg: DCNConfig, tensors, grad_out: torch.Tensor, out: torch.Tensor, grads) -> dict[str, float]:
    """Max relative errors of a kernel's `out` and `grads` (one per op tensor: DCNv4 grad_x,
    grad_offset_mask; DCNv3 grad_x, grad_offset, grad_mask) vs the float64 reference run on the
    same `tensors` (the op's, with the values the kernel saw) and `grad_out`. Keys as `verify`'s."""
    ref = [t.detach().double().cpu().requires_grad_() for t in tensors]
    expected = run_reference(cfg, tuple(ref))
    expected.backward(grad_out.detach().double().cpu())
    names = ("grad_input", "grad_offset_mask") if cfg.op == "dcnv4" else ("grad_input", "grad_offset", "grad_mask")
    errors = {"output": rel_err(out, expected)}
    errors.update({name: rel_err(g, r.grad) for name, g, r in zip(names, grads, ref)})
    return errors


def poisoned_call(cfg: DCNConfig, kernel, tensors: tuple[torch.Tensor, ...], grad_out: torch.Tensor):
    """A loaded kernel's forward and backward on the op's `tensors` ((x, offset_mask) or (x, offset,
    mask)), every output NaN-poisoned first -> (out, grad_x, grad_offset, grad_mask). DCNv4:
    grad_offset is the packed gradient and grad_mask the same tensor; its padding channels are
    zeroed first where the kernel leaves them alone (generators.backward_zeroes_padding), as the
    op does."""
    x = tensors[0]
    offset, mask = (tensors[1], tensors[1]) if cfg.op == "dcnv4" else tensors[1:]
    out, grad_x, grad_offset, grad_mask = poisoned_outputs(cfg, tensors)
    kernel.forward(x, offset, mask, out)
    kernel.backward(x, offset, mask, grad_out.to(x.dtype).contiguous(), grad_x, grad_offset, grad_mask)
    return out, grad_x, grad_offset, grad_mask


def poisoned_outputs(cfg: DCNConfig, tensors: tuple[torch.Tensor, ...]):
    """NaN-filled (out, grad_x, grad_offset, grad_mask) for a kernel call on the op's `tensors`, as
    poisoned_call uses them: DCNv4's grad_mask is grad_offset, whose padding channels are zeroed
    where the kernel leaves them alone."""
    from .generators import backward_zeroes_padding

    x = tensors[0]
    n, h, w, _ = x.shape
    out = torch.full((n, *cfg.output_size(h, w), cfg.channels), float("nan"), dtype=x.dtype, device=x.device)
    grad_x = torch.full_like(x, float("nan"))
    grad_offset = torch.full_like(tensors[1], float("nan"))
    if cfg.op == "dcnv4":
        if not backward_zeroes_padding(cfg):
            grad_offset[..., cfg.min_offset_mask_channels :] = 0
        grad_mask = grad_offset
    else:
        grad_mask = torch.full_like(tensors[2], float("nan"))
    return out, grad_x, grad_offset, grad_mask

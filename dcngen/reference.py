"""Pure-PyTorch DCNv3/DCNv4: the ground truth for every kernel (see SPEC.md sections 1-3).

Sampling is done with `F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`,
which is exactly the bilinear rule of the spec (zero corners outside the image), in the
formulation of the official DCNv3 PyTorch fallback; points outside the strict window, non-finite
ones included, are removed first. Any dtype torch supports, float64
included, and differentiable through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DCNConfig


def kernel_grid(cfg: DCNConfig, **tensor_kwargs) -> torch.Tensor:
    """(P, 2): each point's dilation-grid term (i*dw - Dw, j*dh - Dh) as (x, y), in point order."""
    (kh, kw), (dh, dw) = cfg.kernel_size, cfg.dilation
    half_h, half_w = (dh * (kh - 1)) >> 1, (dw * (kw - 1)) >> 1
    return torch.tensor([[i * dw - half_w, j * dh - half_h] for i, j in cfg.points], **tensor_kwargs)


def sampling_locations(cfg: DCNConfig, offset: torch.Tensor) -> torch.Tensor:
    """Absolute sampling locations in input pixels.

    offset: (N, Ho, Wo, G, P, 2) learned (x, y) offsets -> (N, Ho, Wo, G, P, 2) (px, py).
    """
    _, ho, wo = offset.shape[:3]
    (sh, sw), (ph, pw), (dh, dw) = cfg.stride, cfg.padding, cfg.dilation
    kh, kw = cfg.kernel_size
    half_h, half_w = (dh * (kh - 1)) >> 1, (dw * (kw - 1)) >> 1
    kwargs = dict(dtype=offset.dtype, device=offset.device)
    grid_x, grid_y = kernel_grid(cfg, **kwargs).unbind(-1)  # (P,)
    base_x = torch.arange(wo, **kwargs) * sw - pw + half_w  # (Wo,)
    base_y = torch.arange(ho, **kwargs) * sh - ph + half_h  # (Ho,)
    s = cfg.offset_scale
    px = base_x.view(1, 1, wo, 1, 1) + (grid_x.view(1, 1, 1, 1, -1) + offset[..., 0]) * s
    py = base_y.view(1, ho, 1, 1, 1) + (grid_y.view(1, 1, 1, 1, -1) + offset[..., 1]) * s
    return torch.stack((px, py), dim=-1)


def in_window(loc: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(..., 2) sampling locations (px, py) -> (...) bool: strictly inside the window,
    -1 < px < w and -1 < py < h (False for NaN)."""
    px, py = loc[..., 0], loc[..., 1]
    return (px > -1) & (px < w) & (py > -1) & (py < h)


def dcn_core(cfg: DCNConfig, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The shared DCN core.

    x: (N, H, W, G*C); offset: (N, Ho, Wo, G, P, 2) as (x, y); mask: (N, Ho, Wo, G, P)
    -> (N, Ho, Wo, G*C).
    """
    n, h, w, _ = x.shape
    g, c = cfg.group, cfg.group_channels
    _, ho, wo, _, p, _ = offset.shape
    loc = sampling_locations(cfg, offset)
    # A point outside the strict window (NaN, inf and huge offsets included) contributes nothing and
    # gets zero gradients, whatever its weight: it samples (-2, -2), where every corner is off the
    # image, with weight 0.
    live = in_window(loc, h, w)
    loc = torch.where(live.unsqueeze(-1), loc, torch.full_like(loc, -2.0))
    mask = torch.where(live, mask, torch.zeros_like(mask))
    size = torch.tensor([w, h], dtype=loc.dtype, device=loc.device)
    grid = 2 * (loc + 0.5) / size - 1  # (N, Ho, Wo, G, P, 2), align_corners=False normalisation
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * g, ho * wo, p, 2)
    value = x.reshape(n, h, w, g, c).permute(0, 3, 4, 1, 2).reshape(n * g, c, h, w)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (N*G, C, Ho*Wo, P)
    weights = mask.permute(0, 3, 1, 2, 4).reshape(n * g, 1, ho * wo, p)
    out = (sampled * weights).sum(-1)  # (N*G, C, Ho*Wo)
    return out.view(n, g, c, ho, wo).permute(0, 3, 4, 1, 2).reshape(n, ho, wo, g * c)


def split_offset_mask(cfg: DCNConfig, offset_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DCNv4 packed (N, Ho, Wo, Cpad) -> offset (N, Ho, Wo, G, P, 2), mask (N, Ho, Wo, G, P)."""
    n, ho, wo, _ = offset_mask.shape
    g, p = cfg.group, cfg.num_points
    packed = offset_mask[..., : g * p * 3].reshape(n, ho, wo, g, 3 * p)
    return packed[..., : 2 * p].reshape(n, ho, wo, g, p, 2), packed[..., 2 * p :]


def dcnv4(cfg: DCNConfig, x: torch.Tensor, offset_mask: torch.Tensor) -> torch.Tensor:
    """DCNv4 reference. x: (N, H, W, G*C); offset_mask: (N, Ho, Wo, >= G*P*3) -> (N, Ho, Wo, G*C)."""
    offset, mask = split_offset_mask(cfg, offset_mask)
    return dcn_core(cfg, x, offset, mask)


def dcnv3(cfg: DCNConfig, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DCNv3 reference. x: (N, H, W, G*C); offset: (N, Ho, Wo, G*P*2); mask: (N, Ho, Wo, G*P)."""
    n, ho, wo, _ = offset.shape
    g, p = cfg.group, cfg.num_points
    return dcn_core(cfg, x, offset.reshape(n, ho, wo, g, p, 2), mask.reshape(n, ho, wo, g, p))


def pack_offset_mask(cfg: DCNConfig, offset: torch.Tensor, mask: torch.Tensor, channels: int | None = None) -> torch.Tensor:
    """DCNv3 offset (N, Ho, Wo, G*P*2) and mask (N, Ho, Wo, G*P) -> DCNv4 packed (N, Ho, Wo, channels)."""
    n, ho, wo, _ = offset.shape
    g, p = cfg.group, cfg.num_points
    packed = torch.cat((offset.reshape(n, ho, wo, g, 2 * p), mask.reshape(n, ho, wo, g, p)), dim=-1).reshape(n, ho, wo, 3 * g * p)
    channels = channels or cfg.padded_offset_mask_channels
    return F.pad(packed, (0, channels - 3 * g * p))


def unpack_offset_mask(cfg: DCNConfig, offset_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DCNv4 packed (N, Ho, Wo, Cpad) -> DCNv3 offset (N, Ho, Wo, G*P*2) and mask (N, Ho, Wo, G*P)."""
    offset, mask = split_offset_mask(cfg, offset_mask)
    n, ho, wo = offset.shape[:3]
    return offset.reshape(n, ho, wo, -1), mask.reshape(n, ho, wo, -1)

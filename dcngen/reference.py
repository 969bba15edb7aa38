"""Pure-PyTorch DCNv3/DCNv4: the ground truth for every kernel (see docs/SPEC.md sections 1-3).

Bilinear sampling follows the spec's formula itself: y0 = floor(py), x0 = floor(px), corner weights
from the fractional parts, zero corners off the image, points outside the strict window removed
(non-finite ones included). So the offset gradient on a pixel line is the spec's (from the corner
at floor), where `F.grid_sample`'s coordinate normalisation can round to the other side. Any dtype
torch supports, float64 included, and differentiable through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DCNConfig
from .shapes import check_tensors


def kernel_grid(cfg: DCNConfig, **tensor_kwargs) -> torch.Tensor:
    """(P, 2): each point's dilation-grid term (i*dw - Dw, j*dh - Dh) as (x, y), in point order
    ((Dh, Dw) = cfg.half_window)."""
    dh, dw = cfg.dilation
    half_h, half_w = cfg.half_window
    return torch.tensor([[i * dw - half_w, j * dh - half_h] for i, j in cfg.points], **tensor_kwargs)


def sampling_locations(cfg: DCNConfig, offset: torch.Tensor) -> torch.Tensor:
    """Absolute sampling locations in input pixels.

    offset: (N, Ho, Wo, G, P, 2) learned (x, y) offsets -> (N, Ho, Wo, G, P, 2) (px, py).
    """
    _, ho, wo = offset.shape[:3]
    (sh, sw), (ph, pw) = cfg.stride, cfg.padding
    half_h, half_w = cfg.half_window
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


def live_samples(cfg: DCNConfig, offset: torch.Tensor, mask: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling locations (N, Ho, Wo, G, P, 2) and weights (N, Ho, Wo, G, P) of offsets (N, Ho, Wo, G,
    P, 2) and mask (N, Ho, Wo, G, P) on an h x w image. A point outside the strict window (NaN, inf
    and huge offsets included) contributes nothing and gets zero gradients, whatever its weight: it
    moves to (-2, -2), where every corner is off the image, with weight 0."""
    loc = sampling_locations(cfg, offset)
    live = in_window(loc, h, w)
    return torch.where(live.unsqueeze(-1), loc, torch.full_like(loc, -2.0)), torch.where(live, mask, torch.zeros_like(mask))


def bilinear_corners(loc: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The four corners of each bilinear sample (docs/SPEC.md section 1) in an image padded with two
    rows/columns of zeros before and one after, where every corner of an in-window location lies.

    loc: (..., 2) as (px, py), each with -1 < px < w and -1 < py < h, or exactly (-2, -2) for "no
    sample", whose corners are all padding -> (index, weight), both (..., 4): flat indices into the
    (h + 3) x (w + 3) padded image, and corner weights (differentiable in loc; floor's gradient is 0).
    """
    corner = loc.detach().floor()
    lx, ly = (loc - corner).unbind(-1)
    x0, y0 = (corner.long() + 2).unbind(-1)
    top = y0 * (w + 3) + x0
    index = torch.stack((top, top + 1, top + w + 3, top + w + 4), dim=-1)
    weight = torch.stack(((1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx), dim=-1)
    return index, weight


def dcn_core(cfg: DCNConfig, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The shared DCN core.

    x: (N, H, W, G*C); offset: (N, Ho, Wo, G, P, 2) as (x, y); mask: (N, Ho, Wo, G, P)
    -> (N, Ho, Wo, G*C).
    """
    n, h, w, _ = x.shape
    g, c = cfg.group, cfg.group_channels
    _, ho, wo, _, p, _ = offset.shape
    loc, mask = live_samples(cfg, offset, mask, h, w)
    index, weight = bilinear_corners(loc, h, w)  # (N, Ho, Wo, G, P, 4)
    weight = weight * mask.unsqueeze(-1)
    # every (image, group) as one padded image of rows (C,) in a table of N*G images
    padded = F.pad(x.reshape(n, h, w, g, c), (0, 0, 0, 0, 2, 1, 2, 1)).permute(0, 3, 1, 2, 4).reshape(-1, c)
    image = (torch.arange(n, device=x.device).view(n, 1, 1, 1) * g + torch.arange(g, device=x.device)) * ((h + 3) * (w + 3))
    rows = index + image.view(n, 1, 1, g, 1, 1)
    corners = padded.index_select(0, rows.reshape(-1)).view(n * ho * wo * g, p * 4, c)
    out = torch.bmm(weight.reshape(n * ho * wo * g, 1, p * 4), corners)  # (N*Ho*Wo*G, 1, C)
    return out.view(n, ho, wo, g * c)


def split_offset_mask(cfg: DCNConfig, offset_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DCNv4 packed (N, Ho, Wo, Cpad) -> offset (N, Ho, Wo, G, P, 2), mask (N, Ho, Wo, G, P)."""
    n, ho, wo, _ = offset_mask.shape
    g, p = cfg.group, cfg.num_points
    packed = offset_mask[..., : g * p * 3].reshape(n, ho, wo, g, 3 * p)
    return packed[..., : 2 * p].reshape(n, ho, wo, g, p, 2), packed[..., 2 * p :]


def dcnv4(cfg: DCNConfig, x: torch.Tensor, offset_mask: torch.Tensor) -> torch.Tensor:
    """DCNv4 reference. x: (N, H, W, G*C); offset_mask: (N, Ho, Wo, >= G*P*3) -> (N, Ho, Wo, G*C)."""
    check_tensors("dcnv4", cfg, x, offset_mask)
    offset, mask = split_offset_mask(cfg, offset_mask)
    return dcn_core(cfg, x, offset, mask)


def split_dcnv3(cfg: DCNConfig, offset: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DCNv3 offset (N, Ho, Wo, G*P*2), mask (N, Ho, Wo, G*P) -> (N, Ho, Wo, G, P, 2), (N, Ho, Wo, G, P)."""
    n, ho, wo, _ = offset.shape
    g, p = cfg.group, cfg.num_points
    return offset.reshape(n, ho, wo, g, p, 2), mask.reshape(n, ho, wo, g, p)


def dcnv3(cfg: DCNConfig, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DCNv3 reference. x: (N, H, W, G*C); offset: (N, Ho, Wo, G*P*2); mask: (N, Ho, Wo, G*P)."""
    check_tensors("dcnv3", cfg, x, offset, mask)
    return dcn_core(cfg, x, *split_dcnv3(cfg, offset, mask))


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

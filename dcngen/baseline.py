"""The speed baseline: DCNv3/DCNv4 in PyTorch through `F.grid_sample`, the formulation of the official
DCNv3 PyTorch fallback. `dcngen bench` and the benchmark scripts time the kernels against it.

It gives the results of `dcngen.reference` (tests/test_reference.py compares them) except for the
offset gradient of a sample exactly on a pixel line, where grid_sample's coordinate normalisation
can round to the other side; it is the faster of the two (about 2x on a CPU), as it never holds the
corner rows in memory. Same arguments and shapes as the reference's functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DCNConfig
from .reference import live_samples, split_dcnv3, split_offset_mask
from .shapes import check_tensors


def dcn_core(cfg: DCNConfig, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x: (N, H, W, G*C); offset: (N, Ho, Wo, G, P, 2) as (x, y); mask: (N, Ho, Wo, G, P) -> (N, Ho, Wo, G*C)."""
    n, h, w, _ = x.shape
    g, c = cfg.group, cfg.group_channels
    _, ho, wo, _, p, _ = offset.shape
    loc, mask = live_samples(cfg, offset, mask, h, w)
    size = torch.tensor([w, h], dtype=loc.dtype, device=loc.device)
    grid = 2 * (loc + 0.5) / size - 1  # align_corners=False normalisation
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * g, ho * wo, p, 2)
    value = x.reshape(n, h, w, g, c).permute(0, 3, 4, 1, 2).reshape(n * g, c, h, w)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (N*G, C, Ho*Wo, P)
    weights = mask.permute(0, 3, 1, 2, 4).reshape(n * g, 1, ho * wo, p)
    out = (sampled * weights).sum(-1)  # (N*G, C, Ho*Wo)
    return out.view(n, g, c, ho, wo).permute(0, 3, 4, 1, 2).reshape(n, ho, wo, g * c)


def dcnv4(cfg: DCNConfig, x: torch.Tensor, offset_mask: torch.Tensor) -> torch.Tensor:
    """x: (N, H, W, G*C); offset_mask: (N, Ho, Wo, >= G*P*3) -> (N, Ho, Wo, G*C)."""
    check_tensors("dcnv4", cfg, x, offset_mask)
    return dcn_core(cfg, x, *split_offset_mask(cfg, offset_mask))


def dcnv3(cfg: DCNConfig, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x: (N, H, W, G*C); offset: (N, Ho, Wo, G*P*2); mask: (N, Ho, Wo, G*P) -> (N, Ho, Wo, G*C)."""
    check_tensors("dcnv3", cfg, x, offset, mask)
    return dcn_core(cfg, x, *split_dcnv3(cfg, offset, mask))

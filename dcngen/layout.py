"""Where each op keeps point k's offset and weight inside one pixel's row (the generated kernels' view)."""

from __future__ import annotations

from dataclasses import dataclass

from .config import DCNConfig


@dataclass(frozen=True)
class OffsetLayout:
    """offset(x) of group g, point k at `g*offset_group_stride + offset_base + 2k` (y at +1);
    weight at `g*mask_group_stride + mask_base + k`; the pixel stride is the tensor's last dim, at
    least the row channels the groups use (DCNv4's packed rows may pad past them)."""

    offset_group_stride: int
    offset_base: int
    mask_group_stride: int
    mask_base: int
    offset_row_channels: int
    mask_row_channels: int


def offset_layout(cfg: DCNConfig) -> OffsetLayout:
    p, g = cfg.num_points, cfg.group
    if cfg.op == "dcnv4":  # one packed tensor: [g: x0 y0 ... x(P-1) y(P-1) m0 ... m(P-1)]
        return OffsetLayout(3 * p, 0, 3 * p, 2 * p, 3 * p * g, 3 * p * g)
    return OffsetLayout(2 * p, 0, p, 0, 2 * p * g, p * g)  # dcnv3: separate offset [g][k][x, y] and mask [g][k]

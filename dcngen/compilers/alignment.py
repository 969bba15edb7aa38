"""Tensors whose data pointers meet a kernel's alignment: torch's allocations are aligned (64 bytes
on the CPU, 256 on CUDA), but a view that starts part-way into its storage need not be."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def aligned(tensors: tuple, align: int) -> tuple:
    """`tensors`, each replaced by an aligned copy where its data pointer is not `align`-byte
    aligned; a tensor passed twice (DCNv4's packed offset and mask) stays one tensor."""
    copies = {}
    return tuple(t if t.data_ptr() % align == 0 else copies.setdefault(id(t), t.clone()) for t in tensors)


@contextlib.contextmanager
def aligned_outputs(tensors: tuple, align: int) -> Iterator[tuple]:
    """Outputs for a kernel to write: `tensors` where aligned, else aligned copies, copied back
    into `tensors` when the block ends without an error."""
    stand_ins = aligned(tensors, align)
    yield stand_ins
    done = set()
    for t, s in zip(tensors, stand_ins):
        if s is not t and id(t) not in done:
            done.add(id(t))
            t.copy_(s)


def copy_on_boundary(t, boundary: int = 256):
    """A contiguous copy of tensor t whose data starts on a `boundary`-byte address, as CUDA
    allocations do (256 bytes): host runs of a kernel then see the device's cache-line pattern."""
    import torch  # noqa: PLC0415

    nbytes = t.numel() * t.element_size()
    buffer = torch.empty(nbytes + boundary, dtype=torch.uint8, device=t.device)
    start = -buffer.data_ptr() % boundary
    out = buffer[start : start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out

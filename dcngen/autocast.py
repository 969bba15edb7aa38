"""Autocast for `dcngen::dcnv4` / `dcngen::dcnv3`: importing this module registers it.

Under `torch.autocast(device_type)` the ops cast their fp32/fp16/bf16 inputs to
`torch.get_autocast_dtype(device_type)` (fp16 or bf16: both have kernels on the CPU and on CUDA)
and run below autocast. The kernels accumulate in fp32; the output, and so every gradient the
backward op computes, has the cast dtype (autograd casts the gradients back to the dtypes of the
original inputs). float64 inputs are left alone.
"""

from __future__ import annotations

import torch

from . import ops  # noqa: F401  (defines the ops this module registers for)

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)

_lib = torch.library.Library("dcngen", "IMPL")


def cast_dtype(device_type: str, tensors) -> torch.dtype | None:
    """The dtype the op runs in under autocast on `device_type`, or None to leave the inputs as they are."""
    if any(t.dtype == torch.float64 for t in tensors) or not all(t.dtype in _CASTABLE for t in tensors):
        return None
    return torch.get_autocast_dtype(device_type)


def _register(name: str, num_tensors: int, device_type: str, key: str) -> None:
    op = getattr(torch.ops.dcngen, name).default

    def autocast_impl(*args):
        tensors, rest = args[:num_tensors], args[num_tensors:]
        dtype = cast_dtype(device_type, tensors)
        if dtype is not None:
            tensors = tuple(t.to(dtype) for t in tensors)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))):
            return op(*tensors, *rest)

    _lib.impl(name, autocast_impl, key)


for _device_type, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _register("dcnv4", 2, _device_type, _key)
    _register("dcnv3", 3, _device_type, _key)

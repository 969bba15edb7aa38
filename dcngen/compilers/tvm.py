"""TVMScript -> TVM llvm library; loaded through TVM's runtime (its parallel loops need TVM's
thread pool, which tvm_ffi.load_module alone does not provide)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..cpu_isas import ISAS
from ..errors import BuildError
from ..source import KernelSource
from . import LIBRARY, cpp
from .alignment import aligned, aligned_outputs


@functools.lru_cache(maxsize=1)
def version() -> str:
    """TVM's version."""
    import tvm

    return f"tvm {tvm.__version__}"


def built_for(source: KernelSource) -> str:
    """This CPU where the llvm target is the host's; nothing for a named instruction set."""
    return "" if _target(source).get("mcpu") in ISAS else cpp.host_cpu()


def _target(source: KernelSource) -> dict:
    for flag in source.flags:
        if flag.startswith("target="):
            return json.loads(flag[len("target=") :])
    return {"kind": "llvm"}


def compile(source: KernelSource, out_dir: Path) -> dict:
    """Parse the TVMScript text back into an IRModule, compile it for llvm, export kernel.so."""
    import tvm
    from tvm.script import from_source

    src_path = str(out_dir / f"kernel{source.suffix}")
    try:
        mod = from_source(source.text)
    except Exception as e:  # parser errors carry the offending line
        raise BuildError("TVMScript did not parse", command="tvm.script.from_source", source_path=src_path, log=str(e)) from None
    target = _target(source)
    try:
        ex = tvm.compile(mod, target=target)
        ex.export_library(str(out_dir / LIBRARY))
    except Exception as e:
        raise BuildError("TVM compilation failed", command=f"tvm.compile(target={target})", source_path=src_path, log=str(e)) from None
    return {"tvm_target": target}


class _Module:
    """forward/backward with the shared kernel ABI over TVM's functions.

    forward(x, offset, mask, out); backward(x, offset, mask, grad_out, grad_x, grad_offset, grad_mask).
    x (N, H, W, G*C); DCNv4: offset and mask are the same packed (N, Ho, Wo, Cpad) tensor (and
    grad_offset / grad_mask the same gradient tensor); DCNv3: offset (N, Ho, Wo, G*P*2), mask
    (N, Ho, Wo, G*P). TVM's functions take each distinct tensor once, outputs last.
    """

    def __init__(self, path: Path):
        _use_all_cores()
        import tvm

        self._mod = tvm.runtime.load_module(str(path))
        self._fwd = self._mod["forward"]
        self._bwd = self._mod["backward"]
        try:
            config = json.loads((Path(path).parent / "meta.json").read_text())["config"]
        except (OSError, ValueError, KeyError):
            config = None  # loaded outside an artifact: decide per call, check what can be
        self.op = config["op"] if config else None
        self.rows = None
        if config:
            from ..config import DCNConfig
            from ..layout import offset_layout

            lay = offset_layout(DCNConfig(**config))
            self.rows = (lay.offset_row_channels, lay.mask_row_channels)

    def _packed(self, offset, mask) -> bool:
        return self.op == "dcnv4" if self.op else offset is mask

    def _check(self, *tensors) -> None:
        """What TVM's own argument checks leave out: its CPU kernels index in 32 bits, and read each
        pixel's offset / mask row up to the groups' span."""
        from ..errors import InputError

        for t in tensors:
            if t.numel() >= 1 << 31:
                raise InputError(f"the TVM backend's CPU kernels index in 32 bits: a tensor of {t.numel()} elements is too large (use backend='template')")
        if self.rows and (tensors[1].shape[-1] < self.rows[0] or tensors[2].shape[-1] < self.rows[1]):
            raise InputError(f"offset and mask rows must hold at least {self.rows[0]} and {self.rows[1]} channels, "
                             f"got {tensors[1].shape[-1]} and {tensors[2].shape[-1]}")

    def forward(self, x, offset, mask, out):
        self._check(x, offset, mask, out)
        x, offset, mask = aligned((x, offset, mask), BUFFER_ALIGN)
        with aligned_outputs((out,), BUFFER_ALIGN) as (out,):
            if self._packed(offset, mask):
                self._fwd(x, offset, out)
            else:
                self._fwd(x, offset, mask, out)

    def backward(self, x, offset, mask, grad_out, grad_x, grad_offset, grad_mask):
        self._check(x, offset, mask, grad_out)
        x, offset, mask, grad_out = aligned((x, offset, mask, grad_out), BUFFER_ALIGN)
        with aligned_outputs((grad_x, grad_offset, grad_mask), BUFFER_ALIGN) as (grad_x, grad_offset, grad_mask):
            if self._packed(offset, mask):
                self._bwd(x, offset, grad_out, grad_x, grad_offset)
            else:
                self._bwd(x, offset, mask, grad_out, grad_x, grad_offset, grad_mask)


# TVM's buffers default to its allocation alignment, and its llvm code issues aligned vector accesses
# on that promise: an offset view (e.g. x[1:] of a flat buffer) would fault.
BUFFER_ALIGN = 64


def _use_all_cores() -> None:
    """TVM's thread pool defaults to half the logical CPUs on x86 (it assumes hyper-threads) and
    sizes itself once, when first used; the template backend's OpenMP uses every CPU. Unless the
    user set TVM_NUM_THREADS, give TVM's pool every CPU this process may run on (no effect if
    the pool already exists)."""
    if "TVM_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def load(path: Path) -> _Module:
    return _Module(path)

"""IR-building helpers shared by every TVM definition: symbolic sizes, accumulation type,
per-thread scratch and the scalar `bind` that keeps expressions small."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import te, tirx
from tvm.script.ir_builder import tirx as T

from ..config import DCNConfig


def acc_dtype(dtype: str) -> str:
    """Accumulation type: fp64 for fp64, fp32 for everything else."""
    return "float64" if dtype == "float64" else "float32"


@dataclass(frozen=True)
class Shapes:
    """The symbolic sizes shared by every function of one artifact."""

    N: tvm.tirx.Var
    H: tvm.tirx.Var
    W: tvm.tirx.Var
    Ho: tvm.tirx.Var
    Wo: tvm.tirx.Var
    Cpad: tvm.tirx.Var


def shapes() -> Shapes:
    return Shapes(*(te.var(name) for name in ("N", "H", "W", "Ho", "Wo", "Cpad")))


def _local_scope(cfg: DCNConfig) -> str:
    """Scope of small per-thread buffers: "local" (registers) on CUDA; on llvm "global", which
    TVM turns into a stack alloca for constant sizes ("local" becomes a heap workspace call)."""
    return "local" if cfg.is_cuda else "global"


def alloc(cfg: DCNConfig, shape, dtype):
    return T.buffer_proxy(T.alloc_buffer(shape, dtype, scope=_local_scope(cfg)))


def scalar_binder(cfg: DCNConfig):
    """The imperative `bind`: keep a value in a one-element per-thread buffer, return its load.

    Not T.bind: TVM's simplifier substitutes bound variables back into their uses, and the
    window tests then blow compile times up to tens of seconds; a buffer load is opaque to it
    and free after LLVM / NVCC register promotion. Booleans are stored as int32.
    """

    def bind(value):
        if str(value.ty) == "bool":
            buf = alloc(cfg, (1,), "int32")
            buf[0] = tirx.Cast("int32", value)
            return buf[0] != 0
        buf = alloc(cfg, (1,), str(value.ty))
        buf[0] = value
        return buf[0]

    return bind


def proxies(bufs):
    return [T.buffer_proxy(b) for b in bufs]

"""TVM backend: DCNConfig -> KernelSource (text only; TVM is used as a library, nothing touches disk).

CPU: the TVMScript of the IRModule {forward, backward} built by dcngen/tvm_defs/ with the
llvm schedule parameters (language "tvm"; dcngen/compilers/tvm.py parses it back and compiles
it for llvm). CUDA: TVM compiles the same definitions for the CUDA target and we take its
CUDA source plus a launcher of our own with the template backend's tvm-ffi ABI (language
"cuda", built by nvcc; runs without TVM).
"""

from __future__ import annotations

import functools
import importlib.util
import json

from ..config import DCNConfig
from ..errors import ConfigError
from ..settings import SCHEDULE_DIR
from ..source import KernelSource
from .jinja import resolve_params


@functools.lru_cache(maxsize=None)
def schedule_module(target: str):
    """schedules/<target>.py ("llvm" or "cuda"), loaded by path (it is not a package)."""
    path = SCHEDULE_DIR / f"{target}.py"
    spec = importlib.util.spec_from_file_location(f"dcngen_schedules_{target}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def params_for(cfg: DCNConfig) -> dict[str, int]:
    """Schedule parameters: the schedule's heuristic defaults, overridden by cfg.params (validated;
    tuning records reach the generator as cfg.params, see dcngen/records.py)."""
    sched = schedule_module("cuda" if cfg.is_cuda else "llvm")
    params = resolve_params(cfg, sched.default_params(cfg), sched.PARAM_BOUNDS)
    if cfg.is_cuda and params["vec"] not in (widths := sched.vector_widths(cfg)):
        raise ConfigError("params", f"vec={params['vec']} must be a power of two dividing group_channels={cfg.group_channels}, "
                                    f"at most {sched.VECTOR_BYTES} bytes of {cfg.dtype}: one of {', '.join(map(str, widths))}")
    return params


def llvm_target(cfg: DCNConfig) -> dict:
    """cfg's llvm target: its named x86-64 level, or TVM's own name for this CPU (target 'cpu'), so
    the CPU's vector ISA is used."""
    if cfg.cpu_isa:
        return {"kind": "llvm", "mcpu": cfg.cpu_isa}
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}


def ir_module(cfg: DCNConfig, params: dict):
    """IRModule {forward, backward} for cfg with the given schedule parameters."""
    import tvm

    from .. import tvm_defs

    return tvm.IRModule({"forward": tvm_defs.forward(cfg, params), "backward": tvm_defs.backward(cfg, params)})


def generate(cfg: DCNConfig) -> KernelSource:
    params = params_for(cfg)
    if cfg.is_cuda:
        from . import tvm_cuda

        return tvm_cuda.generate(cfg, params)
    target = llvm_target(cfg)
    text = ir_module(cfg, params).script()
    return KernelSource(
        config=cfg,
        language="tvm",
        text=text,
        flags=("target=" + json.dumps(target, sort_keys=True),),
        params=tuple(sorted(params.items())),
        extra=json.dumps({"tvm_target": target}),
    )

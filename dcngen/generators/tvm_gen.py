"""TVM backend: DCNConfig -> KernelSource (text only; TVM is used as a library, nothing touches disk).

CPU: the TVMScript of the IRModule {forward, backward} built by dcngen/tvm_defs.py with the
llvm schedule parameters (language "tvm"; dcngen/compilers/tvm.py parses it back and compiles
it for llvm). CUDA: TVM compiles the same definitions for the CUDA target and we take its
CUDA source plus a launcher of our own with the template backend's tvm-ffi ABI (language
"cuda", built by nvcc; runs without TVM).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from ..config import DCNConfig
from ..errors import ConfigError
from ..settings import REPO_ROOT
from ..source import KernelSource
from .jinja import resolve_params

SCHEDULE_DIR = REPO_ROOT / "schedules"


@functools.lru_cache(maxsize=None)
def schedule_module(target: str):
    """schedules/<target>.py ("llvm" or "cuda"), loaded by path (it is not a package)."""
    path = SCHEDULE_DIR / f"{target}.py"
    spec = importlib.util.spec_from_file_location(f"dcngen_schedules_{target}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(cfg: DCNConfig, target: str) -> dict:
    """Tuned parameters for cfg from schedules/records/<target>.json ({config key: {param: value}})."""
    path = SCHEDULE_DIR / "records" / f"{target}.json"
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    entry = records.get(cfg.replace(params=()).key, {})
    return dict(entry.get("params", entry)) if isinstance(entry, dict) else {}


def params_for(cfg: DCNConfig) -> dict[str, int]:
    """Schedule parameters: heuristic defaults < tuning record < cfg.params (validated)."""
    target = "cuda" if cfg.is_cuda else "llvm"
    sched = schedule_module(target)
    defaults = {**sched.default_params(cfg), **_record(cfg, target)}
    params = resolve_params(cfg, defaults, sched.PARAM_BOUNDS)
    if cfg.is_cuda and cfg.group_channels % params["vec"]:
        raise ConfigError("params", f"vec={params['vec']} must divide group_channels={cfg.group_channels}")
    return params


def llvm_target() -> dict:
    """The host llvm target: TVM's own name for this CPU, so its vector ISA is used."""
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
    target = llvm_target()
    text = ir_module(cfg, params).script()
    return KernelSource(
        config=cfg,
        language="tvm",
        text=text,
        flags=("target=" + json.dumps(target, sort_keys=True),),
        params=tuple(sorted(params.items())),
        extra=json.dumps({"tvm_target": target, "op": cfg.op}),
    )

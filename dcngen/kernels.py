"""The in-process table of loaded kernels: DCNConfig -> loaded artifact, built on first use (JIT)."""

from __future__ import annotations

import functools
import threading

import torch

from . import settings
from .build import Artifact, build, load
from .config import DCNConfig, canonical_target
from .errors import ConfigError, DCNGenError
from .generators import generate, template_cuda
from .records import bucket, tuned_config

_loaded: dict[DCNConfig, object] = {}
_lock = threading.Lock()


def build_config(cfg: DCNConfig) -> Artifact:
    """Generate and build (or find in the cache) the artifact of `cfg`.

    A CUDA template forward whose automatic register cap made ptxas spill is built again with the
    cap one resident block per SM lower, until it does not spill or is uncapped: the cap is sized
    for sm_80/sm_90, and other targets' code can need more registers."""
    art = build(generate(cfg))
    if not template_cuda.automatic_register_cap(cfg):
        return art
    while template_cuda.forward_spills(art.meta["ptxas"]) and art.meta["params"]["min_blocks"] > 1:
        art = build(generate(cfg.replace(params={**cfg.param_dict, "min_blocks": art.meta["params"]["min_blocks"] - 1})))
    return art


def kernel_for(cfg: DCNConfig, shape: tuple[int, int, int] | None = None):
    """The loaded kernel of `cfg` (`.forward`, `.backward`), building it on first use.

    With the input's (N, H, W) `shape` and no cfg.params, the parameters come from the tuning
    record of the nearest shape bucket (dcngen/records.py), else from the generator's heuristic."""
    if shape is not None and not cfg.params:
        cfg = tuned_config(cfg, bucket(shape))
    mod = _loaded.get(cfg)
    if mod is None:
        with _lock:
            mod = _loaded.get(cfg)
            if mod is None:
                mod = _loaded[cfg] = load(build_config(cfg))
    return mod


def emulated_kernel(cfg: DCNConfig):
    """cfg's CUDA template kernels built for the SIMT emulator and loaded (CPU tensors; the cache
    as for any artifact)."""
    return load(build(template_cuda.generate(cfg, emulate=True)))


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"cuda:sm_{major}{minor}"


@functools.lru_cache(maxsize=1)
def _cpu_target() -> str:
    name = settings.cpu_target()
    try:
        if name.lower().startswith("cpu"):
            return canonical_target(name)
        reason = "expected 'cpu' or 'cpu:<isa>'"
    except ConfigError as e:
        reason = e.reason
    raise DCNGenError(f"DCNGEN_CPU_TARGET={name!r} is not a CPU target: {reason}")


def target_of(device: torch.device) -> str:
    """The DCNConfig target for tensors on `device` (CPU: settings.cpu_target())."""
    if device.type == "cpu":
        return _cpu_target()
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())
    raise ValueError(f"dcngen has no kernels for device type {device.type!r}")

"""Generators turn a DCNConfig into a KernelSource (text only: no disk, no compiler)."""

from __future__ import annotations

import functools
import importlib

from ..config import DCNConfig
from ..source import KernelSource

# (backend, device kind) -> module with `generate(cfg) -> KernelSource`
_GENERATORS = {
    ("template", "cpu"): "template_cpu",
    ("template", "cuda"): "template_cuda",
    ("tvm", "cpu"): "tvm_gen",
    ("tvm", "cuda"): "tvm_gen",
}


@functools.lru_cache(maxsize=None)
def _module(backend: str, device: str):
    return importlib.import_module(f"{__name__}.{_GENERATORS[(backend, device)]}")


def _generator(cfg: DCNConfig):
    """The generator module of cfg's backend for its target."""
    return _module(cfg.backend, "cuda" if cfg.is_cuda else "cpu")


def generate(cfg: DCNConfig) -> KernelSource:
    """Generate the kernel source of `cfg` with its backend for its target."""
    return _generator(cfg).generate(cfg)


def backward_zeroes_padding(cfg: DCNConfig) -> bool:
    """Whether cfg's backward kernel writes the DCNv4 offset_mask gradient's padding channels (with
    zeros); otherwise it leaves them untouched and the op zeroes them."""
    return getattr(_generator(cfg), "BACKWARD_ZEROES_PADDING", False)

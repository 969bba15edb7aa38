"""Generators turn a DCNConfig into a KernelSource (text only: no disk, no compiler)."""

from __future__ import annotations

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


def generate(cfg: DCNConfig) -> KernelSource:
    """Generate the kernel source of `cfg` with its backend for its target."""
    module = _GENERATORS[(cfg.backend, "cuda" if cfg.is_cuda else "cpu")]
    return importlib.import_module(f"{__name__}.{module}").generate(cfg)

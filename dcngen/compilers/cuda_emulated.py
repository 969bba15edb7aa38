"""CUDA template sources on the SIMT emulator (templates/cuda/emulator.h.j2): one host C++ build
through tvm-ffi's builder, with the CUDA toolkit's headers for the fp16/bf16 types. The library
has the CUDA artifact's entry points and is called like it, with CPU tensors."""

from __future__ import annotations

from pathlib import Path

from ..source import KernelSource
from . import cpp, cuda
from .cpp import SANITIZE_LDFLAGS  # noqa: F401  (DCNGEN_SANITIZE=1 builds it sanitized too)

# the host compiler's sanitizer flags at -O0: the emulated source builds 2.4x faster, and every check stays
SANITIZE_FLAGS = (*(f for f in cpp.SANITIZE_FLAGS if not f.startswith("-O")), "-O0")


def version() -> str:
    return f"{cpp.version()} | {cuda.version()}"


def built_for(source: KernelSource) -> str:
    return cpp.built_for(source)


def compile(source: KernelSource, out_dir: Path) -> dict:
    return cpp.compile(source, out_dir, include_paths=(str(Path(cuda.cuda_home(), "include")),), sanitize_flags=SANITIZE_FLAGS)


def load(path: Path, sanitized: bool = False):
    """The CUDA artifact's module (same entry points and calling convention), on CPU tensors."""
    if sanitized:
        cpp.require_asan_runtime(path)
    return cuda.load(path)

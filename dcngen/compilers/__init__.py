"""One module per source language: `version()` (the toolchain's, which must be present),
`built_for(source)` (what a library is specific to beyond its source and flags, such as the host CPU),
`compile(source, out_dir) -> metadata`, `load(path, ...)`.

`compile` writes `out_dir/<LIBRARY>` and returns JSON-able metadata (e.g. the ptxas report);
`load` returns an object whose `forward`/`backward` take torch tensors (see ops.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType

LIBRARY = "kernel.so"


def compiler_for(language: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{language}")


def tvm_ffi_include_paths() -> list[str]:
    """The include folders of tvm-ffi's C++ headers and of DLPack's, as tvm-ffi's builder passes them."""
    from tvm_ffi import libinfo

    return [libinfo.find_include_path(), libinfo.find_dlpack_include_path()]

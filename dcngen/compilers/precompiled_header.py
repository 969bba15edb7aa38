"""GCC's precompiled form of the tvm-ffi headers (templates/common/tvm_ffi.h) for host builds.

Parsing those headers takes about 0.65 s of every host build: a fifth of a CPU kernel's, a
quarter of an emulated CUDA kernel's (benchmarks/build_times.py). The second compile with a set of flags precompiles them for
that set (once per compiler, flags and tvm-ffi headers, into `<cache>/.pch/<key>/`, about 70 MB)
and takes them with `-include`, as do all later ones. GCC reads the header text instead wherever
the precompiled form does not fit the compile, so it is an optimisation only: where it cannot be
built (clang, a read-only cache, any error) compiles go without it; a compiler that fails to
precompile them is not asked again (its message stays in `<key>.failed`).
DCNGEN_PRECOMPILED_HEADER=0 turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

from filelock import FileLock, Timeout

from .. import settings
from . import tvm_ffi_include_paths

HEADER = settings.TEMPLATE_DIR / "common" / "tvm_ffi.h"
FOLDER = ".pch"  # in the cache root
# the flags tvm-ffi's ninja builder puts before a build's own (tvm_ffi.cpp.build_inline)
TVM_FFI_CXXFLAGS = ("-std=c++17", "-fPIC", "-O2")
log = logging.getLogger(__name__)


def include_flags(cxx: tuple[str, ...], compiler_version: str, cflags: list[str]) -> list[str]:
    """['-include', <header>] for a tvm-ffi host compile by `cxx` with `cflags` (after tvm-ffi's
    own), the header's precompiled form beside it (built now from the second such compile on);
    [] where there is none."""
    if not settings.precompiled_header() or "clang" in compiler_version.lower():
        return []
    include_paths = tvm_ffi_include_paths()
    key = _key(cxx, compiler_version, cflags, include_paths)
    root = settings.cache_root().absolute() / FOLDER  # absolute: the builder compiles in its own folder
    folder = root / key
    if not (folder / f"{HEADER.name}.gch").is_file():
        first, failed = root / f"{key}.first", root / f"{key}.failed"
        try:
            if not first.is_file():  # a flag set's first compile goes without: it may be its only one
                root.mkdir(parents=True, exist_ok=True)
                first.touch()
                return []
            if failed.is_file():
                return []
            _build(cxx, [*TVM_FFI_CXXFLAGS, *cflags, *(f"-I{p}" for p in include_paths)], root, key)
        except subprocess.CalledProcessError as e:  # not tried again for this key: the compiler's message is kept
            log.info("the compiler cannot precompile the tvm-ffi headers, each compile parses them: %s", failed)
            with contextlib.suppress(OSError):
                failed.write_text(f"{shlex.join(e.cmd)}\n{e.stderr}")
            return []
        except (OSError, subprocess.SubprocessError, Timeout) as e:
            log.info("no precompiled tvm-ffi headers (%s), the compile parses them", e)
            return []
    return ["-include", str(folder / HEADER.name)]


def _key(cxx: tuple[str, ...], compiler_version: str, cflags: list[str], include_paths: list[str]) -> str:
    """Hash of what the precompiled form depends on; the headers by path, size and mtime (GCC does
    not check that a header changed since it was precompiled)."""
    headers = sorted(
        (str(path), stat.st_size, stat.st_mtime_ns)
        for folder in include_paths
        for path in Path(folder).rglob("*")
        if path.is_file() and (stat := path.stat())
    )
    parts = [list(cxx), compiler_version, list(TVM_FFI_CXXFLAGS), cflags, HEADER.read_text(), headers]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _build(cxx: tuple[str, ...], flags: list[str], root: Path, key: str) -> None:
    """Precompile HEADER into root/key under the key's lock, published with one rename."""
    locks = root.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with FileLock(str(locks / f"pch-{key}.lock"), timeout=600):
        if (root / key / f"{HEADER.name}.gch").is_file():
            return
        shutil.rmtree(root / key, ignore_errors=True)  # a folder without it, left by hand
        stage = root / f".stage-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            shutil.copyfile(HEADER, stage / HEADER.name)
            subprocess.run([*cxx, *flags, "-x", "c++-header", str(stage / HEADER.name), "-o", str(stage / f"{HEADER.name}.gch")],
                           check=True, capture_output=True, text=True, timeout=600)
            os.replace(stage, root / key)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

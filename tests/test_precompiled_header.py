"""The precompiled tvm-ffi headers of host builds (dcngen/compilers/precompiled_header.py): taken by
tvm-ffi's real builder for CPU and emulated CUDA kernels from a set of flags' second compile on,
removed by clean, off with DCNGEN_PRECOMPILED_HEADER=0, and never needed: a compile whose
precompiled header went away parses the headers instead."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dcngen.build import build, clean, load
from dcngen.compilers import cpp, precompiled_header
from dcngen.generators import generate
from dcngen.generators.template_cuda import generate as generate_cuda
from helpers import check_library_forward, fresh_config, needs_cuda_toolkit

pytestmark = pytest.mark.skipif("clang" in cpp.version().lower(), reason="GCC's precompiled headers only")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DCNGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DCNGEN_SANITIZE", raising=False)
    monkeypatch.delenv("DCNGEN_PRECOMPILED_HEADER", raising=False)
    return tmp_path / "cache"


def included_header(meta: dict) -> Path | None:
    flags = meta["cflags"]
    return Path(flags[flags.index("-include") + 1]) if "-include" in flags else None


@pytest.mark.parametrize("kind", ["cpu", pytest.param("emulated", marks=needs_cuda_toolkit)])
def test_host_builds_take_the_precompiled_headers_from_the_second_on_and_clean_removes_them(cache, kind):
    def source():
        if kind == "cpu":
            src = generate(fresh_config())
        else:
            src = generate_cuda(fresh_config(dtype="float16", target="cuda:sm_90"), emulate=True)
        # an unusable precompiled header is an error here, not a silent parse of the headers
        return dataclasses.replace(src, flags=(*src.flags, "-Winvalid-pch", "-Werror=invalid-pch"))

    assert included_header(build(source()).meta) is None, "a set of flags' first compile goes without"
    second = source()
    art = build(second)
    header = included_header(art.meta)
    assert header is not None and header.parent.parent == cache / precompiled_header.FOLDER, art.meta["cflags"]
    assert Path(f"{header}.gch").is_file() and header.read_text() == precompiled_header.HEADER.read_text()
    if kind == "cpu":
        check_library_forward(second.config, load(art))
    clean()
    assert not (cache / precompiled_header.FOLDER).exists()


def test_turned_off_by_the_environment(cache, monkeypatch):
    monkeypatch.setenv("DCNGEN_PRECOMPILED_HEADER", "0")
    for _ in range(2):
        cfg = fresh_config()
        art = build(generate(cfg))
        assert included_header(art.meta) is None and not (cache / precompiled_header.FOLDER).exists()
    check_library_forward(cfg, load(art))


def test_a_precompiled_header_gone_meanwhile_costs_only_time(cache, tmp_path, monkeypatch):
    gone = tmp_path / "removed-by-clean" / precompiled_header.HEADER.name
    monkeypatch.setattr(precompiled_header, "include_flags", lambda *args: ["-include", str(gone)])
    cfg = fresh_config()
    art = build(generate(cfg))
    assert included_header(art.meta) is None
    check_library_forward(cfg, load(art))


def test_a_header_the_compiler_cannot_precompile_is_not_tried_again(cache, tmp_path, monkeypatch):
    broken = tmp_path / precompiled_header.HEADER.name
    broken.write_text("#error this header does not compile\n")
    monkeypatch.setattr(precompiled_header, "HEADER", broken)
    attempts = []
    real_build = precompiled_header._build
    monkeypatch.setattr(precompiled_header, "_build", lambda *args: attempts.append(args) or real_build(*args))
    flags = list(generate(fresh_config()).flags)
    for _ in range(3):
        assert precompiled_header.include_flags(cpp.host_cxx(), cpp.version(), flags) == []
    assert len(attempts) == 1, "the first compile goes without, the second tries, the third knows it fails"
    (failed,) = (cache / precompiled_header.FOLDER).glob("*.failed")
    assert "this header does not compile" in failed.read_text()

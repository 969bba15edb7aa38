"""The artifact cache under stress: concurrent builders, corrupt artifacts, read-only and full
caches, compiler failures. Every test uses its own DCNGEN_CACHE and a config with a fresh
offset_scale, so each one forces a real build."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

import dcngen.build as build_mod
from dcngen import reference
from dcngen.build import artifact_key, build, cache_dir, list_artifacts, load, lookup
from dcngen.config import DCNConfig
from dcngen.errors import BuildError, CacheError
from dcngen.generators import generate
from dcngen.source import KernelSource
from helpers import check_library_forward, fresh_config, needs_cuda_toolkit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("DCNGEN_CACHE", str(root))
    monkeypatch.delenv("DCNGEN_SANITIZE", raising=False)
    monkeypatch.setenv("DCNGEN_PRECOMPILED_HEADER", "0")  # its own tests: test_precompiled_header.py
    monkeypatch.setattr(build_mod, "_fallback_warned", set())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))  # the fallback cache lives under gettempdir()
    return root


def artifact_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def leftovers(root: Path) -> list[Path]:
    return sorted(root.glob(".stage-*"))


# ---- concurrency ----------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")  # each compile: "dcngen.build building ..."
    start = Path(sys.argv[1])
    from dcngen.build import build, load  # no torch: the workers only build and load
    from dcngen.config import DCNConfig
    from dcngen.generators import generate
    cfg = DCNConfig(op="dcnv4", group=2, group_channels=4, dtype="float64", offset_scale=float(sys.argv[2]))
    source = generate(cfg)
    while not start.exists():
        time.sleep(0.005)
    art = build(source)
    load(art)
    print("ARTIFACT", art.path)
    """
)


def test_concurrent_builders_share_one_artifact(cache, tmp_path):
    """8 processes build the same new config at once: all succeed, one compiles it (the others wait
    for it under the key's lock), one artifact, no staging leftovers."""
    cfg = fresh_config()
    start = tmp_path / "go"
    env = dict(os.environ, DCNGEN_CACHE=str(cache), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(start), repr(cfg.offset_scale)], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    time.sleep(2.0)  # let them all import and wait at the barrier
    start.touch()
    results = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    paths = {line.split(" ", 1)[1] for out, _ in results for line in out.splitlines() if line.startswith("ARTIFACT ")}
    assert len(paths) == 1
    assert sum(err.count("dcngen.build building ") for _, err in results) == 1
    assert [str(p) for p in artifact_dirs(cache)] == list(paths)
    assert leftovers(cache) == []
    art = build_mod._published(Path(paths.pop()))
    assert art is not None and art.meta["config_key"] == cfg.key
    check_library_forward(cfg, load(art))


# ---- corruption -----------------------------------------------------------------------------------


def _truncate(art):
    data = art.library.read_bytes()
    art.library.write_bytes(data[: len(data) // 2])


def _flip_byte(art):
    data = bytearray(art.library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.library.write_bytes(bytes(data))


def _garbage_meta(art):
    (art.path / "meta.json").write_text("{not json")


def _missing_library(art):
    art.library.unlink()


def _missing_meta(art):
    (art.path / "meta.json").unlink()


def _empty_library(art):
    art.library.write_bytes(b"")


CORRUPTIONS = [_truncate, _flip_byte, _garbage_meta, _missing_library, _missing_meta, _empty_library]


def test_corrupt_artifacts_are_detected_and_rebuilt(cache):
    """Every kind of damage is detected (never served); a damaged artifact is rebuilt by the next build."""
    cfg = fresh_config()
    source = generate(cfg)
    first = build(source)
    sha = first.meta["library_sha256"]
    backup = cache / ".backup"
    shutil.copytree(first.path, backup)
    for corrupt in CORRUPTIONS:
        corrupt(first)
        assert lookup(source) is None, f"{corrupt.__name__}: a corrupt artifact must not be served"
        assert all(a.path != first.path for a in list_artifacts())
        shutil.rmtree(first.path)
        shutil.copytree(backup, first.path)
        assert lookup(source) is not None
    for corrupt in (_truncate, _garbage_meta):  # the rebuild path (one compiler run each)
        corrupt(first)
        again = build(source)
        assert again.path == first.path and again.meta["library_sha256"] == sha
        assert lookup(source) is not None
    check_library_forward(cfg, load(again))
    assert leftovers(cache) == []


def test_stale_staging_dir_of_a_killed_builder_is_removed(cache):
    cfg = fresh_config()
    source = generate(cfg)
    root = cache_dir()
    stale = root / f".stage-{artifact_key(source)}-killed"
    (stale / "build").mkdir(parents=True)
    (stale / "kernel.so").write_bytes(b"half")
    art = build(source)
    assert not stale.exists()
    assert artifact_dirs(root) == [art.path]


def test_clean_removes_only_what_dcngen_wrote_and_not_what_is_being_built(cache):
    from filelock import FileLock

    from dcngen.build import clean

    kept_art, removed_art = build(generate(fresh_config())), build(generate(fresh_config()))
    root = cache_dir()
    (root / "notes.txt").write_text("mine")
    (root / "myproject").mkdir()
    (root / "myproject" / "meta.json").write_text("{}")  # a meta.json does not make a folder an artifact
    stage = root / f".stage-{removed_art.path.name}-abc_12"  # left by a killed builder
    stage.mkdir()
    (root / ".failed").mkdir()
    (root / ".failed" / "x.cc").write_text("int")
    with FileLock(str(root / ".locks" / f"{kept_art.path.name}.lock")):  # a build of that key in progress
        assert clean(root) == (2, 1)
    assert kept_art.path.is_dir() and not removed_art.path.exists() and not stage.exists() and not (root / ".failed").exists()
    assert (root / "notes.txt").read_text() == "mine" and (root / "myproject").is_dir()


def test_parameters_equal_to_the_defaults_share_the_defaults_artifact(cache):
    """Naming the default parameters explicitly (as tune does for its baseline) gives the same
    kernel, so the same artifact, not a second build of it."""
    from dcngen.search import default_params

    cfg = fresh_config()
    implicit, explicit = generate(cfg), generate(cfg.replace(params=default_params(cfg)))
    assert implicit.config.key != explicit.config.key and artifact_key(implicit) == artifact_key(explicit)
    assert artifact_key(generate(cfg.replace(params={**default_params(cfg), "pixel_chunk": 7}))) != artifact_key(implicit)


def test_the_host_compiler_named_by_cxx_is_part_of_the_key(cache, tmp_path, monkeypatch):
    """$CXX picks the compiler tvm-ffi's builder runs; a library built by another one is another artifact."""
    wrapper = tmp_path / "my-cxx"
    wrapper.write_text('#!/bin/sh\nexec c++ -DBUILT_BY_WRAPPER "$@"\n')
    wrapper.chmod(0o755)
    source = generate(fresh_config())
    monkeypatch.delenv("CXX", raising=False)
    plain = artifact_key(source)
    monkeypatch.setenv("CXX", str(wrapper))
    art = build(source)
    assert art.path.name != plain and str(wrapper) in art.meta["compiler"]
    check_library_forward(source.config, load(art))


def test_cxx_may_carry_a_launcher_and_may_not_be_empty(cache, monkeypatch):
    """CXX='env c++' (a launcher, as ccache is) builds: tvm-ffi's ninja and dcngen's version probe
    both run the words. A set but empty CXX (ninja would run '-MMD ...') is a clear BuildError."""
    import dcngen.compilers.cpp as cpp

    source = generate(fresh_config())
    monkeypatch.setenv("CXX", "env c++")
    art = build(source)
    assert art.meta["compiler"].startswith(f"{shutil.which('env')} c++: ")
    check_library_forward(source.config, load(art))
    monkeypatch.setenv("CXX", " ")
    with pytest.raises(BuildError, match="CXX is set but empty"):
        cpp.version()


# ---- unusable caches ------------------------------------------------------------------------------


def make_readonly(path: Path) -> None:
    """Make `path` unwritable even for root (chmod, else the immutable attribute); skip if impossible."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o555)
    if _writable(path) and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    if _writable(path):
        undo_readonly(path)
        pytest.skip("cannot make a directory read-only here")


def undo_readonly(path: Path) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    os.chmod(path, 0o755)


def _writable(path: Path) -> bool:
    try:
        (path / ".w").touch()
        (path / ".w").unlink()
        return True
    except OSError:
        return False


def _op_forward(cfg: DCNConfig):
    import dcngen.ops as ops

    x = torch.randn(1, 5, 6, cfg.channels, dtype=torch.float64)
    om = torch.randn(1, 5, 6, cfg.padded_offset_mask_channels, dtype=torch.float64)
    out = ops.dcnv4(x, om, group=cfg.group, group_channels=cfg.group_channels, offset_scale=cfg.offset_scale)
    torch.testing.assert_close(out, reference.dcnv4(cfg, x, om))


def test_read_only_cache_falls_back_with_a_warning(cache):
    make_readonly(cache)
    try:
        cfg = fresh_config()
        with pytest.warns(RuntimeWarning, match="not usable"):
            _op_forward(cfg)  # through the op: JIT build lands in the fallback directory
        fallback = Path(tempfile.gettempdir()) / f"dcngen-cache-{os.getuid()}"
        assert any(p.name.startswith("dcnv4_float64_cpu_template_") for p in artifact_dirs(fallback))
        assert artifact_dirs(cache) == []
    finally:
        undo_readonly(cache)


def test_clean_of_an_unusable_cache_cleans_nothing_else(cache):
    """`dcngen clean` with an unwritable cache says so (exit 2); it does not clean the shared
    fallback folder in its place."""
    art = build(generate(fresh_config()))
    fallback = Path(tempfile.gettempdir()) / f"dcngen-cache-{os.getuid()}"
    shutil.copytree(art.path, fallback / art.path.name)
    make_readonly(cache)
    try:
        result = subprocess.run([sys.executable, "-m", "dcngen.cli", "clean", "--yes"], capture_output=True, text=True,
                                env={**os.environ, "DCNGEN_CACHE": str(cache), "TMPDIR": tempfile.gettempdir()})
        assert result.returncode == 2 and f"cannot clean the cache {cache}" in result.stderr, result.stderr
        assert artifact_dirs(fallback) == [fallback / art.path.name] and artifact_dirs(cache) == [art.path]
    finally:
        undo_readonly(cache)


def test_read_only_cache_still_serves_its_artifacts(cache, recwarn):
    cfg = fresh_config()
    source = generate(cfg)
    art = build(source)
    make_readonly(cache)
    try:
        again = build(source)
        assert again.path == art.path
        assert lookup(source) is not None
        check_library_forward(cfg, load(again))
        assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    finally:
        undo_readonly(cache)


def test_read_only_cache_is_listed(cache, recwarn):
    """`dcngen list` shows what a read-only cache serves, not only the (empty) fallback."""
    art = build(generate(fresh_config()))
    make_readonly(cache)
    try:
        assert art.path in [a.path for a in list_artifacts()]
    finally:
        undo_readonly(cache)


def test_artifacts_take_the_umask_mode(cache):
    """A published artifact is readable by the cache's other users (a shared cache, or one built by
    one user and copied for another): its folder takes the umask's mode, not mkdtemp's 0700."""
    old = os.umask(0o022)
    try:
        art = build(generate(fresh_config()))
    finally:
        os.umask(old)
    assert art.path.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in art.path.iterdir())


def test_no_writable_directory_is_a_clear_cache_error(cache):
    make_readonly(cache)
    make_readonly(Path(tempfile.gettempdir()))
    try:
        with pytest.raises(CacheError, match="writable"):
            build(generate(fresh_config()))
    finally:
        undo_readonly(Path(tempfile.gettempdir()))
        undo_readonly(cache)


def test_full_cache_falls_back_with_a_warning(cache, monkeypatch):
    """ENOSPC while publishing (simulated at the copy of the library into the staging directory)."""
    import dcngen.compilers.cpp as cpp

    real_copy = cpp.shutil.copy2

    def copy2(src, dst, *a, **kw):
        if str(dst).startswith(str(cache)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(cpp.shutil, "copy2", copy2)
    cfg = fresh_config()
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        art = build(generate(cfg))
    assert not str(art.path).startswith(str(cache))
    assert artifact_dirs(cache) == [] and leftovers(cache) == []
    check_library_forward(cfg, load(art))


@pytest.mark.skipif(os.geteuid() != 0 or not sys.platform.startswith("linux"), reason="needs to mount a tmpfs")
def test_really_full_cache_falls_back(cache):
    """A 64 KiB tmpfs as the cache: the compiler itself runs out of space."""
    cache.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        cfg = fresh_config()
        with pytest.warns(RuntimeWarning, match="not usable"):
            art = build(generate(cfg))
        assert not str(art.path).startswith(str(cache))
        assert artifact_dirs(cache) == [] and leftovers(cache) == []
        check_library_forward(cfg, load(art))
    finally:
        subprocess.run(["umount", str(cache)], capture_output=True)


# ---- compiler failures ----------------------------------------------------------------------------


def test_compiler_failure_reports_the_message_and_publishes_nothing(cache):
    cfg = fresh_config()
    good = generate(cfg)
    broken = KernelSource(config=cfg, language="cpp", text=good.text + "\nstatic int dcngen_broken = undeclared_name_42;\n",
                          flags=good.flags, params=good.params)
    with pytest.raises(BuildError) as info:
        build(broken)
    err = info.value
    assert "error:" in err.log and "undeclared_name_42" in err.log
    assert "host C++ compilation failed" in str(err) and "compiler output" in str(err)
    kept = Path(err.source_path)
    assert kept.is_file() and kept.read_text() == broken.text, "the failing source is kept for inspection"
    assert artifact_dirs(cache) == [] and leftovers(cache) == []
    assert lookup(broken) is None
    # the good source still builds afterwards
    check_library_forward(cfg, load(build(good)))


def test_artifact_key_covers_text_flags_and_sanitizer(cache, monkeypatch):
    src = generate(fresh_config())
    key = artifact_key(src)
    assert key.startswith("dcnv4_float64_cpu_template_")
    assert artifact_key(KernelSource(src.config, src.language, src.text + "\n", src.flags)) != key
    assert artifact_key(KernelSource(src.config, src.language, src.text, src.flags + ("-O1",))) != key
    monkeypatch.setenv("DCNGEN_SANITIZE", "0")  # off, as unset
    assert artifact_key(src) == key
    monkeypatch.setenv("DCNGEN_SANITIZE", "1")
    assert artifact_key(src) != key


def test_sanitized_library_is_refused_without_the_asan_runtime(cache, monkeypatch):
    """Loading an ASan library into a process without the ASan runtime would abort the interpreter."""
    import dcngen.compilers.cpp as cpp

    if cpp.asan_runtime_loaded():
        pytest.skip("this process runs with the ASan runtime")
    monkeypatch.setenv("DCNGEN_SANITIZE", "1")
    monkeypatch.setattr(cpp, "compile", lambda source, out_dir: (out_dir / "kernel.so").write_bytes(b"\0") and {"sanitize": True})
    art = build(generate(fresh_config()))
    assert art.meta["sanitize"] is True
    with pytest.raises(BuildError, match="LD_PRELOAD"):
        load(art)


# ---- libraries built elsewhere -------------------------------------------------------------------

WITHOUT_COMPILER = textwrap.dedent(
    """
    import json, pickle, sys
    from dcngen.errors import BuildError
    from dcngen.kernels import build_config
    built, missing = pickle.loads(bytes.fromhex(sys.argv[1]))
    path = str(build_config(built).path)
    try:
        build_config(missing)
        error = ""
    except BuildError as e:
        error = str(e)
    print(json.dumps({"path": path, "error": error}))
    """
)


@pytest.mark.parametrize("target", ["cpu", pytest.param("cuda:sm_90", marks=needs_cuda_toolkit)])
def test_machine_without_the_compiler_uses_libraries_built_elsewhere(cache, target):
    """A GPU machine without nvcc (or a host without a C++ compiler) finds a library built for the
    same source by another machine's compiler in its cache; a kernel not there fails naming the fix."""
    built, missing = fresh_config(target=target), fresh_config(target=target)
    art = build(generate(built))  # "elsewhere": this process, with the compiler
    assert art.meta["source_key"] == build_mod.source_key(generate(built))
    env = {**os.environ, "DCNGEN_CACHE": str(cache)}
    if target == "cpu":
        env["PATH"] = str(cache / "no-such-dir")  # no c++ on PATH
    else:
        env["CUDA_HOME"] = str(cache / "no-such-toolkit")
    run = subprocess.run([sys.executable, "-c", WITHOUT_COMPILER, pickle.dumps((built, missing)).hex()], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["path"] == str(art.path)
    assert "holds no library of this kernel built elsewhere" in result["error"], result["error"]
    assert "no working host C++ compiler" in result["error"] if target == "cpu" else "nvcc not found" in result["error"]


def test_each_compile_is_logged_with_its_time(cache, caplog):
    cfg = fresh_config()
    with caplog.at_level("INFO", logger="dcngen.build"):
        art = build(generate(cfg))
        build(generate(cfg))  # cached: no second compile
    messages = [r.getMessage() for r in caplog.records if r.name == "dcngen.build"]
    assert messages == [f"building {art.path.name} (cpp compiler)", f"built {art.path.name} in {art.meta['build_seconds']:.1f} s: {art.path}"]

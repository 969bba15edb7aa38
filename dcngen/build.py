"""The builder: KernelSource -> compiled, content-addressed Artifact in the cache.

Key = sha256 of everything that can change the binary: the source key (generator version,
language, source text, flags, what the compiler builds for, such as the host CPU) and the
compiler's version. A machine without the compiler (a GPU machine without nvcc) still finds a
library built elsewhere for the same source key, copied into its cache. Builds run under a
per-key file lock in a private staging directory that is published with one rename after
meta.json (with the library's size and sha256) is written, so readers never see half an
artifact; a corrupt artifact fails that check and is rebuilt. Each compile is logged at INFO
on the `dcngen.build` logger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from . import settings
from .compilers import LIBRARY, compiler_for, precompiled_header
from .cpu_isas import require_runnable
from .errors import BuildError, CacheError, warn
from .source import KernelSource

GENERATOR_VERSION = "5"
META = "meta.json"
_ARTIFACT_KEY = re.compile(r"[A-Za-z0-9_.-]+_[0-9a-f]{20}")  # artifact_key()'s shape: <source name>_<hash>
log = logging.getLogger(__name__)  # INFO: each compile, with its time (the first use of a config builds it)


@dataclass(frozen=True)
class Artifact:
    """A published build: `path/kernel.so`, `path/kernel.<ext>` (the source) and `path/meta.json`."""

    path: Path
    meta: dict

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    @property
    def source_path(self) -> Path:
        return self.path / self.meta["source_file"]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_json(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def source_key(source: KernelSource) -> str:
    """Hash of what determines the library apart from the compiler's version; needs no compiler."""
    compiler = compiler_for(source.language)
    parts = [GENERATOR_VERSION, source.language, source.kernel_text, list(source.flags), compiler.built_for(source), settings.sanitize()]
    if settings.sanitize():  # the sanitizer flags the compiler adds are part of the binary too
        parts.append(list(getattr(compiler, "SANITIZE_FLAGS", ())) + list(getattr(compiler, "SANITIZE_LDFLAGS", ())))
    return _sha256_json(parts)


def artifact_key(source: KernelSource) -> str:
    """Readable prefix + hash of everything that determines the compiled library (runs the compiler
    for its version: BuildError where it is missing)."""
    return f"{source.name}_{_sha256_json([source_key(source), compiler_for(source.language).version()])[:20]}"


_fallback_warned: set[str] = set()

# Compiler messages that mean "the disk is full", not "the source is wrong".
_DISK_FULL = ("No space left on device", "Disk quota exceeded", "Read-only file system")


def _fallback_root() -> Path:
    return Path(tempfile.gettempdir()) / f"dcngen-cache-{os.getuid()}"


def _warn_fallback(root: Path, fallback: Path, reason: str) -> None:
    if str(root) not in _fallback_warned:
        warn(f"dcngen cache {root} is not usable ({reason}); using {fallback}")
        _fallback_warned.add(str(root))


def _usable_fallback(root: Path, error: BaseException) -> Path:
    fallback = _fallback_root()
    try:
        settings.probe_writable(fallback)
    except OSError as e2:
        raise CacheError(f"neither the cache {root} ({error}) nor the fallback {fallback} is writable: {e2}") from None
    return fallback


def cache_dir() -> Path:
    """The cache directory, created if needed; a temporary one (with a warning) if it is unusable."""
    root = settings.cache_root()
    try:
        settings.probe_writable(root)
        return root
    except OSError as e:
        fallback = _usable_fallback(root, e)
        _warn_fallback(root, fallback, e.strerror or str(e))
        return fallback


def _published(path: Path) -> Artifact | None:
    """The artifact at `path` if it is complete and intact, else None."""
    try:
        meta = json.loads((path / META).read_text())
        lib = path / LIBRARY
        if lib.stat().st_size != meta["library_size"] or _sha256_file(lib) != meta["library_sha256"]:
            return None
        return Artifact(path, meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def lookup(source: KernelSource) -> Artifact | None:
    """The cached artifact of `source`, or None (no compile; without the compiler, a prebuilt one)."""
    try:
        key = artifact_key(source)
    except BuildError:
        return prebuilt(source)
    return _published(settings.cache_root() / key) or _published(cache_dir() / key)


def prebuilt(source: KernelSource) -> Artifact | None:
    """An intact artifact in the cache for `source`'s source key, built by any compiler version (the
    newest), or None. This is how a machine without the compiler runs libraries built elsewhere."""
    want = source_key(source)
    try:
        folders = sorted(settings.cache_root().glob(f"{source.name}_*"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return None
    for folder in folders:
        art = _published(folder)
        if art is not None and art.meta.get("source_key") == want:
            return art
    return None


def build(source: KernelSource) -> Artifact:
    """Compile `source` unless an intact artifact for it is cached; return the artifact.

    Raises BuildError (with the compiler's message) when the source does not compile; nothing is
    published then, and the source is kept under `<cache>/.failed/` for inspection. A cache that
    cannot be written (read-only, full) falls back to a temporary directory with a warning.
    """
    try:
        key = artifact_key(source)
    except BuildError as e:  # no compiler here
        if (art := prebuilt(source)) is not None:
            return art
        unreadable = [p.name for p in settings.cache_root().glob(f"{source.name}_*") if not os.access(p / META, os.R_OK)]
        if unreadable:
            raise BuildError(f"{e}; and this user cannot read the cached folders of this kernel in {settings.cache_root()} "
                             f"({', '.join(unreadable)}): give them read permission (chmod -R a+rX)") from None
        raise BuildError(f"{e}; and the cache {settings.cache_root()} holds no library of this kernel built elsewhere "
                         f"(build it where the compiler is, with the same dcngen, and copy its folder {source.name}_<hash> here)") from None
    if (art := _published(settings.cache_root() / key)) is not None:
        return art  # a read-only cache still serves what it holds
    root = cache_dir()
    try:
        return _build_in(root, key, source)
    except CacheError as e:
        fallback = _usable_fallback(root, e)
        if fallback == root:
            raise
        _warn_fallback(root, fallback, str(e).splitlines()[0])
        return _build_in(fallback, key, source)


def _build_in(root: Path, key: str, source: KernelSource) -> Artifact:
    final = root / key
    if (art := _published(final)) is not None:
        return art
    try:
        locks = root / ".locks"
        locks.mkdir(exist_ok=True)
        lock = FileLock(str(locks / f"{key}.lock"))
        lock.acquire()
    except OSError as e:
        raise CacheError(f"cannot lock artifact {key} in {root}: {e}") from e
    try:
        if (art := _published(final)) is not None:
            return art
        for stale in root.glob(f".stage-{key}-*"):  # left by a builder that was killed (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        stage = None
        try:
            # mkdir, not mkdtemp (mode 0700): the published artifact keeps the umask's mode, so a
            # cache shared by users, or built by one and copied for another, is readable by them
            stage = root / f".stage-{key}-{uuid.uuid4().hex}"
            stage.mkdir()
            source_file = f"kernel{source.suffix}"
            (stage / source_file).write_text(source.text)
            started = time.perf_counter()
            log.info("building %s (%s compiler)", key, source.language)
            try:
                extra = compiler_for(source.language).compile(source, stage)
            except BuildError as e:
                if any(s in e.log for s in _DISK_FULL):
                    raise CacheError(f"cannot build artifact {key} in {root}: {e.log.strip().splitlines()[-1]}") from None
                raise _keep_failed(root, key, source, e) from None
            lib = stage / LIBRARY
            if not lib.is_file():
                raise BuildError(f"the {source.language} compiler produced no {LIBRARY}", source_path=str(stage / source_file))
            meta = {
                "key": key,
                "config": asdict(source.config),
                "config_key": source.config.key,
                "language": source.language,
                "flags": list(source.flags),
                "params": dict(source.params),
                "compiler": compiler_for(source.language).version(),
                "built_for": compiler_for(source.language).built_for(source),
                "source_key": source_key(source),
                "source_file": source_file,
                "build_seconds": round(time.perf_counter() - started, 3),
                "library_size": lib.stat().st_size,
                "library_sha256": _sha256_file(lib),
                **source.extra_meta,
                **extra,
            }
            (stage / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if final.exists() or final.is_symlink():  # a corrupt earlier artifact: replace it
                if final.is_dir() and not final.is_symlink():
                    shutil.rmtree(final)
                else:
                    final.unlink()
            os.replace(stage, final)
            log.info("built %s in %.1f s: %s", key, meta["build_seconds"], final)
        except OSError as e:
            raise CacheError(f"cannot write artifact {key} in {root}: {e}") from e
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
    finally:
        lock.release()
    art = _published(final)
    if art is None:
        raise CacheError(f"artifact {final} failed its integrity check right after being built")
    return art


def _keep_failed(root: Path, key: str, source: KernelSource, error: BuildError) -> BuildError:
    """Copy the source that failed to compile to `<root>/.failed/<key><suffix>`; the error points there."""
    kept = root / ".failed" / f"{key}{source.suffix}"
    try:
        kept.parent.mkdir(exist_ok=True)
        kept.write_text(source.text)
    except OSError:
        return error
    message = str(error).split("\n", 1)[0]
    return BuildError(message, command=error.command, source_path=str(kept), log=error.log)


def clean(root: Path | None = None) -> tuple[int, int]:
    """Delete the cache's artifacts, leftover stage folders, kept failed sources and precompiled
    headers (a compile that wanted one meanwhile parses the headers instead); each artifact
    or stage folder under its key's build lock, so one being built now is skipped. Files dcngen did
    not write stay. Returns (removed, skipped). `root` defaults to the configured cache; where that
    is unusable this is a CacheError, not a clean of the shared fallback that builds then use."""
    root = root or settings.cache_root()
    try:
        settings.probe_writable(root)
    except OSError as e:
        raise CacheError(f"cannot clean the cache {root}: {e.strerror or e}; builds meanwhile go to {_fallback_root()} "
                         f"(clean that with DCNGEN_CACHE={_fallback_root()})") from None
    (root / ".locks").mkdir(exist_ok=True)
    removed = skipped = 0
    for path in sorted(root.iterdir()):
        if path.name.startswith(".stage-") and path.is_dir():
            key = path.name[len(".stage-") :].rsplit("-", 1)[0]  # the stage's uuid suffix has no '-'
        elif path.is_dir() and not path.is_symlink() and (path / META).is_file():
            key = path.name
        else:
            continue
        if not _ARTIFACT_KEY.fullmatch(key):  # a folder of the user's that happens to hold a meta.json
            continue
        lock = FileLock(str(root / ".locks" / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            skipped += 1
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        finally:
            lock.release()
    shutil.rmtree(root / ".failed", ignore_errors=True)
    shutil.rmtree(root / precompiled_header.FOLDER, ignore_errors=True)
    return removed, skipped


def artifact_roots() -> list[Path]:
    """Where artifacts are served from: the cache, and its temporary fallback where the cache cannot
    be written (a read-only cache still serves what it holds)."""
    return list(dict.fromkeys([settings.cache_root(), cache_dir()]))


def list_artifacts() -> list[Artifact]:
    """The intact artifacts of artifact_roots()."""
    found = []
    for root in artifact_roots():
        try:
            entries = sorted(root.iterdir())
        except OSError:
            continue
        found += [a for p in entries if p.is_dir() and not p.name.startswith(".") and (a := _published(p))]
    return found


def load(artifact: Artifact):
    """Load an artifact's library; returns an object with `forward` and `backward`.
    ConfigError where it was built for a CPU instruction set this machine lacks."""
    target = artifact.meta["config"]["target"]
    if target.startswith("cpu:"):
        require_runnable(target.split(":", 1)[1])
    compiler = compiler_for(artifact.meta["language"])
    if artifact.meta.get("sanitize"):
        return compiler.load(artifact.library, sanitized=True)
    return compiler.load(artifact.library)

"""The builder: KernelSource -> compiled, content-addressed Artifact in the cache.

Key = sha256 of everything that can change the binary (generator version, language, source
text, flags, compiler version/host CPU). Builds run under a per-key file lock in a private
staging directory that is published with one rename after meta.json (with the library's size
and sha256) is written, so readers never see half an artifact; a corrupt artifact fails that
check and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from . import settings
from .compilers import LIBRARY, compiler_for
from .errors import BuildError, CacheError
from .source import KernelSource

GENERATOR_VERSION = "1"
META = "meta.json"


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


def artifact_key(source: KernelSource) -> str:
    """Readable prefix + hash of everything that determines the compiled library."""
    compiler = compiler_for(source.language)
    payload = json.dumps([GENERATOR_VERSION, source.language, source.text, list(source.flags), compiler.version(), settings.sanitize()])
    return f"{source.name}_{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


_fallback_warned = False


def cache_dir() -> Path:
    """The cache directory, created if needed; a temporary one (with a warning) if it is unusable."""
    global _fallback_warned
    root = settings.cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-")
        probe.close()
        return root
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / f"dcngen-cache-{os.getuid()}"
        if not _fallback_warned:
            warnings.warn(f"dcngen cache {root} is not writable ({e.strerror or e}); using {fallback}", RuntimeWarning, stacklevel=3)
            _fallback_warned = True
        try:
            fallback.mkdir(parents=True, exist_ok=True)
        except OSError as e2:
            raise CacheError(f"neither the cache {root} nor the fallback {fallback} is writable: {e2}") from None
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
    """The cached artifact of `source`, or None (no compiler run)."""
    return _published(cache_dir() / artifact_key(source))


def build(source: KernelSource) -> Artifact:
    """Compile `source` unless an intact artifact for it is cached; return the artifact."""
    root = cache_dir()
    key = artifact_key(source)
    final = root / key
    if (art := _published(final)) is not None:
        return art
    locks = root / ".locks"
    locks.mkdir(exist_ok=True)
    with FileLock(str(locks / f"{key}.lock")):
        if (art := _published(final)) is not None:
            return art
        stage = Path(tempfile.mkdtemp(prefix=f".stage-{key}-", dir=root))
        try:
            source_file = f"kernel{source.suffix}"
            (stage / source_file).write_text(source.text)
            started = time.perf_counter()
            extra = compiler_for(source.language).compile(source, stage)
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
                "source_file": source_file,
                "build_seconds": round(time.perf_counter() - started, 3),
                "library_size": lib.stat().st_size,
                "library_sha256": _sha256_file(lib),
                **source.extra_meta,
                **extra,
            }
            (stage / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
            if final.exists():  # a corrupt earlier artifact: replace it
                shutil.rmtree(final)
            os.replace(stage, final)
        except OSError as e:
            raise CacheError(f"cannot write artifact {key} in {root}: {e}") from e
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    art = _published(final)
    if art is None:
        raise CacheError(f"artifact {final} failed its integrity check right after being built")
    return art


def list_artifacts() -> list[Artifact]:
    root = cache_dir()
    return [a for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and (a := _published(p))]


def load(artifact: Artifact):
    """Load an artifact's library; returns an object with `forward` and `backward`."""
    return compiler_for(artifact.meta["language"]).load(artifact.library)

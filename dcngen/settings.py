"""dcngen's own environment variables (DCNGEN_*) and its data locations, in one place. (Toolchain
variables are read where the toolchain is driven: CXX in compilers/cpp.py, CUDA_HOME / CUDA_PATH
in compilers/cuda.py, TVM_NUM_THREADS in compilers/tvm.py.)

dcngen runs either from a source checkout (editable install, or the tree on PYTHONPATH) or from an
installed wheel. A checkout keeps its data beside the package (`templates/`, `schedules/`) and
writes into the checkout (`generated/`, `schedules/records/`, which is meant to be committed); a
wheel carries the data inside the package (`dcngen/templates/`, `dcngen/schedules/`) and writes
into the user's cache and data folders.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .errors import DCNGenError

PACKAGE_DIR = Path(__file__).resolve().parent
INSTALLED = (PACKAGE_DIR / "templates").is_dir()  # the wheel's layout
DATA_ROOT = PACKAGE_DIR if INSTALLED else PACKAGE_DIR.parent
TEMPLATE_DIR = DATA_ROOT / "templates"
SCHEDULE_DIR = DATA_ROOT / "schedules"
SHIPPED_RECORDS_DIR = SCHEDULE_DIR / "records"


def _user_dir(xdg_variable: str, fallback: str) -> Path:
    return Path(os.environ.get(xdg_variable) or Path.home() / fallback) / "dcngen"


def cache_root() -> Path:
    """The artifact cache: $DCNGEN_CACHE, else the checkout's generated/ folder, else
    $XDG_CACHE_HOME/dcngen (~/.cache/dcngen) for an installed dcngen."""
    if os.environ.get("DCNGEN_CACHE"):
        return Path(os.environ["DCNGEN_CACHE"]).expanduser()
    return _user_dir("XDG_CACHE_HOME", ".cache") if INSTALLED else DATA_ROOT / "generated"


def records_dirs() -> tuple[Path, ...]:
    """Tuning record folders, in lookup order; `dcngen tune` writes into the first.

    $DCNGEN_RECORDS alone where set; else the checkout's schedules/records/; else, for an installed
    dcngen, $XDG_DATA_HOME/dcngen/records (~/.local/share/dcngen/records) and then the records
    shipped in the wheel."""
    if os.environ.get("DCNGEN_RECORDS"):
        return (Path(os.environ["DCNGEN_RECORDS"]).expanduser(),)
    if INSTALLED:
        return (_user_dir("XDG_DATA_HOME", ".local/share") / "records", SHIPPED_RECORDS_DIR)
    return (SHIPPED_RECORDS_DIR,)


def sanitize() -> bool:
    """DCNGEN_SANITIZE=1 builds CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer."""
    return os.environ.get("DCNGEN_SANITIZE", "") not in ("", "0")


def precompiled_header() -> bool:
    """DCNGEN_PRECOMPILED_HEADER=0 turns off the precompiled tvm-ffi headers of host builds
    (dcngen/compilers/precompiled_header.py): each compile then parses them, and the cache holds
    no .pch folder."""
    return os.environ.get("DCNGEN_PRECOMPILED_HEADER", "1").strip() != "0"


def cpu_target() -> str:
    """DCNGEN_CPU_TARGET, which kernels.target_of reads once per process: the target of the kernels
    that run on CPU tensors, 'cpu' (this machine's CPU, the default) or 'cpu:<isa>' (a named x86-64
    level, which runs kernels built on another machine where this one has no compiler:
    dcngen/cpu_isas.py)."""
    return os.environ.get("DCNGEN_CPU_TARGET", "").strip() or "cpu"


def autotune_seconds() -> float | None:
    """DCNGEN_AUTOTUNE=SECONDS: the budget with which the first op call of a config and shape bucket
    without a tuning record tunes it (dcngen/autotune.py); None (no tuning) where unset or 0."""
    text = os.environ.get("DCNGEN_AUTOTUNE", "").strip()
    if text in ("", "0"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds < math.inf):
        raise DCNGenError(f"DCNGEN_AUTOTUNE must be a number of seconds, the tuning budget of each new config and "
                          f"input shape (0 or unset: no tuning), got {text!r}")
    return seconds


def probe_writable(folder: Path) -> None:
    """Create `folder` if needed and check that files can be made in it; OSError if not."""
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-").close()

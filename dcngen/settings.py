"""Every environment knob dcngen reads, in one place."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    """The artifact cache: $DCNGEN_CACHE, else the checkout's generated/ folder."""
    return Path(os.environ.get("DCNGEN_CACHE") or REPO_ROOT / "generated").expanduser()


def sanitize() -> bool:
    """DCNGEN_SANITIZE=1 builds CPU kernels with AddressSanitizer and UndefinedBehaviorSanitizer."""
    return os.environ.get("DCNGEN_SANITIZE", "") not in ("", "0")

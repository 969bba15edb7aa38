"""Typed errors: each one says what was wrong and where; and warnings that point at the caller's line."""

import os
import sys
import warnings
from pathlib import Path

_PACKAGE_FOLDER = str(Path(__file__).parent) + os.sep


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """warnings.warn, attributed to the first caller outside dcngen and torch: the user's line, not
    dcngen's, nor torch's between them (a module's __call__, a custom op's dispatcher)."""
    torch = sys.modules.get("torch")
    folders = (_PACKAGE_FOLDER,) + ((str(Path(torch.__file__).parent) + os.sep,) if torch is not None else ())
    frame, level = sys._getframe(1), 2  # level 2: warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(folders):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class DCNGenError(Exception):
    """Base class of every error dcngen raises on purpose."""


class ConfigError(DCNGenError, ValueError):
    """A DCNConfig field that cannot work; names the field and the reason."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"invalid config field '{field}': {reason}")


class InputError(DCNGenError, ValueError):
    """A tensor passed to an op that does not match what the config expects."""


class NoKernelError(InputError):
    """Tensors on a device type dcngen generates no kernels for."""


class BuildError(DCNGenError, RuntimeError):
    """A compiler failure; carries the command, the source path and the compiler's message."""

    def __init__(self, message: str, *, command: str = "", source_path: str = "", log: str = ""):
        self.command = command
        self.source_path = source_path
        self.log = log
        parts = [message]
        if command:
            parts.append(f"command: {command}")
        if source_path:
            parts.append(f"source: {source_path}")
        if log:
            parts.append(f"compiler output:\n{log.strip()}")
        super().__init__("\n".join(parts))


class CacheError(DCNGenError, OSError):
    """The artifact cache cannot be used (unwritable, full)."""

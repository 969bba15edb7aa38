"""Named x86-64 instruction sets a CPU kernel can be built for ahead of time (target 'cpu:<isa>'),
and whether this machine can run them.

Target 'cpu' builds for this machine's CPU (-march=native): fastest here, and tied to this CPU
model. A named level (the x86-64 psABI's microarchitecture levels) gives a library that any CPU
with the level's features runs, so it can be built once and shipped, as 'cuda:sm_XY' is for GPUs.
Loading one on a CPU without those features is refused, naming them (it would die of SIGILL).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


@dataclass(frozen=True)
class Isa:
    features: tuple[str, ...]  # /proc/cpuinfo flags the level adds to the one below it
    vector_bits: int  # widest vectors the level has
    vector_registers: int  # how many

    @property
    def register_bytes(self) -> int:
        """The size of the vector register file."""
        return self.vector_registers * self.vector_bits // 8


# Each level includes the features of the levels before it. gcc's -march and LLVM's -mcpu take these names as they are.
ISAS = {
    "x86-64": Isa(("sse2",), 128, 16),
    "x86-64-v2": Isa(("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"), 128, 16),
    "x86-64-v3": Isa(("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"), 256, 16),
    "x86-64-v4": Isa(("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"), 512, 32),
}
NEON_REGISTER_BYTES = 32 * 16  # AArch64: 32 128-bit registers


def required_features(isa: str) -> tuple[str, ...]:
    """Every /proc/cpuinfo flag a CPU needs to run code built for `isa`."""
    names = list(ISAS)
    return tuple(f for name in names[: names.index(isa) + 1] for f in ISAS[name].features)


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The fields of /proc/cpuinfo's text, each as its first CPU gives it."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@functools.lru_cache(maxsize=1)
def cpuinfo() -> dict[str, str]:
    """This machine's /proc/cpuinfo fields (of its first CPU); empty where there is none."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return {}


def host_features() -> frozenset[str]:
    """This CPU's feature flags."""
    return frozenset(cpuinfo().get("flags", "").split())


def is_x86_64(hardware: str | None = None) -> bool:
    """Whether `hardware` (a uname -m name; this machine's where None) is x86-64."""
    return (platform.machine() if hardware is None else hardware).lower() in ("x86_64", "amd64")


def lacking(isa: str, features: frozenset[str]) -> tuple[str, ...]:
    """The features `isa` needs that are not among `features` (an x86-64 CPU's flags)."""
    return tuple(f for f in required_features(isa) if f not in features)


def missing_features(isa: str) -> tuple[str, ...]:
    """The features `isa` needs that this CPU lacks (all of them on a CPU that is not x86-64)."""
    if not is_x86_64():
        return required_features(isa)
    return lacking(isa, host_features())


def best_level(features: frozenset[str]) -> str:
    """The highest level whose features are all among `features` (the lowest where none is)."""
    runnable = [name for name in ISAS if not lacking(name, features)]
    return runnable[-1] if runnable else "x86-64"


def register_bytes(isa: str | None) -> int:
    """The vector register file of code built for `isa`, or for this machine's CPU (None): its
    best level on x86-64, NEON's elsewhere."""
    if isa is None:
        if not is_x86_64():
            return NEON_REGISTER_BYTES
        isa = best_level(host_features())
    return ISAS[isa].register_bytes


def require_runnable(isa: str) -> None:
    """ConfigError (field `target`) unless this CPU runs code built for `isa`."""
    if not is_x86_64():
        raise ConfigError("target", f"a kernel built for cpu:{isa} runs on x86-64 CPUs only, and this one is {platform.machine()}; use target 'cpu'")
    missing = missing_features(isa)
    if missing:
        raise ConfigError(
            "target",
            f"a kernel built for cpu:{isa} needs CPU features this machine lacks ({', '.join(missing)}); "
            "run it on a CPU that has them, or use target 'cpu' (this machine's CPU) or a lower level",
        )

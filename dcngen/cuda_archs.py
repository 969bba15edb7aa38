"""What each supported CUDA architecture gives a block: shared memory and resident threads (the
compute-capability table of the CUDA C++ Programming Guide). The CUDA generators size their
layouts and register caps against these, so a layout too large for the target is rejected when it
is built, with the limit named, not when it is launched."""

from __future__ import annotations

from dataclasses import dataclass

KB = 1024
REGISTERS_PER_SM = 65536  # 32-bit registers, every supported architecture
SMEM_RESERVED_PER_BLOCK = 1 * KB  # shared memory the runtime keeps per resident block (sm_80+)


@dataclass(frozen=True)
class ArchLimits:
    smem_per_block: int  # bytes of shared memory one block may opt in to
    smem_per_sm: int  # bytes of shared memory per SM
    threads_per_sm: int  # resident threads per SM


LIMITS = {
    "sm_75": ArchLimits(64 * KB, 64 * KB, 1024),
    "sm_80": ArchLimits(163 * KB, 164 * KB, 2048),
    "sm_86": ArchLimits(99 * KB, 100 * KB, 1536),
    "sm_87": ArchLimits(163 * KB, 164 * KB, 1536),
    "sm_89": ArchLimits(99 * KB, 100 * KB, 1536),
    "sm_90": ArchLimits(227 * KB, 228 * KB, 2048),
    "sm_100": ArchLimits(227 * KB, 228 * KB, 2048),
    "sm_103": ArchLimits(227 * KB, 228 * KB, 2048),
    "sm_120": ArchLimits(99 * KB, 100 * KB, 1536),
}

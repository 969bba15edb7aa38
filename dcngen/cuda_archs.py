"""What each supported CUDA architecture gives a block: shared memory, resident threads and blocks
(the compute-capability table of the CUDA C++ Programming Guide). The CUDA generators size their
layouts and register caps against these, so a layout too large for the target is rejected when it
is built, with the limit named, not when it is launched; `dcngen build` reports each kernel's
theoretical occupancy from them."""

from __future__ import annotations

from dataclasses import dataclass

KB = 1024
REGISTERS_PER_SM = 65536  # 32-bit registers, every supported architecture
REGISTER_UNIT = 256  # registers a warp is given at a time
SMEM_RESERVED_PER_BLOCK = 1 * KB  # shared memory the runtime keeps per resident block (sm_80+)


@dataclass(frozen=True)
class ArchLimits:
    smem_per_block: int  # bytes of shared memory one block may opt in to
    smem_per_sm: int  # bytes of shared memory per SM
    threads_per_sm: int  # resident threads per SM
    blocks_per_sm: int  # resident blocks per SM


LIMITS = {
    "sm_75": ArchLimits(64 * KB, 64 * KB, 1024, 16),
    "sm_80": ArchLimits(163 * KB, 164 * KB, 2048, 32),
    "sm_86": ArchLimits(99 * KB, 100 * KB, 1536, 16),
    "sm_87": ArchLimits(163 * KB, 164 * KB, 1536, 16),
    "sm_89": ArchLimits(99 * KB, 100 * KB, 1536, 24),
    "sm_90": ArchLimits(227 * KB, 228 * KB, 2048, 32),
    "sm_100": ArchLimits(227 * KB, 228 * KB, 2048, 32),
    "sm_103": ArchLimits(227 * KB, 228 * KB, 2048, 32),
    "sm_120": ArchLimits(99 * KB, 100 * KB, 1536, 24),
}


def resident_warps(arch: str, threads: int, registers: int, smem: int) -> tuple[int, str]:
    """Theoretical occupancy of a kernel on `arch`: the warps its blocks of `threads` threads,
    `registers` registers a thread and `smem` bytes of shared memory (static and dynamic) keep
    resident on an SM, and what limits them: "threads", "registers", "shared memory" or "blocks"."""
    limits = LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = {
        "threads": limits.threads_per_sm // (warps * 32),
        "registers": (REGISTERS_PER_SM // per_warp) // warps if per_warp else limits.blocks_per_sm,
        "shared memory": limits.smem_per_sm // (smem + SMEM_RESERVED_PER_BLOCK),
        "blocks": limits.blocks_per_sm,
    }
    limiter = min(blocks, key=blocks.get)
    return blocks[limiter] * warps, limiter

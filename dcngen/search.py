"""The search of `dcngen tune`: each generator's parameter space, and the order its candidates are
tried in (the default, the generator's other kernels, one parameter at a time, the changes that beat
the default combined, then the rest at random)."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Mapping

from . import records
from .config import DCNConfig
from .errors import DCNGenError


@dataclass(frozen=True)
class Space:
    """Candidate values per parameter, the kernel passes the parameters change (what is timed), and
    the generator's other kernels (each as the parameters that select it), tried first."""

    values: dict[str, tuple[int, ...]]
    passes: tuple[str, ...] = ("forward", "backward")
    kernels: tuple[dict[str, int], ...] = ()


# The CUDA template's forward and backward kernels besides the per-point ones, by the parameters
# that select them (those a dtype's space lacks are left out)
CUDA_FORWARD_KERNELS = ({"share": 1}, {"fwd_tile": 1}, {"fwd_tile": 1, "fwd_tile_mma": 1}, {"fwd_mma": 1}, {"mma": 1})
CUDA_BACKWARD_KERNELS = ({"bwd_tile": 1}, {"bwd_mma": 1})


def _kernel_choices(values: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], ...]:
    """Each other forward kernel, each other backward one, then each pair of them: the passes are
    timed together, so a pair is how a better forward and a better backward are found together."""
    forward, backward = ([k for k in kernels if k.keys() <= values.keys()] for kernels in (CUDA_FORWARD_KERNELS, CUDA_BACKWARD_KERNELS))
    return tuple(forward + backward + [{**f, **b} for f in forward for b in backward])


def _pow2_upto(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(1 << i for i in range(lo.bit_length() - 1, hi.bit_length()) if lo <= 1 << i <= hi)


def space_for(cfg: DCNConfig) -> Space:
    """The search space of cfg's generator (see its PARAM_BOUNDS and default_params)."""
    p = cfg.num_points
    if cfg.backend == "template" and not cfg.is_cuda:
        from .generators.template_cpu import wide_vectors

        # pixel_chunk, unroll_points and accumulators shape the forward only (the backward runs one
        # task per (image, group)); on AVX-512 targets so does vector_bits, the vector width GCC
        # prefers, and bwd_vector_bits the backward's
        unroll = tuple(sorted({1, 2, 3, 4, p} & set(range(1, 65))))
        values = {"pixel_chunk": _pow2_upto(1, 4096), "unroll_points": unroll, "accumulators": (1, 2, 4)}
        if wide_vectors(cfg):
            return Space({**values, "vector_bits": (256, 512), "bwd_vector_bits": (256, 512)})
        return Space(values, passes=("forward",))
    if cfg.backend == "template":
        # the knobs the H100 sweeps found to matter (benchmarks/RESULTS.md), around the defaults
        vec = _pow2_upto(1, 16)
        values = {
            "vec": vec, "pixels": _pow2_upto(1, 64), "unroll": tuple(sorted({1, 2, 3, p})), "min_blocks": (1, 2, 4), "stage": (0, 1), "share": (0, 1),
            "bwd_vec": vec, "bwd_pixels": _pow2_upto(1, 64), "bwd_unroll": (1, 2, 3, 4), "bwd_min_blocks": (1, 2), "bwd_stage": (0, 1),
            "fwd_tile": (0, 1), "fwd_tile_h": (4, 8, 16), "fwd_tile_mma": (0, 1),  # the tiled forward (configs it cannot run are skipped)
        }
        if cfg.dtype in ("float16", "bfloat16"):
            values["bwd_tile"] = (0, 1)  # its fixed-point sums are finer than 16-bit storage, not than fp32
            values["mma"] = (0, 1)  # the tensor-core forwards (configs they cannot run are skipped)
            values["fwd_mma"] = (0, 1)  # (with mma=1: skipped)
            values["fwd_mma_warps"] = (1, 2, 4)
            values["fwd_mma_tiles"] = (1, 4)
            values["fwd_halo"] = (1, 2, 3)
            values["bwd_mma"] = (0, 1)  # the tensor-core backward (with bwd_tile=1: skipped)
            values["bwd_mma_warps"] = (4, 8)  # its warps a block (two blocks an SM where its layout fits twice)
        return Space(values, kernels=_kernel_choices(values))
    if not cfg.is_cuda:
        return Space({"pixels_per_task": _pow2_upto(1, 256), "unroll_points": (0, 1), "vector": (0, 1)})
    from .generators.tvm_gen import schedule_module

    return Space({"threads": _pow2_upto(32, 1024), "vec": schedule_module("cuda").vector_widths(cfg)})


def default_params(cfg: DCNConfig) -> dict[str, int]:
    """The parameters the generator picks by itself for cfg (its heuristic, ignoring any record)."""
    from .generators import generate

    return dict(generate(cfg.replace(params=())).params)


def _kernel_key(cfg: DCNConfig, params: dict) -> str | None:
    """What identifies the kernel `params` give, None if the generator rejects them. Template
    generators: the source's key (a cheap render; build.source_key), so parameters that leave the
    kernel unchanged (e.g. another kernel's tile while that kernel is off) are not timed twice;
    TVM: the parameters (checked at build)."""
    if cfg.backend != "template":
        return records.params_name(params)
    from .build import source_key
    from .generators import generate

    try:
        return source_key(generate(cfg.replace(params=tuple(params.items()))))
    except DCNGenError:
        return None


MEASURE_FIRST = object()  # in candidates' order: what follows depends on the times of what came before


def combined_changes(default: dict, measured: Mapping[str, object]) -> list[dict]:
    """The changes to `default` that beat it in `measured` (parameter-set name -> ms, or a failure),
    combined best first: the best change with the second, then with the third too, and so on; a
    change that contradicts the combination so far is passed over. Each set has two changes or more.
    Changes of different passes' parameters (a faster forward and a faster backward) add up; whether
    others do, their timing says."""
    base = measured.get(records.params_name(default))
    if not isinstance(base, (int, float)):
        return []
    better = sorted((ms, name) for name, ms in measured.items() if isinstance(ms, (int, float)) and ms < base)
    combined, merged, out = {}, 0, []
    for _, name in better:
        params = records.parse_params_name(name)
        change = records.changes(params, default)
        if any(combined.get(k, v) != v for k, v in change.items()) or change.items() <= combined.items():
            continue  # contradicts the combination, or adds nothing to it
        combined.update(change)
        merged += 1
        if merged > 1:
            out.append({**default, **combined})
    return out


def candidates(cfg: DCNConfig, space: Space, default: dict, seed: int = 0, measured: Mapping[str, object] | None = None):
    """Parameter sets in search order: the default, then the space's other kernels, then one
    parameter varied at a time; then MEASURE_FIRST and the combinations of the changes that beat
    the default in `measured` by then (combined_changes; `measured` is read when the order gets
    there); then the rest of the grid in a seeded random order (sampled when the grid is large).
    Invalid sets, and sets that give a kernel already emitted, are skipped."""
    names = sorted(space.values)
    seen: set[str] = set()
    kernels: set[str] = set()

    def emit(params):
        name = records.params_name(params)
        if name in seen:
            return None
        seen.add(name)
        key = _kernel_key(cfg, params)
        if key is None or key in kernels:
            return None
        kernels.add(key)
        return params

    ordered = [dict(default)] + [{**default, **kernel} for kernel in space.kernels]
    for name in names:
        ordered += [{**default, name: v} for v in space.values[name] if v != default.get(name)]
    rng = random.Random(seed)
    size = math.prod(len(space.values[n]) for n in names)
    if size <= 4096:
        rest = [dict(zip(names, combo)) for combo in itertools.product(*(space.values[n] for n in names))]
        rng.shuffle(rest)
    else:
        rest = ({n: rng.choice(space.values[n]) for n in names} for _ in range(4 * 4096))
    def order():
        yield from ordered
        if measured is not None:
            yield MEASURE_FIRST
            yield from combined_changes(default, measured)  # (run only once the order gets here)
        yield from ({**default, **r} for r in rest)

    for params in order():
        if params is MEASURE_FIRST or (params := emit(params)) is not None:
            yield params


def next_batch(pending, size: int) -> list[dict]:
    """Up to `size` parameter sets from `pending` (candidates' order); MEASURE_FIRST ends a batch
    early, so what follows it is chosen after the batch before it was timed."""
    batch: list[dict] = []
    if size <= 0:
        return batch
    for params in pending:
        if params is MEASURE_FIRST:
            if batch:
                break
            continue
        batch.append(params)
        if len(batch) == size:
            break
    return batch

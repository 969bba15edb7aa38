"""Template backend, CPU: renders templates/cpu/dcn.cc.j2 for the host compiler."""

from __future__ import annotations

from ..config import DCNConfig
from ..cpu_isas import ISAS, is_x86_64, missing_features, register_bytes
from ..errors import ConfigError
from ..source import KernelSource
from .jinja import render, resolve_params

SCALAR_TYPE = {"float32": "float", "float64": "double", "bfloat16": "dcn::bf16_t", "float16": "dcn::f16_t"}

# Tunable parameters and their bounds (see `dcngen tune`).
PARAM_BOUNDS = {"pixel_chunk": (1, 4096), "unroll_points": (1, 64), "accumulators": (1, 4)}

# The backward writes DCNv4's padding gradient channels (zeros) itself: the op need not.
BACKWARD_ZEROES_PADDING = True

COMMON_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros", "-ffp-contract=fast")


def wide_vectors(cfg: DCNConfig) -> bool:
    """Whether cfg's target has 512-bit vectors (AVX-512): this machine's CPU, or the named level."""
    if cfg.cpu_isa:
        return ISAS[cfg.cpu_isa].vector_bits == 512
    return is_x86_64() and not missing_features("x86-64-v4")


def default_vector_bits(cfg: DCNConfig) -> int:
    """The vector width GCC prefers on an AVX-512 target: 512 bits (the kernels plan 16 fp32 lanes at
    a time; GCC 13 tunes Sapphire Rapids for 256), except where a group's channel row is longer than
    one 512-bit vector of the accumulation type and does not end on one: GCC finishes each channel
    loop there with a slow partial vector. 256-bit vectors, paired on a Zen 4 (benchmarks/RESULTS.md):
    float32 C20/C28/C36/C40/C52 forward 0.64-0.78x the time (C24 0.96x), backward 0.87-0.97x;
    float64 C12-C28 forward 0.76-0.91x (C10 1.06x); 16-bit C20/C28 backward 0.77-0.85x (float16 C28
    forward 1.10x). The backward can take its own (`bwd_vector_bits`: the backward's entry function
    gets it as a target attribute), which went either way by up to 8 % per config, with no rule
    found; `dcngen tune` tries both widths for each pass."""
    lanes = 8 if cfg.dtype == "float64" else 16  # accumulation-type values per 512-bit vector
    c = cfg.group_channels
    return 256 if c > lanes and c % lanes else 512


def flags(cfg: DCNConfig, params: dict[str, int]) -> tuple[str, ...]:
    """Host compiler flags for cfg's target (this machine's CPU, 'cpu', or a named x86-64 level) and
    params' vector width (AVX-512 targets)."""
    vectors = (f"-mprefer-vector-width={params['vector_bits']}",) if "vector_bits" in params else ()
    return (*COMMON_FLAGS, f"-march={cfg.cpu_isa or 'native'}", *vectors)


def default_params(cfg: DCNConfig) -> dict[str, int]:
    """Heuristic: unroll the forward point loop for kernels up to 4x4 (the point geometry folds to constants);
    forward work items of up to 4096 pixels (fewer when that leaves under four per thread): long runs of
    pixels keep each thread's band of input rows in its own cache; 4, 2 or 1 accumulator rows, as many
    as fit a quarter of the vector registers the compiler uses (more made it spill them: 1.07-1.2x
    the forward's time under AVX2 at C16/C32 in float32, and under AVX-512 at C64; with 256-bit
    vectors preferred on AVX-512, the registers hold half as much: float32 C20/C28 2 rows instead of 4
    0.93x / 0.92x, C36/C52 1 instead of 2 0.79x)."""
    vector_bits = default_vector_bits(cfg) if wide_vectors(cfg) else None
    row_bytes = cfg.group_channels * (8 if cfg.dtype == "float64" else 4)
    budget = register_bytes(cfg.cpu_isa) * (vector_bits or 512) // 512 // 4
    accumulators = next(a for a in (4, 2, 1) if a == 1 or a * row_bytes <= budget)
    params = {"pixel_chunk": 4096, "unroll_points": cfg.num_points if cfg.num_points <= 16 else 1, "accumulators": accumulators}
    if vector_bits:
        params["vector_bits"] = params["bwd_vector_bits"] = vector_bits
    return params


VECTOR_WIDTHS = ("vector_bits", "bwd_vector_bits")  # the unit's (the forward's), the backward's


def generate(cfg: DCNConfig) -> KernelSource:
    wide = wide_vectors(cfg)
    for name in VECTOR_WIDTHS:
        if name in cfg.param_dict and not wide:
            raise ConfigError("params", f"{name} applies to targets with AVX-512 only; {cfg.target} has none")
    params = resolve_params(cfg, default_params(cfg), {**PARAM_BOUNDS, **{n: (256, 512) for n in VECTOR_WIDTHS}} if wide else PARAM_BOUNDS)
    if wide and "bwd_vector_bits" not in cfg.param_dict:
        params["bwd_vector_bits"] = params["vector_bits"]  # an explicit vector_bits sets both passes'
    for name in VECTOR_WIDTHS if wide else ():
        if params[name] not in (256, 512):
            raise ConfigError("params", f"{name}={params[name]} must be 256 or 512")
    text = render("cpu/dcn.cc.j2", cfg, scalar_type=SCALAR_TYPE[cfg.dtype], params=params)
    return KernelSource(config=cfg, language="cpp", text=text, flags=flags(cfg, params), params=tuple(sorted(params.items())))

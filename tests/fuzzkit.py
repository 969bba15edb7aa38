"""Fuzzing kit: random configs and inputs, NaN-poisoned kernel calls, and checks against the float64 reference.

Shared by tests/test_fuzz.py, tests/test_hostile.py, tests/sanitize_driver.py and benchmarks/long_fuzz.py.

- `config_pool(count, seed)`: a bounded, seeded pool of DCNConfigs (each distinct config is one
  kernel build) that always contains the edge configs and then random ones.
- `random_case(cfg, rng)`: random shape and inputs for one config (offsets from small fractions
  to far outside the image, some integer offsets), as float64 values already rounded to the
  config's dtype, with no sample within a rounding error of a grid line (where the offset
  gradient is discontinuous and float32 vs float64 location arithmetic may pick different corners).
- `check_case(cfg, case)`: runs the loaded kernel directly with NaN-poisoned outputs and the
  torch op (forward and autograd backward), compares both with the float64 reference.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

import dcngen.ops as ops
from dcngen import reference
from dcngen.config import DCNConfig
from dcngen.kernels import kernel_for
from dcngen.verify import TORCH_DTYPE, poisoned_call

REPO = Path(__file__).resolve().parents[1]
# (rtol, atol relative to the largest reference magnitude of the tensor compared)
TOLERANCE = {"float64": (1e-9, 1e-10), "float32": (2e-4, 2e-5), "float16": (4e-3, 2e-3), "bfloat16": (2e-2, 1e-2)}
# Samples closer than this to an integer grid line are moved (see module docstring).
GRID_MARGIN = {"float64": 1e-7, "float32": 2e-3, "float16": 2e-3, "bfloat16": 2e-3}
FAR = 1.0e4  # an offset this large puts a sample far outside every test image


def available_backends() -> list[str]:
    """CPU backends to fuzz: the template backend, plus TVM once its generator exists and imports."""
    backends = ["template"]
    if os.environ.get("DCNGEN_FUZZ_BACKENDS"):
        return [b for b in os.environ["DCNGEN_FUZZ_BACKENDS"].split(",") if b]
    if (REPO / "dcngen" / "generators" / "tvm_gen.py").exists() and importlib.util.find_spec("tvm") is not None:
        backends.append("tvm")
    return backends


# ---- configs ------------------------------------------------------------------------------------

EDGE_CONFIGS = (
    dict(op="dcnv4", group=1, group_channels=1, kernel_size=(1, 1), padding=0),
    dict(op="dcnv3", group=8, group_channels=3, kernel_size=(3, 3), remove_center=True, offset_scale=0.5),
    dict(op="dcnv4", group=5, group_channels=16, kernel_size=(7, 7), stride=3, padding=3, dilation=3, remove_center=True, offset_scale=2.0),
    dict(op="dcnv3", group=2, group_channels=64, kernel_size=(1, 7), stride=(2, 1), padding=(0, 3), dilation=(1, 2), offset_scale=-1.0),
    dict(op="dcnv4", group=3, group_channels=7, kernel_size=(6, 2), stride=(1, 3), padding=(3, 0), dilation=(2, 3), offset_scale=0.7),
    dict(op="dcnv3", group=4, group_channels=16, kernel_size=(5, 5), stride=2, padding=2, dilation=1, offset_scale=0.0),
)
DTYPES = ("float64", "float32", "float16", "bfloat16")


def random_config(rng: random.Random, backend: str = "template", dtype: str | None = None, op: str | None = None) -> DCNConfig:
    kh, kw = rng.randint(1, 7), rng.randint(1, 7)
    if rng.random() < 0.3:
        kw = kh
    remove_center = kh == kw and kh % 2 == 1 and kh > 1 and rng.random() < 0.4
    group = rng.randint(1, 8)
    group_channels = rng.choice([1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 64])
    while group * group_channels > 160:  # keeps each case fast
        group_channels = max(1, group_channels // 2)
    return DCNConfig(
        op=op or rng.choice(("dcnv4", "dcnv3")),
        group=group,
        group_channels=group_channels,
        kernel_size=(kh, kw),
        stride=(rng.randint(1, 3), rng.randint(1, 3)),
        padding=(rng.randint(0, 3), rng.randint(0, 3)),
        dilation=(rng.randint(1, 3), rng.randint(1, 3)),
        offset_scale=rng.choice((1.0, 1.0, 0.5, 2.0, 0.25, 1.5, 0.7, 1.3, -0.6, 3.0)),
        remove_center=remove_center,
        dtype=dtype or rng.choice(DTYPES),
        backend=backend,
    )


def config_pool(count: int, seed: int = 0, backends: list[str] | None = None) -> list[DCNConfig]:
    """`count` configs per backend: the edge configs (every dtype in turn), then seeded random ones."""
    pool = []
    for backend in backends or available_backends():
        rng = random.Random(f"{seed}-{backend}")
        configs = [DCNConfig(dtype=DTYPES[i % len(DTYPES)], backend=backend, **edge) for i, edge in enumerate(EDGE_CONFIGS)]
        i = 0
        while len(configs) < count:
            configs.append(random_config(rng, backend, dtype=DTYPES[i % len(DTYPES)], op=("dcnv4", "dcnv3")[(i // 3) % 2]))
            i += 1
        pool += configs[:count]
    return pool


EMULATED_SMS = (1, 132, 4096)  # emulated device sizes a fuzz case draws from (DCN_EMULATE_SMS)


def _cuda_pool(count: int, rng: random.Random, draw) -> list[DCNConfig]:
    """`count` CUDA template configs from draw(rng, i) (the i-th config of the pool); draws the
    generator rejects are drawn again."""
    from dcngen.errors import ConfigError
    from dcngen.generators.template_cuda import launch_params

    pool = []
    while len(pool) < count:
        cfg = draw(rng, len(pool))
        try:
            launch_params(cfg)
        except ConfigError:
            continue
        pool.append(cfg)
    return pool


def tensor_core_pool(count: int, seed: int = 0) -> list[DCNConfig]:
    """`count` seeded random bf16 CUDA configs that run the tensor-core kernels: a tensor-core forward
    (fwd_mma, fwd_tile_mma or mma), bwd_mma or not, random tiles, warps, threads, halos and tiles per
    block; for the SIMT emulator."""
    def draw(rng: random.Random, i: int) -> DCNConfig:
        base = random_config(rng, dtype="bfloat16", op=("dcnv4", "dcnv3")[i % 2])
        kind = rng.random()
        forward = ({"fwd_mma": 1, "fwd_mma_h": rng.choice((2, 4, 8)), "fwd_mma_w": rng.choice((4, 8, 16)), "fwd_mma_warps": rng.choice((1, 2, 4)),
                    "fwd_halo": rng.choice((0, 1, 2)), "fwd_mma_tiles": rng.choice((0, 1, 3))} if kind < 0.5
                   else {"fwd_tile": 1, "fwd_tile_mma": 1, "fwd_tile_h": rng.choice((2, 4, 8)), "fwd_tile_w": rng.choice((4, 8, 16)),
                         "fwd_tile_threads": rng.choice((32, 64, 256)), "fwd_halo": rng.choice((0, 1, 2))} if kind < 0.75 else {"mma": 1})
        backward = {"bwd_mma": 1, "bwd_mma_h": rng.choice((2, 4, 8)), "bwd_mma_w": rng.choice((4, 8, 16)), "bwd_mma_warps": rng.choice((1, 2, 4)),
                    "bwd_halo": rng.choice((0, 1, 2)), "atomic_dtype": rng.choice((0, 1))} if rng.random() < 0.75 else {}
        return base.replace(group=min(base.group, 3), group_channels=rng.choice((16, 32, 48, 64)), target=rng.choice(("cuda:sm_80", "cuda:sm_90")),
                            params={**forward, **backward})

    return _cuda_pool(count, random.Random(f"{seed}-tensor-cores"), draw)


def simt_pool(count: int, seed: int = 0) -> list[DCNConfig]:
    """`count` seeded random CUDA configs of the per-point (SIMT) kernels, every dtype, each launch
    parameter drawn with probability 1/5 (vector widths, blocks, point batches, offset staging,
    shared point locations, atomics, register caps, the deterministic mode, the tiled backward and
    its tile and halo, the tiled forward and its tile and halo, the 16-bit blend; draws the
    generator rejects are drawn again); for the SIMT emulator."""
    def draw(rng: random.Random, i: int) -> DCNConfig:
        base = random_config(rng, dtype=DTYPES[i % len(DTYPES)], op=("dcnv4", "dcnv3")[(i // 4) % 2])
        params: dict[str, int] = {}
        for choice in ({"deterministic": 1}, {"bwd_tile": 1}, {"vec": rng.choice((1, 2, 4, 8))}, {"bwd_vec": rng.choice((1, 2, 4, 8))},
                       {"pixels": rng.randint(1, 9)}, {"bwd_pixels": rng.randint(1, 9)}, {"unroll": rng.randint(1, 5)},
                       {"bwd_unroll": rng.randint(1, 4)}, {"stage": 1}, {"bwd_stage": 0}, {"atomic_dtype": rng.choice((0, 1))},
                       {"bwd_tile": 1, "bwd_tile_h": rng.choice((2, 4, 8, 16))}, {"bwd_halo": rng.randint(0, 4)}, {"min_blocks": rng.randint(1, 3)},
                       {"share": 1}, {"fwd_tile": 1, "fwd_tile_h": rng.choice((2, 4, 8)), "fwd_tile_w": rng.choice((4, 8, 16)), "fwd_halo": rng.randint(0, 3)},
                       {"half_blend": 1}):
            if rng.random() < 0.2:
                params.update(choice)
        return base.replace(target=rng.choice(("cuda:sm_80", "cuda:sm_90")), params=params)

    return _cuda_pool(count, random.Random(f"{seed}-simt"), draw)


# ---- inputs ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One random input set; tensors are float64 holding values exactly representable in the config's dtype."""

    n: int
    h: int
    w: int
    x: torch.Tensor  # (N, H, W, G*C)
    offset: torch.Tensor  # (N, Ho, Wo, G, P, 2)
    mask: torch.Tensor  # (N, Ho, Wo, G, P)
    grad_out: torch.Tensor  # (N, Ho, Wo, G*C)
    extra_channels: int = 0  # DCNv4 offset_mask channels past G*P*3
    label: str = ""


def _fit(cfg: DCNConfig, axis: int, rng: random.Random) -> int:
    """A random input extent along `axis` (0: height, 1: width) for which the kernel fits."""
    need = cfg.dilation[axis] * (cfg.kernel_size[axis] - 1) + 1 - 2 * cfg.padding[axis]
    low = max(1, need)
    return rng.randint(low, low + rng.choice((0, 1, 3, 8, 14)))


def _round(t: torch.Tensor, dtype: str) -> torch.Tensor:
    return t.to(TORCH_DTYPE[dtype]).double()


def random_offsets(shape, h: int, w: int, rng: random.Random, gen: torch.Generator) -> tuple[torch.Tensor, str]:
    """Offsets in one of several regimes (or a per-element mix of them)."""
    regimes = {
        "tiny": lambda: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05,
        "unit": lambda: torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5,
        "wide": lambda: (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * (max(h, w) + 3),
        "far": lambda: (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * 10 * (max(h, w) + 3),
        "integer": lambda: torch.randint(-2, 3, shape, generator=gen).double(),
        "zero": lambda: torch.zeros(shape, dtype=torch.float64),
    }
    name = rng.choice(("tiny", "unit", "unit", "wide", "far", "integer", "zero", "mix", "mix"))
    if name != "mix":
        return regimes[name](), name
    parts = [regimes[k]() for k in ("tiny", "unit", "wide", "far", "integer")]
    pick = torch.randint(0, len(parts), shape, generator=gen)
    out = torch.zeros(shape, dtype=torch.float64)
    for i, part in enumerate(parts):
        out = torch.where(pick == i, part, out)
    return out, name


def keep_off_grid_lines(cfg: DCNConfig, offset: torch.Tensor) -> torch.Tensor:
    """Move samples that lie within GRID_MARGIN of an integer coordinate (float64 offsets in the dtype's values)."""
    s = cfg.offset_scale
    if s == 0:
        return offset
    margin = GRID_MARGIN[cfg.dtype]
    offset = offset.clone()
    for attempt in range(4):
        loc = reference.sampling_locations(cfg, offset)
        near = (loc - loc.round()).abs() < margin
        if not near.any():
            return offset
        shift = FAR if attempt == 3 else 0.37 / s
        offset = _round(torch.where(near, offset + shift, offset), cfg.dtype)
    return offset


def random_case(cfg: DCNConfig, rng: random.Random, size: tuple[int, int, int] | None = None) -> Case:
    """Random inputs of a random size, or of `size` (N, H, W)."""
    gen = torch.Generator().manual_seed(rng.getrandbits(62))
    n = rng.choice((1, 1, 2, 3))
    h, w = _fit(cfg, 0, rng), _fit(cfg, 1, rng)
    if size is not None:
        n, h, w = size
    ho, wo = cfg.output_size(h, w)
    g, p = cfg.group, cfg.num_points
    x = _round(torch.randn(n, h, w, cfg.channels, generator=gen, dtype=torch.float64), cfg.dtype)
    offset, regime = random_offsets((n, ho, wo, g, p, 2), h, w, rng, gen)
    offset = keep_off_grid_lines(cfg, _round(offset, cfg.dtype))
    mask = _round(torch.randn(n, ho, wo, g, p, generator=gen, dtype=torch.float64), cfg.dtype)
    grad_out = _round(torch.randn(n, ho, wo, cfg.channels, generator=gen, dtype=torch.float64), cfg.dtype)
    extra = rng.choice((0, 0, 1, 5, cfg.padded_offset_mask_channels - cfg.min_offset_mask_channels)) if cfg.op == "dcnv4" else 0
    return Case(n, h, w, x, offset, mask, grad_out, extra, f"N={n} H={h} W={w} offsets={regime} extra={extra}")


# ---- op tensors, reference, poisoned kernel calls -------------------------------------------------


def op_tensors(cfg: DCNConfig, case: Case, offset=None, mask=None) -> tuple[torch.Tensor, ...]:
    """The op's tensors in the config's dtype: (x, offset_mask) for DCNv4, (x, offset, mask) for DCNv3."""
    dt = TORCH_DTYPE[cfg.dtype]
    offset = case.offset if offset is None else offset
    mask = case.mask if mask is None else mask
    n, ho, wo = offset.shape[:3]
    x = case.x.to(dt).contiguous()
    if cfg.op == "dcnv4":
        packed = torch.cat((offset.flatten(-2), mask), dim=-1).reshape(n, ho, wo, cfg.min_offset_mask_channels)
        # padding channels hold garbage (including NaN): they must be ignored
        pad = torch.full((n, ho, wo, case.extra_channels), float("nan"), dtype=torch.float64)
        if case.extra_channels > 1:
            pad[..., 0] = 1e30
        return x, torch.cat((packed, pad), dim=-1).to(dt).contiguous()
    g, p = cfg.group, cfg.num_points
    return x, offset.reshape(n, ho, wo, g * p * 2).to(dt).contiguous(), mask.reshape(n, ho, wo, g * p).to(dt).contiguous()


def reference_grads(cfg: DCNConfig, case: Case, offset=None, mask=None):
    """float64 reference: (out, grad_x, grad_offset (N,Ho,Wo,G,P,2), grad_mask (N,Ho,Wo,G,P))."""
    offset = (case.offset if offset is None else offset).clone().requires_grad_()
    mask = (case.mask if mask is None else mask).clone().requires_grad_()
    x = case.x.clone().requires_grad_()
    out = reference.dcn_core(cfg, x, offset, mask)
    if out.numel():
        out.backward(case.grad_out)
    zero = lambda t, like: t if t is not None else torch.zeros_like(like)  # noqa: E731
    return out.detach(), zero(x.grad, x), zero(offset.grad, offset), zero(mask.grad, mask)


def kernel_outputs(cfg: DCNConfig, tensors: tuple, grad_out: torch.Tensor, kernel=None):
    """Calls the loaded kernel (cfg's, or `kernel`) directly with NaN-poisoned outputs; returns
    (out, grad_x, grad_offset_like, grad_mask_like).

    DCNv4: grad_offset_like is the packed gradient (its padding channels pre-zeroed where the
    backend's kernel leaves them alone) and grad_mask_like is the same tensor.
    """
    return poisoned_call(cfg, kernel or kernel_for(cfg), tensors, grad_out)


def split_grads(cfg: DCNConfig, grad_offset: torch.Tensor, grad_mask: torch.Tensor):
    """Kernel-layout gradients -> (N,Ho,Wo,G,P,2), (N,Ho,Wo,G,P), padding channels (DCNv4) or None."""
    n, ho, wo = grad_offset.shape[:3]
    g, p = cfg.group, cfg.num_points
    if cfg.op == "dcnv4":
        off, m = reference.split_offset_mask(cfg, grad_offset)
        return off, m, grad_offset[..., cfg.min_offset_mask_channels :]
    return grad_offset.reshape(n, ho, wo, g, p, 2), grad_mask.reshape(n, ho, wo, g, p), None


def mismatch(name: str, got: torch.Tensor, expected: torch.Tensor, dtype: str, scale: float | None = None) -> str | None:
    """None if `got` matches `expected` within the dtype's tolerance (absolute part relative to
    `scale`, by default the largest |expected|), else a description."""
    got = got.detach().double()
    if got.shape != expected.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if got.numel() == 0:
        return None
    rtol, atol = TOLERANCE[dtype]
    exp_nan = torch.isnan(expected)
    if not torch.equal(torch.isnan(got), exp_nan):
        bad = (torch.isnan(got) != exp_nan).nonzero()[0].tolist()
        return f"{name}: NaN pattern differs (first at {bad}: got {got[tuple(bad)].item()}, expected {expected[tuple(bad)].item()})"
    g, e = got[~exp_nan], expected[~exp_nan]
    if not torch.equal(torch.isinf(g), torch.isinf(e)) or not torch.equal(g[torch.isinf(g)], e[torch.isinf(e)]):
        return f"{name}: infinities differ"
    fin = torch.isfinite(e)
    g, e = g[fin], e[fin]
    if e.numel() == 0:
        return None
    scale = e.abs().max().item() if scale is None else max(scale, e.abs().max().item())
    err = (g - e).abs()
    bound = atol * max(scale, 1e-30) + rtol * e.abs()
    if (err > bound).any():
        i = int((err - bound).argmax())
        return f"{name}: max error {err.max().item():.3g} (scale {scale:.3g}); worst got {g[i].item():.6g} expected {e[i].item():.6g}"
    return None


def check_case(cfg: DCNConfig, case: Case, *, via_ops: bool = True, kernel=None) -> list[str]:
    """Every discrepancy of the kernel (cfg's loaded one, or `kernel`; direct, NaN-poisoned) and of
    the torch op against the reference. Each tensor's absolute tolerance is relative to the
    reference on |x|, |mask|, |grad_out| (the magnitudes of the terms its values sum, not their
    sums): rounding error follows the terms however much they cancel. A float32 grad_mask whose one
    nonzero entry, -7.5e-4, sums channel terms of 5.3 in magnitude came out 6e-7 off, two float32
    ulps of the terms; the tensor-core kernels round the sampling weights to the dtype as well."""
    problems = []
    ref_out, ref_gx, ref_goff, ref_gmask = reference_grads(cfg, case)
    plain = dataclasses.replace(case, x=case.x.abs(), grad_out=case.grad_out.abs())
    scales = [t.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max().item() if t.numel() else None
              for t in reference_grads(cfg, plain, mask=case.mask.abs())]
    tensors = op_tensors(cfg, case)
    ho, wo = ref_out.shape[1:3]
    expected_pad = torch.zeros(case.n, ho, wo, case.extra_channels, dtype=torch.float64)

    def compare(tag, out, gx, goff, gmask):
        off, m, pad = split_grads(cfg, goff, gmask)
        for (name, got, exp), scale in zip((("out", out, ref_out), ("grad_x", gx, ref_gx), ("grad_offset", off, ref_goff), ("grad_mask", m, ref_gmask)),
                                           scales):
            if (msg := mismatch(name, got, exp, cfg.dtype, scale)) is not None:
                problems.append(f"[{tag}] {msg}")
        if pad is not None and (msg := mismatch("grad_padding", pad, expected_pad, cfg.dtype)) is not None:
            problems.append(f"[{tag}] {msg}")

    compare("kernel", *kernel_outputs(cfg, tensors, case.grad_out, kernel=kernel))
    if via_ops:
        leaves = [t.clone().requires_grad_() for t in tensors]
        fn = ops.dcnv4 if cfg.op == "dcnv4" else ops.dcnv3
        out = fn(*leaves, **cfg.op_kwargs)
        out.backward(case.grad_out.to(out.dtype))
        grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
        compare("ops", out, grads[0], grads[1], grads[1] if cfg.op == "dcnv4" else grads[2])
    return problems


def describe(cfg: DCNConfig, case: Case) -> str:
    return f"{cfg.key} {case.label}"


def fuzz_cases_total(default: int) -> int:
    return int(os.environ.get("DCNGEN_FUZZ_CASES", default))


def per_config(total: int, configs: int) -> int:
    return max(1, math.ceil(total / max(1, configs)))

"""Hostile values and shapes: defined results or clear errors, never a crash, never out of bounds.

Semantics (docs/SPEC.md section 1): a point whose sampling location is NaN, infinite or outside the
strict window (-1, H) x (-1, W) contributes exactly zero, whatever its weight (even NaN or inf),
and gets exactly zero offset and weight gradients. A NaN weight on an in-window point makes that
pixel's group output NaN (m * B with IEEE arithmetic) and poisons the input gradient of the
corners it reads and its own offset gradient; its weight gradient (sum_c g_c B_c) stays finite.
A NaN input pixel poisons exactly the samples that read it.

test_under_sanitizers reruns this file in a subprocess with the kernels built with
AddressSanitizer + UndefinedBehaviorSanitizer (DCNGEN_SANITIZE=1) and fails on any report.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import needs_cuda_toolkit
import torch
from fuzzkit import (
    TORCH_DTYPE,
    Case,
    check_case,
    describe,
    kernel_outputs,
    keep_off_grid_lines,
    mismatch,
    op_tensors,
    random_case,
    reference_grads,
    split_grads,
)

import dcngen.ops as ops
from dcngen import reference
from dcngen.config import DCNConfig
from dcngen.errors import InputError
from dcngen.kernels import kernel_for

REPO = Path(__file__).resolve().parents[1]
SANITIZED = os.environ.get("DCNGEN_SANITIZE", "") not in ("", "0")

CONFIGS = [
    DCNConfig(op="dcnv4", group=2, group_channels=8, dtype="float32"),
    DCNConfig(op="dcnv3", group=3, group_channels=5, kernel_size=3, stride=2, remove_center=True, offset_scale=0.5, dtype="float64"),
    DCNConfig(op="dcnv4", group=4, group_channels=16, kernel_size=(5, 3), padding=(2, 0), dilation=(1, 2), offset_scale=2.0, dtype="bfloat16"),
    DCNConfig(op="dcnv3", group=1, group_channels=3, kernel_size=(1, 5), stride=(1, 3), padding=(0, 2), dtype="float32"),
    DCNConfig(op="dcnv4", group=3, group_channels=7, kernel_size=3, stride=2, offset_scale=1.5, dtype="float16"),
    DCNConfig(op="dcnv4", group=1, group_channels=12, offset_scale=-1.5, dtype="bfloat16"),
]
IDS = [c.key for c in CONFIGS]
HOSTILE = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30, 3e9, -3e9)


def inside(cfg: DCNConfig, offset: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, Ho, Wo, G, P) bool: the sampling location is finite and strictly inside the window."""
    with torch.no_grad():
        return reference.in_window(reference.sampling_locations(cfg, offset), h, w)


def expected(cfg: DCNConfig, case: Case):
    """The live points, and the reference's results: it removes every dead point (not inside):
    zero contribution, zero gradients, whatever its weight."""
    return inside(cfg, case.offset, case.h, case.w), reference_grads(cfg, case)


def run_both(cfg: DCNConfig, case: Case):
    """[(tag, out, grad_x, grad_offset (N,Ho,Wo,G,P,2), grad_mask (N,Ho,Wo,G,P))] from the poisoned kernel and the op."""
    tensors = op_tensors(cfg, case)
    results = []
    out, gx, goff, gmask = kernel_outputs(cfg, tensors, case.grad_out)
    off, m, _ = split_grads(cfg, goff, gmask)
    results.append(("kernel", out, gx, off, m))
    leaves = [t.clone().requires_grad_() for t in tensors]
    fn = ops.dcnv4 if cfg.op == "dcnv4" else ops.dcnv3
    out = fn(*leaves, **cfg.op_kwargs)
    out.backward(case.grad_out.to(out.dtype))
    g = [t.grad for t in leaves]
    off, m, _ = split_grads(cfg, g[1], g[1] if cfg.op == "dcnv4" else g[2])
    results.append(("ops", out, g[0], off, m))
    return results


def assert_matches(cfg, case, results, ref, live=None):
    ref_out, ref_gx, ref_goff, ref_gmask = ref
    for tag, out, gx, goff, gmask in results:
        for name, got, exp in (("out", out, ref_out), ("grad_x", gx, ref_gx), ("grad_offset", goff, ref_goff), ("grad_mask", gmask, ref_gmask)):
            msg = mismatch(name, got, exp, cfg.dtype)
            assert msg is None, f"[{tag}] {describe(cfg, case)}: {msg}"
        if live is not None:  # dead points: exactly zero gradients, not just small
            dead = ~live
            assert (goff.double()[dead] == 0).all(), f"[{tag}] nonzero offset gradient on a dead point"
            assert (gmask.double()[dead] == 0).all(), f"[{tag}] nonzero weight gradient on a dead point"


def hostile_case(cfg: DCNConfig, seed: int, fraction: float = 0.3, size: tuple[int, int, int] | None = None) -> tuple[Case, torch.Tensor]:
    """A random case (of `size` (N, H, W) if given) where `fraction` of the points have a NaN / inf /
    1e30 / 3e9 offset coordinate."""
    rng = random.Random(seed)
    case = random_case(cfg, rng, size)
    gen = torch.Generator().manual_seed(seed)
    shape = case.offset.shape
    pick = torch.randint(0, len(HOSTILE), shape, generator=gen)
    values = torch.tensor(HOSTILE, dtype=torch.float64)[pick].to(TORCH_DTYPE[cfg.dtype]).double()
    which = torch.rand(shape[:-1], generator=gen) < fraction
    coord = torch.randint(0, 3, shape[:-1], generator=gen)  # 0: x, 1: y, 2: both
    hit = torch.stack((which & (coord != 1), which & (coord != 0)), dim=-1)
    case.offset = torch.where(hit, values, case.offset)
    return case, hit.any(-1)


def nan_pixel_case(cfg: DCNConfig, seed: int, size: tuple[int, int, int] | None = None) -> Case:
    """A random case (of `size` (N, H, W) if given) with one input pixel NaN in every channel, no
    sample on a grid line (a zero bilinear weight times NaN is NaN)."""
    case = random_case(cfg, random.Random(seed), size)
    gen = torch.Generator().manual_seed(seed)
    n, y, x = (int(torch.randint(0, s, (1,), generator=gen)) for s in (case.n, case.h, case.w))
    case.x = case.x.clone()
    case.x[n, y, x, :] = float("nan")
    case.offset = keep_off_grid_lines(cfg, case.offset)
    return case


# the CUDA template's seven kernels: per-point forward and backward (the defaults), the tiled
# tensor-core forward and backward, the per-point tensor-core forward, the tiled backward, the
# tiled forward (no halo: in-window samples off the region read global memory). Under
# the sanitizers only the tiled tensor-core artifact (a build takes 20 s there; the default kernels
# also ran under compute-sanitizer on a GPU, benchmarks/RESULTS.md).
EMULATED = [
    DCNConfig(op="dcnv3", group=3, group_channels=16, stride=2, offset_scale=0.5, dtype="bfloat16", target="cuda:sm_90", params={"fwd_mma": 1, "bwd_mma": 1}),
    DCNConfig(op="dcnv4", group=2, group_channels=16, dtype="bfloat16", target="cuda:sm_90"),
    DCNConfig(op="dcnv3", group=3, group_channels=8, stride=2, offset_scale=0.5, dtype="bfloat16", target="cuda:sm_90", params={"mma": 1, "bwd_tile": 1}),
    DCNConfig(op="dcnv4", group=2, group_channels=16, dtype="float16", target="cuda:sm_90", params={"fwd_tile": 1, "fwd_halo": 0}),
    DCNConfig(op="dcnv4", group=2, group_channels=32, dtype="bfloat16", target="cuda:sm_90", params={"fwd_tile": 1, "fwd_tile_mma": 1, "fwd_halo": 1}),
][: 1 if SANITIZED else None]


@needs_cuda_toolkit
@pytest.mark.parametrize("cfg", EMULATED, ids=[c.key for c in EMULATED])
def test_emulated_cuda_kernels_on_hostile_offsets(cfg):
    """The CUDA kernels on the SIMT emulator: hostile offsets contribute nothing. Under
    test_under_sanitizers, AddressSanitizer also checks that no offset makes them read or write
    outside their tensors."""
    from dcngen.kernels import emulated_kernel

    kernel = emulated_kernel(cfg)
    case, _ = hostile_case(cfg, seed=4)
    live, ref = expected(cfg, case)
    out, gx, goff, gmask = kernel_outputs(cfg, op_tensors(cfg, case), case.grad_out, kernel=kernel)
    off, m, _ = split_grads(cfg, goff, gmask)
    assert_matches(cfg, case, [("emulated cuda", out, gx, off, m)], ref, live)


ZERO_SCALE = [DCNConfig(group=2, group_channels=4, offset_scale=0.0, dtype=dtype, backend=backend)
              for dtype, backend in (("float32", "template"), ("float64", "template"), ("float32", "tvm"))]


@pytest.mark.parametrize("cfg", ZERO_SCALE, ids=[c.key for c in ZERO_SCALE])
def test_non_finite_offsets_at_offset_scale_zero_contribute_nothing(cfg):
    """(grid + NaN) * 0 is NaN, so the point is outside the window, though a compiler's
    reassociation folds the product to 0 (it did, in both backends)."""
    case, hit = hostile_case(cfg, seed=6)
    live, ref = expected(cfg, case)
    assert not (live & hit & ~torch.isfinite(case.offset).all(-1)).any() and (hit & ~torch.isfinite(case.offset).all(-1)).any()
    assert_matches(cfg, case, run_both(cfg, case), ref, live)


# the kernels that sum the input gradient in fixed point, scaled by a bound of the weights
FIXED_POINT = [
    DCNConfig(op="dcnv4", group=2, group_channels=16, dtype="float32", target="cuda:sm_90", params={"deterministic": 1}),
    DCNConfig(op="dcnv3", group=2, group_channels=16, dtype="float32", target="cuda:sm_90", params={"bwd_tile": 1}),
]


@needs_cuda_toolkit
@pytest.mark.skipif(SANITIZED, reason="the sanitized run covers the tiled tensor-core artifact only")
@pytest.mark.parametrize("cfg", FIXED_POINT, ids=[c.key for c in FIXED_POINT])
def test_fixed_point_scale_ignores_the_weights_of_points_outside_the_window(cfg):
    """A NaN, inf or huge weight on a point that samples outside the window adds nothing, so it
    must not set the fixed-point scale either (it zeroed or NaN-ed the whole input gradient)."""
    from dcngen.kernels import emulated_kernel

    kernel = emulated_kernel(cfg)
    case, _ = hostile_case(cfg, seed=5)
    live = inside(cfg, case.offset, case.h, case.w)
    assert (~live).any()
    for weight in (float("nan"), float("inf"), 1e30):
        case.mask = torch.where(live, case.mask, torch.full_like(case.mask, weight))
        out, gx, goff, gmask = kernel_outputs(cfg, op_tensors(cfg, case), case.grad_out, kernel=kernel)
        off, m, _ = split_grads(cfg, goff, gmask)
        assert_matches(cfg, case, [(f"emulated cuda, weight {weight}", out, gx, off, m)], reference_grads(cfg, case), live)


@needs_cuda_toolkit
@pytest.mark.parametrize("cfg", EMULATED, ids=[c.key for c in EMULATED])
def test_emulated_cuda_kernels_on_nan_input_pixel(cfg):
    """The CUDA kernels on the SIMT emulator: a NaN input pixel poisons exactly the samples that read
    it (the tiled tensor-core forward multiplies it by zero for the others, then recomputes them)."""
    from dcngen.kernels import emulated_kernel

    kernel = emulated_kernel(cfg)
    case = nan_pixel_case(cfg, seed=13, size=(2, 19, 21))  # several tiles, most pixels far from the NaN
    live, ref = expected(cfg, case)
    out, gx, goff, gmask = kernel_outputs(cfg, op_tensors(cfg, case), case.grad_out, kernel=kernel)
    off, m, _ = split_grads(cfg, goff, gmask)
    assert_matches(cfg, case, [("emulated cuda", out, gx, off, m)], ref, live)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hostile_offsets_contribute_nothing(cfg, seed):
    case, hit = hostile_case(cfg, seed)
    live, ref = expected(cfg, case)
    assert not (live & hit).any(), "every hostile offset must put its point outside the window"
    assert_matches(cfg, case, run_both(cfg, case), ref, live)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.group == 1], ids=[c.key for c in CONFIGS if c.group == 1])
def test_hostile_offsets_in_row_bands(cfg):
    """One image of one group, 40 output rows: the CPU backward splits its rows into bands, each
    scattering into its own window of the input gradient. Hostile offsets there too."""
    case, hit = hostile_case(cfg, 3, size=(1, 40, 17))
    live, ref = expected(cfg, case)
    assert cfg.output_size(case.h, case.w)[0] >= 16 and not (live & hit).any()
    assert_matches(cfg, case, run_both(cfg, case), ref, live)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_all_offsets_hostile(cfg):
    for value in HOSTILE:
        case = random_case(cfg, random.Random(7))
        case.offset = torch.full_like(case.offset, value).to(TORCH_DTYPE[cfg.dtype]).double()
        for tag, out, gx, goff, gmask in run_both(cfg, case):
            for name, t in (("out", out), ("grad_x", gx), ("grad_offset", goff), ("grad_mask", gmask)):
                assert (t == 0).all(), f"[{tag}] offset {value}: {name} must be exactly zero"


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_nan_weights(cfg):
    """NaN weights: on a dead point nothing happens; on a live point that pixel-group's output is NaN."""
    case = random_case(cfg, random.Random(11))
    gen = torch.Generator().manual_seed(11)
    nan_at = torch.rand(case.mask.shape, generator=gen) < 0.1
    case.mask = torch.where(nan_at, torch.full_like(case.mask, float("nan")), case.mask)
    live, ref = expected(cfg, case)
    results = run_both(cfg, case)
    assert_matches(cfg, case, results, ref, live)
    poisoned = (nan_at & live).any(-1)  # (N, Ho, Wo, G)
    out = results[0][1].double().unflatten(-1, (cfg.group, cfg.group_channels))
    assert torch.equal(torch.isnan(out).any(-1), poisoned)
    assert torch.equal(torch.isnan(out).all(-1), poisoned)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_inf_weights(cfg):
    """An infinite weight on a live point makes that pixel-group non-finite (never a crash); all else is exact."""
    case = random_case(cfg, random.Random(12))
    gen = torch.Generator().manual_seed(12)
    inf_at = torch.rand(case.mask.shape, generator=gen) < 0.05
    case.mask = torch.where(inf_at, torch.full_like(case.mask, float("inf")), case.mask)
    live = inside(cfg, case.offset, case.h, case.w)
    affected = (inf_at & live).any(-1)  # (N, Ho, Wo, G)
    clean = torch.where(inf_at, torch.zeros_like(case.mask), case.mask)
    ref_out = reference_grads(cfg, case, mask=clean)[0].unflatten(-1, (cfg.group, cfg.group_channels))
    for tag, out, *_ in run_both(cfg, case):
        out = out.detach().double().unflatten(-1, (cfg.group, cfg.group_channels))
        assert (~torch.isfinite(out[affected])).all(), tag
        msg = mismatch("out", out[~affected], ref_out[~affected], cfg.dtype)
        assert msg is None, f"[{tag}] {msg}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_nan_input_pixel(cfg):
    """A NaN input pixel poisons exactly the samples whose corners read it (as the reference does)."""
    case = nan_pixel_case(cfg, seed=13)
    live, ref = expected(cfg, case)
    assert_matches(cfg, case, run_both(cfg, case), ref, live)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_nan_input_pixel_next_to_every_sample(cfg):
    """Offsets within 0.375 px: every point samples beside its own grid position, so many points
    have corners beside the NaN pixel without reading it. Kernels that read a pixel's last, partial
    vector of channels whole must drop the lanes that belong to the next pixel."""
    case = random_case(cfg, random.Random(15), (1, 9, 11))
    case.x = case.x.clone()
    case.x[0, 4, 5, :] = float("nan")
    gen = torch.Generator().manual_seed(15)
    steps = torch.tensor([-0.375, -0.125, 0.125, 0.375], dtype=torch.float64)  # off the grid lines at every offset_scale here
    case.offset = steps[torch.randint(0, 4, case.offset.shape, generator=gen)]
    live, ref = expected(cfg, case)
    assert_matches(cfg, case, run_both(cfg, case), ref, live)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_empty_batch(cfg):
    case = random_case(cfg, random.Random(3))
    case = Case(0, case.h, case.w, case.x[:0], case.offset[:0], case.mask[:0], case.grad_out[:0], case.extra_channels)
    tensors = op_tensors(cfg, case)
    out, gx, goff, gmask = kernel_outputs(cfg, tensors, case.grad_out)  # direct call: a no-op
    assert out.shape[0] == 0 and gx.shape == tensors[0].shape
    results = run_both(cfg, case)
    for tag, out, gx, goff, gmask in results:
        ho, wo = cfg.output_size(case.h, case.w)
        assert tuple(out.shape) == (0, ho, wo, cfg.channels), tag
        assert tuple(gx.shape) == tuple(tensors[0].shape), tag


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_one_pixel_images(cfg, seed):
    """1x1 (or the smallest fitting) images with random offsets."""
    rng = random.Random(seed)
    case = random_case(cfg, rng)
    (kh, kw), (ph, pw), (dh, dw) = cfg.kernel_size, cfg.padding, cfg.dilation
    h, w = max(1, dh * (kh - 1) + 1 - 2 * ph), max(1, dw * (kw - 1) + 1 - 2 * pw)
    ho, wo = cfg.output_size(h, w)
    gen = torch.Generator().manual_seed(seed)
    dt = lambda t: t.to(TORCH_DTYPE[cfg.dtype]).double()  # noqa: E731
    offset = keep_off_grid_lines(cfg, dt(torch.randn(2, ho, wo, cfg.group, cfg.num_points, 2, generator=gen, dtype=torch.float64)))
    case = Case(2, h, w, dt(torch.randn(2, h, w, cfg.channels, generator=gen, dtype=torch.float64)), offset,
                dt(torch.randn(2, ho, wo, cfg.group, cfg.num_points, generator=gen, dtype=torch.float64)),
                dt(torch.randn(2, ho, wo, cfg.channels, generator=gen, dtype=torch.float64)), case.extra_channels)
    assert not check_case(cfg, case)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_random_cases(cfg):
    """A few ordinary random cases per config (under the sanitizers these exercise the hot paths)."""
    rng = random.Random(99)
    for _ in range(6):
        case = random_case(cfg, rng)
        problems = check_case(cfg, case)
        assert not problems, describe(cfg, case) + "\n" + "\n".join(problems)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=IDS[:2])
def test_noncontiguous_inputs(cfg):
    case = random_case(cfg, random.Random(5))
    tensors = op_tensors(cfg, case)
    fn = ops.dcnv4 if cfg.op == "dcnv4" else ops.dcnv3
    expect = fn(*tensors, **cfg.op_kwargs)
    strided = [torch.cat((t, t), dim=-1)[..., : t.shape[-1]] for t in tensors]  # same values, non-contiguous
    assert not strided[0].is_contiguous()
    assert torch.equal(fn(*strided, **cfg.op_kwargs), expect)


def test_kernel_that_does_not_fit_is_an_input_error():
    cfg = CONFIGS[0]
    x = torch.zeros(1, 1, 1, cfg.channels)
    with pytest.raises(InputError, match="does not fit"):
        ops.dcnv4(x, torch.zeros(1, 1, 1, 64), kernel_size=5, padding=0, group=cfg.group, group_channels=cfg.group_channels)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.zeros(1, 4, 4, 15), torch.zeros(1, 4, 4, 56)), "input must be"),
        (lambda: (torch.zeros(1, 4, 4, 16), torch.zeros(1, 4, 4, 53)), "offset_mask must be"),
        (lambda: (torch.zeros(1, 4, 4, 16), torch.zeros(1, 4, 5, 56)), "offset_mask must be"),
        (lambda: (torch.zeros(4, 4, 16), torch.zeros(1, 4, 4, 56)), "4-D"),
        (lambda: (torch.zeros(1, 4, 4, 16), torch.zeros(1, 4, 4, 56, dtype=torch.float64)), "dtype"),
        (lambda: (torch.zeros(1, 4, 4, 16, dtype=torch.int32), torch.zeros(1, 4, 4, 56, dtype=torch.int32)), "dtype"),
        (lambda: (torch.zeros(1, 4, 4, 16, dtype=torch.complex64), torch.zeros(1, 4, 4, 56, dtype=torch.complex64)), "complex64"),
    ],
)
def test_bad_tensors_are_input_errors(make, match):
    x, om = make()
    with pytest.raises(InputError, match=match):
        ops.dcnv4(x, om, group=2, group_channels=8)


def test_non_tensor_argument_is_a_clear_error():
    with pytest.raises((InputError, RuntimeError), match="Tensor"):  # the op schema rejects it before the op runs
        ops.dcnv4(torch.zeros(1, 4, 4, 16), [[0.0]], group=2, group_channels=8)


@pytest.mark.skipif(SANITIZED, reason="already running under the sanitizers")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ASan preload recipe is Linux/gcc specific")
def test_under_sanitizers(tmp_path):
    """This file again, kernels built with -fsanitize=address,undefined,float-cast-overflow; any report fails."""
    try:
        libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("gcc not available")
    if not Path(libasan).is_file():
        pytest.skip("libasan is not installed")
    # libstdc++ preloaded too: otherwise ASan's __cxa_throw interceptor finds no real function and
    # aborts on the first C++ exception torch throws (e.g. an InputError crossing the dispatcher).
    stdcxx = subprocess.run(["g++", "-print-file-name=libstdc++.so.6"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ)
    env.update(
        DCNGEN_SANITIZE="1",
        LD_PRELOAD=" ".join(p for p in (libasan, stdcxx) if p and Path(p).is_file()),
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87",
        OMP_NUM_THREADS="2",
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(Path(__file__)), "-k", "not sanitizers"]
    # -s: a sanitizer report goes to stderr as the process dies; pytest's capture would swallow it
    proc = subprocess.run([*cmd, "-s"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    for marker in ("AddressSanitizer", "runtime error:", "UndefinedBehaviorSanitizer", "LeakSanitizer"):
        assert marker not in output, output[-6000:]
    assert proc.returncode == 0, output[-6000:]
    assert " passed" in output and " failed" not in output, output[-2000:]


@pytest.mark.skipif(not SANITIZED, reason="only meaningful under DCNGEN_SANITIZE=1")
def test_sanitized_kernels_are_loaded():
    art = kernel_for(CONFIGS[0])
    assert art is not None
    from dcngen.compilers.cpp import asan_runtime_loaded

    assert asan_runtime_loaded()

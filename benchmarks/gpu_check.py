"""One-shot GPU check of the CUDA template backend: build, verify, benchmark.

Run on a machine with an NVIDIA GPU, torch (CUDA), nvcc and apache-tvm-ffi (TVM not needed):
    python benchmarks/gpu_check.py
1. Builds the CUDA variants (in parallel) for the visible GPU's architecture.
2. Verifies forward and backward against the float64 reference (dcngen.reference) on random
   inputs whose sampling points cross the image borders, with outputs pre-filled with NaN
   (unwritten elements show up), for many configurations (fp32/fp16/bf16/fp64, DCNv3/DCNv4,
   strides, dilation, remove_center, channel tails, deterministic mode, side streams).
3. Checks the forward's 64-bit index path (default and share=1) on an image whose element offsets pass 2^31.
4. Times forward and backward (CUDA events, warm-up, medians) on the shapes of docs/SPEC.md section 4
   against the PyTorch baseline (dcngen.baseline, grid_sample; and the official DCNv4 package if
   importable), and reports the achieved memory bandwidth against the card's peak.
5. Times parameter candidates against the defaults (paired, alternated), each checked first.
Prints a markdown report; also writes it to $OUT/gpu_results.md when $OUT is set.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")  # no JIT of torch's DLPack addon here

import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcngen import baseline, reference  # noqa: E402
from dcngen.bench import compare  # noqa: E402
from dcngen.build import build, load  # noqa: E402
from dcngen.config import DCNConfig  # noqa: E402
from dcngen.errors import ConfigError  # noqa: E402
from dcngen.generators import generate  # noqa: E402
from dcngen.generators.template_cuda import launch_params  # noqa: E402
from dcngen.verify import TORCH_DTYPE, poisoned_call, rel_err  # noqa: E402

START = time.time()
LINES: list[str] = []
FAILURES: list[str] = []


def log(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def failed(what: str, e: Exception, row: str) -> None:
    """Record a check that raised: a failure, its report row and the traceback."""
    FAILURES.append(f"{what}: {e!r}")
    log(row)
    traceback.print_exc()


def peak_bandwidth(name: str) -> float | None:
    """Peak DRAM bandwidth in bytes/s from the device name (None when unknown)."""
    table = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H800", 3.35e12), ("A100", 2.0e12), ("L40", 0.864e12), ("B200", 8.0e12)]
    for key, bw in table:
        if key.lower() in name.lower():
            return bw
    return None


# ---------------------------------------------------------------------------------------------
# inputs
def make_inputs(cfg: DCNConfig, n: int, h: int, w: int, dtype: torch.dtype, seed: int = 0, reach: int = 2, device: str = "cuda"):
    """x (N, H, W, G*C); DCNv4: (offset_mask,), DCNv3: (offset, mask). Offsets are multiples of
    1/64 plus 1/128 within [-reach, reach): every sampling point lies >= 1/256 px away from
    pixel-grid lines (no floor() ties between precisions) and many cross the borders."""
    g = torch.Generator(device=device).manual_seed(seed)
    dev = device
    ho, wo = cfg.output_size(h, w)
    gp = cfg.group * cfg.num_points
    x = torch.randn(n, h, w, cfg.channels, generator=g, device=dev).to(dtype)
    off = (torch.randint(-64 * reach, 64 * reach, (n, ho, wo, gp * 2), generator=g, device=dev).float() / 64 + 1 / 128).to(dtype)
    mask = torch.randn(n, ho, wo, gp, generator=g, device=dev).to(dtype)
    if cfg.op == "dcnv4":
        return x, (reference.pack_offset_mask(cfg, off, mask),)
    return x, (off, mask)


def ref_grads(cfg, x, om, go):
    """float64 reference output and gradients (autograd through dcngen.reference)."""
    xs = x.double().requires_grad_(True)
    oms = [t.double().requires_grad_(True) for t in om]
    fn = reference.dcnv4 if cfg.op == "dcnv4" else reference.dcnv3
    out = fn(cfg, xs, *oms)
    out.backward(go.double())
    return out.detach(), xs.grad, [t.grad for t in oms]


def run_kernel(mod, cfg, x, om, go, stream=None):
    """Our forward and backward with NaN-poisoned outputs (DCNv4 padding channels zeroed first, as
    the op does, only for kernels that leave them alone)."""
    ctx = torch.cuda.stream(stream) if stream is not None else torch.cuda.stream(torch.cuda.current_stream())
    with ctx:
        out, gx, goff, gmask = poisoned_call(cfg, mod, (x, *om), go)
    torch.cuda.synchronize()
    return out, gx, [goff] if cfg.op == "dcnv4" else [goff, gmask]


TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}



# ---------------------------------------------------------------------------------------------
# configurations
def cuda_cfg(**kw) -> DCNConfig:
    kw.setdefault("target", "cuda")
    return DCNConfig(**kw)


def applies(kw: dict, dtype: str) -> bool:
    """Whether the generator accepts the config `kw` in `dtype` (e.g. mma=1: fp16/bf16 only)."""
    try:
        launch_params(cuda_cfg(dtype=dtype, **kw))
    except ConfigError:
        return False
    return True


DT = TORCH_DTYPE

# (name, config, (N, H, W))
CHECKS = [
    ("v4 bench-like", dict(group=4, group_channels=32, offset_scale=2.0), (2, 13, 17)),
    ("v3 bench-like", dict(op="dcnv3", group=4, group_channels=32, offset_scale=2.0), (2, 13, 17)),
    ("v4 G5 C16 os0.5", dict(group=5, group_channels=16, offset_scale=0.5), (3, 9, 11)),
    ("v4 stride2 pad0", dict(group=4, group_channels=16, stride=2, padding=0), (2, 15, 12)),
    ("v4 dil2 rc", dict(group=2, group_channels=16, dilation=2, padding=2, remove_center=True), (2, 10, 9)),
    ("v3 5x5", dict(op="dcnv3", group=3, group_channels=24, kernel_size=5, padding=2), (1, 11, 10)),
    ("v4 7x7", dict(group=2, group_channels=8, kernel_size=7, padding=3), (1, 12, 13)),
    ("v4 3x5 rect", dict(group=2, group_channels=64, kernel_size=(3, 5), padding=(1, 2)), (1, 8, 9)),
    ("v4 tail C20 vec8", dict(group=3, group_channels=20, params={"vec": 8, "bwd_vec": 8}), (2, 7, 9)),
    ("v4 vec4 px7", dict(group=4, group_channels=32, params={"vec": 4, "pixels": 7, "bwd_pixels": 5}), (3, 7, 9)),
    ("v4 G80 C16", dict(group=80, group_channels=16), (1, 6, 7)),
    ("v4 deterministic", dict(group=4, group_channels=32, params={"deterministic": 1}), (2, 13, 17)),
    # each sample blended in the storage type (half_blend): packed 16-bit FMAs, a channel tail, shared taps
    ("v4 half-blend bench-like", dict(group=4, group_channels=32, offset_scale=2.0, params={"half_blend": 1}), (2, 13, 17)),
    ("v3 half-blend 5x5 C20 share staged", dict(op="dcnv3", group=2, group_channels=20, kernel_size=5, padding=2,
                                                params={"half_blend": 1, "share": 1, "stage": 1, "vec": 8}), (1, 11, 10)),
    # points located once per (pixel, group): rounds of taps in shared memory, an idle lane (C24)
    ("v4 share bench-like", dict(group=4, group_channels=32, offset_scale=2.0, params={"share": 1}), (2, 13, 17)),
    ("v3 share 5x5 C24 staged", dict(op="dcnv3", group=3, group_channels=24, kernel_size=5, padding=2, params={"share": 1, "stage": 1}), (1, 11, 10)),
    ("v3 deterministic", dict(op="dcnv3", group=4, group_channels=16, kernel_size=5, padding=2, params={"deterministic": 1}), (2, 9, 8)),
    # tiled backward: region sums, partial tiles, and (halo 0) the global-memory fallback
    ("v4 bwd-tile bench-like", dict(group=4, group_channels=32, offset_scale=2.0, params={"bwd_tile": 1}), (2, 13, 17)),
    ("v3 bwd-tile 5x5 C24", dict(op="dcnv3", group=3, group_channels=24, kernel_size=5, padding=2, params={"bwd_tile": 1}), (1, 11, 10)),
    ("v4 bwd-tile halo0 4x8", dict(group=4, group_channels=16, params={"bwd_tile": 1, "bwd_halo": 0, "bwd_tile_h": 4, "bwd_tile_w": 8}), (2, 19, 21)),
    ("v4 bwd-tile stride2 dil2 rc", dict(group=2, group_channels=16, stride=2, padding=2, dilation=2, remove_center=True, params={"bwd_tile": 1}), (2, 15, 12)),
    # tiled SIMT forward: corners split by column (fp16 / bf16 C32, fp32 C16), by corner (fp16 C16) or
    # not (fp32 C32), partial tiles, and (halo 0) samples beyond the region from global memory; and
    # with its sums on tensor cores (fwd_tile_mma: swizzled 64-byte rows, 32-byte rows)
    ("v4 fwd-tile bench-like", dict(group=4, group_channels=32, offset_scale=2.0, params={"fwd_tile": 1}), (2, 13, 17)),
    ("v4 fwd-tile-mma bench-like", dict(group=4, group_channels=32, offset_scale=2.0, params={"fwd_tile": 1, "fwd_tile_mma": 1}), (2, 13, 17)),
    ("v3 fwd-tile-mma C16 dil2 rc halo0", dict(op="dcnv3", group=2, group_channels=16, dilation=2, padding=2, remove_center=True,
                                               params={"fwd_tile": 1, "fwd_tile_mma": 1, "fwd_halo": 0}), (1, 11, 23)),
    ("v4 fwd-tile C16 dil2 rc halo0", dict(group=3, group_channels=16, dilation=2, padding=2, remove_center=True, params={"fwd_tile": 1, "fwd_halo": 0}),
     (2, 10, 9)),
    # tensor-core forward (fp16/bf16 only): partial pixel batches, C % 16 == 8, 1..8 warps per block
    ("v4 mma bench-like", dict(group=4, group_channels=32, offset_scale=2.0, params={"mma": 1}), (2, 13, 17)),
    ("v3 mma 5x5 C24", dict(op="dcnv3", group=3, group_channels=24, kernel_size=5, padding=2, params={"mma": 1, "mma_warps": 8}), (1, 11, 10)),
    ("v4 mma stride2 dil2 rc C8", dict(group=2, group_channels=8, stride=2, padding=2, dilation=2, remove_center=True, params={"mma": 1, "mma_warps": 1}), (2, 15, 12)),
    ("v4 mma 7x7 C64", dict(group=2, group_channels=64, kernel_size=7, padding=3, params={"mma": 1}), (1, 12, 13)),
    # tiled tensor-core forward and backward (fp16/bf16 only): partial tiles, the per-point paths
    # (halo 0), fp32 accumulator, one warp per 32-pixel forward tile
    ("v4 mma-tiled bench-like", dict(group=4, group_channels=32, offset_scale=2.0, params={"fwd_mma": 1, "bwd_mma": 1}), (2, 13, 17)),
    ("v3 mma-tiled stride2 dil2 rc halo0", dict(op="dcnv3", group=2, group_channels=32, stride=2, padding=2, dilation=2, remove_center=True,
                                                params={"fwd_mma": 1, "fwd_halo": 0, "bwd_mma": 1, "bwd_halo": 0}), (2, 15, 12)),
    ("v4 mma-tiled 5x5 C64 4x8 fp32-acc", dict(group=2, group_channels=64, kernel_size=5, padding=2,
                                               params={"fwd_mma": 1, "fwd_mma_h": 4, "fwd_mma_w": 8, "fwd_mma_warps": 1,
                                                       "bwd_mma": 1, "bwd_mma_h": 4, "bwd_mma_w": 8, "atomic_dtype": 0}), (1, 12, 13)),
]
CHECK_DTYPES = ("float32", "float16", "bfloat16")

# parameter candidates timed against the defaults on the first two benchmark shapes, per pass (the
# likeliest winners first: rows past the time budget are skipped)
SWEEP = {
    "fwd": [{"half_blend": 1}, {"half_blend": 1, "stage": 1},
            {"fwd_tile": 1, "fwd_tile_mma": 1}, {"fwd_tile": 1}, {"fwd_tile": 1, "fwd_tile_mma": 1, "fwd_tile_h": 16}, {"fwd_tile": 1, "fwd_tile_h": 16},
            {"stage": 1}, {"fwd_mma": 1}, {"fwd_mma": 1, "fwd_mma_warps": 4}, {"fwd_mma": 1, "fwd_halo": 2}, {"fwd_mma": 1, "fwd_mma_tiles": 4},
            {"mma": 1}, {"share": 1}, {"share": 1, "pixels": 16}, {"share": 1, "share_round": 9}, {"pixels": 16}],
    "bwd": [{"bwd_tile": 1}, {"bwd_tile": 1, "bwd_vec": 1}, {"bwd_tile": 1, "bwd_tile_h": 16, "bwd_tile_w": 16, "bwd_tile_threads": 512},
            {"bwd_mma": 1}, {"bwd_mma": 1, "bwd_mma_warps": 8}, {"bwd_mma": 1, "bwd_halo": 2}, {"bwd_mma": 1, "bwd_mma_warps": 8, "bwd_halo": 2},
            {"bwd_mma": 1, "bwd_mma_w": 16}, {"bwd_mma": 1, "bwd_mma_h": 4, "bwd_mma_w": 8},
            {"bwd_stage": 0, "bwd_unroll": 3, "bwd_min_blocks": 2}],
}

# candidates timed on one more shape: 32-byte fp16 corner rows (C16), where each corner costs the L1 a
# whole 128-byte line pass and the forward is near the bound of one line a cycle (benchmarks/l1_traffic.py:
# 85 us against 90.8 us measured on the H100); staged offsets take that bound to 68 us, the tiled
# SIMT forward (its region's rows read free of bank conflicts) to 51 us
LINE_BOUND_SWEEP = {"N1 200x320 G8 C16": {"fwd": [{"stage": 1}, {"fwd_tile": 1}, {"fwd_tile": 1, "fwd_tile_mma": 1}, {"half_blend": 1}]}}

# benchmark shapes: (name, config, (N, H, W))
BENCH = [
    ("N64 56x56 G4 C32", dict(group=4, group_channels=32, offset_scale=2.0), (64, 56, 56)),
    ("N1 200x320 G4 C32", dict(group=4, group_channels=32, offset_scale=2.0), (1, 200, 320)),
    ("N1 200x320 G8 C16", dict(group=8, group_channels=16, offset_scale=2.0), (1, 200, 320)),
    ("N64 28x28 G8 C32", dict(group=8, group_channels=32, offset_scale=2.0), (64, 28, 28)),
    # small outputs, where the per-point launchers halve their blocks to reach every multiprocessor
    ("N64 7x7 G4 C32", dict(group=4, group_channels=32, offset_scale=2.0), (64, 7, 7)),
    ("N1 25x40 G4 C32", dict(group=4, group_channels=32, offset_scale=2.0), (1, 25, 40)),
]
BENCH_DTYPES = ("float16", "float32", "bfloat16")
# the first shape again with small offsets, within +-1 at offset_scale 1 (every sample within 1 px of
# its kernel position): where the tiled kernels' regions are smallest; fp16 only
SMALL_OFFSETS = ("N64 56x56 G4 C32, offsets +-1 x 1", dict(group=4, group_channels=32, offset_scale=1.0), (64, 56, 56), 1)
# parameter sets timed on every benchmark shape: the defaults, and the tensor-core backward where it applies (the
# H200's tunes kept it; no opt-in forward beat the default there, benchmarks/RESULTS.md)
BENCH_PARAMS = ({}, {"bwd_mma": 1})


def build_all(cfgs: list[DCNConfig]) -> dict:
    def one(cfg):
        try:
            return load(build(generate(cfg)))
        except Exception as e:  # noqa: BLE001
            return e

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        return dict(zip(cfgs, pool.map(one, cfgs)))


# ---------------------------------------------------------------------------------------------
def verify(mods: dict) -> None:
    log("## Correctness (max |err| / max |ref| against the float64 reference)\n")
    log("| check | dtype | out | grad x | grad offset(/mask) | grad mask | result |")
    log("|---|---|---|---|---|---|---|")
    for name, kw, (n, h, w) in CHECKS:
        dtypes = CHECK_DTYPES + (("float64",) if name == "v4 bench-like" else ())
        for dt in (d for d in dtypes if applies(kw, d)):
            cfg = cuda_cfg(dtype=dt, **kw)
            mod = mods[cfg]
            if isinstance(mod, Exception):
                FAILURES.append(f"{name} {dt}: build failed: {mod}")
                log(f"| {name} | {dt} | build failed | | | | FAIL |")
                continue
            try:
                x, om = make_inputs(cfg, n, h, w, DT[dt])
                ho, wo = cfg.output_size(h, w)
                go = torch.randn(n, ho, wo, cfg.channels, device="cuda").to(DT[dt])
                out, gx, goms = run_kernel(mod, cfg, x, om, go)
                r_out, r_gx, r_goms = ref_grads(cfg, x, om, go)
                errs = [rel_err(out, r_out), rel_err(gx, r_gx)] + [rel_err(a, b) for a, b in zip(goms, r_goms)]
                tol = TOL[DT[dt]]
                ok = all(e <= tol for e in errs)
                extra = ""
                if cfg.param_dict.get("deterministic"):
                    out2, gx2, goms2 = run_kernel(mod, cfg, x, om, go)
                    same = torch.equal(gx, gx2) and all(torch.equal(a, b) for a, b in zip(goms, goms2))
                    ok &= same
                    extra = " bitwise-repeatable" if same else " NOT REPEATABLE"
                if name == "v4 bench-like" and dt == "float32":  # a side stream and the 7-argument backward
                    s = torch.cuda.Stream()
                    out3, gx3, _ = run_kernel(mod, cfg, x, om, go, stream=s)
                    gx4 = torch.full_like(x, float("nan"))
                    g4 = torch.zeros_like(om[0])
                    mod._mod["backward"](x, om[0], om[0], go, gx4, g4, g4)
                    torch.cuda.synchronize()
                    same = torch.equal(out3, out) and rel_err(gx3, r_gx) <= tol and rel_err(gx4, r_gx) <= tol
                    ok &= same
                    extra += " side-stream+7-arg ok" if same else " SIDE STREAM / 7-ARG MISMATCH"
                cells = [f"{e:.2e}" for e in errs] + ([""] if len(errs) == 3 else [])
                log(f"| {name} | {dt} | " + " | ".join(cells) + f" | {'ok' if ok else 'FAIL'}{extra} |")
                if not ok:
                    FAILURES.append(f"{name} {dt}: errors {errs} (tol {tol}){extra}")
            except Exception as e:  # noqa: BLE001
                failed(f"{name} {dt}", e, f"| {name} | {dt} | error: {str(e).splitlines()[0][:80]} | | | | FAIL |")
    log("")


def wide_index(mods: dict) -> None:
    """An image whose element offsets pass 2^31 (the forward's 64-bit index path, by default and
    with shared point locations): spot pixels, including the last, against the reference on crops
    around them."""
    cfg = cuda_cfg(dtype="float16", group=4, group_channels=32, offset_scale=2.0)
    h, w = 4096, 4100  # (h + 4) * (w + 4) * 128 > 2^31
    log("## 64-bit index path\n")
    try:
        g = torch.Generator(device="cuda").manual_seed(11)
        x = torch.randn(1, h, w, cfg.channels, generator=g, device="cuda", dtype=torch.float16)
        off = (torch.rand(1, h, w, cfg.group * cfg.num_points * 2, generator=g, device="cuda", dtype=torch.float16) * 4 - 2)
        mask = torch.randn(1, h, w, cfg.group * cfg.num_points, generator=g, device="cuda", dtype=torch.float16)
        om = reference.pack_offset_mask(cfg, off, mask)
        del off, mask
        out = torch.empty_like(x)
        for variant in (cfg, cfg.replace(params={"share": 1})):
            mod = mods.get(variant)
            if mod is None or isinstance(mod, Exception):
                log(f"- {variant.param_dict or 'defaults'}: not built")
                continue
            out.fill_(float("nan"))
            mod.forward(x, om, om, out)
            torch.cuda.synchronize()
            worst = 0.0
            for y, xx in [(h - 1, w - 1), (h - 3, 17), (2000, 2100), (0, w - 1)]:
                y0, x0 = max(0, y - 12), max(0, xx - 12)
                crop = (slice(None), slice(y0, min(h, y + 13)), slice(x0, min(w, xx + 13)))
                ref = reference.dcnv4(cfg, x[crop].double(), om[crop].double())[0, y - y0, xx - x0]
                worst = max(worst, rel_err(out[0, y, xx], ref))
            ok = worst <= TOL[torch.float16]
            log(f"- {variant.param_dict or 'defaults'}: 1x{h}x{w}x128 fp16 forward, 4 spot pixels (incl. the last): max rel err {worst:.2e}, "
                f"{'ok' if ok else 'FAIL'}")
            if not ok:
                FAILURES.append(f"wide index {variant.param_dict}: error {worst:.2e}")
        del x, om, out
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        failed("wide index", e, f"- error {e!r}")
    log("")


def parameter_sweep(mods: dict) -> None:
    """Parameter candidates against the defaults, per pass, each checked against the defaults'
    results first."""
    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(props.name)
    log("## Parameter candidates vs the defaults (paired, alternated; ratio = candidate / default)\n")
    log("| shape | dtype | pass | params | default us | candidate us | ratio | rounds won | candidate % floor | check |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for name, kw, (n, h, w) in BENCH[:2] + [b for b in BENCH if b[0] in LINE_BOUND_SWEEP]:
        sweep = LINE_BOUND_SWEEP.get(name, SWEEP)
        for dt in BENCH_DTYPES:
            base = cuda_cfg(dtype=dt, **kw)
            x, (om,) = make_inputs(base, n, h, w, DT[dt])
            ho, wo = base.output_size(h, w)
            out = torch.empty(n, ho, wo, base.channels, device="cuda", dtype=DT[dt])
            go = torch.randn_like(out)
            gx, gom = torch.empty_like(x), torch.empty_like(om)

            def run(mod, what):
                if what == "fwd":
                    mod.forward(x, om, om, out)
                else:
                    mod.backward(x, om, om, go, gx, gom, gom)

            run(mods[base], "fwd")
            run(mods[base], "bwd")
            want = [out.float().clone(), gx.float().clone(), gom.float().clone()]
            es = x.element_size()
            floor_bytes = {"fwd": (x.numel() + om.numel() + out.numel()) * es, "bwd": (2 * x.numel() + 2 * om.numel() + go.numel()) * es}
            for what, candidates in sweep.items():
                for params in (c for c in candidates if applies({**kw, "params": c}, dt)):
                    if time.time() - START > 255:
                        log(f"| {name} | {dt} | {what} | {params} | skipped (time budget) ||||||")
                        continue
                    mod = mods.get(cuda_cfg(dtype=dt, **{**kw, "params": params}))
                    if isinstance(mod, Exception) or mod is None:
                        log(f"| {name} | {dt} | {what} | {params} | build failed ||||||")
                        continue
                    try:
                        for t in (out, gx, gom):
                            t.fill_(float("nan"))
                        run(mod, "fwd")
                        run(mod, "bwd")
                        err = max(rel_err(a, b) for a, b in zip((out, gx, gom), want))
                        ok = err <= TOL[DT[dt]]
                        if not ok:
                            FAILURES.append(f"sweep {name} {dt} {params}: differs from the defaults by {err:.2e}")
                        # samples: CUDA-event medians of 5 calls; 7 rounds (odd), so 1 / speedup is the median ratio
                        c = compare(lambda: run(mod, what), lambda: run(mods[base], what), rounds=7, warmup=0,
                                    timer=lambda fn: cuda_time(fn, warmup=1, reps=5))
                    except Exception as e:  # noqa: BLE001  (the other rows still run)
                        failed(f"sweep {name} {dt} {params}", e, f"| {name} | {dt} | {what} | {params} | error: {str(e).splitlines()[0][:80]} ||||||")
                        continue
                    pct = f"{100 * floor_bytes[what] / peak / (c.candidate_ms * 1e-3):.0f}%" if peak else "n/a"
                    log(f"| {name} | {dt} | {what} | {params} | {c.baseline_ms * 1e3:.1f} | {c.candidate_ms * 1e3:.1f} | {1 / c.speedup:.3f} | "
                        f"{c.candidate_faster}/{c.rounds} | {pct} | "
                        f"{'ok' if ok else 'FAIL'} {err:.1e} |")
    log("")


def cuda_time(fn, warmup: int = 3, reps: int = 15) -> float:
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def official_dcnv4():
    try:
        from DCNv4 import functions  # noqa: PLC0415

        return functions.DCNv4Function
    except Exception:  # noqa: BLE001
        return None


def benchmark(mods: dict) -> None:
    props = torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(props.name)
    official = official_dcnv4()
    log(f"## Performance on {props.name} (peak {peak / 1e12 if peak else float('nan'):.2f} TB/s assumed)\n")
    log("Bandwidth floor = bytes that must move (fwd: x, offset_mask, out; bwd: x, offset_mask, grad_out, grad_x, grad_offset_mask) / peak.")
    log("'% floor' = floor time / measured time. Times are medians in microseconds.\n")
    log("| shape | dtype | fwd us | fwd % floor | bwd us | bwd % floor | bwd/fwd | PyTorch fwd us | PyTorch bwd us | speedup fwd / bwd | official fwd / bwd us | check |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [(*b, 2, BENCH_DTYPES) for b in BENCH] + [(*SMALL_OFFSETS, ("float16",))]
    for name, kw, (n, h, w), reach, dtypes in rows:
        for params, dt in ((p, d) for p in BENCH_PARAMS for d in dtypes if applies({**kw, "params": p}, d)):
            label = " ".join([dt] + [f"{k}={v}" for k, v in params.items()])
            if time.time() - START > 200:
                log(f"| {name} | {label} | skipped (time budget) |||||||||||")
                continue
            cfg = cuda_cfg(dtype=dt, **kw, params=params)
            mod = mods[cfg]
            if isinstance(mod, Exception):
                log(f"| {name} | {label} | build failed ||||||||||| ")
                continue
            try:
                bench_one(name, label, cfg, mod, n, h, w, peak, official, reach)
            except Exception as e:  # noqa: BLE001
                failed(f"bench {name} {label}", e, f"| {name} | {label} | error: {str(e).splitlines()[0][:80]} |||||||||||")
    log("")


def bench_one(name, label, cfg, mod, n, h, w, peak, official, reach: int = 2) -> None:
    """One row of the benchmark table; `label`: the dtype and any non-default parameters;
    offsets within [-reach, reach)."""
    torch.cuda.empty_cache()
    dtype = DT[cfg.dtype]
    x, (om,) = make_inputs(cfg, n, h, w, dtype, reach=reach)
    ho, wo = cfg.output_size(h, w)
    out = torch.empty(n, ho, wo, cfg.channels, device="cuda", dtype=dtype)
    go = torch.randn_like(out)
    gx, gom = torch.empty_like(x), torch.zeros_like(om)
    t_fwd = cuda_time(lambda: mod.forward(x, om, om, out))
    t_bwd = cuda_time(lambda: mod.backward(x, om, om, go, gx, gom, gom))
    es = x.element_size()
    fwd_bytes = (x.numel() + om.numel() + out.numel()) * es
    bwd_bytes = (2 * x.numel() + 2 * om.numel() + go.numel()) * es
    pct = lambda b, t: f"{100 * b / peak / (t * 1e-3):.0f}%" if peak else "n/a"  # noqa: E731
    # correctness at this shape: against the fp32 PyTorch reference on the same inputs
    with torch.no_grad():
        r = reference.dcnv4(cfg, x.float(), om.float())
    check = rel_err(out, r)
    ok = check <= max(TOL[dtype], 1e-4) * 2
    if not ok:
        FAILURES.append(f"bench {name} {label}: output error {check:.2e}")
    del r
    # PyTorch baseline timings (the grid_sample formulation)
    try:
        xr, omr = x.clone().requires_grad_(True), om.clone().requires_grad_(True)
        with torch.no_grad():
            t_ref_fwd = cuda_time(lambda: baseline.dcnv4(cfg, x, om), warmup=1, reps=5)
        yr = baseline.dcnv4(cfg, xr, omr)
        t_ref_bwd = cuda_time(lambda: torch.autograd.grad(yr, (xr, omr), go, retain_graph=True), warmup=1, reps=5)
        yr = None  # its graph is freed before empty_cache
    except torch.cuda.OutOfMemoryError:
        t_ref_fwd = t_ref_bwd = float("nan")
    torch.cuda.empty_cache()
    off = "n/a"
    if official is not None:
        try:
            kh, kw = cfg.kernel_size
            args = (kh, kw, *cfg.stride, *cfg.padding, *cfg.dilation, cfg.group, cfg.group_channels, cfg.offset_scale, 256, cfg.remove_center)
            xo, omo = x.clone().requires_grad_(True), om.clone().requires_grad_(True)
            t_o_fwd = cuda_time(lambda: official.apply(x, om, *args))
            yo = official.apply(xo, omo, *args)
            t_o_bwd = cuda_time(lambda: torch.autograd.grad(yo, (xo, omo), go, retain_graph=True))
            off = f"{t_o_fwd * 1e3:.0f} / {t_o_bwd * 1e3:.0f}"
        except Exception as e:  # noqa: BLE001
            off = f"error: {type(e).__name__}"
    log(
        f"| {name} | {label} | {t_fwd * 1e3:.1f} | {pct(fwd_bytes, t_fwd)} | {t_bwd * 1e3:.1f} | {pct(bwd_bytes, t_bwd)} | {t_bwd / t_fwd:.2f} | "
        f"{t_ref_fwd * 1e3:.0f} | {t_ref_bwd * 1e3:.0f} | {t_ref_fwd / t_fwd:.1f}x / {t_ref_bwd / t_bwd:.1f}x | {off} | {'ok' if ok else 'FAIL'} {check:.1e} |"
    )


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device visible")
        return 2
    props = torch.cuda.get_device_properties(0)
    log(f"# dcngen CUDA template check\n\n{props.name}, sm_{props.major}{props.minor}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    cfgs = []
    for _, kw, _ in CHECKS:
        for dt in CHECK_DTYPES + ("float64",):
            if applies(kw, dt):
                cfgs.append(cuda_cfg(dtype=dt, **kw))
    for _, kw, _ in BENCH + [SMALL_OFFSETS[:3]]:
        for params in BENCH_PARAMS:
            for dt in BENCH_DTYPES:
                if applies({**kw, "params": params}, dt):
                    cfgs.append(cuda_cfg(dtype=dt, **kw, params=params))
    for name, kw, _ in BENCH[:2] + [b for b in BENCH if b[0] in LINE_BOUND_SWEEP]:
        for params in (c for candidates in LINE_BOUND_SWEEP.get(name, SWEEP).values() for c in candidates):
            for dt in BENCH_DTYPES:
                if applies({**kw, "params": params}, dt):
                    cfgs.append(cuda_cfg(dtype=dt, **{**kw, "params": params}))
    cfgs = [c for c in dict.fromkeys(cfgs) if c.dtype != "float64" or c == cuda_cfg(dtype="float64", **CHECKS[0][1])]
    t0 = time.time()
    mods = build_all(cfgs)
    built = [m for m in mods.values() if not isinstance(m, Exception)]
    log(f"Built {len(built)}/{len(cfgs)} kernels in {time.time() - t0:.1f} s.\n")
    for cfg, m in mods.items():
        if isinstance(m, Exception):
            log(f"- build failed for {cfg.key}: {str(m)[:2000]}")
    verify(mods)
    wide_index(mods)
    benchmark(mods)
    parameter_sweep(mods)
    log(f"Total {time.time() - START:.0f} s. {'ALL OK' if not FAILURES else f'{len(FAILURES)} FAILURES:'}")
    for f in FAILURES:
        log(f"- {f}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_results.md").write_text("\n".join(LINES) + "\n")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())

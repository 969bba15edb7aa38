"""GPU check of the TVM backend's CUDA artifacts, which run without TVM installed.

Two steps, because the GPU machine has no TVM:
    python benchmarks/gpu_check_tvm.py build     # here (TVM + nvcc): builds the artifacts into the cache
    python benchmarks/gpu_check_tvm.py check     # on the GPU (cache carried along): verify + time

`check` loads every TVM-backend CUDA artifact of the visible GPU's architecture from the cache,
verifies forward and backward against the float64 reference (NaN-poisoned outputs, offsets
crossing the borders) and times them next to the template backend built there, with CUDA events.
Writes $OUT/gpu_tvm.md when $OUT is set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dcngen.build import build, list_artifacts, load  # noqa: E402
from dcngen.config import DCNConfig  # noqa: E402
from dcngen.generators import generate  # noqa: E402

ARCH = "sm_90"
CONFIGS = [dict(op=op, group=4, group_channels=32, offset_scale=2.0, dtype=dt) for op in ("dcnv4", "dcnv3")
           for dt in ("float32", "float16", "bfloat16")]
CHECK_SHAPE, BENCH_SHAPE = (2, 13, 17), (64, 56, 56)


def build_all() -> None:
    for fields in CONFIGS:
        art = build(generate(DCNConfig(backend="tvm", target=f"cuda:{ARCH}", **fields)))
        print(art.path.name, art.meta.get("registers", ""))


def check() -> int:
    from gpu_check import DT, TOL, cuda_time, make_inputs, ref_grads, rel_err, run_kernel

    lines = [f"# TVM-backend CUDA artifacts on {torch.cuda.get_device_name()}", "",
             "| config | dtype | out | grad x | grad offsets | tvm fwd us | tvm bwd us | template fwd us | template bwd us | result |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    failures = 0
    arts = [a for a in list_artifacts() if a.meta["config"]["backend"] == "tvm" and a.meta["config"]["target"] == f"cuda:{ARCH}"]
    for art in arts:
        c = art.meta["config"]
        cfg = DCNConfig(op=c["op"], group=c["group"], group_channels=c["group_channels"], kernel_size=tuple(c["kernel_size"]),
                        stride=tuple(c["stride"]), padding=tuple(c["padding"]), dilation=tuple(c["dilation"]),
                        offset_scale=c["offset_scale"], remove_center=c["remove_center"], dtype=c["dtype"],
                        target=c["target"], backend="tvm")
        dtype = DT[cfg.dtype]
        mod = load(art)
        x, om = make_inputs(cfg, *CHECK_SHAPE, dtype)
        ho, wo = cfg.output_size(*CHECK_SHAPE[1:])
        go = torch.randn(CHECK_SHAPE[0], ho, wo, cfg.channels, device="cuda").to(dtype)
        out, gx, goms = run_kernel(mod, cfg, x, om, go)
        r_out, r_gx, r_goms = ref_grads(cfg, x, om, go)
        errs = [rel_err(out, r_out), rel_err(gx, r_gx), max(rel_err(a, b) for a, b in zip(goms, r_goms))]
        ok = all(e < TOL[dtype] for e in errs)
        failures += not ok
        xb, omb = make_inputs(cfg, *BENCH_SHAPE, dtype)
        hob, wob = cfg.output_size(*BENCH_SHAPE[1:])
        gob = torch.randn(BENCH_SHAPE[0], hob, wob, cfg.channels, device="cuda").to(dtype)
        times = []
        for kernel in (mod, load(build(generate(cfg.replace(backend="template"))))):
            outb = torch.empty(BENCH_SHAPE[0], hob, wob, cfg.channels, device="cuda", dtype=dtype)
            off, msk = (omb[0], omb[0]) if cfg.op == "dcnv4" else omb
            gxb, gomb = torch.empty_like(xb), [torch.zeros_like(t) for t in omb]
            g_off, g_msk = (gomb[0], gomb[0]) if cfg.op == "dcnv4" else gomb
            times.append(cuda_time(lambda: kernel.forward(xb, off, msk, outb)) * 1e3)
            times.append(cuda_time(lambda: kernel.backward(xb, off, msk, gob, gxb, g_off, g_msk)) * 1e3)
        lines.append(f"| {cfg.op} G{cfg.group} C{cfg.group_channels} N64 56x56 | {cfg.dtype} | "
                     + " | ".join(f"{e:.1e}" for e in errs) + " | "
                     + " | ".join(f"{t:.0f}" for t in times) + f" | {'ok' if ok else 'FAIL'} |")
    lines.append(f"\n{len(arts)} artifacts, {failures} failures.")
    text = "\n".join(lines)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_tvm.md").write_text(text + "\n")
    return 1 if failures or not arts else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:
        build_all()
    else:
        sys.exit(check())

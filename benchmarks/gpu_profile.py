"""Kernel-level diagnostics of the CUDA template backend (one GPU call, Nsight Compute and
compute-sanitizer on the machine).

    PYTHONPATH=/tmp/site:$PWD python benchmarks/gpu_profile.py run [params-json ...]
        runs the forward and backward of gpu_check's first benchmark shape in fp16 (N=64 56x56
        G=4 C=32, offset_scale 2) once per parameter set, for `ncu --kernel-name regex:dcn_ ...` to profile;
    PYTHONPATH=/tmp/site:$PWD python benchmarks/gpu_profile.py hostile [params-json ...]
        runs forward and backward on NaN / inf / huge offsets and weights at a small shape, for
        `compute-sanitizer --tool memcheck` to watch for out-of-bounds accesses.
Each params-json is a JSON object of template parameters ('{}': the defaults).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check as gc  # noqa: E402  (inputs)

from dcngen.build import build, load  # noqa: E402
from dcngen.generators import generate  # noqa: E402



def run(mod, cfg, n: int, h: int, w: int, hostile: bool) -> None:
    x, (om,) = gc.make_inputs(cfg, n, h, w, torch.float16, seed=5)
    if hostile:
        flat = om.view(-1)
        idx = torch.randperm(flat.numel(), device="cuda")[: flat.numel() // 5]
        values = torch.tensor([float("nan"), float("inf"), -float("inf"), 6e4, -6e4, 3.7, -5.2], device="cuda").half()
        flat[idx] = values[torch.arange(idx.numel(), device="cuda") % values.numel()]
    ho, wo = cfg.output_size(h, w)
    out = torch.empty(n, ho, wo, cfg.channels, device="cuda", dtype=torch.float16)
    go = torch.randn_like(out)
    gx, gom = torch.empty_like(x), torch.empty_like(om)
    mod.forward(x, om, om, out)
    mod.backward(x, om, om, go, gx, gom, gom)
    torch.cuda.synchronize()


def main() -> int:
    mode, *sets = sys.argv[1:]
    _, bench_config, bench_shape = gc.BENCH[0]
    for params in sets or ["{}"]:
        cfg = gc.cuda_cfg(dtype="float16", **bench_config, params=json.loads(params))
        mod = load(build(generate(cfg)))
        shape = (2, 13, 17) if mode == "hostile" else bench_shape
        run(mod, cfg, *shape, hostile=mode == "hostile")
        print(f"ran {cfg.key} at {shape}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

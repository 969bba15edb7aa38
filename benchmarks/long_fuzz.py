"""Long fuzz run: many random configs x random inputs, every available CPU backend, against the float64 reference.

Same checks as tests/test_fuzz.py (NaN-poisoned direct kernel calls and the torch op, forward and
backward), without pytest, with a running count and a JSON summary of every failure:

    python benchmarks/long_fuzz.py --cases 10000 --configs 120 --seed 1 --out /tmp/long_fuzz.json

(equivalently, through pytest: DCNGEN_FUZZ_CONFIGS=120 DCNGEN_FUZZ_CASES=10000 DCNGEN_FUZZ_SEED=1
pytest tests/test_fuzz.py -q). `--cases` counts per backend. `--emulated N` adds N configs of the
CUDA per-point kernels and N of the tensor-core kernels with random launch parameters, run on the
SIMT emulator (`--emulated-cases` each; needs the CUDA toolkit's headers, no GPU), each case on an
emulated device of 1, 132 or 4096 SMs unless DCN_EMULATE_SMS sets one. Exit status 1 if any case
failed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fuzzkit import (  # noqa: E402
    EMULATED_SMS, available_backends, check_case, config_pool, describe, per_config, random_case, simt_pool, tensor_core_pool,
)


def emulated_runs(count: int, seed: int):
    """(cfg, check) for `count` per-point and `count` tensor-core CUDA configs on the SIMT emulator;
    check(case) runs the emulated kernel, its warps in an order of the case's own."""
    import os

    from dcngen.kernels import emulated_kernel

    fixed_sms = os.environ.get("DCN_EMULATE_SMS")  # else each case draws the emulated device's size

    def checker(cfg):
        kernel = None

        def check(case, rng: random.Random):
            nonlocal kernel
            kernel = kernel or emulated_kernel(cfg)
            os.environ["DCN_EMULATE_SEED"] = str(rng.randrange(2**62))
            os.environ["DCN_EMULATE_SMS"] = fixed_sms or str(rng.choice(EMULATED_SMS))
            return check_case(cfg, case, via_ops=False, kernel=kernel)

        return check

    return [(cfg, checker(cfg)) for cfg in (*simt_pool(count, seed), *tensor_core_pool(count, seed))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10000, help="random cases per backend")
    ap.add_argument("--configs", type=int, default=120, help="configs per backend (each one is a kernel build)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--backends", default=",".join(available_backends()), help="CPU backends, comma-separated ('' for none)")
    ap.add_argument("--emulated", type=int, default=0, help="CUDA configs of each kind (per-point, tensor-core) on the SIMT emulator")
    ap.add_argument("--emulated-cases", type=int, default=10, help="random cases per emulated config")
    ap.add_argument("--out", type=Path, default=Path("long_fuzz.json"))
    args = ap.parse_args()

    backends = [b for b in args.backends.split(",") if b]
    each = per_config(args.cases, args.configs)
    runs = [(cfg, each, lambda case, rng, cfg=cfg: check_case(cfg, case)) for cfg in (config_pool(args.configs, args.seed, backends) if backends else [])]
    runs += [(cfg, args.emulated_cases, check) for cfg, check in emulated_runs(args.emulated, args.seed)]
    started = time.time()
    done, failures = 0, []
    for i, (cfg, cases, check) in enumerate(runs):
        rng = random.Random(f"{args.seed}-{cfg.key}")
        for _ in range(cases):
            case = random_case(cfg, rng)
            try:
                problems = check(case, rng)
            except Exception:  # a crash of the op is a failure too (a segfault ends the run: rerun with the seed)
                problems = [traceback.format_exc(limit=3)]
            done += 1
            if problems:
                failures.append({"config": cfg.key, "case": case.label, "problems": problems})
                print(f"FAIL {describe(cfg, case)}: {problems[0]}", flush=True)
        print(f"[{i + 1}/{len(runs)}] {cfg.key}: {done} cases, {len(failures)} failures, {time.time() - started:.0f} s", flush=True)
    kinds = backends + (["cuda emulated"] if args.emulated else [])
    summary = {"cases": done, "configs": len(runs), "backends": kinds, "seed": args.seed, "failures": failures,
               "seconds": round(time.time() - started, 1)}
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"{done} cases over {len(runs)} configs ({', '.join(kinds)}): {len(failures)} failures in {summary['seconds']} s -> {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

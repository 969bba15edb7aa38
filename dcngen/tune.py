"""`dcngen tune`: measured search of generator parameters, stored as tuning records (dcngen/records.py).

Per candidate parameter set, in the order of dcngen/search.py: generate and build (a build failure
scores inf), load it where it will run (dcngen/executors.py: this process, or a TVM RPC server),
check forward and every gradient against the float64 reference at a small shape (a mismatch
rejects the candidate: it is recorded as failed and never chosen), then time it against the
default parameters in alternating rounds. A candidate's time is the default's calibrated median
times the median of the paired ratios candidate/default, which keeps times from a noisy, shared
machine comparable. The search stops on a trial or time budget; the best candidate is re-timed
against the default and kept only if it is faster, in the median and in enough of the paired
rounds that chance is unlikely (CONFIRM_P). Candidates already in the record file are not
measured again (resume).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import records
from .config import DCNConfig
from .errors import DCNGenError
from .executors import LocalExecutor
from .search import MEASURE_FIRST, Space, candidates, default_params, next_batch, space_for

FINAL_FIELDS = ("best", "confirm", "spread_ms", "failed", "tune_seconds")  # what a finished run adds to its record
GATE_SHAPE = (2, 9, 11)  # small, border-crossing: every candidate is checked here before timing
MIN_SAMPLE_MS = 10.0  # calls per timing sample are batched up to this
# The best candidate is kept only if it also wins enough of its re-timing's paired rounds that a
# candidate no faster than the default would do so by chance less often than this (a sign test)
CONFIRM_P = 0.05
CONFIRM_ROUNDS = 5  # the re-timing's fewest rounds: where a candidate can pass that test (all 5 won: 1/32)


# ---- one candidate ----------------------------------------------------------------------------
def _kernel_args(cfg: DCNConfig, executor, n: int, h: int, w: int, seed: int = 0):
    """(inputs as torch, forward args, backward args) on the executor for a random problem; the
    outputs start NaN-poisoned (verify.poisoned_outputs), so an element a candidate leaves
    unwritten fails its check."""
    from .verify import TORCH_DTYPE, poisoned_outputs, random_problem

    problem = random_problem(cfg, n, h, w, seed=seed)
    dtype = TORCH_DTYPE[cfg.dtype]
    inputs = problem.op_inputs(dtype)
    x, off, mask = (inputs[0], inputs[1], inputs[1]) if cfg.op == "dcnv4" else inputs
    out, gx, goff, gmask = poisoned_outputs(cfg, inputs)
    host = (x, off, mask, out, problem.grad_out.to(dtype), gx, goff, gmask)
    # one device tensor per host tensor: DCNv4's offset and mask (and their gradients) stay one buffer
    placed = {id(t): executor.put(t) for t in host}
    dev = [placed[id(t)] for t in host]
    fwd = (dev[0], dev[1], dev[2], dev[3])
    bwd = (dev[0], dev[1], dev[2], dev[4], dev[5], dev[6], dev[7])
    return problem, inputs, fwd, bwd, dev


def check(cfg: DCNConfig, executor, mod) -> dict[str, float]:
    """Max relative error of forward and gradients of `mod` vs the float64 reference at GATE_SHAPE."""
    from .verify import reference_errors

    problem, inputs, fwd, bwd, dev = _kernel_args(cfg, executor, *GATE_SHAPE)
    mod.forward(*fwd)
    mod.backward(*bwd)
    out, gx, goff, gmask = (executor.get(t) for t in (dev[3], dev[5], dev[6], dev[7]))
    grads = (gx, goff) if cfg.op == "dcnv4" else (gx, goff, gmask)
    return reference_errors(cfg, inputs, problem.grad_out.to(inputs[0].dtype), out, grads)


@dataclass
class Trial:
    params: dict
    ms: float = math.inf  # drift-corrected median (see module docstring); inf when failed
    failure: str | None = None

    @property
    def value(self):
        return round(self.ms, 4) if self.failure is None else f"failed: {self.failure}"


class _Measure:
    """Builds, checks and times candidates of one config at one shape against the default's timer."""

    def __init__(self, cfg: DCNConfig, shape, executor, space: Space):
        self.cfg, self.shape, self.executor, self.space = cfg, shape, executor, space
        self.args = None
        self.number = 1

    def build(self, params: dict):
        """(artifact, None) or (None, failure reason): `params`' kernel built (or found in the cache).
        Safe to call from several threads for template backends (one compiler process per build)."""
        from .build import build
        from .generators import generate

        try:
            return build(generate(self.cfg.replace(params=tuple(params.items())))), None
        except DCNGenError as e:
            return None, f"build: {str(e).splitlines()[0][:160]}"

    def load(self, params: dict, built=None):
        """(loaded module, None) or (None, failure reason) after building (unless `built`, build's
        result, is given) and checking `params`."""
        from .verify import TOLERANCE

        cand = self.cfg.replace(params=tuple(params.items()))
        artifact, failure = built or self.build(params)
        if failure:
            return None, failure
        try:
            mod = self.executor.load(cand, artifact)
            errors = check(cand, self.executor, mod)
        except Exception as e:  # a candidate that crashes the call is rejected like a wrong one
            return None, f"run: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        tol = TOLERANCE[cand.dtype]
        bad = {k: v for k, v in errors.items() if not v < tol}
        if bad:
            return None, "verify: " + ", ".join(f"{k} rel. error {v:.2e} > {tol:g}" for k, v in bad.items())
        return mod, None

    def timer(self, mod) -> Callable[[], float]:
        if self.args is None:
            _, _, fwd, bwd, _ = _kernel_args(self.cfg, self.executor, *self.shape, seed=1)
            self.args = {"forward": fwd, "backward": bwd}
        return self.executor.timer(mod, [(p, self.args[p]) for p in self.space.passes], self.number)

    def calibrate(self, mod, rounds: int) -> float:
        """Median ms of the default; sets calls per sample so a sample lasts >= MIN_SAMPLE_MS."""
        first = self.timer(mod)
        first()  # warm-up (first touch, thread pool start)
        self.number = max(1, math.ceil(MIN_SAMPLE_MS / max(first(), 1e-3)))
        sample = self.timer(mod)
        sample()
        return statistics.median(sample() for _ in range(rounds))

    def paired(self, a: Callable[[], float], b: Callable[[], float], rounds: int):
        """bench.compare of samplers (each call: one sample's ms) a and b in alternating rounds, after
        one warm-up each; a / b is 1 / its speedup (the inverse of the median of the paired b / a)."""
        from .bench import compare

        return compare(a, b, rounds=rounds, timer=lambda sample: sample())


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere): a CLI budget includes the start-up."""
    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, float(Path("/proc/uptime").read_text().split()[0]) - start)
    except (OSError, ValueError, IndexError):
        return 0.0


@dataclass
class TuneResult:
    key: str
    record: dict
    trials: list[Trial] = field(default_factory=list)
    path: Path | None = None


def tune(cfg: DCNConfig, shape: tuple[int, int, int], *, trials: int = 64, time_budget: float = 300.0, rounds: int = 7,
         executor=None, root: Path | None = None, seed: int = 0, space: Space | None = None, jobs: int = 1,
         progress: Callable[[int, int, float, str], None] | None = None) -> TuneResult:
    """Search cfg's parameters at input `shape` (N, H, W); write and return the record.

    Candidates are built `jobs` at a time in parallel (template backends; TVM builds one at a
    time), then checked and timed one by one, with no build running meanwhile. Stops after
    `trials` new measurements or when `time_budget` seconds would be exceeded (the final re-timing
    of the best against the default is kept inside the budget; inf: no limit).
    progress(done, total, best_ms, note) is called after each candidate.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise DCNGenError(f"trials must be a whole number >= 0, got {trials!r}")
    if math.isnan(time_budget):
        raise DCNGenError("time_budget must be a number of seconds (inf: no limit), got nan")
    started = time.monotonic()
    deadline = started + time_budget
    cfg = cfg.replace(params=())
    space = space or space_for(cfg)
    default = default_params(cfg)
    bkt = records.bucket(shape)
    key = records.record_key(cfg, bkt)
    own_executor = executor is None
    executor = executor or LocalExecutor(cfg)
    measured_on = executor.machine(cfg.target)  # the machine the timings are filed under
    path = records.path_for(cfg.target, root, measured_on)
    records.check_writable(path)
    previous = records.load(path)["records"].get(key, {})
    if previous.get("passes", list(space.passes)) != list(space.passes):  # timed over other passes: start again
        previous = {}
    measured: dict[str, object] = dict(previous.get("candidates", {}))
    m = _Measure(cfg, shape, executor, space)
    done: list[Trial] = []
    try:
        t0 = time.monotonic()
        base_mod, failure = m.load(default)
        default_s = time.monotonic() - t0  # the first estimate of a batch's builds
        if failure:
            raise DCNGenError(f"the default parameters of {cfg.key} fail: {failure}")
        base_ms = m.calibrate(base_mod, rounds=2 * rounds + 1)
        old_base = previous.get("default", {}).get("ms")
        if old_base:  # resumed: rescale earlier times to today's default (the machine's load changes)
            measured = {k: round(v * base_ms / old_base, 4) if isinstance(v, (int, float)) else v for k, v in measured.items()}
        base = m.timer(base_mod)
        measured[records.params_name(default)] = round(base_ms, 4)
        trial_s, build_s = [], []  # seconds per check-and-timing, per batch of builds

        # until this run's own result, the record keeps the last run's (an interrupted re-tune must
        # not leave the ops without it)
        last_result = {k: previous[k] for k in FINAL_FIELDS if k in previous}

        def save(final: dict | None = None) -> None:
            rec = {
                "config": records.config_key(cfg), "generator_version": records.generator_version(), "bucket": list(bkt),
                "shape": list(shape), "candidates": measured, "passes": list(space.passes), "executor": executor.where,
                "default": {"params": default, "ms": round(base_ms, 4)},
            }
            records.update(path, cfg.target, key, {**rec, **(final or last_result)}, measured_on)

        best_ms = min((v for v in measured.values() if isinstance(v, (int, float))), default=base_ms)
        total = trials
        if progress:
            progress(0, total, best_ms, f"default {base_ms:.3f} ms")
        confirm_rounds = max(2 * rounds, CONFIRM_ROUNDS)
        reserve = 2 * (2 * confirm_rounds + 2) * base_ms * m.number / 1e3 * len(space.passes) + 3.0  # the final re-timing
        timing_s = 2 * (rounds + 1) * base_ms * m.number / 1e3 * len(space.passes)  # one paired timing
        pending = (p for p in candidates(cfg, space, default, seed, measured) if p is MEASURE_FIRST or records.params_name(p) not in measured)
        jobs = max(1, jobs) if cfg.backend == "template" else 1
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            while len(done) < trials:
                # builds and trials vary a lot on a loaded machine: 1.5x the slowest recent one
                batch_build = 1.5 * max(build_s[-3:], default=default_s)
                one_trial = 1.5 * max(trial_s[-5:], default=timing_s)
                room = deadline - reserve - time.monotonic() - batch_build
                fit = room / max(one_trial, 1e-3)  # trials that fit in the budget (inf without one)
                batch = next_batch(pending, math.floor(min(jobs, trials - len(done), fit)))
                if not batch:
                    break
                t0 = time.monotonic()
                built = list(pool.map(m.build, batch))
                build_s.append(time.monotonic() - t0)
                for params, artifact in zip(batch, built):
                    if time.monotonic() + one_trial + reserve > deadline:
                        break
                    t0 = time.monotonic()
                    mod, failure = m.load(params, artifact)
                    if failure:
                        trial = Trial(params, failure=failure)
                    else:
                        trial = Trial(params, ms=base_ms / m.paired(m.timer(mod), base, rounds).speedup)
                    trial_s.append(time.monotonic() - t0)
                    done.append(trial)
                    name = records.params_name(params)
                    measured[name] = trial.value
                    best_ms = min(best_ms, trial.ms)
                    save()
                    if progress:
                        progress(len(done), total, best_ms, f"{name}: {trial.value}")

        # the best recorded candidate against the default, paired, with twice the rounds (at least CONFIRM_ROUNDS)
        ranked = sorted((v, n) for n, v in measured.items() if isinstance(v, (int, float)) and n != records.params_name(default))
        best_params, best, confirm = default, base_ms, None
        if ranked and ranked[0][0] < base_ms:
            cand = records.parse_params_name(ranked[0][1])
            mod, failure = m.load(cand)
            if failure:  # measured by an earlier run, broken now (toolchain change): drop it
                measured[ranked[0][1]] = f"failed: {failure}"
            else:
                c = m.paired(m.timer(mod), base, confirm_rounds)
                ratio = 1 / c.speedup
                confirm = {"candidate_ms": round(c.candidate_ms, 4), "default_ms": round(c.baseline_ms, 4), "ratio": round(ratio, 4),
                           "faster_rounds": [c.candidate_faster, c.rounds]}
                if ratio < 1.0 and c.p_faster < CONFIRM_P:
                    best_params, best = cand, base_ms * ratio
        ok = [v for v in measured.values() if isinstance(v, (int, float))]
        final = {  # FINAL_FIELDS
            "best": {"params": best_params, "ms": round(best, 4)},
            "confirm": confirm,
            "spread_ms": [round(min(ok), 4), round(statistics.median(ok), 4), round(max(ok), 4)] if ok else None,
            "failed": sum(1 for v in measured.values() if not isinstance(v, (int, float))),
            "tune_seconds": round(time.monotonic() - started, 1),
        }
        save(final)
        result = records.load(path)["records"][key]
        return TuneResult(key, result, done, path)
    finally:
        if own_executor:
            executor.close()

"""`dcngen tune`: measured search of generator parameters, stored as tuning records (dcngen/records.py).

Per candidate parameter set: generate and build (a build failure scores inf), load it where it
will run (this process, or a TVM RPC server found through a tracker), check forward and every
gradient against the float64 reference at a small shape (a mismatch rejects the candidate: it is
recorded as failed and never chosen), then time it against the default parameters in alternating
rounds. A candidate's time is the default's calibrated median times the median of the paired
ratios candidate/default, which keeps times from a noisy, shared machine comparable. The search
goes from the default through the generator's other kernels and one parameter at a time to the
combinations of the changes that beat the default, then on at random; it stops on a trial or time
budget; the best candidate is re-timed against the default and kept only if it is faster, in the
median and in enough of the paired rounds that chance is unlikely (CONFIRM_P).
Candidates already in the record file are not measured again (resume).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from . import records, remote_cpu
from .config import DCNConfig
from .errors import DCNGenError

FINAL_FIELDS = ("best", "confirm", "spread_ms", "failed", "tune_seconds")  # what a finished run adds to its record
GATE_SHAPE = (2, 9, 11)  # small, border-crossing: every candidate is checked here before timing
MIN_SAMPLE_MS = 10.0  # calls per timing sample are batched up to this
# The best candidate is kept only if it also wins enough of its re-timing's paired rounds that a
# candidate no faster than the default would do so by chance less often than this (a sign test)
CONFIRM_P = 0.05
CONFIRM_ROUNDS = 5  # the re-timing's fewest rounds: where a candidate can pass that test (all 5 won: 1/32)


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
        # task per (image, group)); on AVX-512 targets the vector width GCC prefers shapes both passes
        unroll = tuple(sorted({1, 2, 3, 4, p} & set(range(1, 65))))
        values = {"pixel_chunk": _pow2_upto(1, 4096), "unroll_points": unroll, "accumulators": (1, 2, 4)}
        if wide_vectors(cfg):
            return Space({**values, "vector_bits": (256, 512)})
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
        change = {k: v for k, v in params.items() if default.get(k) != v}
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


def _next_batch(pending, size: int) -> list[dict]:
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


# ---- where candidates run ---------------------------------------------------------------------
class LocalExecutor:
    """Runs artifacts in this process (CPU, or the visible GPU for a CUDA target)."""

    def __init__(self, cfg: DCNConfig):
        self.device = "cuda" if cfg.is_cuda else "cpu"
        self.where = "local " + self.device

    def load(self, cfg: DCNConfig, artifact):
        from .kernels import kernel_for

        return kernel_for(cfg)  # cfg carries explicit params: no record lookup

    def machine(self, target: str) -> dict:
        """What the timings are filed under (records.machine): this machine."""
        return records.machine(target)

    def put(self, t: torch.Tensor):
        return t.to(self.device)

    def get(self, t) -> torch.Tensor:
        return t.cpu()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timer(self, mod, calls: list[tuple[str, tuple]], number: int) -> Callable[[], float]:
        fns = [(getattr(mod, name), args) for name, args in calls]

        def sample() -> float:
            self.sync()
            start = time.perf_counter()
            for _ in range(number):
                for fn, args in fns:
                    fn(*args)
            self.sync()
            return (time.perf_counter() - start) * 1e3 / number

        return sample

    def close(self) -> None:
        pass


class _RemoteModule:
    """forward/backward of an artifact loaded on an RPC server, with the shared kernel ABI."""

    def __init__(self, mod, language: str, packed: bool):
        self.mod = mod
        self.dedupe = language == "tvm" and packed  # TVM's functions take the packed tensor once

    def args(self, name: str, args: tuple) -> tuple:
        if not self.dedupe:
            return args
        if name == "forward":
            x, off, _mask, out = args
            return x, off, out
        x, off, _mask, go, gx, goff, _gmask = args
        return x, off, go, gx, goff

    def forward(self, *args):
        self.mod["forward"](*self.args("forward", args))

    def backward(self, *args):
        self.mod["backward"](*self.args("backward", args))


class RPCExecutor:
    """Runs artifacts on a TVM RPC server requested from a tracker: the library is uploaded and
    loaded there, checked there, and timed there with TVM's time_evaluator."""

    def __init__(self, cfg: DCNConfig, tracker: str, key: str, session_timeout: int = 0, connect_timeout: float = 10.0):
        """A session from `tracker` (HOST:PORT) for a server registered under `key`; waits for one of
        them to be free. DCNGenError at once where the tracker cannot be reached within
        connect_timeout seconds (TVM's client would retry for a minute) or has no server under key
        (the request would wait for ever)."""
        from tvm import rpc

        host, _, port = tracker.rpartition(":")
        if not host or not port.isdigit():
            raise DCNGenError(f"--rpc-tracker must be HOST:PORT, got {tracker!r}")
        try:
            socket.create_connection((host, int(port)), timeout=connect_timeout).close()
        except OSError as e:
            raise DCNGenError(f"cannot reach the RPC tracker {tracker}: {e.strerror or e}") from None
        try:
            tracker_session = rpc.connect_tracker(host, int(port))
            servers = sorted({info["key"].split(":", 1)[1] for info in tracker_session.summary()["server_info"]})
            if key not in servers:
                raise DCNGenError(f"the RPC tracker {tracker} has no server under the key {key!r} "
                                  f"(its servers' keys: {', '.join(servers) or 'none'})")
            self.session = tracker_session.request(key, priority=1, session_timeout=session_timeout)
        except DCNGenError:
            raise
        except Exception as e:  # not a tracker, the server went away
            raise DCNGenError(f"no RPC session for key {key!r} from tracker {tracker}: {e}") from None
        self.dev = self.session.cuda(0) if cfg.is_cuda else self.session.cpu(0)
        self.where = f"rpc {key}@{tracker}"
        self._put: dict[int, tuple[torch.Tensor, object]] = {}

    def machine(self, target: str) -> dict:
        """What the timings are filed under: the server's GPU, by name and architecture, for a CUDA
        target; the server's CPU model and cores for a CPU target (remote_cpu.py). DCNGenError where
        the server cannot run the kernels built here for `target`."""
        if not target.startswith("cuda"):
            server = remote_cpu.server_cpu(self.session)
            remote_cpu.require_runs(target, server)
            return server.machine
        major, _, minor = str(self.dev.compute_version).partition(".")
        arch = f"sm_{major}{minor}"
        if arch != target.split(":", 1)[1]:
            raise DCNGenError(f"the RPC server's GPU is {arch}, but the target is {target}")
        return {"gpu": self.dev.device_name, "arch": arch}

    def load(self, cfg: DCNConfig, artifact):
        name = f"{artifact.path.name}.so"
        self.session.upload(str(artifact.library), name)
        return _RemoteModule(self.session.load_module(name), artifact.meta["language"], cfg.op == "dcnv4")

    def put(self, t: torch.Tensor):
        import tvm

        hit = self._put.get(id(t))  # aliased tensors (DCNv4's packed offset/mask) stay one remote tensor
        if hit is None or hit[0] is not t:
            hit = self._put[id(t)] = (t, tvm.runtime.tensor(t.contiguous().numpy(), device=self.dev))
        return hit[1]

    def get(self, t) -> torch.Tensor:
        return torch.from_numpy(t.numpy())

    def timer(self, mod: _RemoteModule, calls: list[tuple[str, tuple]], number: int) -> Callable[[], float]:
        evals = [(mod.mod.time_evaluator(name, self.dev, number=number, repeat=1), mod.args(name, args)) for name, args in calls]
        return lambda: sum(f(*args).mean for f, args in evals) * 1e3

    def close(self) -> None:
        self._put.clear()
        self.session = None


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
    dev = [executor.put(t) for t in host]
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
                batch = _next_batch(pending, math.floor(min(jobs, trials - len(done), fit)))
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

"""Timing: two sides measured alternately in one run; report medians and the median of paired ratios."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Comparison:
    """Median milliseconds of each side, the median of the per-round ratios baseline / candidate, and
    in how many of the rounds the candidate's sample was the shorter one."""

    candidate_ms: float
    baseline_ms: float
    speedup: float
    rounds: int = 0
    candidate_faster: int = 0

    @property
    def p_faster(self) -> float:
        """One-sided sign test: the chance that a candidate no faster than the baseline wins
        `candidate_faster` rounds or more of `rounds` (1.0 for no rounds). Small: really faster."""
        n = self.rounds
        return sum(math.comb(n, k) for k in range(self.candidate_faster, n + 1)) / 2**n


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def compare(candidate: Callable[[], object], baseline: Callable[[], object], *, rounds: int = 7, device: str = "cpu",
            warmup: int = 1, timer: Callable[[Callable[[], object]], float] | None = None) -> Comparison:
    """Time `candidate` and `baseline` alternately (`rounds` pairs, after `warmup` calls of each).
    `timer(fn)`: milliseconds of one sample of fn (default: one call, wall clock, device synced)."""
    for _ in range(warmup):
        candidate()
        baseline()
    sample = timer or (lambda fn: _time_once(fn, device))
    cand, base = [], []
    for r in range(rounds):
        order = ((cand, candidate), (base, baseline)) if r % 2 == 0 else ((base, baseline), (cand, candidate))
        for sink, fn in order:
            sink.append(sample(fn))
    ratios = [b / c for b, c in zip(base, cand)]
    return Comparison(statistics.median(cand), statistics.median(base), statistics.median(ratios), rounds, sum(r > 1 for r in ratios))


def benchmark_config(cfg, n: int, h: int, w: int, *, rounds: int = 7) -> dict[str, Comparison]:
    """Kernel vs the PyTorch baseline (dcngen.baseline) for `cfg` at input (n, h, w): forward and
    forward+backward."""
    from . import baseline
    from .verify import TORCH_DTYPE, random_problem, run_op

    def run_baseline(cfg, tensors):
        return getattr(baseline, cfg.op)(cfg, *tensors)

    device = "cuda" if cfg.is_cuda else "cpu"
    problem = random_problem(cfg, n, h, w)
    tensors = problem.op_inputs(TORCH_DTYPE[cfg.dtype], device)
    grad_out = problem.grad_out.to(dtype=TORCH_DTYPE[cfg.dtype], device=device)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(cfg, tensors)
        return run

    def training(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]

        def run():
            for leaf in leaves:  # as after optimizer.zero_grad(): backward stores fresh gradients, no accumulation
                leaf.grad = None
            fn(cfg, leaves).backward(grad_out)
        return run

    return {
        "forward": compare(forward(run_op), forward(run_baseline), rounds=rounds, device=device),
        "forward+backward": compare(training(run_op), training(run_baseline), rounds=rounds, device=device),
    }

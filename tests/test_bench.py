"""dcngen.bench.compare: alternation and the median of paired ratios, with a scripted timer."""

from __future__ import annotations

from dcngen.bench import compare


def test_compare_pairs_rounds_and_alternates():
    calls = []
    candidate, baseline = (lambda: calls.append("c")), (lambda: calls.append("b"))
    # per round, the candidate's sample and the baseline's: ratios baseline / candidate 2, 4, 3
    samples = {candidate: iter([1.0, 1.0, 2.0]), baseline: iter([2.0, 4.0, 6.0])}
    c = compare(candidate, baseline, rounds=3, warmup=0, timer=lambda fn: (fn(), next(samples[fn]))[1])
    assert calls == ["c", "b", "b", "c", "c", "b"]  # the side that goes first alternates
    assert (c.candidate_ms, c.baseline_ms, c.speedup) == (1.0, 4.0, 3.0)


def test_compare_default_timer_runs_each_side():
    calls = []
    c = compare(lambda: calls.append("c"), lambda: calls.append("b"), rounds=2, warmup=1)
    assert sorted(calls) == ["b"] * 3 + ["c"] * 3 and c.candidate_ms >= 0 and c.baseline_ms >= 0

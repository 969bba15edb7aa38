"""dcngen.bench.compare: alternation and the median of paired ratios, with a scripted timer."""

from __future__ import annotations

from dcngen.bench import Comparison, compare


def test_compare_pairs_rounds_and_alternates():
    calls = []
    candidate, baseline = (lambda: calls.append("c")), (lambda: calls.append("b"))
    # per round, the candidate's sample and the baseline's: ratios baseline / candidate 2, 4, 3
    samples = {candidate: iter([1.0, 1.0, 2.0]), baseline: iter([2.0, 4.0, 6.0])}
    c = compare(candidate, baseline, rounds=3, warmup=0, timer=lambda fn: (fn(), next(samples[fn]))[1])
    assert calls == ["c", "b", "b", "c", "c", "b"]  # the side that goes first alternates
    assert (c.candidate_ms, c.baseline_ms, c.speedup) == (1.0, 4.0, 3.0)
    assert (c.candidate_faster, c.rounds, c.p_faster) == (3, 3, 1 / 8)


def test_the_sign_test_counts_the_rounds_the_candidate_won():
    """p_faster: the chance of winning that many rounds or more with no real difference."""
    assert Comparison(1.0, 1.0, 1.0, rounds=14, candidate_faster=11).p_faster == (364 + 91 + 14 + 1) / 2**14
    assert Comparison(1.0, 1.0, 1.0, rounds=6, candidate_faster=0).p_faster == 1.0
    assert Comparison(1.0, 1.0, 1.0).p_faster == 1.0  # no rounds: no evidence
    candidate, baseline = (lambda: None), (lambda: None)
    samples = {candidate: iter([1.0, 3.0, 1.0, 2.0]), baseline: iter([2.0] * 4)}  # wins, loses, wins, ties
    c = compare(candidate, baseline, rounds=4, warmup=0, timer=lambda fn: next(samples[fn]))
    assert (c.candidate_faster, c.rounds) == (2, 4)


def test_compare_default_timer_runs_each_side():
    calls = []
    c = compare(lambda: calls.append("c"), lambda: calls.append("b"), rounds=2, warmup=1)
    assert sorted(calls) == ["b"] * 3 + ["c"] * 3 and c.candidate_ms >= 0 and c.baseline_ms >= 0

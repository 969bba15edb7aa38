"""Tuning: record round-trip and bucket lookup, correctness gating of candidates, the JIT hook, RPC on loopback."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch

from dcngen import executors, kernels, records, search, tune
from dcngen.config import DCNConfig
from dcngen.errors import DCNGenError
from dcngen.generators import generate, template_cpu
from helpers import finished_record

CFG = DCNConfig(op="dcnv4", group=2, group_channels=8)
SHAPE = (1, 8, 8)


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty records directory, and no stale lookups cached from other tests."""
    monkeypatch.setenv("DCNGEN_RECORDS", str(tmp_path))
    records.tuned_config.cache_clear()
    yield tmp_path
    records.tuned_config.cache_clear()


def test_bucket_rounds_to_nearest_power_of_two():
    assert records.bucket((8, 56, 56)) == (8, 4096)  # 3136 is nearer 4096 than 2048 in log2
    assert records.bucket((3, 10, 10)) == (4, 128)
    assert records.bucket((1, 1, 1)) == (1, 1)


def test_record_round_trip_is_sorted_and_readable(root):
    path = records.path_for("cpu", root)
    key = records.record_key(CFG, (1, 64))
    rec = finished_record(CFG, (1, 64), {"pixel_chunk": 4, "unroll_points": 2})
    records.update(path, "cpu", key, rec)
    text = path.read_text()
    assert json.loads(text)["records"][key] == rec
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert path.stem == records.fingerprint("cpu") and str(records.machine("cpu")["cores"]) in path.stem
    assert records.parse_params_name(records.params_name({"b": 2, "a": 1})) == {"a": 1, "b": 2}
    assert records.params_name({"b": 2, "a": 1}) == records.params_name({"a": 1, "b": 2}) == "a=1,b=2"  # candidates' keys: any order


def test_lookup_picks_nearest_bucket_of_same_config_and_version(root):
    path = records.path_for("cpu", root)
    small, large = {"pixel_chunk": 2, "unroll_points": 1}, {"pixel_chunk": 64, "unroll_points": 1}
    records.update(path, "cpu", records.record_key(CFG, (1, 64)), finished_record(CFG, (1, 64), small))
    records.update(path, "cpu", records.record_key(CFG, (8, 4096)), finished_record(CFG, (8, 4096), large))
    other = CFG.replace(group_channels=16)
    records.update(path, "cpu", records.record_key(other, (1, 64)), finished_record(other, (1, 64), {"pixel_chunk": 1, "unroll_points": 1}))
    assert records.lookup(CFG, (1, 9, 9))["best"]["params"] == small
    assert records.lookup(CFG, (16, 56, 56))["best"]["params"] == large
    assert records.lookup(CFG.replace(dtype="float64"), (1, 8, 8)) is None
    # a record of another generator version is never replayed
    data = records.load(path)
    current = f"|v{records.generator_version()}|"
    data["records"] = {k.replace(current, "|v-older|"): v for k, v in data["records"].items()}
    records.save(path, data)
    assert records.lookup(CFG, (1, 9, 9)) is None
    # and the next update drops them from the file, but keeps a newer dcngen's (a shared folder)
    newer = records.record_key(CFG, (1, 64)).replace(current, f"|v{int(records.generator_version()) + 1}|")
    data = records.load(path)
    data["records"][newer] = finished_record(CFG, (1, 64), small)
    records.save(path, data)
    records.update(path, "cpu", records.record_key(CFG, (1, 64)), finished_record(CFG, (1, 64), small))
    assert sorted(records.load(path)["records"]) == sorted([records.record_key(CFG, (1, 64)), newer])
    assert [p.name for p in root.glob("*.lock")] == [f".{path.name}.lock"]  # the writers' lock: beside the file, hidden


def test_jit_path_uses_record_and_falls_back(root):
    path = records.path_for("cpu", root)
    best = {"pixel_chunk": 4, "unroll_points": 2}
    records.update(path, "cpu", records.record_key(CFG, (1, 64)), finished_record(CFG, (1, 64), best))
    assert records.tuned_config(CFG, (1, 64)).param_dict == best
    assert records.tuned_config(CFG.replace(group=3), (1, 64)).params == ()  # no record: heuristic
    assert records.tuned_config(CFG.replace(params=(("pixel_chunk", 8),)), (1, 64)).param_dict == {"pixel_chunk": 8}
    # a record the generator no longer accepts is ignored with a warning
    records.update(path, "cpu", records.record_key(CFG, (1, 64)), finished_record(CFG, (1, 64), {"pixel_chunk": 99999}))
    with pytest.warns(RuntimeWarning, match="ignoring the tuning record"):
        assert records.tuned_config(CFG, (1, 64)).params == ()
    for bad in ({"pixel_chunk": "x"}, {"pixel_chunk": 1.7}, {"pixel_chunk": True}):  # values that are no ints
        rec = finished_record(CFG, (1, 64), best)
        rec["best"]["params"] = bad
        records.update(path, "cpu", records.record_key(CFG, (1, 64)), rec)
        with pytest.warns(RuntimeWarning, match="ignoring the tuning record"):
            assert records.tuned_config(CFG, (1, 64)).params == ()



def test_record_warnings_name_the_callers_line(root):
    """A warning about a record names the line that called dcngen (here, this test's op call), not
    dcngen's or torch's dispatcher's: warnings filters and the message's location point at user code."""
    import dcngen.ops

    path = records.path_for("cpu", root)
    records.update(path, "cpu", records.record_key(CFG, (1, 64)), finished_record(CFG, (1, 64), {"pixel_chunk": 99999}))
    x, offset_mask = torch.randn(1, 8, 8, 16), torch.randn(1, 8, 8, 54)
    with pytest.warns(RuntimeWarning, match="ignoring the tuning record") as caught:
        dcngen.ops.dcnv4(x, offset_mask, group=2, group_channels=8); line = sys._getframe().f_lineno  # noqa: E702
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]
    path.write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignoring its records") as caught:
        records.all_records(); line = sys._getframe().f_lineno  # noqa: E702
    assert [(w.filename, w.lineno) for w in caught] == [(__file__, line)]

def test_search_space_and_candidate_order():
    space = search.space_for(CFG)
    default = search.default_params(CFG)
    order = list(search.candidates(CFG, space, default))
    assert order[0] == default
    assert len({records.params_name(p) for p in order}) == len(order) == math.prod(len(v) for v in space.values.values())
    for cfg in (CFG.replace(target="cuda:sm_90"), CFG.replace(backend="tvm")):
        sp = search.space_for(cfg)
        assert set(sp.values) <= set(search.default_params(cfg)) | {"min_blocks"}


def test_candidates_that_give_the_same_kernel_are_timed_once():
    """Another kernel's knob while that kernel is off (the tiled forward's warps with fwd_mma=0)
    leaves the source unchanged: that candidate is skipped."""
    cfg = CFG.replace(target="cuda:sm_90", dtype="float16", group_channels=32)
    space = search.space_for(cfg)
    default = search.default_params(cfg)
    assert default["fwd_mma"] == 0 and len(space.values["fwd_mma_warps"]) > 1
    first = list(itertools.islice(search.candidates(cfg, space, default), 60))
    varied = [{k for k, v in p.items() if v != default[k]} for p in first]
    assert {"fwd_mma"} in varied and {"fwd_mma_warps"} not in varied and {"fwd_halo"} not in varied
    sources = [generate(cfg.replace(params=tuple(p.items()))) for p in first]
    assert len({src.kernel_text for src in sources}) == len(first)


def test_cuda_searches_try_the_other_kernels_first():
    """Right after the default: each other forward and backward kernel, then each pair of them (so a
    short tune reaches them all, the tiled tensor-core forward too, which takes two parameters)."""
    cfg = CFG.replace(target="cuda:sm_90", dtype="float16", group_channels=32)
    space, default = search.space_for(cfg), search.default_params(cfg)
    changed = [{k: v for k, v in p.items() if v != default[k]} for p in itertools.islice(search.candidates(cfg, space, default), 19)]
    kernels = [*search.CUDA_FORWARD_KERNELS, *search.CUDA_BACKWARD_KERNELS]
    assert changed[:8] == [{}, *kernels]
    assert changed[8:18] == [{**f, **b} for f in search.CUDA_FORWARD_KERNELS for b in search.CUDA_BACKWARD_KERNELS]
    assert len(changed[18]) == 1 and changed[18] not in kernels  # then one parameter at a time


def _sign_error_generator(monkeypatch, bad_chunk: int):
    """The CPU template generator, with the forward output negated when pixel_chunk == bad_chunk."""
    original = template_cpu.generate

    def generate(cfg):
        src = original(cfg)
        if cfg.param_dict.get("pixel_chunk") == bad_chunk:
            text = src.text.replace("store_row(dst, acc[0], stream);", "for (acc_t& v : acc[0]) v = -v;\n  store_row(dst, acc[0], stream);")
            assert text != src.text
            src = dataclasses.replace(src, text=text)
        return src

    monkeypatch.setattr(template_cpu, "generate", generate)
    monkeypatch.setattr(kernels, "_loaded", {})  # no kernel loaded by another test stands in for the patched one


@pytest.mark.parametrize("jobs", [1, 2])
def test_wrong_candidate_is_rejected_and_never_chosen(root, monkeypatch, jobs):
    _sign_error_generator(monkeypatch, bad_chunk=2)
    default = search.default_params(CFG)
    space = search.Space({"pixel_chunk": (2, 4), "unroll_points": (default["unroll_points"],)}, passes=("forward",))
    result = tune.tune(CFG, SHAPE, trials=5, time_budget=120, rounds=3, space=space, jobs=jobs)
    cands = result.record["candidates"]
    bad = records.params_name({**default, "pixel_chunk": 2})
    assert cands[bad].startswith("failed: verify: output rel. error")
    assert result.record["best"]["params"]["pixel_chunk"] != 2
    assert result.record["failed"] == 1
    assert sorted(k for k, v in cands.items() if isinstance(v, float)) == sorted(
        records.params_name({**default, "pixel_chunk": c}) for c in (4, default["pixel_chunk"]))
    # resumable: a second run measures nothing new
    again = tune.tune(CFG, SHAPE, trials=5, time_budget=120, rounds=3, space=space)
    assert again.trials == [] and set(again.record["candidates"]) == set(cands)
    assert again.record["candidates"][bad] == cands[bad]  # only the default is re-timed (the calibration)


def test_candidates_build_in_parallel_but_never_while_one_is_timed(root, monkeypatch):
    """jobs=3: the builds of a batch overlap; no build runs during a check or a timing."""
    import dcngen.build

    real_build, events = dcngen.build.build, []

    def slow_build(source):
        if threading.current_thread() is threading.main_thread():  # the default's, inside its own load
            return real_build(source)
        events.append(("build", time.monotonic(), +1))
        time.sleep(0.3)  # long enough for the other threads' builds to start meanwhile
        try:
            return real_build(source)
        finally:
            events.append(("build", time.monotonic(), -1))

    real_load = tune._Measure.load

    def load(self, params, built=None):
        events.append(("load", time.monotonic(), +1))
        try:
            return real_load(self, params, built)
        finally:
            events.append(("load", time.monotonic(), -1))

    monkeypatch.setattr(dcngen.build, "build", slow_build)
    monkeypatch.setattr(tune._Measure, "load", load)
    default = search.default_params(CFG)
    space = search.Space({"pixel_chunk": (1, 2, 4, 8), "unroll_points": (default["unroll_points"],)}, passes=("forward",))
    result = tune.tune(CFG, SHAPE, trials=3, time_budget=120, rounds=3, space=space, jobs=3)
    assert len(result.trials) == 3 and all(t.failure is None for t in result.trials)
    running = {"build": 0, "load": 0}
    most_builds = 0
    for kind, _, step in sorted(events, key=lambda e: e[1]):
        running[kind] += step
        most_builds = max(most_builds, running["build"])
        assert not (running["build"] and running["load"]), "a candidate was checked or timed while another one was building"
    assert most_builds == 3


def test_check_finds_elements_a_candidate_leaves_unwritten():
    """The candidates' gate poisons every output with NaN first: a kernel that skips one element of
    an output or of a gradient fails it (zero-filled buffers would have hidden the last one, a zero
    gradient)."""
    real = kernels.kernel_for(CFG)

    class Skipping:
        def __init__(self, skip: str):
            self.skip = skip

        def forward(self, x, offset, mask, out):
            full = out.clone()
            real.forward(x, offset, mask, full)
            out[...] = torch.where(torch.arange(out.numel()).reshape(out.shape) == 0, out, full) if self.skip == "output" else full

        def backward(self, x, offset, mask, grad_out, grad_x, grad_offset, grad_mask):
            kept = grad_offset[..., CFG.min_offset_mask_channels :].clone()
            real.backward(x, offset, mask, grad_out, grad_x, grad_offset, grad_mask)
            if self.skip == "padding":  # leaves the packed gradient's padding channels as they were
                grad_offset[..., CFG.min_offset_mask_channels :] = kept

    executor = executors.LocalExecutor(CFG)
    assert max(tune.check(CFG, executor, real).values()) < 1e-5
    assert tune.check(CFG, executor, Skipping("output"))["output"] == math.inf
    from dcngen.generators import backward_zeroes_padding

    assert CFG.padded_offset_mask_channels > CFG.min_offset_mask_channels and backward_zeroes_padding(CFG)
    assert tune.check(CFG, executor, Skipping("padding"))["grad_offset_mask"] == math.inf


def test_check_keeps_dcnv4s_packed_tensor_one_buffer_on_a_copying_executor():
    """DCNv4's kernels take the packed offset_mask (and its gradient) as both the offset and the mask
    argument. An executor that copies each tensor it is given (a GPU's) must still see one buffer,
    or the mask gradients land in a copy that the check never reads."""

    class Copying(executors.LocalExecutor):
        def put(self, t):
            return t.clone()

    real = kernels.kernel_for(CFG)
    assert max(tune.check(CFG, Copying(CFG), real).values()) < 1e-5


def test_an_interrupted_retune_keeps_the_last_result(root):
    """While a re-tune runs, and after it is interrupted, the record keeps the last finished run's best."""
    default = search.default_params(CFG)
    space = search.Space({"pixel_chunk": (2, 4, 8), "unroll_points": (default["unroll_points"],)}, passes=("forward",))
    first = tune.tune(CFG, SHAPE, trials=1, time_budget=120, rounds=3, space=space)
    seen = []

    def interrupt(done, total, best_ms, note):
        if done:
            seen.append(records.lookup(CFG, SHAPE))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune.tune(CFG, SHAPE, trials=3, time_budget=120, rounds=3, space=space, progress=interrupt)
    after = records.lookup(CFG, SHAPE)
    assert seen[0]["best"] == first.record["best"] and after["best"] == first.record["best"]
    assert len(after["candidates"]) == len(first.record["candidates"]) + 1  # the new measurement is kept too


def test_records_are_filed_under_the_machine_that_timed_them(root):
    """An executor on another machine (RPC) names it: the record goes to that machine's file."""

    class Elsewhere(executors.LocalExecutor):
        def machine(self, target):
            return {"cpu": "Remote CPU 9000", "cores": 64}

    default = search.default_params(CFG)
    space = search.Space({"pixel_chunk": (2,), "unroll_points": (default["unroll_points"],)}, passes=("forward",))
    result = tune.tune(CFG, SHAPE, trials=1, time_budget=120, rounds=3, space=space, executor=Elsewhere(CFG))
    assert result.path.name == "cpu-remote-cpu-9000-64c.json"
    assert records.load(result.path)["machine"] == {"cpu": "Remote CPU 9000", "cores": 64}
    assert records.lookup(CFG, SHAPE) is None  # not this machine's


class _Scripted(executors.LocalExecutor):
    """Builds, loads and checks the real kernels here, but every timing sample of a candidate takes
    the milliseconds `ms` gives its parameters (times the search can rank without noise), or the
    next of a list of them, over and over."""

    class _Tagged:
        def __init__(self, mod, name):
            self.mod, self.name = mod, name

        def forward(self, *args):
            self.mod.forward(*args)

        def backward(self, *args):
            self.mod.backward(*args)

    def __init__(self, cfg, ms: dict):
        super().__init__(cfg)
        self.ms = ms

    def load(self, cfg, artifact):
        return self._Tagged(super().load(cfg, artifact), records.params_name(cfg.param_dict))

    def timer(self, mod, calls, number):
        ms = self.ms[mod.name]
        if isinstance(ms, list):
            return functools.partial(next, itertools.cycle(ms))
        return lambda: ms


def _chunks(*chunks):
    """Parameter names of CFG's default with these pixel_chunk values, and a forward-only space of them."""
    default = search.default_params(CFG)
    names = [records.params_name({**default, "pixel_chunk": c}) for c in chunks]
    return names, search.Space({"pixel_chunk": chunks, "unroll_points": (default["unroll_points"],)}, passes=("forward",))


def test_the_fastest_candidate_wins_if_its_re_timing_beats_the_default(root):
    (default, fast, slower, slowest), space = _chunks(search.default_params(CFG)["pixel_chunk"], 2, 4, 8)
    result = tune.tune(CFG, SHAPE, trials=3, time_budget=120, rounds=3, space=space,
                       executor=_Scripted(CFG, {default: 2.0, fast: 1.0, slower: 1.5, slowest: 3.0}))
    assert result.record["candidates"] == {default: 2.0, fast: 1.0, slower: 1.5, slowest: 3.0}
    assert records.params_name(result.record["best"]["params"]) == fast and result.record["best"]["ms"] == 1.0
    assert result.record["confirm"]["ratio"] == 0.5


def test_changes_that_beat_the_default_are_combined_best_first():
    default = {"a": 1, "b": 1, "c": 1, "d": 1}
    name = lambda **change: records.params_name({**default, **change})  # noqa: E731
    measured = {
        name(): 10.0, name(a=2): 8.0, name(b=2): 9.0, name(a=3): 8.5, name(c=2, d=2): 9.5,
        name(d=3): 9.9, name(c=3): 11.0, name(b=3): "failed: verify", name(a=2, b=2): 8.2,
    }
    assert search.combined_changes(default, measured) == [
        # a=2 with b=2 (a=3 contradicts a=2; a=2 b=2 adds nothing), then c=2 d=2 (d=3 then contradicts)
        {**default, "a": 2, "b": 2}, {**default, "a": 2, "b": 2, "c": 2, "d": 2},
    ]
    assert search.combined_changes(default, {name(): 10.0, name(a=2): 9.0, name(b=2): 11.0}) == []
    assert search.combined_changes(default, {name(a=2): 9.0, name(b=2): 8.0}) == []  # no default time yet


@pytest.mark.parametrize("jobs", [1, 4])
def test_the_changes_that_beat_the_default_are_tried_together_next(root, jobs):
    """After one parameter at a time, the search combines the changes that won; with several builds
    a batch, it waits for their times before choosing (the batch ends where the order turns)."""
    default = search.default_params(CFG)
    other = {k: next(v for v in (1, 2) if v != default[k]) for k in ("pixel_chunk", "unroll_points", "accumulators")}
    space = search.Space({k: (default[k], v) for k, v in other.items()}, passes=("forward",))
    ms = {records.params_name({**default, **dict(zip(other, combo))}): 4.5 for combo in itertools.product(*space.values.values())}
    name = lambda *changed: records.params_name({**default, **{k: other[k] for k in changed}})  # noqa: E731
    both = name("pixel_chunk", "unroll_points")
    ms |= {name(): 4.0, name("pixel_chunk"): 3.0, name("unroll_points"): 3.5, name("accumulators"): 5.0, both: 2.0}
    result = tune.tune(CFG, SHAPE, trials=4, time_budget=120, rounds=3, space=space, jobs=jobs, executor=_Scripted(CFG, ms))
    assert [records.params_name(t.params) for t in result.trials][-1] == both
    assert result.record["best"]["params"] == records.parse_params_name(both)


def test_a_candidate_faster_in_the_median_only_is_not_kept(root):
    """The re-timing's sign test: the candidate wins 4 of 6 rounds (by 2x), as a candidate no faster
    than the default would with a chance of 22/64, so the default stays."""
    (default, cand), space = _chunks(search.default_params(CFG)["pixel_chunk"], 2)
    result = tune.tune(CFG, SHAPE, trials=1, time_budget=120, rounds=3, space=space,
                       executor=_Scripted(CFG, {default: 2.0, cand: [1.0, 1.0, 3.0]}))
    assert result.record["confirm"]["ratio"] == 0.5 and result.record["confirm"]["faster_rounds"] == [4, 6]
    assert result.record["best"]["params"] == search.default_params(CFG)


def test_a_resumed_tune_rescales_earlier_times_and_re_times_their_best(root):
    """Earlier times are scaled by today's default / the earlier run's (the machine's load changed);
    the best of them is kept only if it still beats the default when re-timed now. A record timed
    over other passes is not resumed."""
    (default, cand), space = _chunks(search.default_params(CFG)["pixel_chunk"], 2)
    path, key = records.path_for("cpu", root), records.record_key(CFG, records.bucket(SHAPE))
    earlier = {**finished_record(CFG, records.bucket(SHAPE), records.parse_params_name(cand), ms=10.0), "passes": ["forward"]}
    records.update(path, "cpu", key, {**earlier, "candidates": {default: 20.0, cand: 10.0}})
    executor = _Scripted(CFG, {default: 2.0, cand: 3.0})  # today: the default 10x faster, the candidate slower than it
    result = tune.tune(CFG, SHAPE, trials=0, time_budget=120, rounds=3, space=space, executor=executor)
    assert result.record["candidates"] == {default: 2.0, cand: 1.0}  # 10.0 * 2.0 / 20.0
    assert result.record["confirm"]["ratio"] == 1.5 and result.record["best"]["params"] == search.default_params(CFG)
    records.update(path, "cpu", key, {**earlier, "passes": ["forward", "backward"]})
    again = tune.tune(CFG, SHAPE, trials=1, time_budget=120, rounds=3, space=space, executor=executor)
    assert [records.params_name(t.params) for t in again.trials] == [cand] and again.record["candidates"][cand] == 3.0


def test_build_failure_scores_inf(root, monkeypatch):
    original = template_cpu.generate

    def generate(cfg):
        src = original(cfg)
        if cfg.param_dict.get("pixel_chunk") == 4:
            src = dataclasses.replace(src, text=src.text + "\n#error candidate does not compile\n")
        return src

    monkeypatch.setattr(template_cpu, "generate", generate)
    space = search.Space({"pixel_chunk": (4,), "unroll_points": (search.default_params(CFG)["unroll_points"],)}, passes=("forward",))
    result = tune.tune(CFG, SHAPE, trials=2, time_budget=120, rounds=3, space=space)
    failed = [t for t in result.trials if t.failure]
    assert failed and failed[0].failure.startswith("build:") and failed[0].ms == float("inf")


def test_rpc_loopback_measures_on_the_server(root, monkeypatch):
    pytest.importorskip("tornado")
    from tvm.rpc.server import Server
    from tvm.rpc.tracker import Tracker

    tracker = Tracker("127.0.0.1", port=9190, port_end=9690, silent=True)
    server = Server("127.0.0.1", port=9700, port_end=9990, key="dcngen-test", tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        executor = None
        for _ in range(50):  # the server registers with the tracker asynchronously
            try:
                executor = executors.RPCExecutor(CFG, f"127.0.0.1:{tracker.port}", "dcngen-test", session_timeout=120)
                break
            except Exception:
                time.sleep(0.2)
        assert executor is not None, "the RPC server never registered with the tracker"
        # a key no server registered under, a port with no tracker: errors at once, not a wait
        with pytest.raises(DCNGenError, match="no server under the key 'other' .its servers' keys: dcngen-test"):
            executors.RPCExecutor(CFG, f"127.0.0.1:{tracker.port}", "other")
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            with pytest.raises(DCNGenError, match="cannot reach the RPC tracker"):
                executors.RPCExecutor(CFG, f"127.0.0.1:{unused.getsockname()[1]}", "dcngen-test")
        _sign_error_generator(monkeypatch, bad_chunk=2)
        space = search.Space({"pixel_chunk": (2,), "unroll_points": (search.default_params(CFG)["unroll_points"],)}, passes=("forward", "backward"))
        result = tune.tune(CFG, SHAPE, trials=3, time_budget=120, rounds=3, space=space, executor=executor)
        executor.close()
        rec = result.record
        assert rec["executor"].startswith("rpc dcngen-test@")
        bad = records.params_name({**search.default_params(CFG), "pixel_chunk": 2})
        assert rec["candidates"][bad].startswith("failed: verify")  # checked on the server, not here
        assert isinstance(rec["default"]["ms"], float) and rec["default"]["ms"] > 0
    finally:
        server.terminate()
        tracker.terminate()


def test_record_files_keep_the_umask_mode_and_a_shared_file_its_own(root):
    """Record files are readable by the folder's other users (mkstemp would give 0600): new files
    take the umask's mode, a rewritten one keeps its mode."""
    path = records.path_for("cpu", root)
    key = records.record_key(CFG, (1, 64))
    old = os.umask(0o022)
    try:
        records.update(path, "cpu", key, finished_record(CFG, (1, 64), {"pixel_chunk": 4}))
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o664)
        records.update(path, "cpu", key, finished_record(CFG, (1, 64), {"pixel_chunk": 8}))
        assert path.stat().st_mode & 0o777 == 0o664
    finally:
        os.umask(old)


def test_malformed_records_are_skipped_with_a_warning(root):
    """A record with a result but missing fields (a hand edit, a bad merge) neither breaks the ops nor
    `tune --list`: it is skipped with a warning."""
    path = records.path_for("cpu", root)
    good = finished_record(CFG, (1, 64), {"pixel_chunk": 4, "unroll_points": 2})
    records.update(path, "cpu", records.record_key(CFG, (1, 64)), {k: v for k, v in good.items() if k != "bucket"})
    records.update(path, "cpu", records.record_key(CFG, (2, 64)), {**good, "best": {"params": {"pixel_chunk": 4}, "ms": "fast"}})
    with pytest.warns(RuntimeWarning, match="malformed tuning record"):
        assert records.lookup(CFG, SHAPE) is None
    records.update(path, "cpu", records.record_key(CFG, (4, 64)), {**good, "default": {"params": {}, "ms": math.inf}})
    with pytest.warns(RuntimeWarning, match="malformed tuning record"):
        assert records.lookup(CFG, SHAPE) is None
    for confirm in ({"ratio": "fast"}, {"ratio": 0.9, "faster_rounds": [3]}, "yes"):
        records.update(path, "cpu", records.record_key(CFG, (4, 64)), {**good, "confirm": confirm})
        with pytest.warns(RuntimeWarning, match="malformed tuning record"):
            assert records.lookup(CFG, SHAPE) is None
    with pytest.warns(RuntimeWarning, match="malformed tuning record"):
        assert records.all_records() == []
    # an entry without a result is a tune in progress: skipped without a warning
    records.save(path, {"records": {records.record_key(CFG, (1, 64)): {k: v for k, v in good.items() if k != "best"}}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert records.lookup(CFG, SHAPE) is None and records.all_records() == []


def test_tune_list_shows_each_records_re_timing(root, monkeypatch):
    from typer.testing import CliRunner

    from dcngen import cli

    monkeypatch.setattr(cli.console, "_width", 300)  # the table's cells whole, whatever the terminal

    path = records.path_for("cpu", root)
    good = finished_record(CFG, (1, 64), {"pixel_chunk": 4, "unroll_points": 2})
    records.update(path, "cpu", records.record_key(CFG, (1, 64)), good)
    records.update(path, "cpu", records.record_key(CFG, (2, 64)), {**finished_record(CFG, (2, 64), search.default_params(CFG)), "confirm": None})
    result = CliRunner().invoke(cli.app, ["tune", "--list"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "│ 1,64" in line or "│ 2,64" in line]
    assert len(rows) == 2 and "0.500 (14/14 rounds)" in rows[0] and rows[1].split("│")[7].strip() == "-"
    # the best's changes from the default, not all of its parameters
    assert rows[0].split("│")[4].strip() == "pixel_chunk=4,unroll_points=2" and rows[1].split("│")[4].strip() == "defaults"


def test_unreadable_record_files_are_skipped_by_lookups_and_refused_by_updates(root):
    """A record file that is not JSON, or whose 'records' is no object, costs the ops and the listing
    only its records, with a warning naming it; a tune does not overwrite it."""
    path = records.path_for("cpu", root)
    key = records.record_key(CFG, (1, 64))
    for text in ("{not json", '{"records": []}'):
        path.write_text(text)
        with pytest.warns(RuntimeWarning, match=f"ignoring its records: tuning record file {path}"):
            assert records.lookup(CFG, SHAPE) is None
        with pytest.warns(RuntimeWarning, match=f"ignoring its records: tuning record file {path}"):
            assert records.all_records() == []
        with pytest.raises(DCNGenError, match="tuning record file"):
            records.update(path, "cpu", key, finished_record(CFG, (1, 64), {"pixel_chunk": 4}))
        assert path.read_text() == text


UPDATER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dcngen import records
    path, start, worker = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    while not start.exists():
        time.sleep(0.005)
    for i in range(25):
        records.update(path, "cpu", f"worker{worker}|v{records.generator_version()}|n{i}", {"worker": worker})
""")


def test_concurrent_updates_of_other_keys_all_survive(root):
    """Tuners of other configs in other processes write the same record file at once: each update
    re-reads the file under the lock, so no process overwrites another's records."""
    path, start = records.path_for("cpu", root), root / "go"
    procs = [subprocess.Popen([sys.executable, "-c", UPDATER, str(path), str(start), str(w)], env=os.environ.copy(),
                              stderr=subprocess.PIPE, text=True) for w in range(4)]
    time.sleep(0.5)
    start.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    assert len(records.load(path)["records"]) == 4 * 25


def test_cuda_records_are_found_without_the_gpu(root, monkeypatch):
    """Records a GPU machine timed (filed under its GPU's name) serve that architecture on a machine
    without the GPU (a build host); the file of another architecture is not read, whatever it holds."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    records.machine.cache_clear()
    try:
        cfg = CFG.replace(target="cuda:sm_90")
        for gpu, arch, best in (("NVIDIA H100 80GB HBM3", "sm_90", {"vec": 4}), ("NVIDIA A100", "sm_80", {"vec": 8})):
            path = records.path_for(cfg.target, root, {"gpu": gpu, "arch": arch})
            records.update(path, cfg.target, records.record_key(cfg, (1, 64)), finished_record(cfg, (1, 64), best), {"gpu": gpu, "arch": arch})
        assert records.lookup(cfg, SHAPE)["best"]["params"] == {"vec": 4}
    finally:
        records.machine.cache_clear()


def test_bad_budgets_and_unwritable_records_fail_before_any_work(root, monkeypatch):
    """trials < 0 and a NaN time budget are refused; an unwritable record folder is found before the
    default kernel is built and timed; an infinite budget means no limit."""
    built = []

    def no_build(self, *args):
        built.append(args)
        raise AssertionError("a kernel was built")

    monkeypatch.setattr(tune._Measure, "load", no_build)
    with pytest.raises(DCNGenError, match="trials must be"):
        tune.tune(CFG, SHAPE, trials=-1)
    with pytest.raises(DCNGenError, match="time_budget must be"):
        tune.tune(CFG, SHAPE, time_budget=float("nan"))
    (root / "file").write_text("")
    monkeypatch.setenv("DCNGEN_RECORDS", str(root / "file" / "records"))  # a folder under a file: never writable
    with pytest.raises(DCNGenError, match="cannot write tuning records"):
        tune.tune(CFG, SHAPE)
    assert built == []
    monkeypatch.undo()
    monkeypatch.setenv("DCNGEN_RECORDS", str(root))
    result = tune.tune(CFG, SHAPE, trials=1, time_budget=float("inf"), rounds=1)
    assert len(result.trials) == 1


def test_lookup_ties_go_to_the_earlier_folder(tmp_path, monkeypatch):
    """Two records at equal distance from the wanted bucket (H*W 64 and 256 for 128): the earlier
    record folder's wins, as lookup's docstring says (a user's folder before the shipped one)."""
    first, second = tmp_path / "first", tmp_path / "second"
    monkeypatch.setattr(records, "records_dirs", lambda: (first, second))
    records.tuned_config.cache_clear()
    a, b = {"pixel_chunk": 2, "unroll_points": 1}, {"pixel_chunk": 8, "unroll_points": 1}
    records.update(records.path_for("cpu", second), "cpu", records.record_key(CFG, (1, 64)), finished_record(CFG, (1, 64), b))
    records.update(records.path_for("cpu", first), "cpu", records.record_key(CFG, (1, 256)), finished_record(CFG, (1, 256), a))
    assert records.lookup(CFG, (1, 8, 16))["best"]["params"] == a
    records.tuned_config.cache_clear()


@pytest.mark.parametrize("args, message", [
    (["--time-budget", "nan"], "--time-budget must be a positive number of seconds (inf: no limit), got nan"),
    (["--time-budget", "0"], "--time-budget must be a positive number of seconds"),
    (["--time-budget", "-1"], "--time-budget must be a positive number of seconds"),
    (["--rpc-tracker", "127.0.0.1:9190"], "--rpc-tracker and --rpc-key go together"),
    (["--rpc-key", "dcngen-test"], "--rpc-tracker and --rpc-key go together"),
], ids=["nan", "zero", "negative", "tracker-alone", "key-alone"])
def test_cli_tune_refuses_bad_budgets_and_half_an_rpc_address(root, args, message):
    """Refused before any work, with one line (the shape here leaves no output pixel: were the flag
    let through, that check would fail instead, so nothing is tuned either way)."""
    from typer.testing import CliRunner

    from dcngen.cli import app

    result = CliRunner().invoke(app, ["tune", "--kernel-size", "5", "--padding", "0", "--shape", "1x4x4", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output

"""Tuning on first use (DCNGEN_AUTOTUNE): one real tune per (config, shape bucket) without a record,
from any calling context, and the op's result unchanged by it."""

from __future__ import annotations

import _thread
import signal
import threading
import time
import warnings

import pytest
import torch
from filelock import FileLock

import dcngen.ops
from dcngen import autotune, records, reference, search, tune
from dcngen.config import DCNConfig
from dcngen.errors import DCNGenError
from dcngen.verify import TOLERANCE, rel_err
from helpers import finished_record

CFG = DCNConfig(op="dcnv4", group=2, group_channels=8)
OP_ARGS = dict(group=2, group_channels=8)


@pytest.fixture
def tunes(tmp_path, monkeypatch):
    """An empty records folder, a small budget (no candidate beyond the default fits: each tune
    times the default and records it), no earlier attempts; the (config, shape) of each real tune run."""
    monkeypatch.setenv("DCNGEN_RECORDS", str(tmp_path))
    monkeypatch.setenv("DCNGEN_AUTOTUNE", "2")
    monkeypatch.setattr(autotune, "_attempted", set())
    monkeypatch.setattr(autotune, "_decided", set())
    records.tuned_config.cache_clear()
    calls = []
    real = tune.tune

    def counted(cfg, shape, **kwargs):
        calls.append((cfg.key, tuple(shape)))
        return real(cfg, shape, **kwargs)

    monkeypatch.setattr(tune, "tune", counted)
    yield calls
    records.tuned_config.cache_clear()


def _inputs(n, h, w, requires_grad=False):
    x = torch.randn(n, h, w, 16, requires_grad=requires_grad)
    offset_mask = (torch.rand(n, h, w, 54) * 4 - 2).requires_grad_(requires_grad)
    return x, offset_mask


def _assert_correct(y, x, offset_mask):
    """y is the float32 op's output for (x, offset_mask), to the float64 reference's tolerance."""
    assert rel_err(y, reference.dcnv4(CFG, x.detach().double(), offset_mask.detach().double())) < TOLERANCE["float32"]


def _recorded_buckets():
    return sorted(tuple(rec["bucket"]) for _, rec in records.all_records())


def test_the_first_call_of_each_shape_bucket_tunes_it_once(tunes):
    x, om = _inputs(2, 9, 11)
    _assert_correct(dcngen.ops.dcnv4(x, om, **OP_ARGS), x, om)
    assert tunes == [(CFG.key, (2, 9, 11))] and _recorded_buckets() == [records.bucket((2, 9, 11))]
    dcngen.ops.dcnv4(x, om, **OP_ARGS)
    dcngen.ops.dcnv4(*_inputs(2, 10, 10), **OP_ARGS)  # another shape of the same bucket
    assert len(tunes) == 1
    x, om = _inputs(8, 9, 11)  # another bucket
    _assert_correct(dcngen.ops.dcnv4(x, om, **OP_ARGS), x, om)
    assert [shape for _, shape in tunes] == [(2, 9, 11), (8, 9, 11)]
    assert records.tuned_config(CFG, records.bucket((8, 9, 11))).params  # the ops now take the record


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "dispatcher_with_autograd"])
def test_tuning_needs_nothing_of_the_callers_context(tunes, context):
    """The tune's reference gradients need autograd, which no_grad, inference mode and the
    dispatcher below a custom op's autograd (the path of torch.compile's graphs) turn off."""
    x, om = _inputs(1, 12, 12, requires_grad=context == "dispatcher_with_autograd")
    if context == "dispatcher_with_autograd":
        y = torch.ops.dcngen.dcnv4(x, om, 3, 3, 1, 1, 1, 1, 1, 1, 2, 8, 1.0, False, "template")
        y.sum().backward()
        assert x.grad is not None and om.grad is not None
    else:
        with getattr(torch, context)():
            y = dcngen.ops.dcnv4(x, om, **OP_ARGS)
    _assert_correct(y, x, om)
    assert tunes == [(CFG.key, (1, 12, 12))] and _recorded_buckets() == [records.bucket((1, 12, 12))]


def _write_record(shape) -> None:
    """A finished tune's record of CFG's bucket of `shape` (as another process would write it)."""
    bkt = records.bucket(shape)
    records.update(records.path_for(CFG.target), CFG.target, records.record_key(CFG, bkt), finished_record(CFG, bkt, search.default_params(CFG)))


def test_a_record_of_the_bucket_is_used_and_a_nearby_ones_is_not_enough(tunes):
    for shape in ((2, 16, 16), (4, 16, 16)):  # another process's finished tune, and one a bucket away
        _write_record(shape)
        if shape == (2, 16, 16):
            dcngen.ops.dcnv4(*_inputs(*shape), **OP_ARGS)
            assert tunes == []
    dcngen.ops.dcnv4(*_inputs(8, 16, 16), **OP_ARGS)
    assert tunes == [(CFG.key, (8, 16, 16))]


def test_a_call_waits_for_another_process_tuning_the_same_record_file_and_takes_its_record(tunes):
    other = FileLock(str(autotune.lock_file(records.path_for(CFG.target))), thread_local=False)  # another process's tune, which ends in 1.5 s
    other.acquire()

    def finish():
        _write_record((2, 12, 12))
        other.release()

    threading.Timer(1.5, finish).start()
    started = time.monotonic()
    x, om = _inputs(2, 12, 12)
    _assert_correct(dcngen.ops.dcnv4(x, om, **OP_ARGS), x, om)
    assert time.monotonic() - started > 1.5 and tunes == []


def test_a_call_gives_up_waiting_for_a_tune_that_takes_too_long(tunes, monkeypatch):
    monkeypatch.setenv("DCNGEN_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "WAIT_MARGIN_S", 0.5)
    with FileLock(str(autotune.lock_file(records.path_for(CFG.target)))):
        x, om = _inputs(1, 9, 9)
        with pytest.warns(RuntimeWarning, match="default parameters: another process has been tuning for more than 1.5 s"):
            _assert_correct(dcngen.ops.dcnv4(x, om, **OP_ARGS), x, om)
    assert tunes == []


def test_a_failed_tune_warns_once_and_the_op_runs_with_its_defaults(tunes, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("DCNGEN_RECORDS", str(blocker / "records"))  # a folder that cannot be made
    x, om = _inputs(1, 9, 9)
    with pytest.warns(RuntimeWarning, match="could not tune .* runs its default parameters: DCNGenError: cannot write tuning records"):
        y = dcngen.ops.dcnv4(x, om, **OP_ARGS)
    _assert_correct(y, x, om)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tried once a process
        dcngen.ops.dcnv4(x, om, **OP_ARGS)


@pytest.mark.parametrize("value", ["abc", "-1", "inf", "nan", "1e999"])
def test_a_bad_budget_is_refused_naming_the_variable(tunes, monkeypatch, value):
    monkeypatch.setenv("DCNGEN_AUTOTUNE", value)
    with pytest.raises(DCNGenError, match=f"DCNGEN_AUTOTUNE must be a number of seconds.*got '{value}'"):
        dcngen.ops.dcnv4(*_inputs(1, 8, 8), **OP_ARGS)
    assert tunes == []


def test_unset_or_zero_tunes_nothing(tunes, monkeypatch):
    for value in (None, "0", " "):
        if value is None:
            monkeypatch.delenv("DCNGEN_AUTOTUNE")
        else:
            monkeypatch.setenv("DCNGEN_AUTOTUNE", value)
        dcngen.ops.dcnv4(*_inputs(1, 8, 8), **OP_ARGS)
    assert tunes == [] and _recorded_buckets() == []


@pytest.fixture
def ctrl_c_handled():
    """Python's own Ctrl-C handler, as in an interactive process (a shell's background job, a CI
    runner's say, starts with SIGINT ignored, and Python then installs none)."""
    assert threading.current_thread() is threading.main_thread()  # where Python raises KeyboardInterrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_stops_the_tune_at_its_next_candidate_and_the_next_call_resumes_it(tunes, ctrl_c_handled, monkeypatch):
    monkeypatch.setenv("DCNGEN_AUTOTUNE", "600")
    counted = tune.tune

    def interrupted(*args, **kwargs):  # Ctrl-C half a second into the tune, as Python's signal handler takes it
        threading.Timer(0.5, _thread.interrupt_main).start()
        return counted(*args, **kwargs)

    monkeypatch.setattr(tune, "tune", interrupted)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        dcngen.ops.dcnv4(*_inputs(1, 8, 8), **OP_ARGS)
    assert time.monotonic() - started < 60 and _recorded_buckets() == []  # its record is unfinished, never used
    monkeypatch.setattr(tune, "tune", counted)
    monkeypatch.setenv("DCNGEN_AUTOTUNE", "2")
    dcngen.ops.dcnv4(*_inputs(1, 8, 8), **OP_ARGS)
    assert len(tunes) == 2 and _recorded_buckets() == [records.bucket((1, 8, 8))]


def test_the_variable_is_read_at_the_first_call_of_a_config_and_shape(tunes, monkeypatch):
    monkeypatch.delenv("DCNGEN_AUTOTUNE")
    dcngen.ops.dcnv4(*_inputs(1, 8, 8), **OP_ARGS)
    monkeypatch.setenv("DCNGEN_AUTOTUNE", "2")
    dcngen.ops.dcnv4(*_inputs(1, 8, 8), **OP_ARGS)  # decided at its first call
    assert tunes == []
    dcngen.ops.dcnv4(*_inputs(1, 9, 9), **OP_ARGS)  # a first call
    assert tunes == [(CFG.key, (1, 9, 9))]

"""Tuning on first use (DCNGEN_AUTOTUNE=SECONDS), as cudnn.benchmark does for convolutions.

The first op call of a (config, shape bucket) that has no tuning record of its own bucket on this
machine runs `dcngen tune` for it (dcngen/tune.py: every candidate checked against the float64
reference before it is timed) within that many seconds, and then takes the record's kernel like
any later call, in this process or another. A process tries a (config, bucket) once (again only
after Ctrl-C stopped the tune); a tune that fails warns and the op keeps its default parameters.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch

from . import records, settings
from .config import DCNConfig
from .errors import warn

log = logging.getLogger(__name__)  # INFO: each tune's start and result

WAKE_S = 0.1  # how often a call waiting for its tune looks for Ctrl-C
WAIT_MARGIN_S = 30.0  # beyond the budget, how long a call waits for another process's tune of its record file
_decided: set[tuple[DCNConfig, tuple[int, int, int]]] = set()  # (config, input shape): nothing more to do
_attempted: set[tuple[DCNConfig, tuple[int, int]]] = set()  # (config, shape bucket): tuned, or tried to
_lock = threading.Lock()


def ensure_tuned(cfg: DCNConfig, shape: tuple[int, int, int], device: torch.device) -> None:
    """With DCNGEN_AUTOTUNE set, tune cfg for input `shape` (N, H, W) on `device` unless its bucket
    has a record here or this process tried it already. cfg with explicit params is left alone, and
    so is a call inside a CUDA graph capture (the next call outside one tunes). The variable is read
    at the first call of each config and input shape only (os.environ costs 0.7 us, 5 % of the
    cheapest call)."""
    if (cfg, shape) in _decided:
        return
    budget = settings.autotune_seconds()
    if budget is not None and not cfg.params:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # decided at a later call
        _tune_once(cfg, shape, device, budget)
    _decided.add((cfg, shape))


def _tune_once(cfg: DCNConfig, shape: tuple[int, int, int], device: torch.device, budget: float) -> None:
    """Tune cfg's bucket of `shape` unless this process tried it already; warn where it fails."""
    key = (cfg, records.bucket(shape))
    with _lock:
        if key in _attempted:
            return
        _attempted.add(key)
        # a thread of its own: the tune's reference gradients need autograd, which the caller may
        # have turned off (no_grad, inference mode, or the dispatcher below a custom op's autograd)
        stop, done = threading.Event(), threading.Event()
        outcome: list[str | None] = []

        def work() -> None:
            try:
                outcome.append(_tune(cfg, shape, device, budget, stop))
            finally:
                done.set()

        threading.Thread(target=work, name="dcngen-autotune", daemon=True).start()
        try:
            # short waits: Ctrl-C lands when this thread next runs Python, whichever thread the
            # signal interrupted (and an interrupted Thread.join would take the thread for finished)
            while not done.wait(WAKE_S):
                pass
        except KeyboardInterrupt:  # the tune stops after its current candidate; the next call resumes it
            stop.set()
            done.wait()
            _attempted.discard(key)
            raise
        failure = outcome[0] if outcome else "the tune stopped unfinished"
    if failure:
        warn(f"dcngen could not tune {cfg.key} for input {'x'.join(map(str, shape))} on first use, so it runs "
             f"its default parameters: {failure}")


def lock_file(record_file: Path) -> Path:
    """The lock a tune on first use holds over `record_file` (hidden, beside it; ignored by git)."""
    return record_file.parent / f".{record_file.name}.tune.lock"


class _Stopped(Exception):
    """Raised in the tuning thread once its caller was interrupted, at the tune's next step."""


def _tune(cfg: DCNConfig, shape: tuple[int, int, int], device: torch.device, budget: float, stop: threading.Event) -> str | None:
    """Tune cfg at `shape` unless a finished record of its bucket exists (another process may have
    written one meanwhile: tunes of one record file run one at a time); the failure's text, or None.
    Once `stop` is set, the tune ends at its next candidate."""
    from filelock import FileLock, Timeout

    from .tune import tune

    def progress(*_) -> None:
        if stop.is_set():
            raise _Stopped

    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        path = records.path_for(cfg.target)
        records.check_writable(path)
        lock = FileLock(str(lock_file(path)))
        patience = time.monotonic() + budget + WAIT_MARGIN_S
        while True:  # (while another process tunes, Ctrl-C still stops this one)
            progress()
            try:
                lock.acquire(timeout=1.0)
                break
            except Timeout:
                if time.monotonic() > patience:
                    return f"another process has been tuning for more than {budget + WAIT_MARGIN_S:g} s (it holds {lock.lock_file})"
        try:
            found = records.lookup(cfg, shape)
            if found is not None and tuple(found["bucket"]) == records.bucket(shape):
                return None
            log.info("tuning %s for input %s (DCNGEN_AUTOTUNE: up to %g s)", cfg.key, shape, budget)
            result = tune(cfg, shape, time_budget=budget, jobs=os.cpu_count() or 1, progress=progress)
            best = result.record["best"]
            log.info("tuned %s: %s, %.4g ms (default %.4g ms), %d candidates in %.1f s", cfg.key, best["params"], best["ms"],
                     result.record["default"]["ms"], len(result.trials), result.record["tune_seconds"])
            return None
        finally:
            lock.release()
    except _Stopped:
        return "stopped"
    except Exception as e:  # the op still runs with the default parameters
        return f"{type(e).__name__}: {e}"

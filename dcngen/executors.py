"""Where `dcngen tune`'s candidates run: this process, or a TVM RPC server found through a tracker.
An executor loads an artifact, moves tensors to and from it, and gives timers of its calls."""

from __future__ import annotations

import socket
import time
from typing import Callable

import torch

from . import records, remote_cpu
from .config import DCNConfig
from .errors import DCNGenError


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

        return tvm.runtime.tensor(t.contiguous().numpy(), device=self.dev)

    def get(self, t) -> torch.Tensor:
        return torch.from_numpy(t.numpy())

    def timer(self, mod: _RemoteModule, calls: list[tuple[str, tuple]], number: int) -> Callable[[], float]:
        evals = [(mod.mod.time_evaluator(name, self.dev, number=number, repeat=1), mod.args(name, args)) for name, args in calls]
        return lambda: sum(f(*args).mean for f, args in evals) * 1e3

    def close(self) -> None:
        self.session = None

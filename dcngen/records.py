"""Tuning records: measured kernel parameters per target machine, op config and input-shape bucket.

One JSON file per target fingerprint (`<fingerprint>.json`, sorted keys, indented, so a re-tune
reads as a diff) in the record folders of `settings.records_dirs()`: a checkout's
schedules/records/, or the user's folder and then the wheel's records for an installed dcngen. Layout:

    {"fingerprint": "...", "machine": {...},
     "records": {"<config key>|v<generator version>|n<N>_hw<H*W>": {
         "config": "<config key>", "generator_version": "1", "bucket": [N, HW], "shape": [n, h, w],
         "best": {"params": {...}, "ms": t}, "default": {"params": {...}, "ms": t},
         "candidates": {"name=value,...": ms | "failed: reason"}, "measured": ["forward"], ...}}}

Buckets round N and H*W to the nearest power of two; a lookup takes the record of the nearest
bucket (log2 distance) with the same fingerprint, config key (without params) and generator
version. Candidate times are medians scaled by their paired ratio to the default's median (see
dcngen/tune.py), so times measured minutes apart stay comparable on a noisy machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import re
import uuid
from pathlib import Path

from .config import DCNConfig
from .cpu_isas import cpuinfo
from .errors import DCNGenError, warn
from .settings import probe_writable, records_dirs

FORMAT = 1


def generator_version() -> str:
    from .build import GENERATOR_VERSION

    return GENERATOR_VERSION


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    """This machine's CPU model name (what its records are filed under)."""
    return cpuinfo().get("model name") or platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def machine(target: str) -> dict:
    """What the fingerprint of `target` is made of: CPU model and cores, or GPU name and architecture."""
    if not target.startswith("cuda"):  # this CPU, whichever instruction set the kernels use
        return {"cpu": cpu_model(), "cores": _cores()}
    import torch

    arch = target.split(":", 1)[1]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            if f"sm_{major}{minor}" == arch:
                return {"gpu": torch.cuda.get_device_name(i), "arch": arch}
    return {"gpu": None, "arch": arch}  # no such GPU here: match records by architecture only


def fingerprint(target: str, measured_on: dict | None = None) -> str:
    """File stem of `target`'s records, e.g. `cpu-intel-r-xeon-r-processor-2c` or `cuda-nvidia-h100-sm90`:
    of this machine, or of `measured_on` (a machine() dict of the machine that timed them)."""
    m = measured_on or machine(target)
    if "cpu" in m:
        return f"cpu-{_slug(m['cpu'])}-{m['cores']}c"
    return f"cuda-{_slug(m['gpu'] or 'any')}-{m['arch'].replace('_', '')}"


def _pow2(v: int) -> int:
    return 1 << max(0, round(math.log2(max(v, 1))))


@functools.lru_cache(maxsize=4096)  # consulted on every op call
def bucket(shape: tuple[int, int, int]) -> tuple[int, int]:
    """(N, H*W) of an (N, H, W) input, each rounded to the nearest power of two."""
    n, h, w = shape
    return _pow2(n), _pow2(h * w)


def config_key(cfg: DCNConfig) -> str:
    return cfg.replace(params=()).key if cfg.params else cfg.key


def record_key(cfg: DCNConfig, bkt: tuple[int, int]) -> str:
    return f"{config_key(cfg)}|v{generator_version()}|n{bkt[0]}_hw{bkt[1]}"


def params_name(params: dict) -> str:
    """Canonical text of a parameter set, used as a candidate's key: `a=1,b=2`."""
    return ",".join(f"{k}={int(v)}" for k, v in sorted(params.items()))


def parse_params_name(name: str) -> dict[str, int]:
    return {k: int(v) for k, _, v in (item.partition("=") for item in name.split(",") if item)}


def changes(params: dict, default: dict) -> dict:
    """The parameters of `params` whose values differ from `default`'s."""
    return {k: v for k, v in params.items() if default.get(k) != v}


def folders(root: Path | None = None) -> tuple[Path, ...]:
    """The record folders, in lookup order: `root` alone where given, else `settings.records_dirs()`."""
    return (Path(root),) if root else records_dirs()


def path_for(target: str, root: Path | None = None, measured_on: dict | None = None) -> Path:
    """The file `target`'s records (timed here, or on `measured_on`) are written to: in the first record folder."""
    return folders(root)[0] / f"{fingerprint(target, measured_on)}.json"


def load(path: Path) -> dict:
    """A record file's content; an empty one if it does not exist. Raises DCNGenError if it is malformed."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {"format": FORMAT, "records": {}}
    except (OSError, ValueError) as e:
        raise DCNGenError(f"tuning record file {path} is unreadable: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("records", {}), dict):
        raise DCNGenError(f"tuning record file {path} has no 'records' object")
    data.setdefault("records", {})
    return data


def save(path: Path, data: dict) -> None:
    """Write a record file atomically (temporary file + rename); sorted keys, one field per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    # open(..., "x"), not mkstemp (mode 0600): other users of the folder must read the records
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    try:
        with open(tmp, "x") as f:
            f.write(text)
        with contextlib.suppress(OSError):
            os.chmod(tmp, path.stat().st_mode & 0o7777)  # a shared file keeps its mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _cached_file.cache_clear()
    tuned_config.cache_clear()


def _version_of(key: str) -> int | None:
    m = re.search(r"\|v(\d+)\|", key)
    return int(m.group(1)) if m else None


def update(path: Path, target: str, key: str, record: dict, measured_on: dict | None = None) -> None:
    """Store `record` under `key` in the file at `path` (re-read first, under a lock beside it, so
    concurrent tuners of other keys survive, from any process or host that shares the folder).
    Records of older generator versions, which no lookup uses, are dropped; a newer dcngen's stay."""
    from filelock import FileLock

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.parent / f".{path.name}.lock")):  # hidden, and ignored by git (the repository's .gitignore)
            data = load(path)
            data.update(format=FORMAT, fingerprint=fingerprint(target, measured_on), machine=measured_on or machine(target))
            current = int(generator_version())
            data["records"] = {k: r for k, r in data["records"].items() if (_version_of(k) or 0) >= current}
            data["records"][key] = record
            save(path, data)
    except OSError as e:
        raise _unwritable(path, e) from None


def check_writable(path: Path) -> None:
    """Raise DCNGenError if the record file `path` cannot be written (before a tune spends its time)."""
    try:
        probe_writable(Path(path).parent)
    except OSError as e:
        raise _unwritable(path, e) from None


def _unwritable(path: Path, error: OSError) -> DCNGenError:
    return DCNGenError(f"cannot write tuning records to {path}: {error.strerror or error} (set DCNGEN_RECORDS to a writable folder)")


def _finished(rec) -> bool:
    """Whether a record entry is a finished tune's, with the fields lookups and listings read (an
    entry without "best" is a tune in progress; one missing other fields was edited by hand)."""
    try:
        n, hw = rec["bucket"]
        confirm = rec.get("confirm")
        won, rounds = confirm.get("faster_rounds", (0, 0)) if confirm else (0, 0)
        return (isinstance(rec["config"], str) and int(n) > 0 and int(hw) > 0 and isinstance(rec["best"]["params"], dict)
                and math.isfinite(float(rec["best"]["ms"])) and math.isfinite(float(rec["default"]["ms"])) and isinstance(rec["candidates"], dict)
                and (confirm is None or (math.isfinite(float(confirm["ratio"])) and 0 <= int(won) <= int(rounds))))
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def best_changes(record: dict) -> str:
    """A finished record's best parameters that differ from its default's, as text (`bwd_mma=1`), or
    `defaults` where the tune kept them: a CUDA config has over 30 parameters."""
    return params_name(changes(record["best"]["params"], record["default"]["params"])) or "defaults"


def retimed(record: dict) -> str:
    """The re-timing of a finished record's best other candidate, as text: its time / the default's
    and the paired rounds it won, e.g. `0.973 (12/14 rounds)`; `-` where no candidate beat the
    default in the search."""
    confirm = record.get("confirm")
    if not confirm:
        return "-"
    won = confirm.get("faster_rounds")
    return f"{confirm['ratio']:.3f}" + (f" ({won[0]}/{won[1]} rounds)" if won else "")


def _usable(rec, key: str, path: Path) -> bool:
    """_finished(rec); a record with a result but not well formed is skipped with a warning."""
    if not isinstance(rec, dict) or "best" not in rec:
        return False
    if not _finished(rec):
        warn(f"ignoring the malformed tuning record {key!r} in {path}")
        return False
    return True


@functools.lru_cache(maxsize=64)
def _cached_file(path: str, mtime: float) -> dict:
    return load(Path(path))


def _readable(path: Path, cached: bool = False) -> dict | None:
    """The record file's contents; None, with a warning naming it, where it cannot be read (and
    silently where it is gone since it was listed). `cached`: through the per-mtime cache."""
    try:
        return _cached_file(str(path), path.stat().st_mtime) if cached else load(path)
    except DCNGenError as e:
        warn(f"ignoring its records: {e}")
    except OSError:
        pass
    return None


def _candidate_files(target: str, root: Path | None) -> list[Path]:
    """This machine's record files, in folder order; for a CUDA target with no such GPU here, every
    file of its architecture."""
    if not target.startswith("cuda") or machine(target)["gpu"] is not None:
        return [folder / f"{fingerprint(target)}.json" for folder in folders(root)]
    pattern = f"cuda-*-{target.split(':', 1)[1].replace('_', '')}.json"
    return [path for folder in folders(root) for path in sorted(folder.glob(pattern))]


def lookup(cfg: DCNConfig, shape: tuple[int, int, int], root: Path | None = None) -> dict | None:
    """The record of the nearest shape bucket for cfg on this machine, or None (at equal distance,
    the earlier folder's)."""
    want = bucket(shape)
    prefix = f"{config_key(cfg)}|v{generator_version()}|"
    best, best_dist = None, math.inf
    for path in _candidate_files(cfg.target, root):
        if (data := _readable(path, cached=True)) is None:
            continue
        for key, rec in sorted(data["records"].items()):
            if not key.startswith(prefix) or not _usable(rec, key, path):
                continue
            n, hw = rec["bucket"]
            dist = abs(math.log2(n / want[0])) + abs(math.log2(hw / want[1]))
            if dist < best_dist:
                best, best_dist = rec, dist
    return best


@functools.lru_cache(maxsize=256)
def tuned_config(cfg: DCNConfig, bkt: tuple[int, int]) -> DCNConfig:
    """cfg with the best recorded parameters for shape bucket `bkt` (cfg itself if it has params or no record fits).

    A record whose parameters the generator no longer accepts is ignored with a warning."""
    if cfg.params:
        return cfg
    rec = lookup(cfg, (bkt[0], bkt[1], 1))
    if rec is None or not rec["best"]["params"]:
        return cfg
    try:
        from .generators import generate

        tuned = cfg.replace(params=tuple(rec["best"]["params"].items()))
        generate(tuned)
    except DCNGenError as e:
        warn(f"ignoring the tuning record of {cfg.key}: {e}")
        return cfg
    return tuned


def all_records(root: Path | None = None) -> list[tuple[str, dict]]:
    """(fingerprint, record) for every record file in the record folders."""
    out = []
    for path in [path for folder in folders(root) for path in sorted(folder.glob("*.json"))]:
        if (data := _readable(path)) is None:
            continue
        out += [(data.get("fingerprint", path.stem), rec) for key, rec in sorted(data["records"].items()) if _usable(rec, key, path)]
    return out

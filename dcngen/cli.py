"""`dcngen` command line: build, verify, bench, tune, list, show, doctor, clean."""

import inspect
import json
import math
import os
import shutil
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .config import DCNConfig
from .errors import DCNGenError

app = typer.Typer(help="Generate, build, verify and benchmark deformable convolution kernels.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
console = Console()

# The config flags, named like the Python API; spatial ones take `3` or `3x5`.
Op = Annotated[str, typer.Option("--op", help="dcnv4 | dcnv3")]
Group = Annotated[int, typer.Option("--group", help="groups G")]
GroupChannels = Annotated[int, typer.Option("--group-channels", help="channels per group C")]
KernelSize = Annotated[str, typer.Option("--kernel-size", help="kernel, e.g. 3 or 3x5 (h x w)")]
Stride = Annotated[str, typer.Option("--stride", help="stride, e.g. 1 or 2x1")]
Padding = Annotated[str, typer.Option("--padding", help="padding, e.g. 1 or 1x2")]
Dilation = Annotated[str, typer.Option("--dilation", help="dilation, e.g. 1 or 2x1")]
OffsetScale = Annotated[float, typer.Option("--offset-scale", help="offset scale s")]
RemoveCenter = Annotated[bool, typer.Option("--remove-center/--keep-center", help="skip the kernel centre point")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32 | float64 | bfloat16 | float16")]
Target = Annotated[str, typer.Option("--target", help="cpu (this CPU) | cpu:x86-64-v3 (and v2, v4, x86-64: any CPU with that level) | cuda (the visible GPU) | cuda:sm_80 | cuda:sm_90 | ...")]
Backend = Annotated[str, typer.Option("--backend", help="template | tvm")]
Param = Annotated[Optional[list[str]], typer.Option("--param", help="generator parameter NAME=INT (repeatable)")]
Shape = Annotated[str, typer.Option("--shape", help="N x H x W of the input, e.g. 8x56x56")]


def _fail(message: str) -> None:
    """One line on stderr, exit code 2: the CLI never shows a traceback for bad input."""
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 3 or not all(p.strip().isascii() and p.strip().isdigit() and int(p) > 0 for p in parts):
        _fail(f"invalid --shape {text!r}: expected N x H x W with positive ints, e.g. 8x56x56")
    n, h, w = (int(p) for p in parts)
    return n, h, w


def _problem(cfg: DCNConfig, text: str) -> tuple[int, int, int]:
    """_shape, checked against cfg: the kernel must leave an output of at least one pixel."""
    n, h, w = _shape(text)
    ho, wo = cfg.output_size(h, w)
    if ho <= 0 or wo <= 0:
        _fail(f"invalid --shape {text!r}: a {'x'.join(map(str, cfg.kernel_size))} kernel (dilation {'x'.join(map(str, cfg.dilation))}, "
              f"padding {'x'.join(map(str, cfg.padding))}) leaves no output pixel on a {h}x{w} input")
    need = n * (h * w * cfg.channels + ho * wo * (cfg.channels + 3 * cfg.group * cfg.num_points)) * 8  # the float64 tensors, at least
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        _fail(f"invalid --shape {text!r}: its input, offsets and output alone take {need / 2**30:.3g} GiB in float64, "
              f"more than this machine's {have / 2**30:.3g} GiB")
    return n, h, w


def _runs_here(cfg: DCNConfig, what: str) -> None:
    """A cuda target's kernels run on the visible GPU: say so where there is none."""
    import torch

    if cfg.is_cuda and not torch.cuda.is_available():
        _fail(f"{what} {cfg.target} kernels needs a CUDA GPU and torch sees none"
              + (" (--emulate runs the template's CUDA kernels on the CPU)" if what == "verifying" else "")
              + f"; `dcngen build --target {cfg.target}` compiles them without one")


def _config_flags(op: Op = "dcnv4", group: Group = 4, group_channels: GroupChannels = 16, kernel_size: KernelSize = "3",
                  stride: Stride = "1", padding: Padding = "1", dilation: Dilation = "1", offset_scale: OffsetScale = 1.0,
                  remove_center: RemoveCenter = False, dtype: Dtype = "float32", target: Target = "cpu",
                  backend: Backend = "template", param: Param = None) -> DCNConfig:
    """The DCNConfig of the config flags (a bad field: one-line error)."""
    params = []
    for item in param or []:
        name, sep, value = item.partition("=")
        if not sep:
            _fail(f"invalid config field 'params': expected NAME=INT, got {item!r}")
        params.append((name.strip(), value.strip()))
    try:
        return DCNConfig(op=op, group=group, group_channels=group_channels, kernel_size=kernel_size, stride=stride,
                         padding=padding, dilation=dilation, offset_scale=offset_scale, remove_center=remove_center,
                         dtype=dtype, target=target, backend=backend, params=tuple(params))
    except DCNGenError as e:
        _fail(str(e))


def _config_command(fn):
    """Decorator: the command takes every config flag (see _config_flags) plus its own options, and
    `fn` receives the validated DCNConfig followed by its own options."""
    flags = inspect.signature(_config_flags).parameters
    own = list(inspect.signature(fn).parameters.values())[1:]

    def command(**kwargs):
        cfg = _config_flags(**{name: kwargs.pop(name) for name in flags})
        try:
            return fn(cfg, **kwargs)
        except DCNGenError as e:
            _fail(str(e))

    command.__name__, command.__doc__ = fn.__name__, fn.__doc__
    command.__signature__ = inspect.Signature(list(flags.values()) + own)
    return command


@app.command()
@_config_command
def build(cfg: DCNConfig, shape: Annotated[Optional[str], typer.Option("--shape", help="N x H x W: use the tuning record of this shape")] = None) -> None:
    """Generate and compile the kernel of a configuration; print where the artifact is."""
    from .kernels import build_config
    from .records import bucket, tuned_config

    if shape is not None:
        cfg = tuned_config(cfg, bucket(_shape(shape)))
    with console.status(f"building {cfg.key}"):
        art = build_config(cfg)
    console.print(f"[green]built[/] {cfg.key}")
    console.print(str(art.path), highlight=False, soft_wrap=True)
    console.print(f"compiled by {art.meta.get('compiler', 'an unrecorded compiler')}", highlight=False, soft_wrap=True)  # a prebuilt library's may differ from $CXX
    if art.meta.get("ptxas"):  # nvcc's per-kernel resource report
        console.print(_ptxas_table(art.meta))


def _ptxas_table(meta: dict) -> Table:
    """An artifact's ptxas report, a kernel a row, with its block and theoretical occupancy where the
    template generator recorded its launch geometry."""
    from .cuda_archs import LIMITS, resident_warps
    from .generators.template_cuda import kernel_block

    table = Table(title="ptxas")
    for col in ("kernel", "arch", "registers", "spills st/ld B", "smem B", "threads", "warps / SM (limit)"):
        table.add_column(col, no_wrap=True)
    for k in meta["ptxas"]:
        block = kernel_block(k["kernel"], meta["launch"]) if meta.get("launch") else None
        smem = k["shared"] + (block[1] if block else 0)
        occupancy = "-"
        if block and k["arch"] in LIMITS:
            warps, limit = resident_warps(k["arch"], block[0], k["registers"], smem)
            occupancy = f"{warps} ({limit})"
        table.add_row(k.get("instance", k["kernel"]), k["arch"], str(k["registers"]), f"{k['spill_stores']}/{k['spill_loads']}", str(smem),
                      str(block[0]) if block else "-", occupancy)
    return table


@app.command()
@_config_command
def verify(
    cfg: DCNConfig,
    shape: Shape = "2x9x11",
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    emulate: Annotated[bool, typer.Option("--emulate", help="cuda targets, template backend: run the CUDA kernels on the CPU (SIMT emulator)")] = False,
    schedules: Annotated[int, typer.Option(min=1, help="--emulate: warp orders to run the kernels under (DCN_EMULATE_SEED 0, 1, ...); the worst counts")] = 3,
) -> None:
    """Forward and every gradient against the float64 reference on random border-crossing inputs."""
    from .verify import TOLERANCE, verify as run_verify, verify_kernel

    n, h, w = _problem(cfg, shape)
    if emulate and not (cfg.is_cuda and cfg.backend == "template"):
        _fail("--emulate runs the CUDA template kernels: it needs --target cuda... and --backend template")
    if not emulate:
        _runs_here(cfg, "verifying")
    with console.status(f"verifying {cfg.key}" + (" on the SIMT emulator" if emulate else "")):
        if emulate:
            from unittest import mock

            from .kernels import emulated_kernel

            kernel = emulated_kernel(cfg)
            runs = []
            for schedule in range(schedules):
                with mock.patch.dict(os.environ, {"DCN_EMULATE_SEED": str(schedule)}):
                    runs.append(verify_kernel(cfg, kernel, n, h, w, seed=seed))
            errors = {name: max((run[name] for run in runs), key=lambda e: (math.isnan(e), e)) for name in runs[0]}  # NaN is the worst
        else:
            errors = run_verify(cfg, n, h, w, seed=seed, device="cuda" if cfg.is_cuda else "cpu")
    tol = TOLERANCE[cfg.dtype]
    where = f", SIMT emulator, {schedules} warp order{'s' if schedules > 1 else ''}" if emulate else ""
    table = Table(title=f"{cfg.key}  (N, H, W) = ({n}, {h}, {w}){where}, tolerance {tol:g}")
    table.add_column("tensor")
    table.add_column("max rel. error", justify="right")
    table.add_column("")
    for name, err in errors.items():
        table.add_row(name, f"{err:.3e}", "[green]PASS[/]" if err < tol else "[red]FAIL[/]")
    console.print(table)
    if not all(err < tol for err in errors.values()):
        raise typer.Exit(1)


@app.command()
@_config_command
def bench(cfg: DCNConfig, shape: Shape = "8x56x56", rounds: Annotated[int, typer.Option(min=1, help="timed rounds per side")] = 7) -> None:
    """Time the kernel and the PyTorch baseline (grid_sample) in the same run (forward, forward+backward)."""
    from .bench import benchmark_config

    n, h, w = _problem(cfg, shape)
    _runs_here(cfg, "benchmarking")
    with console.status(f"benchmarking {cfg.key} at {n}x{h}x{w}"):
        rows = benchmark_config(cfg, n, h, w, rounds=rounds)
    table = Table(title=f"{cfg.key}  N={n} {h}x{w}")
    for col in ("pass", "kernel ms", "PyTorch ms", "speedup (median of paired ratios)"):
        table.add_column(col, justify="right")
    for name, c in rows.items():
        table.add_row(name, f"{c.candidate_ms:.3f}", f"{c.baseline_ms:.3f}", f"{c.speedup:.1f}x")
    console.print(table)


Shapes = Annotated[Optional[list[str]], typer.Option("--shape", help="N x H x W to tune for, e.g. 8x56x56 (repeatable)")]


@app.command()
@_config_command
def tune(cfg: DCNConfig, shape: Shapes = None, trials: Annotated[int, typer.Option(min=0, help="new candidates to measure per shape")] = 64,
         time_budget: Annotated[float, typer.Option(help="seconds for the whole run (split over the shapes); inf: no limit")] = 300.0,
         list_records: Annotated[bool, typer.Option("--list", help="show the stored tuning records and exit")] = False,
         rpc_tracker: Annotated[Optional[str], typer.Option(help="measure on a TVM RPC server from this tracker, HOST:PORT")] = None,
         rpc_key: Annotated[Optional[str], typer.Option(help="the RPC server key to request")] = None,
         seed: Annotated[int, typer.Option(help="seed of the search order")] = 0,
         jobs: Annotated[Optional[int], typer.Option(min=1, help="candidates built in parallel, before they are timed one by one "
                                                          "(template backends; default: the CPU count)")] = None) -> None:
    """Search generator parameters by measurement; store the best per machine, config and shape bucket.

    With DCNGEN_AUTOTUNE=SECONDS set, the ops run this search themselves on first use (see README).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from . import records
    from .executors import LocalExecutor, RPCExecutor
    from .tune import process_age, tune as run_tune

    if list_records:
        table = Table(title=f"tuning records in {', '.join(map(str, records.folders()))}")
        for col in ("machine", "config", "bucket N,HW", "best: changes from the default", "best ms", "default ms", "re-timed", "measured", "failed"):
            table.add_column(col)
        for fp, r in records.all_records():
            table.add_row(fp, r["config"], ",".join(map(str, r["bucket"])), records.best_changes(r),
                          f"{r['best']['ms']:.3f}", f"{r['default']['ms']:.3f}", records.retimed(r), str(len(r["candidates"])), str(r.get("failed", 0)))
        console.print(table)
        return
    if cfg.params:
        _fail("tune searches the parameters: drop --param")
    if not time_budget > 0:  # nan too
        _fail(f"--time-budget must be a positive number of seconds (inf: no limit), got {time_budget}")
    if bool(rpc_tracker) != bool(rpc_key):
        _fail("--rpc-tracker and --rpc-key go together")
    shapes = [_problem(cfg, s) for s in shape or ["8x56x56"]]
    if not rpc_tracker:
        _runs_here(cfg, "tuning")
    time_budget -= process_age()  # the budget covers the whole command
    executor = RPCExecutor(cfg, rpc_tracker, rpc_key) if rpc_tracker else LocalExecutor(cfg)
    try:
        for n, h, w in shapes:
            with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=console) as bar:
                task = bar.add_task(f"{n}x{h}x{w}", total=trials, note="building the default")

                def report(done, total, best_ms, note, task=task, bar=bar):
                    bar.update(task, completed=done, description=f"{n}x{h}x{w} best {best_ms:.3f} ms", note=note[-60:])

                result = run_tune(cfg, (n, h, w), trials=trials, time_budget=time_budget / len(shapes), executor=executor,
                                  seed=seed, jobs=jobs or os.cpu_count() or 1, progress=report)
            r = result.record
            console.print(f"[green]{n}x{h}x{w}[/]: best {records.best_changes(r)} {r['best']['ms']:.3f} ms, "
                          f"default {r['default']['ms']:.3f} ms, "
                          f"best other candidate re-timed: {records.retimed(r)}, "
                          f"{len(result.trials)} new candidates ({r['failed']} failed in all) -> {result.path}", highlight=False)
    finally:
        executor.close()


@app.command("list")
def list_cmd(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """List the cached artifacts."""
    from .build import artifact_roots, list_artifacts

    arts = list_artifacts()
    if as_json:
        print(json.dumps([{"path": str(a.path), **a.meta} for a in arts], indent=2))
        return
    table = Table(title=f"artifacts in {' and '.join(map(str, artifact_roots()))}")
    for col in ("config", "language", "params", "size", "build s", "path"):
        table.add_column(col)
    for a in arts:
        m = a.meta
        table.add_row(m["config_key"], m["language"], ",".join(f"{k}={v}" for k, v in m["params"].items()),
                      f"{m['library_size'] // 1024} KiB", str(m["build_seconds"]), a.path.name)
    console.print(table)


@app.command()
@_config_command
def show(cfg: DCNConfig) -> None:
    """Print the generated source of a configuration (nothing is compiled)."""
    from .generators import generate

    try:
        sys.stdout.write(generate(cfg).text)
    except DCNGenError as e:
        _fail(str(e))


@app.command()
def doctor() -> None:
    """Build and check a tiny kernel per backend and target this machine can handle; PASS/FAIL each."""
    import torch

    from .compilers.cuda import ptxas_report
    from .generators import generate
    from .kernels import emulated_kernel
    from .verify import TOLERANCE, verify as run_verify, verify_kernel

    small = dict(group=2, group_channels=8, kernel_size=3, dtype="float32")
    gpu = torch.cuda.is_available()

    def passes(cfg: DCNConfig, errors: dict) -> bool:
        return all(e < TOLERANCE[cfg.dtype] for e in errors.values())

    def compiles_without_spills(cfg: DCNConfig) -> bool:
        kernels = ptxas_report(generate(cfg), ("sm_90",))
        return bool(kernels) and all(k["spill_stores"] == 0 for k in kernels)

    def checks(cfg: DCNConfig):
        """(what, run() -> ok) for cfg on this machine."""
        if not cfg.is_cuda or gpu:
            yield "forward + gradients vs float64 reference", lambda: passes(cfg, run_verify(cfg, 1, 6, 7, device="cuda" if cfg.is_cuda else "cpu"))
            return
        yield "compiles for sm_90, no spills (no GPU here)", lambda: compiles_without_spills(cfg)
        if cfg.backend == "template":
            yield "forward + gradients vs reference on the SIMT emulator", lambda: passes(cfg, verify_kernel(cfg, emulated_kernel(cfg), 1, 6, 7))

    table = Table(title="dcngen doctor")
    for col in ("backend", "target", "check", "result"):
        table.add_column(col)
    failed = False
    for backend in ("template", "tvm"):
        targets = ["cpu"] + (["cuda"] if gpu else ["cuda:sm_90"] if shutil.which("nvcc") else [])
        for target in targets:
            try:
                cfg = DCNConfig(backend=backend, target=target, **small)
                todo = list(checks(cfg))
            except Exception as e:  # noqa: BLE001  (report every failure, keep going)
                failed = True
                table.add_row(backend, target, "config", f"[red]FAIL[/] {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            for check, run in todo:
                try:
                    ok = run()
                    result = "[green]PASS[/]" if ok else "[red]FAIL[/]"
                except Exception as e:  # noqa: BLE001  (report every failure, keep going)
                    ok, result = False, f"[red]FAIL[/] {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                failed |= not ok
                table.add_row(backend, target, check, result)
    console.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def clean(yes: Annotated[bool, typer.Option("--yes", help="do not ask")] = False) -> None:
    """Delete every cached artifact (not those being built now, nor files dcngen did not write)."""
    from .build import clean as clean_cache
    from .settings import cache_root

    root = cache_root()
    if not yes and not typer.confirm(f"delete all artifacts under {root}?"):
        raise typer.Exit(1)
    try:
        removed, skipped = clean_cache(root)
    except DCNGenError as e:
        _fail(str(e))
    console.print(f"cleaned {root}: {removed} removed" + (f", {skipped} being built now left alone" if skipped else ""), highlight=False)


if __name__ == "__main__":
    app()

"""Where the host time of main.py's training step goes: torch.profiler over one epoch of its own loop.

    # GPU: efficientnet_b0 at 112 px, batch 128, the default recipe (about a minute)
    python -m foldkit.synthetic --out /tmp/syn --n-train 9000 --n-validate 3000 --n-test 100 --seed 0
    python benchmarks/profile_step.py --data-dir /tmp/syn --out /tmp/prof/recipe --trace
    python benchmarks/profile_step.py --data-dir /tmp/syn --out /tmp/prof/compile --set train.compile=true

    # all the GPU variants (recipe, lean, compiled) in one call of about five minutes
    bash benchmarks/gpu_profile.sh OUT_DIR

    # CPU smoke test at tiny sizes
    python -m foldkit.synthetic --out /tmp/prof_syn --n-train 150 --n-validate 50 --n-test 10 \\
        --seed 0 --size 64
    python benchmarks/profile_step.py --device cpu --backbone test_efficientnet --img-size 32 --batch 16 \\
        --steps 6 --data-dir /tmp/prof_syn --out /tmp/prof_cpu

How: ``main.main`` runs in this process (fold 0, ``--epochs`` 2, ``train.max_train_batches=--steps``,
``pretrained=false``, ``data.near_dup=false``) with ``_Trainer.train_epoch`` wrapped here; foldkit itself
is unchanged. Every epoch is timed (wall, this thread's CPU, the process's CPU, the DataLoader workers'
CPU from /proc). Epoch ``--profile-epoch`` (2: epoch 1 carries the first-epoch effects) runs under
``torch.profiler`` with every thread recorded (the pin-memory thread too, where torch allows it) and
the step's parts marked by ``record_function`` as ``phase::data`` (the DeviceLoader's next batch, with
``phase::h2d_transform`` inside), ``phase::forward``, ``phase::backward``, ``phase::optimizer_step``
(with ``phase::clip`` and ``phase::ema`` inside) and ``phase::loss_sync``. Right after it the run's own
trainer (its model, optimizer, EMA, clipping and scaler) runs the bare step on one fixed device batch,
``--steps`` steps unprofiled and then ``--steps`` profiled, and is restored, so the run goes on as before.

Writes to ``--out``: summary.json (loop and bare side by side per step: wall, host CPU, kernel launches
and CUDA runtime calls, kernel time and GPU-busy fraction, phases, top self-CPU ops, CPU per thread),
report.txt (the same as printed), host_ops.txt and host_ops_bare.txt (the profiler's tables), and with
``--trace`` trace.json and trace_bare.json (chrome://tracing or https://ui.perfetto.dev), cut to
``--trace-steps`` steps from the middle (a whole GPU epoch is hundreds of MB).

Reading it: profiled figures carry the profiler's own cost (microseconds per op), so compare the loop
with the bare step, both profiled, and the unprofiled epochs with the unprofiled bare step. Where
main.py's output is not a terminal its tqdm bar is off, as in benchmarks/run.py's runs; ``--bar``
forces it on. Reading a profile costs time per recorded event (``processing_s`` in the summary):
size ``--steps`` to the time limit with it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, without installing the package
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import foldkit.predict  # noqa: E402
import foldkit.train as ft  # noqa: E402
from foldkit.cli import run  # noqa: E402
from foldkit.device_transforms import DeviceLoader  # noqa: E402
from foldkit.ema import CachedEma  # noqa: E402

# host-side calls that put a kernel on the GPU queue: runtime and driver API, CUDA graphs
_LAUNCH = re.compile(r"^cu(da)?(LaunchKernel(Ex|ExC)?|LaunchCooperativeKernel|GraphLaunch)(_v\d+)?$")
_RUNTIME = re.compile(r"^cu(da)?[A-Z]")  # every CUDA runtime / driver call the profiler saw
_STEP_PHASES = ("data", "forward", "backward", "optimizer_step", "loss_sync")  # not nested in each other


# --------------------------------------------------------------------------------------------------
# marking the step's parts, timing and profiling a block
# --------------------------------------------------------------------------------------------------


def _marked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` inside ``record_function("phase::<name>")``: its ops group under one profiler row."""

    @functools.wraps(fn)
    def marked(*args: Any, **kwargs: Any) -> Any:
        with record_function(f"phase::{name}"):
            return fn(*args, **kwargs)

    return marked


class _Forward:
    """What ``_Trainer.net`` hands out while phases are marked: the module, its call marked as
    ``phase::forward`` (outside a compiled model, so torch.compile sees nothing of it)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with record_function("phase::forward"):
            return self.module(*args, **kwargs)


def _marked_iter(original: Callable[[DeviceLoader], Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    """``DeviceLoader.__iter__`` with each ``next`` marked ``phase::data``: the wait for the workers'
    batch (the DataLoader's own record inside it) plus the side-stream copy and transform."""

    @functools.wraps(original)
    def __iter__(self: DeviceLoader) -> Iterator[Any]:
        batches = original(self)
        while True:
            with record_function("phase::data"):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    return __iter__


@contextlib.contextmanager
def marked_phases() -> Iterator[None]:
    """Mark the parts of a training step, by patching foldkit's and torch's classes for the block only
    (foldkit's code stays as it is): the profile then says how the host time splits between them."""
    net = ft._Trainer.net
    patches = [
        mock.patch.object(ft._Trainer, "net", property(lambda self: _Forward(net.fget(self)))),
        mock.patch.object(torch.Tensor, "backward", _marked("backward", torch.Tensor.backward)),
        mock.patch.object(
            ft._Trainer, "_optimizer_step", _marked("optimizer_step", ft._Trainer._optimizer_step)
        ),
        mock.patch.object(ft._Trainer, "_checked_sums", _marked("loss_sync", ft._Trainer._checked_sums)),
        mock.patch.object(torch.nn.utils, "clip_grad_norm_", _marked("clip", torch.nn.utils.clip_grad_norm_)),
        mock.patch.object(CachedEma, "update", _marked("ema", CachedEma.update)),
        mock.patch.object(DeviceLoader, "_to_device", _marked("h2d_transform", DeviceLoader._to_device)),
        mock.patch.object(DeviceLoader, "__iter__", _marked_iter(DeviceLoader.__iter__)),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def _sync(device: torch.device) -> None:
    """Wait for the device's queue: a wall time read without it would miss the work still queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _children_cpu() -> tuple[float, int]:
    """CPU seconds used so far by the live multiprocessing children and their number, from /proc: the
    DataLoader workers (the train loader's and, after the first validation, the idle eval loader's).
    Whether the workers keep up shows in their CPU time against the wall."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 0.0, 0
    total, n = 0.0, 0
    for child in multiprocessing.active_children():
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total, n = total + (int(fields[11]) + int(fields[12])) / tick, n + 1  # utime, stime
    return total, n


@contextlib.contextmanager
def clock(device: torch.device, steps: int, batch: int) -> Iterator[dict[str, Any]]:
    """Wall and CPU time of the block per step, the device's queue drained at both ends so the wall is
    the block's own work. This thread's CPU time below its wall means it waited (the GIL, a batch, a
    sync); the process's CPU beyond this thread's is the other threads' (pin memory, the bar's)."""
    _sync(device)
    children0, _ = _children_cpu()
    t0, thread0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
    out: dict[str, Any] = {}
    yield out
    _sync(device)
    wall = time.perf_counter() - t0
    thread, proc = time.thread_time() - thread0, time.process_time() - proc0
    children1, n_children = _children_cpu()
    per = 1000 / max(1, steps)
    out.update(
        steps=steps,
        wall_s=round(wall, 3),
        img_s=round(steps * batch / max(wall, 1e-9), 1),
        wall_ms_per_step=round(wall * per, 3),
        main_thread_cpu_ms_per_step=round(thread * per, 3),
        process_cpu_ms_per_step=round(proc * per, 3),
        child_processes=n_children,
        children_cpu_ms_per_step=round((children1 - children0) * per, 3),
    )


def _all_threads(wanted: bool) -> dict[str, Any]:
    """Record the ops of every thread (torch >= 2.7), not only this one's: the pin-memory thread's
    copies then show; older torch records this thread and the threads it starts meanwhile."""
    if not wanted:
        return {}
    try:
        return {"experimental_config": torch._C._profiler._ExperimentalConfig(profile_all_threads=True)}
    except (AttributeError, TypeError):
        return {}


@contextlib.contextmanager
def profiled(device: torch.device, all_threads: bool = True) -> Iterator[profile]:
    """torch.profiler (CPU, and CUDA on a GPU) over the block, with the step's phases marked. Started
    here, outside any ``clock`` inside the block, so CUPTI's start-up is not in the measured wall."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, **_all_threads(all_threads))
    prof.start()
    try:
        with marked_phases():
            yield prof
    finally:
        prof.stop()


# --------------------------------------------------------------------------------------------------
# what a profile says, per step
# --------------------------------------------------------------------------------------------------


def _is_work(e: Any) -> bool:
    """A device event that is GPU work (a kernel, a copy), not a marked range's span on the GPU
    timeline (a user annotation, which would count the gaps between its kernels as busy)."""
    return e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)


def _scan_events(prof: profile, steps: int) -> tuple[float, list[dict[str, Any]]]:
    """One pass over the raw events: the GPU's busy time (the union of kernel and copy intervals, so
    side-stream work overlapping the model counts once), and self CPU time in recorded ops per thread
    with each thread's top ops, to tell the main thread from the pin-memory one."""
    intervals: list[tuple[float, float]] = []
    by_thread: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    main_thread = None
    for e in prof.events():
        if e.device_type != DeviceType.CPU:
            if _is_work(e):
                intervals.append((e.time_range.start, e.time_range.end))
        elif e.name.startswith("phase::"):
            main_thread = e.thread if e.name == "phase::forward" else main_thread
        else:
            by_thread[e.thread][e.name] += e.self_cpu_time_total
    busy, end = 0.0, -float("inf")
    for start, stop in sorted(intervals):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    threads = []
    for tid, ops in by_thread.items():
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:4]
        threads.append(
            {
                "thread": tid,
                "main": tid == main_thread,
                "self_cpu_ms_per_step": round(sum(ops.values()) / 1000 / steps, 3),
                "top_ops": {name: round(us / 1000 / steps, 3) for name, us in top},
            }
        )
    return busy, sorted(threads, key=lambda t: -t["self_cpu_ms_per_step"])[:6]


def _gpu_stats(rows: list[Any], busy_us: float, wall_s: float, steps: int) -> dict[str, Any]:
    """Kernels per step and their time against the wall: the sum of kernel times (``kernel_fraction``,
    the GPU-busy fraction as kernel time / wall) and the union of kernel and copy intervals
    (``gpu_busy_fraction``: overlapping side-stream work counted once)."""
    work = [r for r in rows if _is_work(r)]
    copies = [r for r in work if r.key.startswith(("Memcpy", "Memset"))]
    kernels = [r for r in work if not r.key.startswith(("Memcpy", "Memset"))]
    kernel_us = sum(r.self_device_time_total for r in kernels)
    return {
        "kernels_per_step": round(sum(r.count for r in kernels) / steps, 1),
        "kernel_ms_per_step": round(kernel_us / 1000 / steps, 3),
        "copy_ms_per_step": round(sum(r.self_device_time_total for r in copies) / 1000 / steps, 3),
        "kernel_fraction": round(kernel_us / 1e6 / max(wall_s, 1e-9), 3),
        "gpu_busy_ms_per_step": round(busy_us / 1000 / steps, 3),
        "gpu_busy_fraction": round(busy_us / 1e6 / max(wall_s, 1e-9), 3),
    }


def profile_stats(prof: profile, rows: Any, timing: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Per-step figures of one profiled window: host time and what it was spent on (phases, top ops,
    threads), kernel launches and the other CUDA runtime calls, and on a GPU its kernels' time.
    ``rows``: ``prof.key_averages()``, computed once (on a long window it takes seconds)."""
    steps = max(1, timing["steps"])
    per = lambda us: round(us / 1000 / steps, 3)  # noqa: E731 (profiler times are microseconds)
    cpu = [r for r in rows if r.device_type == DeviceType.CPU]
    ops = [r for r in cpu if not r.key.startswith("phase::")]
    runtime = sorted((r for r in cpu if _RUNTIME.match(r.key)), key=lambda r: -r.self_cpu_time_total)
    phases = {
        r.key.removeprefix("phase::"): {
            "ms_per_step": per(r.cpu_time_total),
            "self_ms_per_step": per(r.self_cpu_time_total),  # its Python, between its ops
            "calls_per_step": round(r.count / steps, 2),
        }
        for r in cpu
        if r.key.startswith("phase::")
    }
    marked = sum(phases[p]["ms_per_step"] for p in _STEP_PHASES if p in phases)
    phases["rest"] = {"ms_per_step": round(timing["wall_ms_per_step"] - marked, 3)}  # loss, bar, loop
    busy, threads = _scan_events(prof, steps)
    top = sorted(ops, key=lambda r: -r.self_cpu_time_total)[:10]
    out: dict[str, Any] = {
        **timing,
        "ops_self_cpu_ms_per_step": per(sum(r.self_cpu_time_total for r in ops)),
        "kernel_launches_per_step": round(sum(r.count for r in cpu if _LAUNCH.match(r.key)) / steps, 1),
        "runtime_calls_per_step": round(sum(r.count for r in runtime) / steps, 1),
        "runtime_calls": {
            r.key: {"calls_per_step": round(r.count / steps, 2), "ms_per_step": per(r.self_cpu_time_total)}
            for r in runtime[:8]
        },
        "phases": phases,
        "top_self_cpu": [
            {
                "op": r.key,
                "ms_per_step": per(r.self_cpu_time_total),
                "calls_per_step": round(r.count / steps, 2),
            }
            for r in top
        ],
        "threads": threads,
    }
    if device.type == "cuda":
        out.update(_gpu_stats(rows, busy, timing["wall_s"], steps))
    return out


def _in_window(e: dict[str, Any], lo: float, hi: float) -> bool:
    """A trace event to keep: metadata (thread names), or an event overlapping [lo, hi)."""
    if "ts" not in e or e.get("ph") == "M":
        return True
    start = float(e["ts"])
    return start < hi and start + float(e.get("dur", 0)) >= lo


def write_trace(prof: profile, path: Path, keep: int) -> None:
    """The chrome trace, cut to ``keep`` steps from the middle of the window (0: all of them). A whole
    epoch of efficientnet_b0 on a GPU is some 15,000 events a step, hundreds of MB of JSON; a few
    steps show the same gaps and threads. Steps start at the main thread's ``phase::data`` (the
    loop) or ``phase::forward`` (the bare step); an event is kept where it overlaps the cut."""
    prof.export_chrome_trace(str(path))
    if keep <= 0:
        return
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    starts: dict[str, list[float]] = {"phase::data": [], "phase::forward": []}
    for e in events:
        if e.get("cat") == "user_annotation" and e.get("name") in starts:
            starts[e["name"]].append(float(e["ts"]))
    marks = sorted(starts["phase::data"] or starts["phase::forward"])
    if len(marks) <= keep + 1:
        return
    first = (len(marks) - keep) // 2
    lo, hi = marks[first], marks[first + keep]
    trace["traceEvents"] = [e for e in events if _in_window(e, lo, hi)]
    trace["foldkit_cut"] = {"steps": keep, "of": len(marks), "from_step": first}
    path.write_text(json.dumps(trace))


def write_tables(rows: Any, path: Path, steps: int, device: torch.device) -> None:
    """The profiler's own tables (``rows``: its ``key_averages()``): by self CPU time and by CPU total,
    top 40, and on a GPU by kernel time."""
    keys = [("self CPU time", "self_cpu_time_total"), ("CPU total", "cpu_time_total")]
    keys += [("self device time", "self_device_time_total")] if device.type == "cuda" else []
    parts = [f"Totals over {steps} steps: divide by {steps} for per-step figures."]
    for title, key in keys:
        try:
            table = rows.table(sort_by=key, row_limit=40, max_name_column_width=70)
        except (AttributeError, KeyError, TypeError) as exc:  # a sort key this torch does not know
            table = f"(no table: {exc!r})"
        parts.append(f"== sorted by {title}, top 40 ==\n{table}")
    path.write_text("\n\n".join(parts) + "\n")


# --------------------------------------------------------------------------------------------------
# the bare step and the wrapped epoch
# --------------------------------------------------------------------------------------------------


def _bare_step(trainer: ft._Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
    """train_epoch's step without its loop: forward, loss, backward and ``_optimizer_step`` (clipping,
    optimizer, scaler, schedule, EMA) as the run has them configured, on a batch already on the device."""
    trainer.forward_backward(x, y)
    trainer._optimizer_step()


def bare_steps(
    trainer: ft._Trainer, steps: int, warmup: int, all_threads: bool = True, profiling: bool = True
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The run's own trainer on one fixed random batch: ``warmup`` steps, ``steps`` unprofiled, then
    (with ``profiling``) ``steps`` profiled; returns (unprofiled timing, profiled figures or None).
    Weights, EMA, optimizer, step count, schedule and RNG streams are restored after, so the run goes
    on as if this had not run."""
    cfg, device = trainer.cfg, trainer.device
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    batch, size = cfg.train.batch_size, cfg.data.img_size
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, device=device) > 0.5).float()
    saved, step = ft._snapshot(trainer), trainer.step
    trainer.model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for _ in range(warmup):
                _bare_step(trainer, x, y)
            with clock(device, steps, batch) as plain:
                for _ in range(steps):
                    _bare_step(trainer, x, y)
            if not profiling:
                return plain, None
            with profiled(device, all_threads) as prof, clock(device, steps, batch) as timing:
                for _ in range(steps):
                    _bare_step(trainer, x, y)
    finally:
        ft._restore(trainer, saved)
        trainer.step = step
        trainer.scheduler.step_update(step)
    return plain, {"prof": prof, "timing": timing}


class EpochProbe:
    """Stands in for ``_Trainer.train_epoch`` during one main.py run: times every epoch, profiles epoch
    ``--profile-epoch`` and, right after it, the bare step of the same trainer; writes the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.original = ft._Trainer.train_epoch
        self.epochs: list[dict[str, Any]] = []
        self.loop: dict[str, Any] | None = None
        self.bare: dict[str, Any] | None = None
        self.bare_unprofiled: dict[str, Any] | None = None
        self.processing_s: dict[str, float] = {}  # reading the profiles: to size --steps to a time limit

    def method(self) -> Callable[..., Any]:
        """A function to patch in as ``_Trainer.train_epoch`` (bound to each trainer like the original)."""

        def train_epoch(
            trainer: ft._Trainer, loader: DeviceLoader, progress: Any, *rest: Any, **kw: Any
        ) -> Any:
            return self.train_epoch(trainer, loader, progress, *rest, **kw)

        return train_epoch

    def train_epoch(
        self, trainer: ft._Trainer, loader: DeviceLoader, progress: Any, *rest: Any, **kw: Any
    ) -> Any:
        """The original epoch, timed; profiled (then the bare step measured) when it is the one asked for."""
        tc, device, epoch = trainer.cfg.train, trainer.device, progress.epoch
        steps = min(len(loader), tc.max_train_batches or len(loader)) - progress.batch
        if epoch != self.args.profile_epoch or self.args.no_profile:
            with clock(device, steps, tc.batch_size) as timing:
                result = self.original(trainer, loader, progress, *rest, **kw)
            self.epochs.append({"epoch": epoch, "profiled": False, **timing})
            if epoch == self.args.profile_epoch:  # --no-profile: the bare step unprofiled only
                self.bare_unprofiled, _ = bare_steps(trainer, steps, self.args.warmup, profiling=False)
                self.write()
            return result
        all_threads = not self.args.main_thread_only
        with profiled(device, all_threads) as prof, clock(device, steps, tc.batch_size) as timing:
            result = self.original(trainer, loader, progress, *rest, **kw)
        self.epochs.append({"epoch": epoch, "profiled": True, **timing})
        self.loop = self._read(prof, timing, "", device)
        del prof
        self.bare_unprofiled, bare = bare_steps(trainer, steps, self.args.warmup, all_threads)
        self.bare = self._read(bare["prof"], bare["timing"], "_bare", device)
        self.write()  # now: a run cut short later (validation, OOF) still leaves the figures
        return result

    def _read(
        self, prof: profile, timing: dict[str, Any], suffix: str, device: torch.device
    ) -> dict[str, Any]:
        """A profile's figures, its tables (and trace) written; the seconds this takes are recorded."""
        start = time.perf_counter()
        rows = prof.key_averages()
        stats = profile_stats(prof, rows, timing, device)
        write_tables(rows, self.args.out / f"host_ops{suffix}.txt", timing["steps"], device)
        if self.args.trace:
            write_trace(prof, self.args.out / f"trace{suffix}.json", self.args.trace_steps)
        self.processing_s[suffix.strip("_") or "loop"] = round(time.perf_counter() - start, 1)
        return stats

    def summary(self) -> dict[str, Any]:
        """Everything measured so far, with what it was measured on."""
        return {
            "environment": environment(self.args),
            "epochs": self.epochs,
            "side_by_side": side_by_side(self.bare, self.loop),
            "bare_unprofiled": self.bare_unprofiled,
            "loop": self.loop,
            "bare": self.bare,
            "processing_s": self.processing_s,
        }

    def write(self) -> str:
        """summary.json and report.txt as they stand; returns the report."""
        summary = self.summary()
        (self.args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        text = report(summary)
        (self.args.out / "report.txt").write_text(text + "\n")
        return text


# --------------------------------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------------------------------

_COMPARED = (
    "wall_ms_per_step", "main_thread_cpu_ms_per_step", "process_cpu_ms_per_step", "children_cpu_ms_per_step",
    "ops_self_cpu_ms_per_step", "kernel_launches_per_step", "runtime_calls_per_step", "kernels_per_step",
    "kernel_ms_per_step", "gpu_busy_ms_per_step", "kernel_fraction", "gpu_busy_fraction",
)  # fmt: skip


def side_by_side(bare: dict[str, Any] | None, loop: dict[str, Any] | None) -> dict[str, Any]:
    """Bare step against the loop, both profiled, per step: what the loop adds, figure by figure."""
    if bare is None or loop is None:
        return {}
    out: dict[str, Any] = {}
    for key in _COMPARED:
        if key in bare and key in loop:
            out[key] = {
                "bare": bare[key],
                "loop": loop[key],
                "loop_minus_bare": round(loop[key] - bare[key], 3),
            }
    for name in sorted(set(bare["phases"]) | set(loop["phases"])):
        b, lp = bare["phases"].get(name, {}), loop["phases"].get(name, {})
        out[f"phase {name} ms_per_step"] = {"bare": b.get("ms_per_step"), "loop": lp.get("ms_per_step")}
    return out


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """What the figures were measured on and with."""
    import timm

    device = torch.device(args.device)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpus": os.cpu_count(),
        "backbone": args.backbone,
        "img_size": args.img_size,
        "batch": args.batch,
        "steps": args.steps,
        "profile_epoch": args.profile_epoch,
        "sets": args.sets,
        "bar": args.bar,
        "profiled": not args.no_profile,
        "pinned": device.type == "cuda" and not args.no_pin,  # loaders pin on CUDA only
        "switch_interval": args.switch_interval or sys.getswitchinterval(),
        "all_threads": not args.main_thread_only,
        "main_argv": main_argv(args),
    }


def _fmt(value: Any) -> str:
    """A table cell: three decimals for measured figures, '-' where a side has none."""
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def report(summary: dict[str, Any]) -> str:
    """The summary as a few lines to read in a terminal."""
    env, pairs, loop = summary["environment"], summary["side_by_side"], summary["loop"] or {}
    lines = [
        f"{env['backbone']} {env['img_size']} px, batch {env['batch']}, {env['device']}, "
        f"torch {env['torch']}, {env['cpus']} cpus, sets {env['sets'] or 'none'}, "
        f"pinned {env.get('pinned', True)}, switch interval {env.get('switch_interval')}",
    ]
    if env.get("profiled", True):
        lines.append(
            f"{'per step (epoch ' + str(env['profile_epoch']) + ' profiled)':36} "
            f"{'bare':>10} {'loop':>10} {'loop-bare':>10}"
        )
    for key, v in pairs.items():
        diff = v.get("loop_minus_bare")
        lines.append(f"{key:36} {_fmt(v['bare']):>10} {_fmt(v['loop']):>10} {_fmt(diff):>10}")
    walls = [f"bare {_fmt((summary['bare_unprofiled'] or {}).get('wall_ms_per_step'))} unprofiled"]
    walls += [
        f"epoch {e['epoch']} {_fmt(e['wall_ms_per_step'])}{' profiled' if e['profiled'] else ''}"
        for e in summary["epochs"]
    ]
    lines.append("wall ms per step: " + ", ".join(walls))
    if not env.get("profiled", True):
        return "\n".join(lines)
    tops = [
        f"{t['op']} {t['ms_per_step']:.3f} ({t['calls_per_step']:g})" for t in loop.get("top_self_cpu", [])
    ]
    lines.append("loop's top self-CPU ops, ms per step (calls per step): " + ", ".join(tops))
    for t in loop.get("threads", []):
        ops = ", ".join(f"{name} {ms:.3f}" for name, ms in t["top_ops"].items())
        main = " (main)" if t["main"] else ""
        lines.append(
            f"loop thread {t['thread']}{main}: {t['self_cpu_ms_per_step']:.3f} ms/step in ops: {ops}"
        )
    lines.append(f"seconds spent reading the profiles: {summary['processing_s']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def main_argv(args: argparse.Namespace) -> list[str]:
    """main.py's command line: fold 0, ``--steps`` batches per epoch, from scratch every time."""
    sets = ["pretrained=false", "data.near_dup=false", f"train.max_train_batches={args.steps}", *args.sets]
    return [
        "--config", str(args.config), "--data-dir", str(args.data_dir), "--work-dir", str(args.work_dir),
        "--exp", args.exp, "--fold", "0", "--epochs", str(args.epochs), "--backbones", args.backbone,
        "--img-size", str(args.img_size), "--batch", str(args.batch), "--device", args.device,
        "--no-resume", "--force", *[x for s in sets for x in ("--set", s)],
    ]  # fmt: skip


def _unpinned(make_loader: Callable[..., Any]) -> Callable[..., Any]:
    """``foldkit.dataset.make_loader`` with ``pin`` off (``--no-pin``): no pin-memory thread; the
    DeviceLoader's non_blocking copy then reads the workers' pageable shared memory (CUDA stages it,
    the host waits for that part)."""
    signature = inspect.signature(make_loader)

    @functools.wraps(make_loader)
    def unpinned(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.arguments["pin"] = False
        return make_loader(*bound.args, **bound.kwargs)

    return unpinned


def _bar_on(*args: Any, **kwargs: Any) -> Any:
    """foldkit.train's tqdm with the bar forced on, as in a terminal (``--bar``)."""
    from tqdm.auto import tqdm

    return tqdm(*args, **{**kwargs, "disable": False})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; defaults are the GPU case the numbers are wanted for (b0, 112 px, batch 128)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data-dir", type=Path, required=True, help="data in the seed's layout (foldkit.synthetic)"
    )
    p.add_argument("--out", type=Path, required=True, help="folder for summary.json, report.txt, tables")
    p.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "foldkit-profile",
        help="main.py's work dir (store, folds, checkpoints): keep it out of --out",
    )  # fmt: skip
    p.add_argument("--backbone", default="efficientnet_b0")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60, help="batches per epoch, and bare steps")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--profile-epoch", type=int, default=2, help="the epoch profiled (1: with warm-up effects)"
    )
    p.add_argument("--warmup", type=int, default=5, help="bare steps before the measured ones")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--exp", default="profile", help="main.py's experiment name")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
        help="passed to main.py, repeatable: --set train.compile=true",
    )  # fmt: skip
    p.add_argument("--trace", action="store_true", help="also write trace.json and trace_bare.json")
    p.add_argument("--trace-steps", type=int, default=10, help="steps the traces keep (0: every step)")
    p.add_argument(
        "--main-thread-only", action="store_true",
        help="record only this thread's ops (should the all-threads profiler misbehave)",
    )  # fmt: skip
    p.add_argument("--bar", action="store_true", help="force main.py's tqdm bar on (a terminal's run)")
    p.add_argument(
        "--no-profile", action="store_true",
        help="time every epoch and the bare step without the profiler (quick A/B runs)",
    )  # fmt: skip
    p.add_argument(
        "--no-pin", action="store_true",
        help="loaders without pinned memory (no pin-memory thread): an A/B of the batch hand-over",
    )  # fmt: skip
    p.add_argument(
        "--switch-interval", type=float, default=None, metavar="S",
        help="sys.setswitchinterval(S) for the run (Python's default 0.005): how long a thread that "
        "wants the GIL (the pin-memory thread) may wait for the one launching kernels",
    )  # fmt: skip
    args = p.parse_args(argv)
    if not 1 <= args.profile_epoch <= args.epochs:
        p.error(f"--profile-epoch {args.profile_epoch}: expected 1..--epochs ({args.epochs})")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run main.py's loop with the probe in place; print the report."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import main as main_py  # the repository's main.py (ROOT is first on sys.path)

    probe = EpochProbe(args)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(ft._Trainer, "train_epoch", probe.method()))
        if args.bar:
            stack.enter_context(mock.patch.object(ft, "tqdm", _bar_on))
        if args.no_pin:  # every loader unpinned: the copy goes from the workers' shared memory
            for module in (ft, foldkit.predict):
                stack.enter_context(mock.patch.object(module, "make_loader", _unpinned(module.make_loader)))
        if args.switch_interval is not None:
            stack.callback(sys.setswitchinterval, sys.getswitchinterval())
            sys.setswitchinterval(args.switch_interval)
        status = run(main_py.main, main_argv(args))
    if status != 0:
        print(f"main.py ended with exit status {status}", file=sys.stderr)
        return status
    if (probe.bare_unprofiled if args.no_profile else probe.loop) is None:
        print(f"epoch {args.profile_epoch} was never trained (early stop?)", file=sys.stderr)
        return 1
    print(probe.write())  # again, with the epochs after the profiled one
    print(f"wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

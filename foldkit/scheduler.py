"""Fold-parallel training on one machine: one (fold, backbone) job per listed device at a time.

    python main.py --fold all --devices cuda:0,cuda:1,cuda:2,cuda:3   # four jobs at a time
    python main.py --fold all --devices cuda:0,cuda:0                 # two small jobs share one GPU
    python main.py --fold 0,1 --devices cpu,cpu                       # the same on the CPU

Each job is ``main.py`` itself in a subprocess (``--fold k --model b`` and every other option of the
command), so a job is exactly the run a sequential ``main.py`` makes, with its own ``train.log``,
checkpoints and OOF file. Its console output goes to ``logs/<exp>/<backbone>-fold<k>.log``; the
terminal gets one line per job event (started, each epoch, finished or failed). A failed job does not
stop the others; the summary at the end names every failure with its log, and the command exits
non-zero. ``main.py`` builds the folds and the image store before the first job starts, so the jobs
only read them. A ``cuda:N`` device becomes ``CUDA_VISIBLE_DEVICES`` of its job (each job sees one
GPU), so the saved config stays the one a sequential run saves.

Why not torch.multiprocessing or a pool: a job is a whole ``main.py`` run (its own CUDA context,
logging and exit status); a subprocess per job isolates a crash or an out-of-memory error to that
job, and its log is a plain file to read when it fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from foldkit.io import FoldkitError

log = logging.getLogger("foldkit.main")

_DEVICE = re.compile(r"cpu|cuda:\d+")
#: Set in every job's environment to the scheduler's pid (``follow_parent``).
PARENT_ENV = "FOLDKIT_SCHEDULER_PID"
_EPOCH_LINE = re.compile(r" INFO (\S+ fold \d+ epoch \d+/\d+: .*)$")


@dataclass
class Job:
    """One ``main.py`` run: a backbone on a fold."""

    fold: int
    backbone: str
    argv: list[str]  # main.py's arguments, --fold and --model included
    log: Path

    @property
    def name(self) -> str:
        return f"{self.backbone} fold {self.fold}"


@dataclass
class JobResult:
    job: Job
    device: str
    returncode: int
    seconds: float


@dataclass
class _Running:
    job: Job
    device: str
    proc: subprocess.Popen
    out: IO[str]
    start: float
    offset: int = 0  # how far its log has been read for progress lines
    done: list[str] = field(default_factory=list)


def parse_devices(text: str) -> list[str]:
    """``cuda:0,cuda:1`` / ``cpu,cpu`` -> the device list (a device may repeat: one slot per entry)."""
    devices = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in devices if not _DEVICE.fullmatch(d)]
    if not devices or bad:
        raise FoldkitError(f"--devices {text!r}: expected a comma list of cpu or cuda:N, e.g. cuda:0,cuda:1")
    return devices


def check_devices(devices: list[str]) -> None:
    """Every listed GPU must exist here: a job on a missing one would fail only after its start-up."""
    wanted = sorted({int(d.split(":")[1]) for d in devices if d.startswith("cuda:")})
    if not wanted:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [f"cuda:{i}" for i in wanted if i >= have]
    if missing:
        raise FoldkitError(f"--devices: {', '.join(missing)} not found ({have} CUDA device(s) visible)")


def args_to_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: set[str]) -> list[str]:
    """The options of ``args`` that differ from their defaults, as command-line arguments, leaving out
    the destinations in ``skip``. Rebuilt from the parsed values rather than edited from ``sys.argv``,
    so abbreviations and ``--opt=value`` forms cannot slip through. (argparse has no public way to list
    its actions, hence ``_actions``.)"""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in skip or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreConstAction):  # store_true/false: one flag per value
            if value == action.const and value != action.default:
                out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            out += [part for v in value or [] for part in (flag, str(v))]
        elif value != action.default and value is not None:
            out += [flag, str(value)]
    return out


def device_setup(device: str, config_device: str, slots: int = 1) -> tuple[dict[str, str], list[str]]:
    """(environment, extra main.py arguments) that put a job on ``device``, one of ``slots`` at once.

    ``cuda:N`` shows the job only GPU N (of the GPUs this process sees) and keeps the config's device
    when it already means "a GPU" (auto, cuda): the saved config then matches a sequential run's.
    ``cpu`` beside other jobs gets its share of torch's threads (``OMP_NUM_THREADS``, unless set):
    each job would otherwise start one compute thread per core, and two jobs on a 2-core machine
    trained at 36 images/s each against 577 with their share (docs/benchmarks.md).
    """
    if device == "cpu":
        shared = slots > 1 and "OMP_NUM_THREADS" not in os.environ
        threads = {"OMP_NUM_THREADS": str(_cpu_share(slots))} if shared else {}
        return threads, [] if config_device == "cpu" else ["--device", "cpu"]
    index = int(device.split(":")[1])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(index + 1)]
    extra = [] if config_device in ("auto", "cuda") else ["--device", "cuda"]
    return {"CUDA_VISIBLE_DEVICES": ids[index]}, extra


def _cpu_share(slots: int) -> int:
    """torch's compute threads for each of ``slots`` jobs at once (at least one): this process's own
    count (torch's default: the physical cores this process may use) split between them."""
    import torch  # main.py has imported it by the time jobs start

    return max(1, torch.get_num_threads() // slots)


def run_jobs(
    jobs: list[Job],
    devices: list[str],
    main_py: Path,
    config_device: str,
    poll_s: float = 0.5,
) -> list[JobResult]:
    """Run ``jobs`` with at most one per entry of ``devices`` at a time, in order; returns every
    job's result. Ctrl-C (or any error here) terminates the running jobs before it propagates."""
    pending, running, results = deque(jobs), {}, []
    total = len(jobs)
    try:
        while pending or running:
            for slot, device in enumerate(devices):
                if slot not in running and pending:
                    running[slot] = _start(pending.popleft(), device, main_py, config_device, len(devices))
                    log.info(
                        "[%d/%d %s] %s: started (log %s)",
                        total - len(pending), total, device, running[slot].job.name, running[slot].job.log,
                    )  # fmt: skip
            time.sleep(poll_s)
            for slot, run in list(running.items()):
                _report_progress(run)
                if run.proc.poll() is not None:
                    results.append(_finish(run))
                    del running[slot]
    finally:
        for run in running.values():  # only the processes this call started
            run.proc.terminate()
        for run in running.values():
            try:
                run.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                run.proc.kill()
            run.out.close()
    return results


def _start(job: Job, device: str, main_py: Path, config_device: str, slots: int = 1) -> _Running:
    env, extra = device_setup(device, config_device, slots)
    # progress bars would fill the log with carriage returns; the epoch lines are the progress
    env = {**os.environ, **env, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
    job.log.parent.mkdir(parents=True, exist_ok=True)
    out = open(job.log, "w", encoding="utf-8")  # noqa: SIM115 (closed when the job ends)
    cmd = [sys.executable, str(main_py), *job.argv, *extra]
    out.write(f"$ {' '.join(cmd)}\n")
    out.flush()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return _Running(job, device, proc, out, time.perf_counter(), offset=out.tell())


def follow_parent() -> None:
    """In a job (``PARENT_ENV`` set): end when the scheduler ends, however it ends.

    Ctrl-C and SIGTERM on the scheduler stop its jobs (``run_jobs``' cleanup), but a scheduler killed
    with SIGKILL, or by the out-of-memory killer, runs no cleanup: its jobs went on as orphans, and
    the rerun the README advises trained the same folds a second time beside them. Linux's
    ``PR_SET_PDEATHSIG`` (no library offers it; one ``prctl`` call through ctypes) has the kernel
    send SIGTERM when the parent dies. Elsewhere this does nothing (``fold_lock`` still refuses a
    second run on a fold).
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the scheduler died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _report_progress(run: _Running) -> None:
    """One terminal line per epoch a job finished (read from its log since the last look)."""
    try:
        with open(run.job.log, encoding="utf-8", errors="replace") as fh:
            fh.seek(run.offset)
            text = fh.read()
    except OSError:
        return
    complete = text[: text.rfind("\n") + 1]  # a line still being written is read next time
    run.offset += len(complete.encode("utf-8"))
    for line in complete.splitlines():
        found = _EPOCH_LINE.search(line)
        if found:
            log.info("[%s] %s", run.device, found.group(1))


def _finish(run: _Running) -> JobResult:
    _report_progress(run)
    run.out.close()
    seconds = time.perf_counter() - run.start
    code = run.proc.returncode
    if code == 0:
        log.info("[%s] %s: done in %.1f s", run.device, run.job.name, seconds)
    else:
        log.error(
            "[%s] %s: FAILED (exit %d) after %.1f s: %s (log %s)",
            run.device, run.job.name, code, seconds, last_error(run.job.log), run.job.log,
        )  # fmt: skip
    return JobResult(run.job, run.device, code, seconds)


def last_error(path: Path) -> str:
    """The job's own ``error:`` line (or its last line): what to show before the log is opened."""
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if ln.startswith(("error:", "Traceback")) or "Error:" in ln]
    return (errors[-1] if errors else lines[-1] if lines else "(empty log)").strip()


def failure(code: int, log_path: Path) -> str:
    """Why a job failed: the signal that ended it (its log then stops mid-run, its last line says
    nothing), else its own ``error:`` line."""
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        oom = " (the kernel's out-of-memory killer sends it: too many workers or too large a batch?)"
        return f"killed by {name}{oom if -code == signal.SIGKILL else ''}"
    return last_error(log_path)


def summarize(results: list[JobResult]) -> None:
    """Log every job's outcome; raise naming the failed jobs and their logs (exit status 2)."""
    failed = [r for r in results if r.returncode != 0]
    log.info(
        "jobs: %d done, %d failed, %.1f s of job time",
        len(results) - len(failed), len(failed), sum(r.seconds for r in results),
    )  # fmt: skip
    if failed:
        lines = [
            f"{r.job.name} on {r.device} (exit {r.returncode}): {failure(r.returncode, r.job.log)}\n"
            f"    log: {r.job.log}"
            for r in failed
        ]
        raise FoldkitError(
            (
                f"all {len(results)} job(s) failed"
                if len(failed) == len(results)
                else f"{len(failed)} of {len(results)} job(s) failed (the others finished)"
            )
            + ":\n  "
            + "\n  ".join(lines)
        )

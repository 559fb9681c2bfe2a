"""Beyond one process: torchrun DDP on CPU (gloo) and fold-parallel jobs with ``--devices``.

The DDP runs use the tiny data's fold 0 (21 training images, 19 holdout) at batch 4 on 2 ranks: two
full rounds of 8 images, then the last 5 split 3 + 2, so every training image is seen once.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from conftest import TRAIN_ARGS

import main
from foldkit import PROJECT_ROOT, distributed
from foldkit.cli import run
from foldkit.dataset import EpochBatchSampler
from foldkit.folds import load_folds
from foldkit.io import FoldkitError
from foldkit.predict import load_checkpoint
from foldkit.scheduler import Job, args_to_argv, device_setup, run_jobs, summarize

RUN = "models/demo/test_efficientnet/fold0"
OOF = "oof/demo/test_efficientnet/fold0.csv"
DDP_ARGS = ["--model", "test_efficientnet", "--fold", "0", "--batch", "4"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _torchrun(data: Path, work: Path, *extra: str, env: dict[str, str] | None = None, timeout: float = 240):
    argv = [*TRAIN_ARGS, *DDP_ARGS, "--data-dir", str(data), "--work-dir", str(work), *extra]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FOLDKIT_TEST_")}
    return subprocess.run(
        [*TORCHRUN, "main.py", *argv],
        cwd=PROJECT_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the sharded sampler -----------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch", "world"), [(21, 4, 2), (20, 4, 2), (23, 4, 3), (64, 8, 4), (9, 4, 2)])
def test_sharded_batches_cover_each_image_once_with_the_single_process_seeds(n, batch, world) -> None:
    single = EpochBatchSampler(n, batch, True, 7, drop_last=False)
    single.set_epoch(3)
    seed_of = {g: b[0][1] for g, b in enumerate(single)}  # batch number -> its augmentation seed
    for drop_last in (True, False):  # training, evaluation
        shards = []
        for rank in range(world):
            s = EpochBatchSampler(n, batch, True, 7, drop_last, rank, world)
            s.set_epoch(3)
            shards.append(list(s))
            assert len(shards[-1]) == len(s)
            s.set_epoch(3, start_batch=1)
            assert list(s) == shards[-1][1:]  # a resumed epoch continues with this rank's next batch
        seen = [i for shard in shards for b in shard for i, _ in b]
        assert len(seen) == len(set(seen))  # never an image twice: no padding
        if drop_last:
            assert len({len(shard) for shard in shards}) == 1  # DDP needs equal steps on every rank
            assert n - len(seen) == (n == 9)  # 9 = 8 + 1: a last batch of 1 image cannot train BatchNorm
        else:
            assert sorted(seen) == list(range(n))
        for rank, shard in enumerate(shards):  # full batches: rank r has batches r, r+W, ... of one process
            for j, b in enumerate(shard[: n // (batch * world)]):
                assert b[0][1] == seed_of[j * world + rank]


def test_one_process_keeps_its_old_batches() -> None:
    old = [[(i, s) for i, s in b] for b in EpochBatchSampler(21, 4, True, 7, True)]
    assert [len(b) for b in old] == [4] * 5  # drop_last: the partial batch is left out
    assert list(EpochBatchSampler(21, 4, True, 7, True, 0, 1)) == old


# -- in-process checks with a one-rank gloo group -------------------------------------------------------


@pytest.fixture
def gloo_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    ctx = distributed.DistContext(0, 0, 1, torch.device("cpu"), "gloo")
    monkeypatch.setattr(distributed, "_CTX", ctx)
    yield ctx
    distributed.shutdown()


def test_gather_refuses_a_duplicate_or_missing_index(gloo_group) -> None:
    probs = distributed.gather_by_index(np.array([2, 0, 1]), np.array([0.2, 0.0, 0.1]), 3, "oof")
    np.testing.assert_array_equal(probs, [0.0, 0.1, 0.2])
    with pytest.raises(FoldkitError, match=r"4 rows for 3 images \(0 missing, 1 more than once\)"):
        distributed.gather_by_index(np.array([0, 1, 2, 2]), np.zeros(4), 3, "oof")
    with pytest.raises(FoldkitError, match=r"1 missing"):
        distributed.gather_by_index(np.array([0, 1]), np.zeros(2), 3, "oof")


def test_sync_bn_on_the_cpu_is_a_clear_error(gloo_group) -> None:
    with pytest.raises(FoldkitError, match=r"train\.sync_bn needs CUDA"):
        distributed.wrap_model(torch.nn.BatchNorm2d(3), sync_bn=True)


# -- torchrun: 2 gloo processes on the CPU ------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_ranks_exact_oof_history_resume_and_one_set_of_artifacts(
    tiny_data: Path, tmp_path: Path
) -> None:
    """One run killed on rank 0 mid-epoch and resumed, one uninterrupted, one single-process reference
    with accum_steps=2 (the same batches per optimizer step as 2 ranks)."""
    killed = _torchrun(
        tiny_data, tmp_path / "ddp", "--save-every", "1", env={"FOLDKIT_TEST_KILL_AT_STEP": "2"}
    )
    assert killed.returncode != 0
    last = load_checkpoint(tmp_path / "ddp" / RUN / "last.pt")
    assert (last["progress"]["batch"], last["step"], last["world_size"]) == (2, 2, 2)
    assert last["progress"]["seen"] == 16  # both ranks' images, carried by rank 0's save
    resumed = _torchrun(tiny_data, tmp_path / "ddp", "--save-every", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "at epoch 1, batch 2" in resumed.stderr
    fresh = _torchrun(tiny_data, tmp_path / "fresh")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert fresh.stderr.count("epoch 1/1: train_loss") == 1  # only rank 0 logs
    assert (tmp_path / "ddp" / OOF).read_bytes() == (tmp_path / "fresh" / OOF).read_bytes()

    folds_df, _ = load_folds(tmp_path / "ddp")
    holdout, train = folds_df[folds_df.fold == 0], folds_df[folds_df.fold != 0]
    oof = pd.read_csv(tmp_path / "ddp" / OOF, dtype={"name": str})
    assert len(oof) == len(holdout) == 19 and sorted(oof.name) == sorted(holdout.name)
    for work in ("ddp", "fresh"):
        history = pd.read_csv(tmp_path / work / RUN / "history.csv")
        assert history.world_size.tolist() == [2] and history.train_images.tolist() == [len(train)]

    single = tmp_path / "single"
    assert run(main.main, [*TRAIN_ARGS, *DDP_ARGS, "--data-dir", str(tiny_data), "--work-dir", str(single),
                           "--set", "train.accum_steps=2"]) == 0  # fmt: skip
    assert _files(tmp_path / "fresh") == _files(single)  # one set of artifacts, no stray temp files
    # Close, not equal: the optimizer steps see the same images (the last one 3 + 2 against the single
    # process's 4, which drops one), but BatchNorm's running statistics are rank 0's own, and the
    # split last batch normalises over 3 and 2 images.
    a = pd.read_csv(single / OOF, dtype={"name": str}).set_index("name").prob
    b = oof.set_index("name").prob.loc[a.index]
    assert np.abs(a - b).max() < 0.1 and a.corr(b) > 0.9
    ha, hb = (pd.read_csv(w / RUN / "history.csv").iloc[0] for w in (single, tmp_path / "fresh"))
    assert abs(ha.train_loss - hb.train_loss) < 0.25 * ha.train_loss
    assert abs(ha.val_loss - hb.val_loss) < 0.05 and ha.best_f1 == pytest.approx(hb.best_f1, abs=0.1)


def test_a_failing_rank_ends_the_run_naming_it(tiny_data: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    out = _torchrun(tiny_data, tmp_path, env={"FOLDKIT_TEST_FAIL_RANK": "1"}, timeout=120)
    assert out.returncode != 0
    assert "error: rank 1 of 2: failing on purpose" in out.stderr
    assert time.perf_counter() - start < 90  # torchrun stops rank 0, blocked in a collective
    assert not (tmp_path / OOF).exists()


# -- --devices: fold-parallel jobs -------------------------------------------------------------------------


def test_devices_trains_folds_at_once_leaving_the_sequential_artifacts(
    tiny_data: Path, trained: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the jobs compute with as many threads as the sequential run did (a set OMP_NUM_THREADS wins
    # over their share of the cores), so their float sums, and so their OOF bytes, are the same
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    argv = [*TRAIN_ARGS, "--data-dir", str(tiny_data), "--work-dir", str(tmp_path)]
    assert (
        run(main.main, [*argv, "--fold", "0,1", "--model", "test_efficientnet", "--devices", "cpu,cpu"]) == 0
    )
    err = capsys.readouterr().err
    for k in (0, 1):
        assert f"[cpu] test_efficientnet fold {k}: done in" in err
        assert f"[cpu] test_efficientnet fold {k} epoch 1/1: train_loss" in err  # its progress line
        job_log = (tmp_path / f"logs/demo/test_efficientnet-fold{k}.log").read_text()
        assert "--workers" not in job_log.splitlines()[0]  # the config's own workers (0) are kept
        assert "it/s" not in job_log  # no progress-bar frames in a log file; the epoch lines remain
    # The two jobs ran at the same time: each was started before the other finished. (Their train.log
    # spans, well under a second here, need not overlap: one process may import torch faster.)
    started = [err.index(f"test_efficientnet fold {k}: started") for k in (0, 1)]
    done = [err.index(f"test_efficientnet fold {k}: done in") for k in (0, 1)]
    assert started[0] < done[1] and started[1] < done[0]
    for sub in ("models/demo/test_efficientnet", "oof/demo/test_efficientnet"):
        assert _files(tmp_path / sub) == _files(trained / sub)
    for k in (0, 1):
        name = f"oof/demo/test_efficientnet/fold{k}.csv"
        assert (tmp_path / name).read_bytes() == (trained / name).read_bytes()
    # the same command again: finished jobs are skipped up front, no process started to say so
    assert (
        run(main.main, [*argv, "--fold", "0,1", "--model", "test_efficientnet", "--devices", "cpu,cpu"]) == 0
    )
    err = capsys.readouterr().err
    for k in (0, 1):
        assert f"test_efficientnet fold {k}: finished (its OOF matches best.pt): skipped" in err
    assert "started" not in err and "0 job(s) on 2 device slot(s)" in err


def test_cpu_jobs_at_once_share_the_cores_as_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each CPU job would start one compute thread per core: two jobs on 2 cores trained at 36
    images/s each against 577 with their share. One job alone keeps torch's default; a set
    OMP_NUM_THREADS is the user's and wins."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    assert device_setup("cpu", "cpu", 4) == ({"OMP_NUM_THREADS": "4"}, [])
    assert device_setup("cpu", "auto", 32) == ({"OMP_NUM_THREADS": "1"}, ["--device", "cpu"])
    assert device_setup("cpu", "cpu", 1) == ({}, [])  # alone: as a sequential run
    assert device_setup("cuda:1", "auto", 2) == ({"CUDA_VISIBLE_DEVICES": "1"}, [])
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device_setup("cpu", "cpu", 4) == ({}, [])


def test_failed_jobs_are_reported_at_the_end_and_the_others_finish(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="foldkit")
    fake = tmp_path / "fake_main.py"  # stands in for main.py: an epoch line, then the asked exit status
    fake.write_text(
        "import sys, time\n"
        "code = int(sys.argv[sys.argv.index('--code') + 1])\n"
        "print('12:00:00 INFO toy fold 0 epoch 1/1: train_loss 0.5', flush=True)\n"
        "time.sleep(0.3)\n"
        "if code == 9: import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n"
        "print('error: broken on purpose' if code else 'ok')\n"
        "sys.exit(code)\n"
    )
    jobs = [
        Job(k, "toy", ["--code", str(code)], tmp_path / f"logs/toy-fold{k}.log")
        for k, code in enumerate([0, 2, 0, 9])
    ]
    results = run_jobs(jobs, ["cpu", "cpu"], fake, "cpu", poll_s=0.05)
    assert sorted((r.job.fold, r.returncode) for r in results) == [(0, 0), (1, 2), (2, 0), (3, -9)]
    with pytest.raises(FoldkitError) as exc:
        summarize(results)
    message = str(exc.value)
    assert message.startswith("2 of 4 job(s) failed")
    assert "toy fold 1 on cpu (exit 2): error: broken on purpose" in message
    assert "toy fold 3 on cpu (exit -9): killed by SIGKILL (the kernel's out-of-memory killer" in message
    assert str(tmp_path / "logs/toy-fold1.log") in message
    assert "toy fold 0 epoch 1/1: train_loss 0.5" in caplog.text
    with pytest.raises(FoldkitError, match=r"^all 2 job\(s\) failed:"):
        summarize([r for r in results if r.returncode])


def test_job_arguments_repeat_the_command_but_fold_model_and_devices() -> None:
    parser = main.build_parser()
    argv = ["--config", "c.yaml", "--set", "a.b=1", "--set", "c=2", "--no-resume", "--epochs=3",
            "--fold", "all", "--devices", "cpu,cpu", "--refold", "--verbose"]  # fmt: skip
    args = parser.parse_args(argv)
    job = args_to_argv(parser, args, {"devices", "fold", "model", "refold", "device"})
    again = parser.parse_args([*job, "--fold", "1"])
    for key, value in vars(args).items():
        if key not in ("devices", "fold", "refold"):
            assert getattr(again, key) == value, key
    assert again.resume is False and again.refold is False and again.devices is None
    # data.workers null ("one per core") is split between the jobs that run at once
    assert main.jobs_workers(2) == max(1, (os.cpu_count() or 1) // 2) and main.jobs_workers(10_000) == 1


def test_devices_refuses_device_and_bad_names(tiny_data: Path, tmp_path: Path, capsys) -> None:
    argv = [*TRAIN_ARGS, "--data-dir", str(tiny_data), "--work-dir", str(tmp_path)]
    assert run(main.main, [*argv, "--devices", "gpu0"]) == 2
    assert "expected a comma list of cpu or cuda:N" in capsys.readouterr().err
    assert run(main.main, [*argv, "--devices", "cpu", "--device", "cpu"]) == 2
    assert "leave out --device" in capsys.readouterr().err
    assert not _files(tmp_path)


def test_a_job_ends_when_its_scheduler_is_killed(tmp_path: Path) -> None:
    """SIGKILL on the scheduler runs no cleanup; its jobs must not live on as orphans (a rerun would
    train the same folds beside them). The job asks the kernel to be told (follow_parent)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    pid_file = tmp_path / "job.pid"
    job = (
        "import os, time\nfrom foldkit.scheduler import follow_parent\nfollow_parent()\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"
    )
    scheduler = (
        "import os, subprocess, sys, time\n"
        "from foldkit.scheduler import PARENT_ENV\n"
        "env = {**os.environ, PARENT_ENV: str(os.getpid())}\n"
        f"subprocess.Popen([sys.executable, '-c', {job!r}], env=env)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", scheduler], cwd=PROJECT_ROOT)
    deadline = time.monotonic() + 30
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the job outlived its killed scheduler"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Running (not a zombie waiting for its parent's successor to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_second_run_on_a_fold_being_trained_is_refused(tiny_data: Path, tmp_path: Path, capsys) -> None:
    """Two runs on one fold would write one best.pt, last.pt and OOF in turn: the second stops at once,
    naming the holder; the lock goes with the process (no stale lock file to delete)."""
    from conftest import train_tiny

    from foldkit.resume import fold_lock

    fold_dir = tmp_path / "models/demo/test_efficientnet/fold0"
    fold_dir.mkdir(parents=True)
    with fold_lock(fold_dir, "holder"):
        assert train_tiny(tiny_data, tmp_path, "--model", "test_efficientnet", "--fold", "0") == 2
        err = capsys.readouterr().err
        assert f"test_efficientnet fold 0: another run (pid {os.getpid()}) is training this fold" in err
        assert not (fold_dir / "best.pt").exists()
        with pytest.raises(FoldkitError, match="another run"), fold_lock(fold_dir, "again"):
            pass
    assert train_tiny(tiny_data, tmp_path, "--model", "test_efficientnet", "--fold", "0") == 0

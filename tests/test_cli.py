"""Every command's --help: a line of help and a default for every option, answered fast (no torch).

Also the process-wide quiet defaults that ``import foldkit`` sets up for every command.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import time

import pytest

from foldkit import PROJECT_ROOT

#: Every command a user runs, as the arguments after ``python``. A module not written yet is skipped,
#: so it is covered from the day it lands.
COMMANDS = {
    "main.py": ["main.py"],
    "ensemble.py": ["ensemble.py"],
    "foldkit.synthetic": ["-m", "foldkit.synthetic"],
    "foldkit.report": ["-m", "foldkit.report"],
    "foldkit.folds": ["-m", "foldkit.folds"],
    "foldkit.store": ["-m", "foldkit.store"],
    "foldkit.demo": ["-m", "foldkit.demo"],
}
#: Modules that take seconds to import; --help must not wait for them.
HEAVY = ("torch", "torchvision", "timm", "albumentations", "ttach")
#: Wall-clock bound for one --help, interpreter start included. Measured on the 2-core CI machine under
#: load: 0.1-0.4 s for main.py, ensemble.py, synthetic, store; 1.0-1.4 s for folds and report (pandas,
#: sklearn, matplotlib). Importing torch + timm alone takes 3-6 s there, so this catches that regression.
HELP_SECONDS = 3.0


def _exists(args: list[str]) -> bool:
    if args[0] == "-m":
        return importlib.util.find_spec(args[1]) is not None
    return (PROJECT_ROOT / args[0]).is_file()


def help_entries(text: str) -> dict[str, str]:
    """Option (its first spelling) or positional -> its help text, from argparse's --help output."""
    entries: dict[str, str] = {}
    current, in_section = None, False
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            in_section = line in ("options:", "optional arguments:", "positional arguments:")
            current = None
        elif in_section and line.startswith("  ") and not line.startswith("   "):
            invocation, _, help_text = line.strip().partition("  ")  # help follows after 2+ spaces
            current = invocation.split(",")[0].split(" ")[0]
            entries[current] = help_text.strip()
        elif in_section and current and line.strip():
            entries[current] = f"{entries[current]} {line.strip()}".strip()
    return entries


def test_help_entries_parses_argparse_layout() -> None:
    text = (
        "usage: x [-h]\n\ndescription:\n  not an option\n\npositional arguments:\n  report      the file\n\n"
        "options:\n  -h, --help            show this help\n  --data-dir DATA_DIR, --data_dir DATA_DIR\n"
        "                        folder (default:\n                        data)\n  --flag\n"
    )
    assert help_entries(text) == {
        "report": "the file",
        "-h": "show this help",
        "--data-dir": "folder (default: data)",
        "--flag": "",
    }


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_documents_every_option_and_answers_fast(name: str) -> None:
    args = COMMANDS[name]
    if not _exists(args):
        pytest.skip(f"{name} does not exist yet")
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *args, "--help"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.perf_counter() - start
    assert out.returncode == 0, out.stderr[-2000:]
    entries = help_entries(out.stdout)
    assert entries, out.stdout
    undocumented = [opt for opt, text in entries.items() if not text]
    assert not undocumented, f"{name}: no help text for {undocumented}"
    no_default = [
        opt
        for opt, text in entries.items()
        if opt.startswith("-") and opt != "-h" and "default" not in text and "required" not in text
    ]
    assert not no_default, f"{name}: help names no default for {no_default}"
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines()}
    assert not imported & set(HEAVY), f"{name} --help imports {sorted(imported & set(HEAVY))}"
    assert seconds < HELP_SECONDS, f"{name} --help took {seconds:.1f} s"


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("main.py", ["--no-such-option"], "unrecognized arguments: --no-such-option"),
        ("ensemble.py", ["--no-such-option"], "unrecognized arguments: --no-such-option"),
        ("main.py", ["--set", "train.epoch=3", "--data-dir", "{tmp}"], "did you mean 'train.epochs'"),
        ("main.py", ["--data-dir", "{tmp}/nowhere"], "data folder not found"),
        ("ensemble.py", ["--tta", "spin"], "unknown TTA ['spin']"),
        ("ensemble.py", ["--work-dir", "{tmp}"], "nothing is trained"),
    ],
)
def test_argument_errors_answer_before_heavy_imports(
    name: str, argv: list[str], message: str, tmp_path
) -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *COMMANDS[name], *(a.format(tmp=tmp_path) for a in argv)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines()}
    assert not imported & set(HEAVY), f"{name} {argv} imports {sorted(imported & set(HEAVY))}"


def test_foldkit_turns_off_albumentations_update_check_for_its_child_processes() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    child = "import os; print(os.environ.get('NO_ALBUMENTATIONS_UPDATE'))"
    code = f"import subprocess, sys, foldkit; subprocess.run([sys.executable, '-c', {child!r}])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "1"
    env["NO_ALBUMENTATIONS_UPDATE"] = "true"  # a user's own setting wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "true"


def test_one_epoch_cosine_schedule_warning_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    import timm.scheduler
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with caplog.at_level(logging.WARNING):
        timm.scheduler.CosineLRScheduler(opt, t_initial=1)
    assert not [r for r in caplog.records if "Cosine annealing" in r.getMessage()]

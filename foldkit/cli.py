"""Pieces every entry point shares: logging set-up, the error-to-exit-status policy, path options."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from foldkit import PROJECT_ROOT
from foldkit.io import FoldkitError


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record, not the one at set-up: an
    entry point called again in the same process (tests, notebooks) may have swapped it since."""

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it; nothing to keep
        pass


def setup_logging(verbose: bool = False) -> None:
    """Console logging for the ``foldkit`` loggers; run folders add their own file handlers."""
    logger = logging.getLogger("foldkit")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_foldkit_console", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._foldkit_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, so ``--help`` answers "what happens if I leave it out".

    The default is appended as ``(default: X)`` unless the help text already names it in words (help of
    an option whose default is None must say what None means: "default: the checkpoint's"), flags show
    ``off``/``on`` rather than False/True, and required options say ``(required)``. The description keeps
    its line breaks (the entry points put exact commands in it).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


def add_path_args(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--work-dir``, spelled alike in every command (the seed's ``_`` forms too)."""
    parser.add_argument(
        "--data-dir",
        "--data_dir",
        dest="data_dir",
        type=Path,
        default=Path("data"),
        help="folder holding train/ validate/ test/ and their label files (relative: to the current folder)",
    )
    parser.add_argument(
        "--work-dir",
        "--work_dir",
        dest="work_dir",
        type=Path,
        default=PROJECT_ROOT,
        help="root of folds/ models/ oof/ submissions/ (relative: to the current folder)",
    )


def add_set_arg(parser: argparse._ActionsContainer, help_text: str) -> None:
    """``--set KEY=VALUE``, repeatable, collected in ``overrides``: every command spells it alike."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def add_on_bad_image_arg(parser: argparse._ActionsContainer, help_text: str) -> None:
    """``--on-bad-image {error,skip}`` (or ``--on_bad_image``), default None: the checkpoint's own."""
    parser.add_argument(
        "--on-bad-image", "--on_bad_image", dest="on_bad_image", choices=("error", "skip"), default=None,
        help=help_text,
    )  # fmt: skip


def _own_message(exc: FoldkitError) -> str:
    """The error's own text. Raised in a DataLoader worker, torch re-raises it in the main process
    with the worker's whole traceback as its message ("Caught FoldkitError in DataLoader worker
    process 0. Original Traceback ..."): the text after the traceback's last line's class name is
    what foldkit said."""
    text = str(exc)
    if "\nOriginal Traceback (most recent call last):" not in text:
        return text
    prefix = text[: max(text.find(f"Caught {type(exc).__name__} "), 0)]  # e.g. main.py's "rank 1 of 2: "
    return prefix + text.rsplit(f"{type(exc).__name__}: ", 1)[-1].rstrip() + " (in a data loader worker)"


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call ``main``; a FoldkitError becomes one clear message on stderr and exit status 2."""
    try:
        return main(argv)
    except FoldkitError as exc:
        print(f"error: {_own_message(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""Pieces every entry point shares: logging set-up, the error-to-exit-status policy, path options."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from foldkit import PROJECT_ROOT
from foldkit.io import FoldkitError


def setup_logging(verbose: bool = False) -> None:
    """Console logging for the ``foldkit`` loggers; run folders add their own file handlers."""
    logger = logging.getLogger("foldkit")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not any(getattr(h, "_foldkit_console", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._foldkit_console = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def add_path_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        "--data_dir",
        dest="data_dir",
        type=Path,
        default=Path("data"),
        help="folder holding train/ validate/ test/ and their label files",
    )
    parser.add_argument(
        "--work-dir",
        "--work_dir",
        dest="work_dir",
        type=Path,
        default=PROJECT_ROOT,
        help="root of folds/ models/ oof/ submissions/",
    )


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call ``main``; a FoldkitError becomes one clear message on stderr and exit status 2."""
    try:
        return main(argv)
    except FoldkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

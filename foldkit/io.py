"""Atomic artifact writes, reading them back, and the toolkit's user-facing error type.

Every artifact is written to a temporary file in the destination folder and then moved into place
with ``os.replace``, so a crash or Ctrl-C never leaves a half-written CSV or checkpoint behind that a
later step would trust.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from foldkit import PROJECT_ROOT


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; artifacts should get the usual permissions.
_FILE_MODE = 0o666 & ~_umask()


class FoldkitError(Exception):
    """A problem with the user's input or artifacts; entry points print it and exit with status 2."""

    exit_code = 2


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it over ``path``, on error delete it.

    Use this for writers that want a file name (``torch.save``, ``fig.savefig``, ``df.to_csv``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)  # on disk before it takes the name: a lost VM must not leave a short best.pt
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _fsync(path: Path) -> None:
    """Flush a file the writer closed (``torch.save``, ``savefig``) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], writer: Callable[[IO[Any]], None], mode: str = "w") -> Path:
    """Open a temporary file beside ``path`` in ``mode``, let ``writer`` fill it, then move it into place."""
    with atomic_path(path) as tmp:
        kwargs = {"encoding": "utf-8", "newline": ""} if "b" not in mode else {}
        with open(tmp, mode, **kwargs) as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(text))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda fh: fh.write(data), mode="wb")


def read_json_artifact(path: Path, recover: str) -> dict[str, Any]:
    """A JSON object foldkit wrote (folds.json, an OOF sidecar), or a FoldkitError naming the file and
    ``recover`` (how to make it again): a file truncated by a full disk or a copy must stop the run
    with exit 2 and a way out, not a JSONDecodeError traceback."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FoldkitError(f"{path} is unreadable ({exc}); {recover}") from None
    if not isinstance(data, dict):
        raise FoldkitError(f"{path} is unreadable (not a JSON object); {recover}")
    return data


#: How many problems (or files) a message lists before it says how many more there are.
MAX_LISTED = 20


def script(name: str) -> str:
    """How a pasteable hint names one of the project's entry points (``main.py``, ``ensemble.py``):
    as is where the user stands in the project folder, by its full path anywhere else. (Config
    paths in hints need no such care: ``main.py`` also looks a relative one up in the project.)"""
    try:
        here = Path.cwd().resolve() == PROJECT_ROOT
    except OSError:  # the current folder was removed
        here = False
    return name if here else str(PROJECT_ROOT / name)  # a word for shlex.join, unquoted


def listed(items: Sequence[str], limit: int = MAX_LISTED) -> list[str]:
    """The first ``limit`` items, then ``... and N more``: long lists of problems stay readable and
    still say how many there are."""
    more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
    return [*items[:limit], *more]


#: errno values of a file system without ``flock`` (Lustre mounted noflock, some FUSE mounts).
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_NO_FLOCK_SAID: list[str] = []


def try_flock(fh: IO[Any], what: str) -> bool | None:
    """Try an exclusive ``flock`` on ``fh`` without waiting: True held, False held by another process,
    None when the file system has no ``flock`` (then ``what`` goes unlocked, with a warning) rather
    than a traceback; the caller decides what an unlocked run may do."""
    import fcntl

    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        if _NO_FLOCK_SAID:  # said once per process, not once per fold and store
            return None
        _NO_FLOCK_SAID.append(what)
        logging.getLogger("foldkit").warning(
            "%s: this file system has no file locking (%s): not locked", what, exc
        )
        return None
    return True

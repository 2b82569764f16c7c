"""Exit codes of every ``megatron-kd`` command, and the exceptions that map to them.

=====  ==============================================================================
code   meaning
=====  ==============================================================================
0      finished (or already finished: a rerun of a finished run changes nothing)
1      unexpected error (a bug: a traceback is printed)
2      bad input or configuration (one line naming the input and the fix)
3      non-finite loss or gradient norm (``train.nonfinite``; no checkpoint of it saved)
74     filesystem error: read-only or full disk, permissions (one line naming the path)
75     interrupted by SIGTERM/SIGINT after saving a checkpoint: rerun the same command to
       resume (EX_TEMPFAIL: "try again"; the code a Slurm requeue recipe tests for)
=====  ==============================================================================
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_IO_ERROR = 74
EXIT_REQUEUE = 75


class RunStopped(Exception):
    """A run ended before finishing for a reason the user can act on; ``exit_code`` says which."""

    exit_code = EXIT_ERROR


class RunInterrupted(RunStopped):
    """SIGTERM/SIGINT arrived: the run checkpointed (when it has a save directory) and stopped."""

    exit_code = EXIT_REQUEUE


class NonFiniteError(RunStopped):
    """The loss or gradient norm became NaN/inf (``train.nonfinite=stop``, or too many skips)."""

    exit_code = EXIT_NONFINITE


def _free_bytes(path: str | os.PathLike | None) -> int | None:
    if not path:
        return None
    p = Path(path)
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def describe_os_error(exc: OSError, needed_bytes: int | None = None) -> str:
    """One line for a filesystem error: what failed, on which path, and the fix."""
    path = exc.filename or ""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        need = f"{needed_bytes:,} bytes needed, " if needed_bytes else ""
        have = f"{free:,} bytes free" if free is not None else "free space unknown"
        return f"no space left writing {path} ({need}{have}): free disk space or write elsewhere, then rerun"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {path} ({reason}): choose a writable output directory"
    return f"{reason}: {path}" if path else reason


class FilesystemError(OSError):
    """An ``OSError`` whose message is already the one line to show (path, space needed/free, fix)."""

    def __init__(self, exc: OSError, context: str = "", needed_bytes: int | None = None):
        super().__init__(exc.errno, exc.strerror, exc.filename)
        self.message = (f"{context}: " if context else "") + describe_os_error(exc, needed_bytes)

    def __str__(self) -> str:
        return self.message


_FILESYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR,
                      errno.ENOTDIR, errno.EEXIST, errno.ENOENT, errno.ENAMETOOLONG, errno.EFBIG, errno.EIO}


def is_filesystem_error(exc: OSError) -> bool:
    """True for the errors a user fixes on the filesystem (path, permissions, space)."""
    return isinstance(exc, (FilesystemError, FileNotFoundError, FileExistsError)) or exc.errno in _FILESYSTEM_ERRNOS


def one_line(exc: BaseException) -> str:
    """The message ``megatron-kd`` prints for ``exc`` (first line only)."""
    if isinstance(exc, OSError) and not isinstance(exc, FilesystemError) and exc.errno is not None \
            and not isinstance(exc, (FileNotFoundError, FileExistsError)):
        text = describe_os_error(exc)
    else:
        text = str(exc) or type(exc).__name__
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__

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
import re
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


# What torch's zip writer (``torch.save``) and megatron-core's writers say when a write fails
# without an errno: a full disk or an unwritable file shows up only as these texts.
_WRITE_FAILURE_TEXTS = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed",
                        "No space left on device", "Read-only file system", "Disk quota exceeded")


def _chain(exc: BaseException):
    """``exc``, its causes/contexts, and the per-rank failures of torch's ``CheckpointException``."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack.extend([e.__cause__, e.__context__])
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack.extend(v for v in failures.values() if isinstance(v, BaseException))
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))


def filesystem_cause(exc: BaseException, path: str | os.PathLike | None = None) -> OSError | None:
    """The filesystem error behind ``exc`` (read-only, full disk, permissions), or None.

    Looks through the exception chain (a library may wrap the ``OSError``) and recognises the
    errno-less texts of ``torch.save``'s writer (``unexpected pos 704 vs 598``); for those, the
    errno is inferred from ``path`` (the output being written): ENOSPC when its filesystem has
    (almost) no space left, EROFS when it is mounted read-only."""
    for e in _chain(exc):
        if isinstance(e, FilesystemError):
            return e
        if isinstance(e, OSError) and e.errno in _FILESYSTEM_ERRNOS - {errno.ENOENT, errno.EEXIST}:
            return e
    text = " ".join(str(e) for e in _chain(exc))
    short_write = re.search(r"\d+ requested and \d+ written", text)  # numpy's tofile/fromfile on a full disk
    if not short_write and not any(t in text for t in _WRITE_FAILURE_TEXTS):
        return None
    code = errno.EIO
    if "No space left" in text or "Disk quota" in text:
        code = errno.ENOSPC
    elif "Read-only" in text:
        code = errno.EROFS
    elif path is not None:
        free = _free_bytes(path)
        probe = Path(path)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            if os.statvfs(probe).f_flag & os.ST_RDONLY:
                code = errno.EROFS
            elif free is not None and free < (1 << 20):
                code = errno.ENOSPC
        except OSError:
            pass
    return OSError(code, os.strerror(code), str(path) if path is not None else None)


def one_line(exc: BaseException) -> str:
    """The message ``megatron-kd`` prints for ``exc`` (first line only)."""
    if isinstance(exc, OSError) and not isinstance(exc, FilesystemError) and exc.errno is not None \
            and not isinstance(exc, (FileNotFoundError, FileExistsError)):
        text = describe_os_error(exc)
    else:
        text = str(exc) or type(exc).__name__
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__

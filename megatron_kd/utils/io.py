"""Atomic writes and checksums: a crash never leaves a half-written file under its final name."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs) -> Iterator[Any]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file ordinary permissions
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read JSON with a one-line error naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}): rewrite it") from None


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, streamed in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def replace_dir_atomic(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Move a fully written ``tmp_dir`` to ``final_dir`` (replacing an old one) as safely as a
    directory allows: old -> ``final.old`` rename, new -> final rename, then delete the old."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temps(directory: str | Path, pattern: str, pid_regex: str) -> list[Path]:
    """Delete temp files/directories matching ``pattern`` in ``directory`` whose writer process
    (the pid captured by ``pid_regex``'s first group in the name) is gone: what a killed run left.
    Temps of live processes (a concurrent run) are kept. Returns what was removed."""
    import re

    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    rx = re.compile(pid_regex)
    for path in directory.glob(pattern):
        m = rx.search(path.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


def check_output_dir(path: str | Path, what: str) -> None:
    """Before any work: ``path`` (or its nearest existing parent) must be a writable directory.
    Raises a one-line ``ValueError`` / ``FilesystemError`` naming ``what`` and the path; writes nothing."""
    import errno

    from megatron_kd.utils.exits import FilesystemError

    target = Path(path)
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what}={path}: {probe} is a file, not a directory; choose another path")
    read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    if read_only or not os.access(probe, os.W_OK | os.X_OK):
        code = errno.EROFS if read_only else errno.EACCES
        raise FilesystemError(OSError(code, os.strerror(code), str(probe)), f"{what}={path}")

"""Progress bars (rank 0 only, with rate and ETA) and JSONL metrics files."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_kd.runtime.distributed import is_main_process


def progress(total: int | None, desc: str, unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar shown on rank 0 only (disabled elsewhere); rate and ETA included."""
    disable = kwargs.pop("disable", False) or not is_main_process()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                disable=disable, file=sys.stderr, mininterval=1.0, **kwargs)


class JsonlWriter:
    """Append-only JSONL metrics (one object per line, flushed each write) on rank 0."""

    def __init__(self, path: str | Path | None, enabled: bool | None = None):
        self.enabled = (is_main_process() if enabled is None else enabled) and path is not None
        self.path = Path(path) if path else None
        self._fh = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Write one record, adding a wall-clock ``time`` (seconds since epoch)."""
        if not self.enabled:
            return
        self._fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file."""
        if self._fh:
            self._fh.close()
            self._fh = None


def read_jsonl_lines(path: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """``(records, torn)`` of a JSONL file. A last line that does not parse (a write cut short by
    a crash or a full disk) is left out and returned as ``torn``; a bad line elsewhere raises a
    one-line ``ValueError`` naming ``file:line``."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.readlines()
    records: list[dict[str, Any]] = []
    torn = None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                torn = line
                break
            raise ValueError(f"{path}:{number} is not valid JSON ({exc.msg}): fix or delete that line") from None
    return records, torn


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (a torn last line is ignored, see :func:`read_jsonl_lines`)."""
    return read_jsonl_lines(path)[0]

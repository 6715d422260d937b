"""What every benchmark script shares: the commit it measured, a JSON report written after every row (so a run
cut short by its time limit keeps what it measured), and a time budget that starts when the process did."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


def git_commit() -> str:
    """The short commit of the working tree, ``+dirty`` when it has changes; "unknown" without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10).stdout
        return out.stdout.strip() + ("+dirty" if dirty.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def short_error(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters: what a table's note says of a failure."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit] if lines else ''}"


def write_json(path: str | os.PathLike | None, report: dict) -> None:
    """Write ``report`` to ``path`` (if any) whole or not at all: into a temporary file, then renamed over it, so
    a process killed mid-write leaves the previous complete report. Missing parent folders are made."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1)
    os.replace(tmp, path)


def process_age_s() -> float:
    """Seconds since this process started (interpreter start-up, imports and device initialisation included),
    from /proc where there is one, else since this module was imported."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()


class Budget:
    """A time budget counted from the process start: ``over()`` once ``seconds`` have passed (never with
    ``seconds=None``). A script checks it before each optional piece of work, so it ends, with its report
    written, before the time limit it runs under."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds

    def elapsed(self) -> float:
        return process_age_s()

    def over(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds

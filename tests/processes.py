"""Running several local processes of one test (multi-process ``jax.distributed`` jobs on localhost)."""

import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (for a ``jax.distributed`` coordinator)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(command: Callable[[int], list[str]], timeout: float, what: str, count: int = 2):
    """Run ``command(process_id)`` for processes 0 .. count-1 at once from the repository root (CPU JAX,
    unbuffered output); returns [(returncode, output)]. A hard timeout fails the test, killing them all."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen(
            command(i),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=Path(__file__).parents[1],
        )
        for i in range(count)
    ]
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
        return [(proc.returncode, text) for proc, text in zip(procs, outputs, strict=True)]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{what} did not finish within {timeout} s")

"""What GPU interpret mode (the kernels simulated on the CPU) needs of the process it runs in.

The interpreter runs each warpgroup of a kernel as its own XLA:CPU program, started from a callback, and every
barrier wait of a warpgroup is a callback that blocks the thread running it until another warpgroup arrives. All
of these run on XLA:CPU's one thread pool. With fewer pool threads than the kernel's warpgroups plus the caller,
every pool thread can end up blocked (the caller waiting for the warpgroups, one warpgroup waiting at a barrier)
while the warpgroup that would release them waits for a thread: the process hangs, not always, as the threads'
timing decides. The pool has one thread per CPU core, or per CPU device where ``jax_num_cpu_devices`` asks for
more, or the number in the environment variable ``NPROC`` (read when the backend starts). A 2-core machine with
one CPU device is short, so the kernels refuse to interpret there instead of hanging; ``NPROC=8`` fixes it.
"""

from __future__ import annotations

import os

POOL_THREAD_NAME = "tf_XLAEigen"  # XLA:CPU's pool threads (Linux thread names)
POOL_SIZE_ENV = ("PORTABLE_JOBS", "NPROC")  # what XLA:CPU reads for its pool size, in this order
SPARE_THREADS = 2  # beyond one per warpgroup: the caller's callback, and one for work the warpgroups queue


def xla_cpu_pool_threads() -> int | None:
    """The XLA:CPU thread pool's size: its threads counted by name (Linux, once the backend has started), else what
    the backend will start with (``PORTABLE_JOBS`` / ``NPROC``, else the schedulable CPUs; at least one per
    ``jax_num_cpu_devices``); None where unknown."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = []
    count = 0
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                count += f.read().strip() == POOL_THREAD_NAME
        except OSError:  # (a thread that has just ended)
            continue
    if count:
        return count
    import jax

    devices = max(int(jax.config.jax_num_cpu_devices), 1)  # (-1: not set)
    for name in POOL_SIZE_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return max(int(value), devices)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    return None if cores is None else max(cores, devices)


def check_interpret_threads(kernel_threads: int, kernel: str) -> None:
    """Refuse to interpret a kernel of ``kernel_threads`` warpgroups where XLA:CPU's pool is too small to run
    them without the chance of a hang (see the module docstring)."""
    needed = kernel_threads + SPARE_THREADS
    have = xla_cpu_pool_threads()
    if have is not None and have < needed:
        raise RuntimeError(
            f"GPU interpret mode of the {kernel} kernel ({kernel_threads} warpgroups) needs at least {needed} XLA:CPU "
            f"pool threads and this process has {have}: with fewer it can hang (every thread blocked at a "
            "simulated barrier). Start Python with NPROC=8 in the environment (XLA:CPU's pool size, read when the "
            "backend starts), or set jax_num_cpu_devices to 8 before the first JAX computation."
        )


def interpret_params(kernel_threads: int, kernel: str):
    """The ``interpret=`` argument of ``plgpu.kernel`` for a kernel of ``kernel_threads`` warpgroups (its
    ``num_threads``): GPU interpret mode's parameters, after :func:`check_interpret_threads`."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    check_interpret_threads(kernel_threads, kernel)
    return plgpu.InterpretGPUParams()


def size_pool_for_interpret(threads: int = 8) -> None:
    """Ask XLA:CPU for a pool of at least ``threads`` (``NPROC``) unless the environment sizes it already. Call it
    before the first JAX computation (the backend reads it when it starts; later it changes nothing)."""
    if not any(os.environ.get(name, "").strip() for name in POOL_SIZE_ENV):
        os.environ["NPROC"] = str(max(threads, os.cpu_count() or 1))

"""Every test runs on 8 fake CPU devices (set before the JAX backend starts)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# LLVM's optimisation of XLA:CPU's generated code is about half of a test program's compile time, and compiling is
# most of the suite's time; tests check results, not speed, so they compile without it (the same HLO programs, IEEE
# arithmetic either way). Set in the environment, so the processes tests start (CLIs, notebook kernels) inherit it.
# Benchmarks and users keep XLA's default. An explicit level in XLA_FLAGS wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Many tests build identical programs through fresh jit closures (a new Trainer, a new engine ...). A
# compilation cache private to this test session lets them share executables; it starts empty every run,
# so timings here stay those of a fresh machine.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_cache_dir = tempfile.mkdtemp(prefix="step3-jax-test-cache-")
atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _cache_dir)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from step3_jax.config import get_preset  # noqa: E402


@pytest.fixture(scope="session")
def test_config():
    """The prime-ish test preset in float32, for tight numerical comparisons."""
    return dataclasses.replace(get_preset("test"), param_dtype="float32")


# pytest-xdist hands tests to its workers in collection order, so long tests collected last (test_train.py comes late
# in the alphabet) keep one worker busy after the other has run out of work. The files with the longest tests go
# first; the order within a file, and of the other files, stays as collected.
_LONG_FIRST = (
    "test_notebooks.py",
    "test_benchmarks.py",  # (the whole GPU benchmark script at CPU sizes, in one test)
    "test_train.py",
    "test_demo.py",
    "test_afd.py",
    "test_generate.py",  # (its three-process CLI run is one of the longest tests)
    "test_sharding.py",
    "test_engine.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

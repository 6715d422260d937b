"""Every test runs on 8 fake CPU devices (set before the JAX backend starts)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from step3_jax.config import get_preset  # noqa: E402


@pytest.fixture(scope="session")
def test_config():
    """The prime-ish test preset in float32, for tight numerical comparisons."""
    return dataclasses.replace(get_preset("test"), param_dtype="float32")

"""The random-number generator that draws initial weights: a counter-based hash, cheap to compile.

``jax.random``'s default generator (threefry) lowers on the CPU to a loop of ~15 kernels per draw, so a model
initialiser with one draw per parameter compiled in ~9 s for the 3-layer test preset (and that once per config
and mesh: in the tests, notebooks and CLIs). This generator, registered through ``jax.extend.random``, computes
every element as two rounds of the ``lowbias32`` integer hash (C. Wellons) of its flat index and the key: one
small fused kernel per parameter, ~3 s for the same initialiser. Like partitionable threefry, each element
depends only on (key, index), so a parameter created directly in its sharding on a mesh has the same values as
on one device (same seed, same weights on any mesh and any backend).

It is for initialisation only (weights are statistically normal, independent across parameters); sampling and
dropout keep ``jax.random.key`` (threefry).
"""

from __future__ import annotations

import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
from jax import lax

__all__ = ["INIT_PRNG", "init_key"]

_U32 = jnp.uint32
_FOLD_DOMAIN = 0x9E3779B9  # separates fold_in(k, i) from split(k)[i]


def _mix(x: jax.Array) -> jax.Array:
    """lowbias32: a bijection of uint32 with near-ideal avalanche (every input bit flips each output bit ~1/2)."""
    x = x ^ (x >> 16)
    x = x * _U32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * _U32(0x846CA68B)
    return x ^ (x >> 16)


def _hash(key: jax.Array, counter: jax.Array) -> jax.Array:
    """uint32 hash of ``counter`` (any shape) under ``key`` ([2] uint32)."""
    return _mix(_mix(counter ^ key[0]) + key[1])


def _counters(shape: tuple[int, ...]) -> jax.Array:
    """The row-major flat index of every element, built from iotas (so it partitions like any elementwise op)."""
    if math.prod(shape) >= 2**32:
        raise ValueError(f"the init generator draws arrays of fewer than 2**32 elements, got shape {shape}")
    index = jnp.zeros(shape, _U32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(_U32, shape, axis) * _U32(stride)
        stride *= shape[axis]
    return index


def _seed(seed: jax.Array) -> jax.Array:
    seed = jnp.asarray(seed)
    lo = seed.astype(_U32)
    hi = (seed >> 32).astype(_U32) if seed.dtype.itemsize == 8 else jnp.zeros((), _U32)
    return jnp.stack([_mix(lo ^ _U32(0x243F6A88)), _mix(_mix(hi) + lo)])


def _split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    c = _counters((*shape, 2))
    return _hash(key, c)


def _fold_in(key: jax.Array, data) -> jax.Array:
    key = jnp.stack([key[0], key[1] ^ _U32(_FOLD_DOMAIN)])
    d = jnp.asarray(data).astype(_U32) * _U32(2)
    return _hash(key, jnp.stack([d, d + _U32(1)]))


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    c = _counters(tuple(shape))
    bits = _hash(key, c)
    if bit_width == 32:
        return bits
    if bit_width in (8, 16):
        return (bits >> (32 - bit_width)).astype(jnp.dtype(f"uint{bit_width}"))
    if bit_width == 64:
        low = _hash(jnp.stack([key[1], key[0]]), c)
        return (bits.astype(jnp.uint64) << 32) | low.astype(jnp.uint64)
    raise ValueError(f"bit_width must be 8, 16, 32 or 64, got {bit_width}")


INIT_PRNG = jex_random.define_prng_impl(
    key_shape=(2,),
    seed=_seed,
    split=_split,
    random_bits=_random_bits,
    fold_in=_fold_in,
    name="step3_init_hash",
    tag="s3i",
)
"""The PRNG implementation (for ``jax.random.key(seed, impl=INIT_PRNG)``)."""


def init_key(seed) -> jax.Array:
    """A typed key of the init generator: ``jax.random.normal(init_key(0), shape)`` etc. work as usual."""
    return jax.random.key(seed, impl=INIT_PRNG)

"""KV cache for MFA: one K and one V vector of ``head_dim`` per KV head (Step-3: a single 256-wide head).

The contiguous cache keeps, per layer, ``k`` and ``v`` arrays ``[B, S_max, G, K]`` and one ``lengths``
vector ``[B]`` (tokens already written per sequence). A forward step of ``T`` tokens writes them at
slots ``lengths[b] .. lengths[b] + T - 1`` and attends to every slot ``<=`` its own, so slots past a
sequence's length (padding written by a batched prefill) are never read and get overwritten later.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from step3_jax.config import Step3Config
from step3_jax.sharding import DEFAULT_RULES, ShardingRules

CACHE_AXES = ("act_batch", "cache_seq", "kv_heads", "head_dim")


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S_max, G, K]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32

    @classmethod
    def create(
        cls,
        config: Step3Config,
        batch_size: int,
        max_length: int,
        *,
        dtype=None,
        mesh: jax.sharding.Mesh | None = None,
        rules: ShardingRules = DEFAULT_RULES,
    ) -> KVCache:
        if max_length > config.max_position_embedding:
            raise ValueError(
                f"KV cache max_length {max_length} exceeds the model's max_position_embedding "
                f"{config.max_position_embedding}"
            )
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"KV cache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}")
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)

        def zeros():
            return jnp.zeros(shape, dtype)

        if mesh is not None:
            zeros = jax.jit(zeros, out_shardings=rules.sharding(mesh, CACHE_AXES, shape))
        n = config.num_hidden_layers
        return cls(
            k=tuple(zeros() for _ in range(n)),
            v=tuple(zeros() for _ in range(n)),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


def write(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array):
    """Write ``k, v [B, T, G, K]`` into ``cache_k, cache_v [B, S, G, K]`` at per-sequence slot ``start [B]``."""

    def one(ck, cv, kb, vb, s):
        ck = jax.lax.dynamic_update_slice(ck, kb.astype(ck.dtype), (s, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, vb.astype(cv.dtype), (s, 0, 0))
        return ck, cv

    return jax.vmap(one)(cache_k, cache_v, k, v, start)

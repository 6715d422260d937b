"""FP8 formats of Step-3's FP8 release (DeepSeek-V3 convention).

Weights: ``w ~= q * scale_inv`` with ``q`` float8_e4m3fn in torch layout ``[..., N(out), K(in)]`` (K-major,
as FP8 wgmma wants its B operand) and one float32 ``scale_inv`` per 128 x 128 block,
``[..., ceil(N / 128), ceil(K / 128)]`` (edge blocks are partial).

Activations (dynamic, at run time): ``x ~= q * scale`` with one float32 scale per token per 128 channels,
``[..., ceil(K / 128)]``.

A block-scaled matmul accumulates ``sum_b (xq_b . wq_b) * x_scale_b * w_scale_b`` over the K blocks in
float32; since the scales are constant within a block this equals the plain matmul of the dequantised
operands up to float32 rounding, which is what the pure-JAX reference path computes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448
BLOCK = 128


def _num_blocks(n: int, block: int) -> int:
    return math.ceil(n / block)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def quantize_blockwise(w: jax.Array, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """Block-quantise ``w [..., N, K]`` -> ``(q float8_e4m3fn [..., N, K], scale_inv float32 [..., N/b, K/b])``."""
    if w.ndim < 2:
        raise ValueError(f"quantize_blockwise needs a matrix [..., N, K], got shape {w.shape}")
    *lead, n, k = w.shape
    nb, kb = _num_blocks(n, block), _num_blocks(k, block)
    wp = _pad_to(_pad_to(w.astype(jnp.float32), -2, block), -1, block)
    blocks = wp.reshape(*lead, nb, block, kb, block)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))  # [..., nb, kb]
    scale_inv = jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(jnp.float32)
    q = blocks / scale_inv[..., :, None, :, None]
    q = jnp.clip(q, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE).reshape(*lead, nb * block, kb * block)
    return q[..., :n, :k], scale_inv


def dequantize_blockwise(q: jax.Array, scale_inv: jax.Array, block: int = BLOCK, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_blockwise`: ``q [..., N, K]``, ``scale_inv [..., N/b, K/b]`` -> ``[..., N, K]``."""
    *lead, n, k = q.shape
    want = (*lead, _num_blocks(n, block), _num_blocks(k, block))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {q.shape}: expected {want}")
    s = jnp.repeat(jnp.repeat(scale_inv.astype(jnp.float32), block, axis=-2), block, axis=-1)[..., :n, :k]
    return (q.astype(jnp.float32) * s).astype(dtype)


def quantize_activations(x: jax.Array, group: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """Per-token, per-``group``-channel FP8: ``x [..., K]`` -> ``(q float8 [..., K], scale float32 [..., K/g])``."""
    k = x.shape[-1]
    g = _num_blocks(k, group)
    xp = _pad_to(x.astype(jnp.float32), -1, group).reshape(*x.shape[:-1], g, group)
    amax = jnp.max(jnp.abs(xp), axis=-1)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(xp / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q.reshape(*x.shape[:-1], g * group)[..., :k], scale


def dequantize_activations(q: jax.Array, scale: jax.Array, group: int = BLOCK, dtype=jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_activations`: ``q * scale`` with one scale per ``group`` channels of each row."""
    k = q.shape[-1]
    s = jnp.repeat(scale.astype(jnp.float32), group, axis=-1)[..., :k]
    return (q.astype(jnp.float32) * s).astype(dtype)


def quantize_per_token(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One FP8 scale per token (the whole last axis as one group): ``x [..., K]`` -> ``(q float8 [..., K],
    scale float32 [...])`` with ``x ~= q * scale``. The FP8 KV cache format."""
    q, scale = quantize_activations(x, group=x.shape[-1])
    return q, scale[..., 0]


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fake_quantize_activations(x: jax.Array, group: int = BLOCK) -> jax.Array:
    """Round ``x`` through per-token-group FP8 and back (what the FP8 GEMM sees), in float32.

    Differentiated as the identity (straight-through), so training through an FP8 model (LoRA on FP8 weights)
    gets the gradient of the unrounded matmul rather than one through the rounding and the scale's max."""
    return dequantize_activations(*quantize_activations(x, group), group=group)


@fake_quantize_activations.defjvp
def _fake_quantize_jvp(group, primals, tangents):
    (x,), (t,) = primals, tangents
    return fake_quantize_activations(x, group), t.astype(jnp.float32)


class Fp8Weight(NamedTuple):
    """A block-FP8 weight as the attention, FFN and expert matmuls take it: ``q`` float8_e4m3fn ``[..., N, K]``
    (HF layout, K-major) and ``scale_inv`` float32 ``[..., ceil(N / 128), ceil(K / 128)]``. A pytree, so it passes
    through ``jit`` / ``shard_map`` (give it a ``Fp8Weight`` of two PartitionSpecs)."""

    q: jax.Array
    scale_inv: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize_blockwise(self.q, self.scale_inv, dtype=dtype)

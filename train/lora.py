"""LoRA adapters over the model's parameter state, applied functionally (the model code is unchanged).

For a target matrix ``W`` stored ``[lead..., in..., out...]`` (see ``step3_jax.checkpoint.hf_keys``), the
adapter is ``A [lead..., prod(in), r]`` (small random) and ``B [lead..., r, prod(out)]`` (zeros), and the
effective weight is ``W + (alpha / r) * (A @ B)`` reshaped to ``W``'s shape. Only adapters are trained;
``merge`` folds them into the base weights for export with ``save_pretrained``.

Block-FP8 targets (``quantization="fp8"``: attention projections, FFNs, experts, stored ``[lead..., out, in]`` with
``X_scale_inv`` beside them) take the same adapters (``A [lead..., in, r]``, ``B [lead..., r, out]``). The base is
dequantised on the fly: :func:`apply_lora` puts the float weight ``q * scale_inv + update`` (HF layout) where the
FP8 bytes were and sets its scales to one, so the model still runs its FP8 numerics (FP8-rounded activations,
straight-through gradients) on that weight; :func:`merge` block-quantises the sum back to FP8 (a lossy step: the
update is rounded with the base).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from step3_jax.checkpoint.hf_keys import SCALE_SUFFIX, is_scale, matrix_split
from step3_jax.quant import dequantize_blockwise, quantize_blockwise

ATTENTION_TARGETS = ("q_proj", "wq", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which weights get low-rank adapters (attention projections; optionally experts, shared expert), rank, alpha."""

    rank: int = 8
    alpha: float = 16.0
    attention: tuple[str, ...] = ATTENTION_TARGETS
    experts: bool = False  # routed experts (moe.gate_proj / up_proj / down_proj)
    shared_expert: bool = False  # share_expert and dense mlp projections

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be an int >= 1, got {self.rank!r}")
        unknown = set(self.attention) - set(ATTENTION_TARGETS)
        if unknown:
            raise ValueError(
                f"LoraConfig.attention: unknown projections {sorted(unknown)}; choose from {ATTENTION_TARGETS}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def wants(self, path: tuple) -> bool:
        names = [str(p) for p in path]
        leaf, parent = names[-1], names[-2] if len(names) > 1 else ""
        if is_scale(path):
            return False  # FP8 block scales: their weight gets the adapter
        if parent == "self_attn":
            return leaf in self.attention
        if parent == "moe":
            return self.experts and leaf in ("gate_proj", "up_proj", "down_proj")
        if parent in ("share_expert", "mlp"):
            return self.shared_expert
        return False


def _path(keypath) -> tuple:
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
    return tuple(out)


def _flat_params(params) -> dict[tuple, jax.Array]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_path(kp): v for kp, v in leaves}


def _name(path: tuple) -> str:
    return "/".join(map(str, path))


def _scale_path(path: tuple) -> tuple:
    return (*path[:-1], str(path[-1]) + SCALE_SUFFIX)


def _weight_path(scale_path: tuple) -> tuple:
    return (*scale_path[:-1], str(scale_path[-1])[: -len(SCALE_SUFFIX)])


def _dims(path: tuple, shape: tuple[int, ...], fp8: bool) -> tuple[tuple[int, ...], int, int]:
    """(lead shape, in size, out size) of a target matrix; FP8 weights are ``[lead..., out, in]``."""
    lead = 1 if str(path[-2]) == "moe" else 0
    if fp8:
        return shape[:lead], shape[-1], shape[-2]
    split = matrix_split(path)
    return shape[:lead], math.prod(shape[lead:split]), math.prod(shape[split:])


def init_lora(params, config: LoraConfig, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """Adapters for every targeted matrix of ``params`` (an ``nnx.State`` of the model), float or block-FP8."""
    flat = _flat_params(params)
    targets = [(p, w) for p, w in flat.items() if config.wants(p) and w.ndim >= 2]
    if not targets:
        raise ValueError("LoRA config selects no parameters of this model")
    adapters = {}
    for i, (path, w) in enumerate(targets):
        lead, n_in, n_out = _dims(path, w.shape, _scale_path(path) in flat)
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, n_in, config.rank), jnp.float32) / math.sqrt(n_in)
        adapters[_name(path)] = {"a": a, "b": jnp.zeros((*lead, config.rank, n_out), jnp.float32)}
    return adapters


def _update(adapter, config: LoraConfig) -> jax.Array:
    """``(alpha / r) * A @ B``: float32 ``[lead..., in, out]``."""
    return jnp.einsum("...ir,...ro->...io", adapter["a"], adapter["b"]) * config.scale


def apply_lora(params, adapters, config: LoraConfig):
    """Base parameters with every adapter's low-rank update added (same tree structure; same dtypes, except that an
    FP8 target becomes its float32 dequantised weight + update, in the FP8 layout, with scales of one)."""
    flat = _flat_params(params)

    def one(keypath, w):
        path = _path(keypath)
        if is_scale(path):
            return jnp.ones_like(w) if _name(_weight_path(path)) in adapters else w
        name = _name(path)
        if name not in adapters:
            return w
        delta = _update(adapters[name], config)
        scale = flat.get(_scale_path(path))
        if scale is not None:  # block-FP8 [lead..., out, in]: dequantise the base on the fly
            return dequantize_blockwise(w, scale) + delta.swapaxes(-1, -2)
        return (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def merge_params(params, adapters, config: LoraConfig):
    """Like :func:`apply_lora`, with every FP8 target block-quantised back to FP8 (the model's own format)."""
    merged = apply_lora(params, adapters, config)
    flat = _flat_params(params)
    flat_merged = _flat_params(merged)
    requantised = {}
    for path in flat:
        if _name(path) in adapters and _scale_path(path) in flat:
            q, s = quantize_blockwise(flat_merged[path])
            requantised[path], requantised[_scale_path(path)] = q, s
    return jax.tree_util.tree_map_with_path(lambda kp, w: requantised.get(_path(kp), w), merged)


def merge(model: nnx.Module, adapters, config: LoraConfig) -> nnx.Module:
    """A model whose weights are base + adapters (for export with ``save_pretrained``); FP8 weights stay FP8."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, merge_params(state, adapters, config))

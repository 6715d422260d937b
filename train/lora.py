"""LoRA adapters over the model's parameter state, applied functionally (the model code is unchanged).

For a target matrix ``W`` stored ``[lead..., in..., out...]`` (see ``step3_jax.checkpoint.hf_keys``), the
adapter is ``A [lead..., prod(in), r]`` (small random) and ``B [lead..., r, prod(out)]`` (zeros), and the
effective weight is ``W + (alpha / r) * (A @ B)`` reshaped to ``W``'s shape. Only adapters are trained;
``merge`` folds them into the base weights for export with ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from step3_jax.checkpoint.hf_keys import matrix_split

ATTENTION_TARGETS = ("q_proj", "wq", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
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


def _dims(path: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
    split = matrix_split(path)
    lead = 1 if str(path[-2]) == "moe" else 0
    return shape[:lead], math.prod(shape[lead:split]), math.prod(shape[split:])


def init_lora(params, config: LoraConfig, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """Adapters for every targeted float matrix of ``params`` (an ``nnx.State`` of the model)."""
    adapters = {}
    # FP8 (1-byte) weights are left alone: adapters go on BF16 / F32 matrices only.
    targets = [
        (p, w) for p, w in _flat_params(params).items() if config.wants(p) and w.ndim >= 2 and w.dtype.itemsize >= 2
    ]
    if not targets:
        raise ValueError("LoRA config selects no parameters of this model")
    for i, (path, w) in enumerate(targets):
        lead, n_in, n_out = _dims(path, w.shape)
        a = jax.random.normal(jax.random.fold_in(key, i), (*lead, n_in, config.rank), jnp.float32) / math.sqrt(n_in)
        adapters["/".join(map(str, path))] = {"a": a, "b": jnp.zeros((*lead, config.rank, n_out), jnp.float32)}
    return adapters


def apply_lora(params, adapters, config: LoraConfig):
    """Base parameters with every adapter's low-rank update added (same tree structure and dtypes)."""

    def one(keypath, w):
        name = "/".join(map(str, _path(keypath)))
        if name not in adapters:
            return w
        ad = adapters[name]
        delta = jnp.einsum("...ir,...ro->...io", ad["a"], ad["b"]) * config.scale
        return (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def merge(model: nnx.Module, adapters, config: LoraConfig) -> nnx.Module:
    """A model whose weights are base + adapters (for export with ``save_pretrained``)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, apply_lora(state, adapters, config))

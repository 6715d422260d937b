"""step3-jax: Step-3 (MFA + MoE) in JAX / Flax NNX."""

from step3_jax.checkpoint.hf import load_pretrained, save_pretrained
from step3_jax.config import PRESETS, Step3Config, get_preset
from step3_jax.kv_cache import KVCache
from step3_jax.model import Step3ForCausalLM, count_params, create_model
from step3_jax.sharding import DEFAULT_RULES, ShardingRules, make_mesh

__all__ = [
    "DEFAULT_RULES",
    "KVCache",
    "PRESETS",
    "ShardingRules",
    "Step3Config",
    "Step3ForCausalLM",
    "count_params",
    "create_model",
    "get_preset",
    "load_pretrained",
    "make_mesh",
    "save_pretrained",
]

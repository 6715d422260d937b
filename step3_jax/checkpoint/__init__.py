"""Checkpoint interop: Hugging Face key names and layouts."""

from step3_jax.checkpoint.hf_keys import from_hf_layout, hf_name, hf_shapes, to_hf_layout

__all__ = ["from_hf_layout", "hf_name", "hf_shapes", "to_hf_layout"]

"""Checkpoint interop: Hugging Face key names and layouts, safetensors load / save."""

from step3_jax.checkpoint.hf import (
    CheckpointReport,
    checkpoint_folder,
    inspect_checkpoint,
    load_pretrained,
    load_tensors,
    read_hf_config,
    save_pretrained,
    set_checkpoint_folder,
)
from step3_jax.checkpoint.hf_keys import from_hf_layout, hf_name, hf_shapes, to_hf_layout

__all__ = [
    "CheckpointReport",
    "checkpoint_folder",
    "from_hf_layout",
    "hf_name",
    "hf_shapes",
    "inspect_checkpoint",
    "load_pretrained",
    "load_tensors",
    "read_hf_config",
    "save_pretrained",
    "set_checkpoint_folder",
    "to_hf_layout",
]

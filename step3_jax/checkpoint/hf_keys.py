"""Module parameter paths <-> Hugging Face Step-3 keys and layouts.

Module attribute names follow the HF names, so the key of a parameter is its path: ``layers/3/self_attn/q_proj``
-> ``model.layers.3.self_attn.q_proj.weight``. Matrices are stored ``[in..., out...]`` here and ``[out, in]``
(torch) in HF, with multi-axis sides flattened (``wq [Q, H, K]`` <-> ``[H*K, Q]``); stacked experts keep their
leading expert axis (``[E, D, F]`` <-> ``[E, F, D]``). Embedding and norm weights are copied as they are.

Block-FP8 weights (``Step3Config.quantization == "fp8"``) are already stored in the HF layout ``[..., out, in]``
with their scales beside them as ``X_scale_inv`` (``X.weight_scale_inv`` in HF): both are copied as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import ml_dtypes
import numpy as np

SCALE_SUFFIX = "_scale_inv"  # module attribute of an FP8 weight's block scales (HF: ``X.weight_scale_inv``)
HF_SCALE_SUFFIX = ".weight_scale_inv"
# Weights of the VLM's vision encoder and projector, which the text model does not use.
VISION_PREFIXES = ("vision_model.", "vit_downsampler.", "vit_downsampler2.", "vit_large_projector.")

# Number of leading input axes (after the expert axis, if any) of each matrix, by attribute name.
_INPUT_AXES = {
    "q_proj": 1,
    "wq": 1,
    "k_proj": 1,
    "v_proj": 1,
    "o_proj": 2,
    "gate_proj": 1,
    "up_proj": 1,
    "down_proj": 1,
    "gate": 1,  # the MoE router
    "lm_head": 1,
}


def hf_name(path: Sequence) -> str:
    """HF key of the parameter at module path ``path`` (a tuple of attribute names / layer indices)."""
    parts = [str(p) for p in path]
    if parts[-1].endswith(SCALE_SUFFIX):
        parts[-1] = parts[-1][: -len(SCALE_SUFFIX)]
        parts.append("weight_scale_inv")
    elif parts[-1] != "weight":
        parts.append("weight")
    if parts[0] != "lm_head":
        parts.insert(0, "model")
    return ".".join(parts)


def scale_key(weight_key: str) -> str:
    """``X.weight`` -> ``X.weight_scale_inv``."""
    return weight_key[: -len(".weight")] + HF_SCALE_SUFFIX if weight_key.endswith(".weight") else weight_key


def is_scale(path: Sequence) -> bool:
    """Whether a parameter path names an FP8 weight's block scales (``X_scale_inv``)."""
    return str(path[-1]).endswith(SCALE_SUFFIX)


def is_fp8(dtype) -> bool:
    """Whether ``dtype`` is an 8-bit float (e4m3fn or e5m2)."""
    return dtype is not None and np.dtype(dtype) in (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


def is_vision_key(key: str) -> bool:
    """Whether a checkpoint key belongs to the release's vision tower (skipped by the text model)."""
    return key.startswith(VISION_PREFIXES)


def _in_hf_layout(path: Sequence, dtype) -> bool:
    """FP8 weights and their scales are kept in the HF layout by the model."""
    return is_scale(path) or is_fp8(dtype)


def matrix_split(path: Sequence) -> int | None:
    """Index of the first output axis of a matrix parameter, or None for copied tensors."""
    name = str(path[-1])
    if name not in _INPUT_AXES:
        return None  # embedding, norms: copied
    return int(_is_expert(path)) + _INPUT_AXES[name]


def _is_expert(path: Sequence) -> bool:
    return len(path) >= 2 and str(path[-2]) == "moe" and str(path[-1]) != "gate"


def shares_first_axis(path: Sequence, dtype=None) -> bool:
    """Whether the parameter's first axis is its HF tensor's first axis (stacked experts, tensors copied as they
    are, FP8 weights), so a slice of one along it is the same slice of the other."""
    return matrix_split(path) is None or _in_hf_layout(path, dtype) or _is_expert(path)


def to_hf_layout(path: Sequence, array):
    """Module layout -> HF layout (works on numpy and jax arrays)."""
    split = matrix_split(path)
    if split is None or _in_hf_layout(path, array.dtype):
        return array
    lead = 1 if _is_expert(path) else 0
    shape = array.shape
    flat = array.reshape(shape[:lead] + (math.prod(shape[lead:split]), math.prod(shape[split:])))
    return flat.swapaxes(-1, -2)


def from_hf_layout(path: Sequence, array, shape: Sequence[int], dtype=None):
    """HF layout -> module layout of ``shape`` (and parameter ``dtype``: FP8 parameters stay in HF layout);
    raises ValueError naming the key on a shape mismatch. On numpy input the result is a view, not a copy."""
    expected = hf_layout_shape(path, shape, dtype)
    if tuple(array.shape) != expected:
        raise ValueError(f"{hf_name(path)}: checkpoint shape {tuple(array.shape)} does not match expected {expected}")
    if matrix_split(path) is None or _in_hf_layout(path, dtype):
        return array
    return array.swapaxes(-1, -2).reshape(tuple(shape))


def hf_layout_shape(path: Sequence, shape: Sequence[int], dtype=None) -> tuple[int, ...]:
    """HF shape of the module parameter at ``path`` with ``shape`` (and ``dtype``, which matters for FP8)."""
    if matrix_split(path) is None or _in_hf_layout(path, dtype):
        return tuple(shape)
    return to_hf_layout(path, np.empty(tuple(shape), np.int8)).shape


def hf_shapes(model_or_state) -> dict[str, tuple[int, ...]]:
    """HF key -> HF shape for every parameter of a (possibly abstract, e.g. ``eval_shape``d) model."""
    from flax import nnx

    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return {hf_name(path): hf_layout_shape(path, var.shape, var.dtype) for path, var in nnx.to_flat_state(state)}

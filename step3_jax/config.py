"""Step-3 text-model configuration: presets, Hugging Face config.json interop, parameter counting.

Field names follow the Hugging Face ``step3_text`` config so that a ``config.json`` maps one to one.
``moe_layers_enum`` is kept resolved as a tuple of layer indices (HF writes it as the string "4,5,...,59").
"""

from __future__ import annotations

import dataclasses
from typing import Any

_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "num_attention_heads",
    "num_attention_groups",
    "head_dim",
    "share_q_dim",
    "intermediate_size",
    "moe_num_experts",
    "moe_top_k",
    "moe_intermediate_size",
    "share_expert_dim",
    "max_position_embedding",
)
_PARAM_DTYPES = ("bfloat16", "float32")
QUANTIZATIONS = (None, "fp8")
# The one FP8 scheme supported (DeepSeek-V3 / step3-fp8): e4m3 weights in 128 x 128 blocks, dynamic activations.
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


@dataclasses.dataclass(frozen=True)
class Step3Config:
    """Hyper-parameters of the Step-3 text model (the defaults are the 321B release)."""

    hidden_size: int = 7168
    num_hidden_layers: int = 61
    vocab_size: int = 128815
    num_attention_heads: int = 64
    num_attention_groups: int = 1
    head_dim: int = 256
    share_q_dim: int = 2048
    intermediate_size: int = 18432
    moe_num_experts: int = 48
    moe_top_k: int = 3
    moe_intermediate_size: int = 5120
    share_expert_dim: int = 5120
    # Layer indices that are MoE; None means the reference default, layers 1..L-1.
    moe_layers_enum: tuple[int, ...] | None = tuple(range(4, 60))
    norm_expert_weight: bool = False
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embedding: int = 65536
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 128805
    # Storage dtype of the parameters; activations follow it, norms/router/softmax run in float32.
    param_dtype: str = "bfloat16"
    # "fp8": MFA projections, dense MLP, shared and routed expert weights are block-FP8 (HF layout + scales), as in
    # the step3-fp8 release; norms, embeddings, lm_head and the router stay param_dtype. None: all param_dtype.
    quantization: str | None = None

    def __post_init__(self):
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Step3Config.{name} must be an int, got {type(value).__name__} {value!r}")
            if value <= 0:
                raise ValueError(f"Step3Config.{name} must be positive, got {value}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Step3Config.{name} must be a positive number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.norm_expert_weight, bool):
            raise ValueError(f"Step3Config.norm_expert_weight must be a bool, got {self.norm_expert_weight!r}")
        if self.param_dtype not in _PARAM_DTYPES:
            raise ValueError(f"Step3Config.param_dtype must be one of {_PARAM_DTYPES}, got {self.param_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"Step3Config.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.rope_scaling is not None:
            raise ValueError(f"Step3Config.rope_scaling: Step-3 uses no rope scaling, got {self.rope_scaling!r}")
        if self.num_attention_heads % self.num_attention_groups:
            raise ValueError(
                f"Step3Config.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_attention_groups ({self.num_attention_groups})"
            )
        if self.head_dim % 2:
            raise ValueError(f"Step3Config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.moe_top_k > self.moe_num_experts:
            raise ValueError(
                f"Step3Config.moe_top_k ({self.moe_top_k}) exceeds moe_num_experts ({self.moe_num_experts})"
            )
        layers = self.moe_layers_enum
        if layers is None:
            layers = tuple(range(1, self.num_hidden_layers))
        elif isinstance(layers, str):
            layers = parse_moe_layers_enum(layers)
        try:
            layers = tuple(sorted(set(layers)))
        except TypeError as e:
            raise ValueError(f"Step3Config.moe_layers_enum must be a sequence of ints, got {layers!r}") from e
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"Step3Config.moe_layers_enum must hold ints, got {i!r}")
            if not 0 <= i < self.num_hidden_layers:
                raise ValueError(
                    f"Step3Config.moe_layers_enum: layer {i} is out of range for num_hidden_layers="
                    f"{self.num_hidden_layers}"
                )
        object.__setattr__(self, "moe_layers_enum", layers)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        is_id = lambda i: isinstance(i, int) and not isinstance(i, bool) and i >= 0  # noqa: E731
        if self.bos_token_id is not None and not is_id(self.bos_token_id):
            raise ValueError(
                f"Step3Config.bos_token_id must be a token id (an int >= 0) or None, got {self.bos_token_id!r}"
            )
        eos = self.eos_token_id
        if eos is not None and not (is_id(eos) or (isinstance(eos, tuple) and eos and all(map(is_id, eos)))):
            raise ValueError(
                "Step3Config.eos_token_id must be a token id (an int >= 0), a non-empty list of them or None, "
                f"got {eos!r}"
            )

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_groups

    @property
    def dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.param_dtype)

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe_layers_enum

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def kv_bytes_per_token(self, bytes_per_element: float = 1.0) -> float:
        """KV-cache bytes per token over all layers (one K and one V vector per KV head per layer)."""
        return 2 * self.num_kv_heads * self.head_dim * self.num_hidden_layers * bytes_per_element

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides) -> Step3Config:
        """Build from a Hugging Face ``config.json`` dict: the VLM one (``text_config``) or a bare text one."""
        if not isinstance(hf, dict):
            raise ValueError(f"from_hf_config expects a dict, got {type(hf).__name__}")
        text = hf.get("text_config", hf)
        if not isinstance(text, dict):
            raise ValueError(f"config 'text_config' must be a dict, got {type(text).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for name in fields:
            if name in text:
                kwargs[name] = text[name]
        # Some exports spell the context length the usual (plural) way.
        if "max_position_embedding" not in text and "max_position_embeddings" in text:
            kwargs["max_position_embedding"] = text["max_position_embeddings"]
        # Token ids live at the top level of the VLM config.
        for name in ("bos_token_id", "eos_token_id"):
            if name not in kwargs and name in hf:
                kwargs[name] = hf[name]
        if "rope_parameters" in text:  # newer exports: {"rope_type": "default", "rope_theta": ...}
            kwargs.update(_rope_from_parameters(text["rope_parameters"], text))
        if "moe_layers_enum" in text:
            kwargs["moe_layers_enum"] = parse_moe_layers_enum(text["moe_layers_enum"])
        else:
            kwargs["moe_layers_enum"] = None
        dtype = text.get("torch_dtype", hf.get("torch_dtype"))
        if dtype in _PARAM_DTYPES:
            kwargs["param_dtype"] = dtype
        kwargs.pop("quantization", None)  # only ever read from quantization_config
        qc = text.get("quantization_config", hf.get("quantization_config"))
        if qc is not None:
            kwargs["quantization"] = parse_quantization_config(qc)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A bare ``step3_text`` config dict (what ``from_hf_config`` reads back)."""
        out: dict[str, Any] = {"model_type": "step3_text", "architectures": ["Step3TextForCausalLM"]}
        for f in dataclasses.fields(self):
            if f.name in ("param_dtype", "quantization"):
                continue
            value = getattr(self, f.name)
            if f.name == "moe_layers_enum":
                value = ",".join(str(i) for i in value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["torch_dtype"] = self.param_dtype
        out["tie_word_embeddings"] = False
        if self.quantization == "fp8":
            out["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG, weight_block_size=[128, 128])
        return out

    # ------------------------------------------------------------------ parameter counting (closed form)
    def closed_form_param_counts(self) -> dict[str, int]:
        """Parameter counts by component, from the formulas (cross-check for the eval_shape count)."""
        d, h, k, g, q = self.hidden_size, self.num_attention_heads, self.head_dim, self.num_kv_heads, self.share_q_dim
        attn = d * q + q + q * h * k + 2 * d * g * k + h * k * d
        norms = 2 * d
        dense = 3 * d * self.intermediate_size
        experts = self.moe_num_experts * 3 * d * self.moe_intermediate_size
        shared = 3 * d * self.share_expert_dim
        router = d * self.moe_num_experts
        n_moe = len(self.moe_layers_enum)
        n_dense = self.num_hidden_layers - n_moe
        counts = {
            "embed": self.vocab_size * d,
            "lm_head": self.vocab_size * d,
            "final_norm": d,
            "attention": self.num_hidden_layers * (attn + norms),
            "dense_mlp": n_dense * dense,
            "router": n_moe * router,
            "shared_expert": n_moe * shared,
            "experts": n_moe * experts,
        }
        counts["total"] = sum(counts.values())
        active_experts = n_moe * self.moe_top_k * 3 * d * self.moe_intermediate_size
        counts["active"] = counts["total"] - counts["experts"] + active_experts
        return counts


def _rope_from_parameters(rope: Any, text: dict[str, Any]) -> dict[str, Any]:
    """The ``rope_theta`` of a ``rope_parameters`` entry (how newer ``transformers`` write rope settings). Step-3
    uses plain rotary embeddings: any other ``rope_type`` is refused, as ``rope_scaling`` is, and a
    ``rope_theta`` given both there and at the top level must agree."""
    if rope is None:
        return {}
    if not isinstance(rope, dict):
        raise ValueError(f"config rope_parameters must be an object, got {type(rope).__name__} {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"config rope_parameters: Step-3 uses no rope scaling, got rope_type {kind!r}")
    if "rope_theta" not in rope:
        return {}
    theta = rope["rope_theta"]
    if "rope_theta" in text and text["rope_theta"] != theta:
        raise ValueError(
            f"config gives rope_theta {text['rope_theta']!r} and rope_parameters.rope_theta {theta!r}; they must agree"
        )
    return {"rope_theta": theta}


def parse_quantization_config(qc: Any) -> str | None:
    """HF ``quantization_config`` -> ``Step3Config.quantization``; only block FP8 (e4m3, 128 x 128) is supported."""
    if not isinstance(qc, dict):
        raise ValueError(f"config quantization_config must be a dict, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(
            f"config quantization_config.quant_method {method!r} is not supported: only block FP8 ('fp8', "
            "e4m3 weights with 128 x 128 scales, as in stepfun-ai/step3-fp8) can be loaded"
        )
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"config quantization_config.fmt {fmt!r} is not supported: only 'e4m3'")
    block = qc.get("weight_block_size")
    if not isinstance(block, list) or block != [128, 128]:
        raise ValueError(
            f"config quantization_config.weight_block_size {block!r} is not supported: only [128, 128] blocks"
        )
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ValueError(
            f"config quantization_config.activation_scheme {scheme!r} is not supported: only 'dynamic' "
            "(per-token, per-128-channel activation scales computed at run time)"
        )
    return "fp8"


def parse_moe_layers_enum(value: Any) -> tuple[int, ...] | None:
    """Parse HF ``moe_layers_enum`` ("4,5,...,59", a list of ints, or None for the default)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return tuple(int(s) for s in value.replace(" ", "").split(",") if s)
        except ValueError as e:
            raise ValueError(f"Step3Config.moe_layers_enum: cannot parse {value!r} as comma-separated ints") from e
    if isinstance(value, (list, tuple)):
        return tuple(value)
    raise ValueError(f"Step3Config.moe_layers_enum must be a string or list of ints, got {type(value).__name__}")


# ---------------------------------------------------------------------- presets
STEP3 = Step3Config()

PRESETS: dict[str, Step3Config] = {
    # The released 321B model (316.3B text parameters, 38.8B active per token).
    "step3": STEP3,
    # Unit tests: small, mutually distinct dimensions so a wrong transpose or axis fails loudly.
    "test": Step3Config(
        hidden_size=40,
        num_hidden_layers=3,
        vocab_size=263,
        num_attention_heads=4,
        num_attention_groups=1,
        head_dim=16,
        share_q_dim=24,
        intermediate_size=56,
        moe_num_experts=5,
        moe_top_k=2,
        moe_intermediate_size=36,
        share_expert_dim=28,
        moe_layers_enum=(1, 2),
        rope_theta=10000.0,
        max_position_embedding=512,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # README demo: a few million parameters, byte-level vocabulary.
    "tiny": Step3Config(
        hidden_size=256,
        num_hidden_layers=4,
        vocab_size=384,
        num_attention_heads=8,
        num_attention_groups=1,
        head_dim=64,
        share_q_dim=128,
        intermediate_size=704,
        moe_num_experts=8,
        moe_top_k=2,
        moe_intermediate_size=192,
        share_expert_dim=192,
        moe_layers_enum=(1, 2, 3),
        rope_theta=10000.0,
        max_position_embedding=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Small research model with Step-3's shape ratios (0.67B total, 0.41B active; 0.15B active without embeddings).
    "step3-mini": Step3Config(
        hidden_size=1024,
        num_hidden_layers=12,
        vocab_size=128815,
        num_attention_heads=16,
        num_attention_groups=1,
        head_dim=128,
        share_q_dim=512,
        intermediate_size=2816,
        moe_num_experts=16,
        moe_top_k=3,
        moe_intermediate_size=704,
        share_expert_dim=704,
        moe_layers_enum=tuple(range(2, 11)),
        max_position_embedding=16384,
    ),
}


def get_preset(name: str) -> Step3Config:
    """The preset config ``name`` (one of :data:`PRESETS`: "step3", "step3-mini", "tiny", "test")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def format_params(n: int) -> str:
    """A parameter count for people: 316294538240 -> "316.3B", 1234567 -> "1.2M"."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"

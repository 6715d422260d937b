"""The Step-3 paper's decoding-cost model (sections 4-6) and an AFD throughput estimate (section 7).

Per decoded token at a given context length a model needs (paper section 4.1):
  * KV/state bytes read by core attention (grows with the context),
  * core-attention FLOPs (QK^T and PV; grows with the context),
  * FLOPs of the linear projections around attention (q/k/v/o, constant),
  * activated FFN FLOPs (constant).
Embedding and lm_head are left out, as in the paper (< 5% of either).

With attention-FFN disaggregation (AFD) both halves are costed on whichever accelerator is cheapest for
them (paper section 4.2):
  attention = max(attn_flops * U_flop, kv_bytes * U_byte) + linear_flops * U_flop
  ffn       = ffn_flops * U_flop
with U_flop = price / (3600 * FLOP/s) and U_byte = price / (3600 * bytes/s); FP8 FLOP/s where the card has
them, BF16 otherwise (INT8 storage keeps the byte counts). Section 5.3-5.4 gives the sparsest MoE a card and
network allow; `estimate_afd_throughput` turns per-layer stage times (roofline with efficiency factors, or
measured kernel times) into the largest batch meeting a TPOT target and the resulting tokens/GPU/s.

Model specs live in ``configs/models/*.json`` (from each model's public config.json); Step-3's is derived
from ``step3_jax.config.STEP3``. Accelerator specs live in ``configs/hardware/accelerators.json``.
Units: bytes, FLOPs, seconds, USD; costs are USD per 1M decoded tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from step3_jax.config import STEP3, Step3Config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
MODELS_DIR = CONFIG_DIR / "models"
HARDWARE_FILE = CONFIG_DIR / "hardware" / "accelerators.json"

# The paper's nine models (Tables 2/3/6) and four accelerators (Table 4), in the paper's order.
PAPER_MODELS = (
    "deepseek-v3",
    "kimi-k2",
    "qwen3-235b-a22b",
    "qwen3-32b",
    "llama4-maverick",
    "minimax-m1",
    "ernie-4.5-300b-a47b",
    "pangu-pro-moe",
    "step3",
)
PAPER_HARDWARE = ("H800", "H20", "A800", "910B")
PAPER_TPOT_S = 0.050  # 20 tokens/s decoding SLA
PAPER_STAGES = 3  # attention / communication / FFN
TOKENS_PER_COST_UNIT = 1_000_000


def _fail(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def _check_positive_int(where: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"'{name}' must be an int, got {value!r}")
    if value <= 0:
        raise _fail(where, f"'{name}' must be positive, got {value}")
    return value


def _check_positive(where: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(where, f"'{name}' must be a finite number, got {value!r}")
    if value <= 0:
        raise _fail(where, f"'{name}' must be positive, got {value}")
    return float(value)


def _check_context(context: Any) -> int:
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context <= 0:
        raise ValueError(f"context must be a positive int (tokens), got {context!r}")
    return int(context)


# ====================================================================== layer groups
@dataclasses.dataclass(frozen=True, kw_only=True)
class _LayerGroup:
    """``layer_step``: the group's layers are every ``layer_step``-th layer (1-based: layers k, 2k, ...), as
    Hugging Face configs interleave them (``interleave_moe_layer_step``, Llama 4's global-attention layers); a
    group without it takes the remaining layers in listed order."""

    layer_step: int | None = None


# ====================================================================== attention designs
@dataclasses.dataclass(frozen=True)
class GQAAttention(_LayerGroup):
    """Softmax attention with shared K/V heads: MHA, GQA, MQA, and MFA (a low-rank, normalised query).

    ``window`` caps the attended length (chunked/sliding layers; the paper charges the full chunk).
    ``q_lora_rank`` makes the query factorised, hidden -> rank -> heads*head_dim (Step-3's MFA).
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    kv_bytes: float = 1.0
    window: int | None = None
    q_lora_rank: int | None = None

    @property
    def kind(self) -> str:
        return "mfa" if self.q_lora_rank else "gqa"

    def attended(self, context: int) -> int:
        return min(context, self.window) if self.window else context

    def kv_elements_per_token_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim

    def kv_read_bytes(self, context: int) -> float:
        """Bytes of KV read, all layers of the group, for one decoded token."""
        return self.num_layers * self.attended(context) * self.kv_elements_per_token_layer() * self.kv_bytes

    def kv_storage_bytes(self, context: int) -> float:
        """Bytes of KV held for one sequence at this context (equal to the bytes read)."""
        return self.kv_read_bytes(context)

    def core_flops_per_layer(self, context: int) -> float:
        # QK^T and PV, 2 FLOPs per multiply-add, every query head over every attended position.
        return 4.0 * self.num_heads * self.head_dim * self.attended(context)

    def core_flops(self, context: int) -> float:
        return self.num_layers * self.core_flops_per_layer(context)

    def linear_params(self, hidden: int) -> tuple[int, int]:
        """(q/k/v projection parameters, o_proj parameters) of one layer."""
        qd = self.num_heads * self.head_dim
        if self.q_lora_rank:
            q = hidden * self.q_lora_rank + self.q_lora_rank * qd
        else:
            q = hidden * qd
        kv = 2 * hidden * self.num_kv_heads * self.head_dim
        return q + kv, qd * hidden


@dataclasses.dataclass(frozen=True)
class MLAAttention(_LayerGroup):
    """DeepSeek multi-head latent attention, decoded with the up-projections absorbed.

    The cache holds ``kv_lora_rank + qk_rope_head_dim`` values per token per layer. Core FLOPs follow the
    paper's convention, 2 x 2 x heads x (kv_lora_rank + qk_rope_head_dim) per attended position: it charges
    the PV product at the full 576-wide cached row (an exact count, PV over the 512-wide latent only, is
    5.9% lower for DSv3); this is what reproduces Tables 2/3 and the stated arithmetic intensity of 512.
    """

    num_layers: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    kv_bytes: float = 1.0

    kind = "mla"
    window = None

    def attended(self, context: int) -> int:
        return context

    def kv_elements_per_token_layer(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim

    def kv_read_bytes(self, context: int) -> float:
        return self.num_layers * context * self.kv_elements_per_token_layer() * self.kv_bytes

    def kv_storage_bytes(self, context: int) -> float:
        return self.kv_read_bytes(context)

    def core_flops_per_layer(self, context: int) -> float:
        return 4.0 * self.num_heads * self.kv_elements_per_token_layer() * context

    def core_flops(self, context: int) -> float:
        return self.num_layers * self.core_flops_per_layer(context)

    def linear_params(self, hidden: int) -> tuple[int, int]:
        # Counted un-absorbed; absorbing W_UK into q and W_UV into o moves the same number of MACs.
        h = self.num_heads
        q = hidden * self.q_lora_rank + self.q_lora_rank * h * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        kv_a = hidden * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b, h * self.v_head_dim * hidden


@dataclasses.dataclass(frozen=True)
class LinearAttention(_LayerGroup):
    """Linear (recurrent-state) attention, e.g. MiniMax's lightning attention: a fixed head_dim^2 state per head.

    ``state_accesses`` counts how often the state moves per token (2 = read + write) and
    ``flops_per_state_element`` the FLOPs per state element per token. The paper does not print its formula;
    2 accesses of an FP32 state reproduce its MM M1 bytes exactly, and 10 FLOPs/element reproduce its
    FLOPs (a minimal recurrent update, decay + k^T v + read-out, is 5; see docs/cost_model.md).
    """

    num_layers: int
    num_heads: int
    head_dim: int
    state_bytes: float = 4.0
    state_accesses: float = 2.0
    flops_per_state_element: float = 10.0
    output_gate: bool = True

    kind = "linear"
    window = None

    def attended(self, context: int) -> int:
        return 0

    def state_elements_per_layer(self) -> int:
        return self.num_heads * self.head_dim * self.head_dim

    def kv_read_bytes(self, context: int) -> float:
        return self.num_layers * self.state_elements_per_layer() * self.state_bytes * self.state_accesses

    def kv_storage_bytes(self, context: int) -> float:
        return self.num_layers * self.state_elements_per_layer() * self.state_bytes

    def core_flops_per_layer(self, context: int) -> float:
        return self.flops_per_state_element * self.state_elements_per_layer()

    def core_flops(self, context: int) -> float:
        return self.num_layers * self.core_flops_per_layer(context)

    def linear_params(self, hidden: int) -> tuple[int, int]:
        inner = self.num_heads * self.head_dim
        qkv_gate = hidden * inner * (4 if self.output_gate else 3)
        return qkv_gate, inner * hidden


AttentionGroup = GQAAttention | MLAAttention | LinearAttention


# ====================================================================== FFN designs
@dataclasses.dataclass(frozen=True)
class DenseFFN(_LayerGroup):
    """SwiGLU FFN (gate, up, down)."""

    num_layers: int
    intermediate_size: int

    kind = "dense"

    def active_params(self, hidden: int) -> int:
        return 3 * hidden * self.intermediate_size

    def total_params(self, hidden: int) -> int:
        return self.active_params(hidden)

    def touched_params(self, hidden: int, tokens: float) -> float:
        return float(self.total_params(hidden))


@dataclasses.dataclass(frozen=True)
class MoEFFN(_LayerGroup):
    """Routed SwiGLU experts (top_k of num_experts) plus always-on shared experts; router not counted."""

    num_layers: int
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0

    kind = "moe"

    def expert_params(self, hidden: int) -> int:
        return 3 * hidden * self.expert_intermediate_size

    def shared_params(self, hidden: int) -> int:
        return self.num_shared_experts * 3 * hidden * self.shared_intermediate_size

    def active_params(self, hidden: int) -> int:
        return self.top_k * self.expert_params(hidden) + self.shared_params(hidden)

    def total_params(self, hidden: int) -> int:
        return self.num_experts * self.expert_params(hidden) + self.shared_params(hidden)

    @property
    def sparsity(self) -> float:
        """Activated / total FFN weights of one layer: (k + shared) / (E + shared) in expert units (paper 5.3)."""
        return self.active_params(1) / self.total_params(1)

    @property
    def shared_expert_units(self) -> float:
        return self.num_shared_experts * self.shared_intermediate_size / self.expert_intermediate_size

    def touched_params(self, hidden: int, tokens: float) -> float:
        """Expected weights read for ``tokens`` tokens under uniform routing (all experts for a big batch)."""
        p_untouched = (1.0 - self.top_k / self.num_experts) ** tokens
        routed = self.num_experts * (1.0 - p_untouched) * self.expert_params(hidden)
        return routed + self.shared_params(hidden)


FFNGroup = DenseFFN | MoEFFN


# ====================================================================== model spec
@dataclasses.dataclass(frozen=True)
class TokenCost:
    """What one decoded token needs at a context length (the columns of the paper's Tables 2 and 3)."""

    kv_bytes: float
    attn_flops: float
    linear_flops: float
    ffn_flops: float

    @property
    def arithmetic_intensity(self) -> float:
        """Core-attention FLOPs per KV/state byte (paper 5.1)."""
        return self.attn_flops / self.kv_bytes


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model as the cost model sees it: attention groups (KV bytes and FLOPs per token) and FFN groups per layer."""

    name: str
    display_name: str
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention: tuple[AttentionGroup, ...]
    ffn: tuple[FFNGroup, ...]
    source: str = ""
    quantization: str = ""
    weight_bytes: float = 1.0  # FP8 (or INT8) weights for everything but embedding/lm_head

    def __post_init__(self):
        where = f"model {self.name!r}"
        if not self.attention:
            raise _fail(where, "needs at least one attention group")
        if not self.ffn:
            raise _fail(where, "needs at least one FFN group")
        n_attn = sum(g.num_layers for g in self.attention)
        n_ffn = sum(g.num_layers for g in self.ffn)
        if n_attn != n_ffn:
            raise _fail(where, f"attention groups cover {n_attn} layers but FFN groups cover {n_ffn}")
        for side, groups in (("attention", self.attention), ("FFN", self.ffn)):
            layer_order(groups, where=f"{where} {side}")

    @property
    def num_layers(self) -> int:
        return sum(g.num_layers for g in self.attention)

    # -------- per-token quantities (paper Tables 2/3)
    def kv_bytes(self, context: int) -> float:
        context = _check_context(context)
        return float(sum(g.kv_read_bytes(context) for g in self.attention))

    def kv_storage_bytes(self, context: int) -> float:
        """KV cache / state held for one sequence of ``context`` tokens, all layers."""
        context = _check_context(context)
        return float(sum(g.kv_storage_bytes(context) for g in self.attention))

    def attn_flops(self, context: int) -> float:
        context = _check_context(context)
        return float(sum(g.core_flops(context) for g in self.attention))

    def attention_linear_params(self) -> int:
        return sum(g.num_layers * sum(g.linear_params(self.hidden_size)) for g in self.attention)

    def linear_flops(self) -> float:
        return 2.0 * self.attention_linear_params()

    def ffn_active_params(self) -> int:
        return sum(g.num_layers * g.active_params(self.hidden_size) for g in self.ffn)

    def ffn_total_params(self) -> int:
        return sum(g.num_layers * g.total_params(self.hidden_size) for g in self.ffn)

    def ffn_flops(self) -> float:
        return 2.0 * self.ffn_active_params()

    def token_cost(self, context: int) -> TokenCost:
        return TokenCost(self.kv_bytes(context), self.attn_flops(context), self.linear_flops(), self.ffn_flops())

    def arithmetic_intensity(self, context: int) -> float:
        return self.token_cost(context).arithmetic_intensity

    # -------- parameters
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def activated_params(self) -> int:
        """Attention projections + activated FFN + embedding and lm_head (norms and routers left out)."""
        return self.attention_linear_params() + self.ffn_active_params() + self.embedding_params()

    def total_params(self) -> int:
        return self.attention_linear_params() + self.ffn_total_params() + self.embedding_params()

    @property
    def moe(self) -> MoEFFN | None:
        """The model's MoE group (the sparsest one if there are several), None for a dense model."""
        groups = [g for g in self.ffn if isinstance(g, MoEFFN)]
        return min(groups, key=lambda g: g.sparsity) if groups else None


# -------- loading specs
_ATTN_TYPES: dict[str, type] = {"gqa": GQAAttention, "mha": GQAAttention, "mfa": GQAAttention, "mla": MLAAttention}
_ATTN_TYPES["linear"] = LinearAttention
_FFN_TYPES: dict[str, type] = {"dense": DenseFFN, "moe": MoEFFN}
_INT_FIELDS = {
    "num_layers",
    "layer_step",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "window",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "intermediate_size",
    "num_experts",
    "top_k",
    "expert_intermediate_size",
    "num_shared_experts",
    "shared_intermediate_size",
}
_MODEL_KEYS = {
    "name",
    "display_name",
    "hidden_size",
    "vocab_size",
    "tie_word_embeddings",
    "attention",
    "ffn",
    "source",
    "quantization",
    "weight_bytes",
}


def _build_group(where: str, entry: Any, types: Mapping[str, type]) -> Any:
    if not isinstance(entry, dict):
        raise _fail(where, f"must be an object, got {type(entry).__name__}")
    kind = entry.get("type")
    if kind not in types:
        raise _fail(where, f"'type' must be one of {sorted(types)}, got {kind!r}")
    cls = types[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    if kind == "mfa":
        required.append("q_lora_rank")
    for name in required:
        if name not in entry:
            raise _fail(where, f"missing field '{name}' (type {kind!r})")
    kwargs: dict[str, Any] = {}
    for name, value in entry.items():
        if name == "type":
            continue
        if name not in fields:
            raise _fail(where, f"unknown field '{name}' for type {kind!r}; known: {sorted(fields)}")
        if name in _INT_FIELDS:
            if value is None and fields[name].default is None:
                kwargs[name] = None
                continue
            if name in ("num_shared_experts", "shared_intermediate_size") and value == 0:
                kwargs[name] = 0
                continue
            kwargs[name] = _check_positive_int(where, name, value)
        elif name == "output_gate":
            if not isinstance(value, bool):
                raise _fail(where, f"'output_gate' must be true or false, got {value!r}")
            kwargs[name] = value
        else:
            kwargs[name] = _check_positive(where, name, value)
    if cls is MoEFFN:
        if kwargs["top_k"] > kwargs["num_experts"]:
            raise _fail(where, f"'top_k' ({kwargs['top_k']}) exceeds 'num_experts' ({kwargs['num_experts']})")
        if kwargs.get("num_shared_experts") and not kwargs.get("shared_intermediate_size"):
            kwargs["shared_intermediate_size"] = kwargs["expert_intermediate_size"]
    if cls is GQAAttention and kwargs["num_heads"] % kwargs["num_kv_heads"]:
        raise _fail(where, f"'num_heads' ({kwargs['num_heads']}) is not a multiple of 'num_kv_heads'")
    return cls(**kwargs)


def model_spec_from_dict(data: Any, where: str = "model spec") -> ModelSpec:
    """Build a ModelSpec from the JSON schema of ``configs/models/*.json``; errors name the bad field."""
    if not isinstance(data, dict):
        raise _fail(where, f"must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _MODEL_KEYS)
    if unknown:
        raise _fail(where, f"unknown field(s) {unknown}; known: {sorted(_MODEL_KEYS)}")
    for name in ("name", "hidden_size", "vocab_size", "attention", "ffn"):
        if name not in data:
            raise _fail(where, f"missing field '{name}'")
    name = data["name"]
    if not isinstance(name, str) or not name:
        raise _fail(where, f"'name' must be a non-empty string, got {name!r}")
    where = f"{where} ({name})"
    for key in ("attention", "ffn"):
        if not isinstance(data[key], list) or not data[key]:
            raise _fail(where, f"'{key}' must be a non-empty list of layer groups")
    tie = data.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise _fail(where, f"'tie_word_embeddings' must be true or false, got {tie!r}")
    return ModelSpec(
        name=name,
        display_name=str(data.get("display_name", name)),
        hidden_size=_check_positive_int(where, "hidden_size", data["hidden_size"]),
        vocab_size=_check_positive_int(where, "vocab_size", data["vocab_size"]),
        tie_word_embeddings=tie,
        attention=tuple(
            _build_group(f"{where} attention[{i}]", e, _ATTN_TYPES) for i, e in enumerate(data["attention"])
        ),
        ffn=tuple(_build_group(f"{where} ffn[{i}]", e, _FFN_TYPES) for i, e in enumerate(data["ffn"])),
        source=str(data.get("source", "")),
        quantization=str(data.get("quantization", "")),
        weight_bytes=_check_positive(where, "weight_bytes", data.get("weight_bytes", 1.0)),
    )


def _read_json(path: Path | str, what: str) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{what} file {str(path)!r} cannot be read: {e.strerror or e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {str(path)!r} is not valid JSON: {e}") from e


def load_model_spec(path: Path | str) -> ModelSpec:
    """Read a model spec JSON (see ``configs/models/`` and docs/cost_model.md); errors name the file and field."""
    return model_spec_from_dict(_read_json(path, "model spec"), where=f"model spec {str(path)!r}")


def step3_spec(config: Step3Config = STEP3, kv_bytes: float = 1.0) -> ModelSpec:
    """Step-3's spec, derived from a Step3Config (full FP8, FP8 KV, as in the paper)."""
    moe_layers = set(config.moe_layers_enum)
    ffn: list[FFNGroup] = []
    # one group per run of consecutive dense or MoE layers, in layer order (the release: 4 dense, 56 MoE, 1 dense),
    # so layer_order puts each where the model has it
    for is_moe, run in itertools.groupby(range(config.num_hidden_layers), key=lambda i: i in moe_layers):
        n = len(list(run))
        if not is_moe:
            ffn.append(DenseFFN(n, config.intermediate_size))
            continue
        ffn.append(
            MoEFFN(
                num_layers=n,
                num_experts=config.moe_num_experts,
                top_k=config.moe_top_k,
                expert_intermediate_size=config.moe_intermediate_size,
                num_shared_experts=1,
                shared_intermediate_size=config.share_expert_dim,
            )
        )
    attention = GQAAttention(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_attention_groups,
        head_dim=config.head_dim,
        kv_bytes=kv_bytes,
        q_lora_rank=config.share_q_dim,
    )
    return ModelSpec(
        name="step3",
        display_name="Step-3",
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        tie_word_embeddings=False,
        attention=(attention,),
        ffn=tuple(ffn),
        source="step3_jax.config.Step3Config (stepfun-ai/step3 text_config)",
        quantization="paper section 4.1: full FP8 including the KV cache",
    )


def _model_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(MODELS_DIR.glob("*.json"))}


def available_models() -> list[str]:
    """Known model names: the paper's nine in its order, then any other spec under configs/models."""
    names = list(PAPER_MODELS)
    names += [n for n in _model_files() if n not in names]
    return names


def get_model(name: str) -> ModelSpec:
    """A model by name (file stem), display name (e.g. 'DSv3') or a path to a spec JSON; case-insensitive."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise ValueError(f"model spec file {name!r} does not exist")
        return load_model_spec(name)
    key = name.lower()
    if key in ("step3", "step-3"):
        return step3_spec()
    files = _model_files()
    if key in files:
        return load_model_spec(files[key])
    for path in files.values():
        spec = load_model_spec(path)
        if spec.display_name.lower() == key:
            return spec
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(available_models())}")


# ====================================================================== hardware
_HW_REQUIRED = ("name", "price_per_hour", "bf16_flops", "fp8_flops", "memory_bandwidth", "network_bandwidth")
_HW_OPTIONAL = ("gpus_per_node", "memory_capacity", "sources")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator card. FLOP/s are dense; bandwidths in bytes/s; network = this card's NIC share."""

    name: str
    price_per_hour: float
    bf16_flops: float
    fp8_flops: float | None
    memory_bandwidth: float
    network_bandwidth: float
    gpus_per_node: int = 8
    memory_capacity: float | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    @property
    def compute_flops(self) -> float:
        """The rate costs use: FP8 where supported, else BF16 (with INT8 storage, paper 4.1 / Table 5)."""
        return self.fp8_flops if self.fp8_flops else self.bf16_flops

    @property
    def cost_per_flop(self) -> float:
        return self.price_per_hour / 3600.0 / self.compute_flops

    @property
    def cost_per_byte(self) -> float:
        return self.price_per_hour / 3600.0 / self.memory_bandwidth

    @property
    def roofline(self) -> float:
        """Compute-bandwidth ratio, FLOPs per byte (paper Table 4's last column)."""
        return self.compute_flops / self.memory_bandwidth

    @property
    def node_network_bandwidth(self) -> float:
        return self.network_bandwidth * self.gpus_per_node


def hardware_from_dict(data: Any, where: str = "hardware spec") -> Hardware:
    """An accelerator from a JSON object (price, FLOP/s, bandwidths, memory); errors name ``where`` and the field."""
    if not isinstance(data, dict):
        raise _fail(where, f"must be a JSON object, got {type(data).__name__}")
    name = data.get("name")
    if isinstance(name, str) and name:
        where = f"{where} ({name})"
    unknown = sorted(set(data) - set(_HW_REQUIRED) - set(_HW_OPTIONAL))
    if unknown:
        raise _fail(where, f"unknown field(s) {unknown}; known: {sorted(_HW_REQUIRED + _HW_OPTIONAL)}")
    for field in _HW_REQUIRED:
        if field not in data:
            raise _fail(where, f"missing field '{field}'")
    if not isinstance(name, str) or not name:
        raise _fail(where, f"'name' must be a non-empty string, got {name!r}")
    fp8 = data["fp8_flops"]
    capacity = data.get("memory_capacity")
    sources = data.get("sources", {})
    if not isinstance(sources, dict):
        raise _fail(where, "'sources' must be an object mapping field -> source")
    return Hardware(
        name=name,
        price_per_hour=_check_positive(where, "price_per_hour", data["price_per_hour"]),
        bf16_flops=_check_positive(where, "bf16_flops", data["bf16_flops"]),
        fp8_flops=None if fp8 is None else _check_positive(where, "fp8_flops", fp8),
        memory_bandwidth=_check_positive(where, "memory_bandwidth", data["memory_bandwidth"]),
        network_bandwidth=_check_positive(where, "network_bandwidth", data["network_bandwidth"]),
        gpus_per_node=_check_positive_int(where, "gpus_per_node", data.get("gpus_per_node", 8)),
        memory_capacity=None if capacity is None else _check_positive(where, "memory_capacity", capacity),
        sources={str(k): str(v) for k, v in sources.items()},
    )


def load_hardware(path: Path | str) -> dict[str, Hardware]:
    """Read accelerators from JSON: {"accelerators": [...]}, a list of specs, or one spec object."""
    data = _read_json(path, "hardware")
    where = f"hardware file {str(path)!r}"
    if isinstance(data, dict) and "accelerators" in data:
        entries = data["accelerators"]
    elif isinstance(data, dict):
        entries = [data]
    else:
        entries = data
    if not isinstance(entries, list) or not entries:
        raise _fail(where, "must hold a non-empty list of accelerator specs")
    out: dict[str, Hardware] = {}
    for i, entry in enumerate(entries):
        hw = hardware_from_dict(entry, where=f"{where} entry {i}")
        if hw.name in out:
            raise _fail(where, f"accelerator {hw.name!r} is listed twice")
        out[hw.name] = hw
    return out


def default_hardware() -> dict[str, Hardware]:
    """The accelerators shipped in ``configs/hardware`` (the paper's; H100 / H200 / B200 with stated prices)."""
    return load_hardware(HARDWARE_FILE)


def select_hardware(
    names: Sequence[str] | None = None, extra: Mapping[str, Hardware] | None = None
) -> dict[str, Hardware]:
    """The named accelerators (default: the paper's four) from the bundled specs plus ``extra``.

    ``extra`` (e.g. from a user JSON) overrides bundled entries of the same name.
    """
    pool = default_hardware()
    pool.update(extra or {})
    if names is None:
        names = [n for n in PAPER_HARDWARE if n in pool] + [n for n in (extra or {}) if n not in PAPER_HARDWARE]
    lookup = {n.lower(): n for n in pool}
    out: dict[str, Hardware] = {}
    for n in names:
        if n.lower() not in lookup:
            raise ValueError(f"unknown accelerator {n!r}; known: {', '.join(pool)}")
        out[lookup[n.lower()]] = pool[lookup[n.lower()]]
    return out


# ====================================================================== cost per 1M tokens (paper 4.2)
@dataclasses.dataclass(frozen=True)
class Cost:
    """Decoding cost in USD per 1M tokens, split into its attention and FFN parts."""

    attn: float
    ffn: float

    @property
    def total(self) -> float:
        return self.attn + self.ffn


@dataclasses.dataclass(frozen=True)
class Deployment:
    """A hardware choice and its cost, USD per 1M tokens."""

    attn_hardware: str
    ffn_hardware: str
    attn: float
    ffn: float

    @property
    def total(self) -> float:
        return self.attn + self.ffn

    @property
    def label(self) -> str:
        if self.attn_hardware == self.ffn_hardware:
            return self.attn_hardware
        return f"A:{self.attn_hardware}+F:{self.ffn_hardware}"


def attention_cost(spec: ModelSpec, hw: Hardware, context: int) -> float:
    """max(attn FLOPs x U_flop, KV bytes x U_byte) + linear FLOPs x U_flop, per 1M tokens."""
    t = spec.token_cost(context)
    per_token = max(t.attn_flops * hw.cost_per_flop, t.kv_bytes * hw.cost_per_byte) + t.linear_flops * hw.cost_per_flop
    return per_token * TOKENS_PER_COST_UNIT


def ffn_cost(spec: ModelSpec, hw: Hardware) -> float:
    """Activated FFN FLOPs x U_flop per 1M tokens (compute-bound FFN, paper 4.2)."""
    return spec.ffn_flops() * hw.cost_per_flop * TOKENS_PER_COST_UNIT


def cost_per_mtok(spec: ModelSpec, hardware: Mapping[str, Hardware], context: int) -> dict[str, Cost]:
    """USD per 1M decoded tokens on each accelerator at ``context`` (paper section 4.2, Table 3)."""
    return {name: Cost(attention_cost(spec, hw, context), ffn_cost(spec, hw)) for name, hw in hardware.items()}


def best_afd(spec: ModelSpec, hardware: Mapping[str, Hardware], context: int) -> Deployment:
    """AFD: cheapest accelerator for attention plus cheapest for FFN (communication assumed hidden)."""
    costs = cost_per_mtok(spec, hardware, context)
    if not costs:
        raise ValueError("best_afd needs at least one accelerator")
    a = min(costs, key=lambda n: costs[n].attn)
    f = min(costs, key=lambda n: costs[n].ffn)
    return Deployment(a, f, costs[a].attn, costs[f].ffn)


def single_hardware(spec: ModelSpec, hardware: Mapping[str, Hardware], context: int) -> dict[str, Deployment]:
    """Non-disaggregated baseline: attention and FFN on the same accelerator type."""
    return {n: Deployment(n, n, c.attn, c.ffn) for n, c in cost_per_mtok(spec, hardware, context).items()}


def best_single(spec: ModelSpec, hardware: Mapping[str, Hardware], context: int) -> Deployment:
    """The cheapest deployment with attention and FFN on the same accelerator type."""
    options = single_hardware(spec, hardware, context)
    if not options:
        raise ValueError("best_single needs at least one accelerator")
    return min(options.values(), key=lambda d: d.total)


def training_cost(spec: ModelSpec, hw: Hardware, context: int, mfu: float = 1.0) -> float:
    """Rough training cost per 1M tokens (paper Figure 4): 3 x (core attention + linear + FFN) forward FLOPs
    at the card's cost per FLOP, divided by ``mfu``. Like the paper, the core attention is charged at the full
    context (no causal halving)."""
    mfu = _check_positive("training_cost", "mfu", mfu)
    t = spec.token_cost(context)
    fwd = t.attn_flops + t.linear_flops + t.ffn_flops
    return 3.0 * fwd * hw.cost_per_flop / mfu * TOKENS_PER_COST_UNIT


# ====================================================================== MoE sparsity (paper 5.3-5.4)
def ffn_batch_for_mfu(hw: Hardware, sparsity: float = 1.0, weight_bytes: float = 1.0) -> float:
    """Tokens per FFN instance needed to reach the roofline: B_dense = FLOP/s x weight_bytes / (2 x BW), / S."""
    return hw.compute_flops * weight_bytes / (2.0 * hw.memory_bandwidth) / sparsity


def min_moe_sparsity(
    hw: Hardware,
    hidden_size: int,
    num_layers: int,
    tpot_s: float = PAPER_TPOT_S,
    stages: int = PAPER_STAGES,
    dispatch_bytes: float = 1.0,
    combine_bytes: float = 2.0,
    weight_bytes: float = 1.0,
    network_efficiency: float = 1.0,
) -> float:
    """Sparsest MoE (activated/total FFN weights) that keeps FFN at the roofline while hiding the network.

    Paper 5.4: an FFN instance (one server of ``gpus_per_node`` cards, its NICs in aggregate) needs
    B_MoE = FLOP/s / (2 S BW) tokens per layer, moving (dispatch + combine) x H x B_MoE bytes in
    TPOT / stages / L; solving for S gives S >= (d + c) H FLOP/s L / (2 BW Net TPOT/stages), i.e. the
    paper's H x FLOPs x L / (Net x BW x 11.1 ms) for FP8 dispatch and BF16 combine.
    """
    stage_s = _check_positive("min_moe_sparsity", "tpot_s", tpot_s) / _check_positive_int(
        "min_moe_sparsity", "stages", stages
    )
    net = hw.node_network_bandwidth * _check_positive("min_moe_sparsity", "network_efficiency", network_efficiency)
    moved = (dispatch_bytes + combine_bytes) * hidden_size * hw.compute_flops * weight_bytes * num_layers
    return moved / (2.0 * hw.memory_bandwidth * net * stage_s)


def required_active_experts(moe: MoEFFN, sparsity: float) -> float:
    """Routed experts a MoE must activate to reach ``sparsity``: (E + shared) x S - shared (paper 5.4)."""
    units = moe.shared_expert_units
    return (moe.num_experts + units) * sparsity - units


# ====================================================================== AFD throughput (paper 3, 6, 7)
@dataclasses.dataclass(frozen=True)
class Efficiency:
    """Fractions of peak reached in the roofline estimate, and fixed overheads. Defaults: ideal roofline."""

    attention_bandwidth: float = 1.0
    attention_compute: float = 1.0
    ffn_bandwidth: float = 1.0
    ffn_compute: float = 1.0
    network: float = 1.0
    layer_overhead_us: float = 0.0  # added to every attention and FFN stage (launches, syncs)
    memory_fraction: float = 0.9  # share of HBM usable for weights + KV (the rest: activations, workspace)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Efficiency.{f.name} must be a number, got {value!r}")
            if f.name == "layer_overhead_us":
                if value < 0:
                    raise ValueError(f"Efficiency.layer_overhead_us must be >= 0, got {value}")
            elif not 0 < value <= 1:
                raise ValueError(f"Efficiency.{f.name} must be in (0, 1], got {value}")


# Stated, not fitted to the 4,039 result: attention reaches 40% of HBM bandwidth (what the paper's Table 9 MFA
# timings imply on H800: 37% at 8K, 44% at 32K, see docs/cost_model.md); network 80% (paper 5.4: 40 of 50 GB/s
# per NIC measured with DeepEP); FP8 expert GEMMs at 60% of peak FLOP/s and 70% of HBM bandwidth (our
# assumption for grouped GEMMs at a few hundred tokens per expert); launch/sync overheads folded in.
CALIBRATED_EFFICIENCY = Efficiency(
    attention_bandwidth=0.4, attention_compute=0.5, ffn_bandwidth=0.7, ffn_compute=0.6, network=0.8
)


@dataclasses.dataclass(frozen=True)
class AFDSetup:
    """An M:N deployment ("2A2F" = 2 attention + 2 FFN instances of ``gpus_per_instance`` cards each).

    Attention instances run data-parallel attention per card with o_proj tensor-parallel inside the instance
    (the paper's 67 MB of per-card linear weights); FFN instances hold all FFN layers, experts split evenly
    over all FFN cards (TP + EP, perfect balance assumed). ``stages`` micro-batches fill the
    ``stages``-stage pipeline; every token is sent to every FFN instance (FP8 dispatch, BF16 combine).
    """

    attention_instances: int
    ffn_instances: int
    gpus_per_instance: int = 8
    tpot_s: float = PAPER_TPOT_S
    stages: int = PAPER_STAGES
    attention_fp8: bool = True  # core attention math in FP8 (the 4,039 run) or BF16
    dispatch_bytes: float = 1.0
    combine_bytes: float = 2.0
    embedding_bytes: float = 2.0  # embedding / lm_head kept in BF16 on the attention cards
    full_duplex: bool = True  # A->F and F->A do not compete for the NIC (paper 7.1)

    def __post_init__(self):
        where = "AFDSetup"
        _check_positive_int(where, "attention_instances", self.attention_instances)
        _check_positive_int(where, "ffn_instances", self.ffn_instances)
        _check_positive_int(where, "gpus_per_instance", self.gpus_per_instance)
        _check_positive_int(where, "stages", self.stages)
        for name in ("tpot_s", "dispatch_bytes", "combine_bytes", "embedding_bytes"):
            _check_positive(where, name, getattr(self, name))

    @property
    def total_gpus(self) -> int:
        return (self.attention_instances + self.ffn_instances) * self.gpus_per_instance

    @property
    def label(self) -> str:
        return f"{self.attention_instances}A{self.ffn_instances}F"


@dataclasses.dataclass(frozen=True)
class KernelTimes:
    """Per-layer kernel times fitted from benchmark records (microseconds).

    attention_us = a + b x tokens_per_gpu + c x tokens_per_gpu x context (a column is dropped when the
    records cannot identify it: with a single batch size, b, so other batch sizes are extrapolated on
    ``a + c x tokens x context`` alone (:attr:`caveat` says so); with a single context, the fit holds at that
    context only); ffn_us = a + b x tokens (per FFN instance), for ``ffn_gpus`` FFN cards when the records name
    them (``"gpus"``: the expert split the times stand for).
    """

    hardware: str | None
    model: str | None
    attention_coef: tuple[float, float, float]
    ffn_coef: tuple[float, float] | None = None
    source: str = ""
    contexts: tuple[int, ...] = ()  # the contexts the attention records were measured at
    max_tokens_per_gpu: float = math.inf  # the largest attention record's tokens
    max_ffn_tokens: float = math.inf  # the largest FFN record's tokens
    min_attention_us: float = 0.0  # the smallest measured times (what counts as noise around 0)
    min_ffn_us: float = 0.0
    ffn_gpus: int | None = None  # the FFN cards the FFN records were measured for (None: not said)
    batch_sizes: tuple[float, ...] = ()  # the attention records' tokens per card

    # A fitted time below 0 by at most this fraction of the smallest measured time is noise (taken as 0).
    NOISE = 0.1

    @property
    def caveat(self) -> str | None:
        """What the fit cannot know and assumes (None when the records identify every term)."""
        if len(self.batch_sizes) == 1:
            return (
                f"attention measured at one batch size ({self.batch_sizes[0]:g} tokens per card): its per-token "
                f"cost is folded into the fixed time, so other batch sizes assume a + c x tokens x context"
            )
        return None

    def attention_us(self, tokens_per_gpu: float, context: int) -> float:
        """The fitted time; ``ValueError`` at another context than the only one measured (one context cannot tell
        per-token from per-KV-position time), or where the fit goes negative by more than noise (``NOISE`` of the
        smallest measured time), or at all past the measured sizes (it falls as the work grows: records far from
        affine). A negative value within the noise (a fit's intercept under zero) is taken as 0."""
        if len(self.contexts) == 1 and context != self.contexts[0]:
            raise ValueError(
                f"kernel times {self.source!r}: every attention record is at context {self.contexts[0]}, which "
                f"cannot say how the time grows with context; ask for context {self.contexts[0]}, or measure at "
                f"two or more contexts for context {context}"
            )
        a, b, c = self.attention_coef
        t = a + b * tokens_per_gpu + c * tokens_per_gpu * context
        beyond = tokens_per_gpu > self.max_tokens_per_gpu or context > max(self.contexts, default=math.inf)
        return self._not_negative(t, "attention", f"{tokens_per_gpu:g} tokens x context {context}", beyond)

    def ffn_us(self, tokens: float) -> float | None:
        if self.ffn_coef is None:
            return None
        a, b = self.ffn_coef
        return self._not_negative(a + b * tokens, "FFN", f"{tokens:g} tokens", tokens > self.max_ffn_tokens)

    def _not_negative(self, t: float, what: str, where: str, beyond: bool) -> float:
        if t > 0:
            return t
        smallest = self.min_attention_us if what == "attention" else self.min_ffn_us
        if not beyond and -t <= self.NOISE * smallest:
            return 0.0
        why = "past the measured sizes" if beyond else f"below 0 by more than noise (smallest time {smallest:.3g} us)"
        raise ValueError(
            f"kernel times {self.source!r}: the fitted {what} time at {where} is {t:.3g} us, {why}: the records are "
            f"far from affine (measure nearer to this size)"
        )


_RECORD_KEYS = {"component", "tokens_per_gpu", "tokens", "context", "time_us", "gpus", "note"}


def kernel_times_from_records(
    records: Iterable[Mapping[str, Any]], hardware: str | None = None, model: str | None = None, source: str = ""
) -> KernelTimes:
    """Fit KernelTimes from records {"component": "attention", "tokens_per_gpu", "context", "time_us"} and
    optionally {"component": "ffn", "tokens", "time_us"} (tokens = micro-batch per FFN instance)."""
    where = f"kernel times{f' {source!r}' if source else ''}"
    attn: list[tuple[float, float, float]] = []
    ffn: list[tuple[float, float]] = []
    ffn_gpus: set[int | None] = set()
    rows = list(records)
    for i, rec in enumerate(rows):
        w = f"{where} record {i}"
        if not isinstance(rec, Mapping):
            raise _fail(w, f"must be an object, got {type(rec).__name__}")
        unknown = sorted(set(rec) - _RECORD_KEYS)
        if unknown:
            raise _fail(w, f"unknown field(s) {unknown}")
        comp = rec.get("component")
        if "time_us" not in rec:
            raise _fail(w, "missing field 'time_us'")
        t = _check_positive(w, "time_us", rec["time_us"])
        if comp == "attention":
            for name in ("tokens_per_gpu", "context"):
                if name not in rec:
                    raise _fail(w, f"missing field '{name}'")
            n = _check_positive(w, "tokens_per_gpu", rec["tokens_per_gpu"])
            context = _check_positive(w, "context", rec["context"])
            if not context.is_integer():
                raise _fail(w, f"'context' must be a whole number of tokens, got {rec['context']!r}")
            attn.append((n, n * context, t))
        elif comp == "ffn":
            if "tokens" not in rec:
                raise _fail(w, "missing field 'tokens'")
            ffn.append((_check_positive(w, "tokens", rec["tokens"]), t))
            ffn_gpus.add(_check_positive_int(w, "gpus", rec["gpus"]) if "gpus" in rec else None)
        else:
            raise _fail(w, f"'component' must be 'attention' or 'ffn', got {comp!r}")
    if len({kv for _, kv, _ in attn}) < 2:
        raise _fail(where, "needs attention records at two or more different tokens x context sizes")
    a = np.array(attn)
    full = np.column_stack([np.ones(len(a)), a[:, 0], a[:, 1]])
    if np.linalg.matrix_rank(full) == 3:
        coef = np.linalg.lstsq(full, a[:, 2], rcond=None)[0]
        attention_coef = (float(coef[0]), float(coef[1]), float(coef[2]))
    else:
        coef = np.linalg.lstsq(full[:, [0, 2]], a[:, 2], rcond=None)[0]
        attention_coef = (float(coef[0]), 0.0, float(coef[1]))
    ffn_coef = None
    if ffn:
        f = np.array(ffn)
        if len(set(f[:, 0])) < 2:
            raise _fail(where, "needs ffn records at two or more different token counts (or none)")
        coef = np.linalg.lstsq(np.column_stack([np.ones(len(f)), f[:, 0]]), f[:, 1], rcond=None)[0]
        ffn_coef = (float(coef[0]), float(coef[1]))
    contexts = tuple(sorted({int(rec["context"]) for rec in rows if rec.get("component") == "attention"}))
    if len(ffn_gpus) > 1:
        said = sorted(str(n) for n in ffn_gpus)
        raise _fail(where, f"the ffn records name different FFN card counts ('gpus'; None: not said): {said}")
    return KernelTimes(
        hardware,
        model,
        attention_coef,
        ffn_coef,
        source,
        contexts,
        max_tokens_per_gpu=float(a[:, 0].max()),
        max_ffn_tokens=max((n for n, _ in ffn), default=math.inf),
        min_attention_us=float(a[:, 2].min()),
        min_ffn_us=min((t for _, t in ffn), default=0.0),
        ffn_gpus=next(iter(ffn_gpus), None),
        batch_sizes=tuple(sorted(set(a[:, 0].tolist()))),
    )


def load_kernel_times(path: Path | str) -> KernelTimes:
    """Read a benchmark JSON: {"hardware": "H800", "model": "step3", "records": [...]} (see docs/cost_model.md)."""
    data = _read_json(path, "kernel times")
    where = f"kernel times file {str(path)!r}"
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise _fail(where, "must be an object with a 'records' list")
    for name in ("hardware", "model"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise _fail(where, f"'{name}' must be a name (a string), got {data[name]!r}")
    return kernel_times_from_records(data["records"], data.get("hardware"), data.get("model"), source=str(path))


# Paper Table 9 (MFA-Step3 rows): one attention layer incl. projections, 4 cards, total batch 256 with DP
# attention (64 sequences per card), FP8 GEMMs, BF16 attention math. Measured inputs, not outputs.
PAPER_TABLE9_MFA_US = {"H800": {8192: 281.0, 32768: 791.0}, "H20": {8192: 438.0, 32768: 1452.0}}
PAPER_TABLE9_MFA_US["A800"] = {8192: 531.0, 32768: 1484.0}


def paper_table9_kernel_times(hardware: str = "H800") -> KernelTimes:
    """Kernel times from the paper's Table 9 MFA rows (one attention layer, 64 sequences per card) for ``hardware``."""
    hardware = next((k for k in PAPER_TABLE9_MFA_US if k.lower() == str(hardware).lower()), hardware)
    if hardware not in PAPER_TABLE9_MFA_US:
        raise ValueError(f"paper Table 9 has no MFA timing for {hardware!r}; it has {sorted(PAPER_TABLE9_MFA_US)}")
    records = [
        {"component": "attention", "tokens_per_gpu": 64, "context": ctx, "time_us": t}
        for ctx, t in PAPER_TABLE9_MFA_US[hardware].items()
    ]
    return kernel_times_from_records(records, hardware, "step3", source=f"paper Table 9 ({hardware})")


@dataclasses.dataclass(frozen=True)
class LayerTimes:
    """One layer's per-micro-batch stage times; the pipeline advances at the slowest (``stage_us``)."""

    attention_us: float
    communication_us: float
    ffn_us: float

    @property
    def stage_us(self) -> float:
        return max(self.attention_us, self.communication_us, self.ffn_us)


@dataclasses.dataclass(frozen=True)
class AFDEstimate:
    """What :func:`estimate_afd_throughput` finds: the largest feasible batch, TPOT, bottleneck, stage times, memory."""

    model: str
    context: int
    attention_hardware: str
    ffn_hardware: str
    setup: AFDSetup
    micro_batch: float  # sequences per micro-batch, all attention instances together (0: no batch is feasible)
    # achieved time per output token at that batch (<= setup.tpot_s when feasible); with no feasible batch, the
    # TPOT, layer times and memory are those of the smallest batch tried (one sequence per attention card)
    tpot_s: float
    bottleneck: str  # what stops a larger batch
    mean_layer: LayerTimes  # per-layer stage times averaged over layers
    attention_memory_bytes: float  # per attention card: weights + KV of all micro-batches
    ffn_memory_bytes: float  # per FFN card: FFN weights
    method: str  # "roofline" or "measured (<source>)"

    @property
    def total_batch(self) -> int:
        return round(self.micro_batch * self.setup.stages)

    @property
    def tokens_per_gpu_s(self) -> float:
        """Throughput at the achieved TPOT."""
        if not self.micro_batch:
            return 0.0
        return self.total_batch / (self.tpot_s * self.setup.total_gpus)

    @property
    def feasible(self) -> bool:
        """Whether the batch meets the TPOT target and fits in memory."""
        return bool(self.micro_batch) and not self.bottleneck.startswith("violates")

    @property
    def tokens_per_gpu_s_at_target(self) -> float | None:
        """Throughput if the step ran exactly at the TPOT target (the SLA-bound figure); None for a batch that
        misses the target or does not fit (it cannot run at the target)."""
        if not self.feasible:
            return None
        return self.total_batch / (self.setup.tpot_s * self.setup.total_gpus)


def layer_order(groups: Sequence[Any], *, where: str = "layer groups") -> list[Any]:
    """The group of each layer, first to last: groups with a ``layer_step`` on their layers (every k-th), the
    others filling the remaining layers in listed order. ``ValueError`` if a stepped group's ``num_layers`` is not
    the number of such layers, or two stepped groups claim the same layer."""
    n = sum(g.num_layers for g in groups)
    slots: list[Any] = [None] * n
    for i, g in enumerate(groups):
        if g.layer_step is None:
            continue
        layers = range(g.layer_step - 1, n, g.layer_step)
        if len(layers) != g.num_layers:
            raise _fail(
                f"{where} group {i}",
                f"'layer_step' {g.layer_step} places it on {len(layers)} of the {n} layers, but 'num_layers' is "
                f"{g.num_layers}",
            )
        for layer in layers:
            if slots[layer] is not None:
                raise _fail(f"{where} group {i}", f"layer {layer + 1} is already another group's ('layer_step')")
            slots[layer] = g
    rest = iter([g for g in groups if g.layer_step is None for _ in range(g.num_layers)])
    return [g if g is not None else next(rest) for g in slots]


def afd_layer_times(
    spec: ModelSpec,
    context: int,
    micro_batch: float,
    attn_hw: Hardware,
    ffn_hw: Hardware,
    setup: AFDSetup,
    efficiency: Efficiency = Efficiency(),
    kernel_times: KernelTimes | None = None,
) -> list[LayerTimes]:
    """Per-layer attention / communication / FFN stage times (us) for one micro-batch of ``micro_batch`` tokens.

    Layer ``i``'s attention group meets layer ``i``'s FFN group (:func:`layer_order`: listed order, or every
    ``layer_step``-th layer, as Llama 4 interleaves its global-attention and MoE layers).
    """
    context = _check_context(context)
    g = setup.gpus_per_instance
    h = spec.hidden_size
    wb = spec.weight_bytes
    eff = efficiency
    tok_gpu = micro_batch / (setup.attention_instances * g)
    tok_inst = micro_batch / setup.attention_instances
    ffn_gpus = setup.ffn_instances * g
    core_rate = attn_hw.fp8_flops if (setup.attention_fp8 and attn_hw.fp8_flops) else attn_hw.bf16_flops
    if kernel_times is not None and len(spec.attention) != 1:
        raise ValueError(f"measured kernel times need a model with one attention design; {spec.name} has several")
    if kernel_times is not None and kernel_times.ffn_coef is not None and kernel_times.ffn_gpus not in (None, ffn_gpus):
        raise ValueError(
            f"kernel times {kernel_times.source!r}: the FFN records were measured for {kernel_times.ffn_gpus} FFN "
            f"cards (their expert split), but {setup.label} with {g} cards per instance has {ffn_gpus}: measure at "
            f"that split, or use kernel times without FFN records (the FFN roofline)"
        )

    # Network: attention instance sends its tokens to every FFN instance and gets partial results back.
    net_attn = attn_hw.network_bandwidth * g * eff.network
    net_ffn = ffn_hw.network_bandwidth * g * eff.network
    a_send = tok_inst * h * setup.dispatch_bytes * setup.ffn_instances / net_attn
    a_recv = tok_inst * h * setup.combine_bytes * setup.ffn_instances / net_attn
    f_recv = micro_batch * h * setup.dispatch_bytes / net_ffn
    f_send = micro_batch * h * setup.combine_bytes / net_ffn
    if setup.full_duplex:
        comm = max(a_send, a_recv, f_recv, f_send)
    else:
        comm = max(a_send + a_recv, f_recv + f_send)
    comm_us = comm * 1e6

    out = []
    for attn, ffn in zip(layer_order(spec.attention), layer_order(spec.ffn), strict=True):
        if kernel_times is not None:
            attn_us = kernel_times.attention_us(tok_gpu, context)
        else:
            rep, o = attn.linear_params(h)
            per_layer_kv = attn.kv_read_bytes(context) / attn.num_layers
            bytes_ = tok_gpu * per_layer_kv + (rep + o / g) * wb
            t_mem = bytes_ / (attn_hw.memory_bandwidth * eff.attention_bandwidth)
            t_core = tok_gpu * attn.core_flops_per_layer(context) / (core_rate * eff.attention_compute)
            t_lin = 2.0 * tok_gpu * (rep + o) / (attn_hw.compute_flops * eff.attention_compute)
            attn_us = max(t_mem, t_core + t_lin) * 1e6 + eff.layer_overhead_us
        measured_ffn = kernel_times.ffn_us(micro_batch / setup.ffn_instances) if kernel_times else None
        if measured_ffn is not None:
            ffn_us = measured_ffn
        else:
            f_bytes = ffn.touched_params(h, micro_batch) * wb / ffn_gpus
            f_flops = 2.0 * micro_batch * ffn.active_params(h) / ffn_gpus
            t_mem = f_bytes / (ffn_hw.memory_bandwidth * eff.ffn_bandwidth)
            t_cmp = f_flops / (ffn_hw.compute_flops * eff.ffn_compute)
            ffn_us = max(t_mem, t_cmp) * 1e6 + eff.layer_overhead_us
        out.append(LayerTimes(attn_us, comm_us, ffn_us))
    return out


def afd_memory(spec: ModelSpec, context: int, micro_batch: int, setup: AFDSetup) -> tuple[float, float]:
    """(bytes per attention card, bytes per FFN card): weights, plus the KV of all in-flight micro-batches."""
    g = setup.gpus_per_instance
    h = spec.hidden_size
    attn_w = 0.0
    for a in spec.attention:
        rep, o = a.linear_params(h)
        attn_w += a.num_layers * (rep + o / g) * spec.weight_bytes
    attn_w = attn_w + spec.embedding_params() * setup.embedding_bytes
    seqs_per_gpu = setup.stages * micro_batch / (setup.attention_instances * g)
    attn_bytes = attn_w + seqs_per_gpu * spec.kv_storage_bytes(context)
    ffn_bytes = spec.ffn_total_params() * spec.weight_bytes / (setup.ffn_instances * g)
    return attn_bytes, ffn_bytes


def _afd_at(
    spec: ModelSpec,
    context: int,
    micro_batch: int,
    attn_hw: Hardware,
    ffn_hw: Hardware,
    setup: AFDSetup,
    efficiency: Efficiency,
    kernel_times: KernelTimes | None,
) -> tuple[float, list[LayerTimes], float, float, str | None]:
    """(TPOT, layer times, attention-card bytes, FFN-card bytes, violated constraint or None)."""
    layers = afd_layer_times(spec, context, micro_batch, attn_hw, ffn_hw, setup, efficiency, kernel_times)
    tpot = setup.stages * sum(lt.stage_us for lt in layers) * 1e-6
    mem_a, mem_f = afd_memory(spec, context, micro_batch, setup)
    usable_a = attn_hw.memory_capacity * efficiency.memory_fraction if attn_hw.memory_capacity else math.inf
    usable_f = ffn_hw.memory_capacity * efficiency.memory_fraction if ffn_hw.memory_capacity else math.inf
    reason = None
    if mem_f > usable_f:
        reason = (
            f"FFN weights do not fit ({mem_f / 1e9:.1f} GB > {usable_f / 1e9:.1f} GB usable per {ffn_hw.name} card)"
        )
    elif mem_a > usable_a:
        reason = f"attention-card memory (weights + KV {mem_a / 1e9:.1f} GB > {usable_a / 1e9:.1f} GB usable)"
    elif tpot > setup.tpot_s * (1 + 1e-12):
        sums = {
            "attention": sum(lt.attention_us for lt in layers),
            "communication": sum(lt.communication_us for lt in layers),
            "FFN": sum(lt.ffn_us for lt in layers),
        }
        reason = f"TPOT target ({max(sums, key=sums.get)} stage limits)"
    return tpot, layers, mem_a, mem_f, reason


def evaluate_afd(
    spec: ModelSpec,
    context: int,
    total_batch: int,
    attn_hw: Hardware,
    ffn_hw: Hardware | None = None,
    setup: AFDSetup = AFDSetup(2, 2),
    efficiency: Efficiency = Efficiency(),
    kernel_times: KernelTimes | None = None,
) -> AFDEstimate:
    """TPOT and tokens/GPU/s at a fixed total batch (e.g. the paper's 6,144); ``bottleneck`` names a
    violated constraint (SLA or memory), or says the batch is feasible."""
    context = _check_context(context)
    _check_positive_int("evaluate_afd", "total_batch", total_batch)
    ffn_hw = ffn_hw or attn_hw
    micro = total_batch / setup.stages
    tpot, layers, mem_a, mem_f, reason = _afd_at(spec, context, micro, attn_hw, ffn_hw, setup, efficiency, kernel_times)
    method = f"measured ({kernel_times.source})" if kernel_times else "roofline"
    return AFDEstimate(
        spec.name,
        context,
        attn_hw.name,
        ffn_hw.name,
        setup,
        micro,
        tpot,
        f"violates: {reason}" if reason else "feasible (fixed batch)",
        _mean(layers),
        mem_a,
        mem_f,
        method,
    )


def estimate_afd_throughput(
    spec: ModelSpec,
    context: int,
    attn_hw: Hardware,
    ffn_hw: Hardware | None = None,
    setup: AFDSetup = AFDSetup(2, 2),
    efficiency: Efficiency = Efficiency(),
    kernel_times: KernelTimes | None = None,
    max_tokens_per_gpu: int = 1 << 16,
) -> AFDEstimate:
    """Largest micro-batch (a whole number of sequences per attention card) meeting the TPOT target and
    fitting in memory, and the resulting tokens/GPU/s.

    TPOT = stages x sum over layers of max(attention, communication, FFN) stage time: with ``stages``
    micro-batches in flight each stage serves every micro-batch once per layer. Every time and byte count is
    non-decreasing in the batch, so a bisection finds the largest feasible one.
    """
    context = _check_context(context)
    ffn_hw = ffn_hw or attn_hw
    per_gpu = setup.attention_instances * setup.gpus_per_instance

    def why(t: int) -> str | None:
        return _afd_at(spec, context, t * per_gpu, attn_hw, ffn_hw, setup, efficiency, kernel_times)[-1]

    method = f"measured ({kernel_times.source})" if kernel_times else "roofline"
    lo, reason = 0, why(1)
    if reason is None:
        lo, hi = 1, 2
        while hi <= max_tokens_per_gpu and why(hi) is None:
            lo, hi = hi, hi * 2
        hi = min(hi, max_tokens_per_gpu + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if why(mid) is None:
                lo = mid
            else:
                hi = mid
        reason = why(hi) if hi <= max_tokens_per_gpu else f"search cap ({max_tokens_per_gpu} per attention card)"
    tpot, layers, mem_a, mem_f, _ = _afd_at(
        spec, context, max(lo, 1) * per_gpu, attn_hw, ffn_hw, setup, efficiency, kernel_times
    )
    return AFDEstimate(
        spec.name,
        context,
        attn_hw.name,
        ffn_hw.name,
        setup,
        lo * per_gpu,
        tpot,
        reason,
        _mean(layers),
        mem_a,
        mem_f,
        method,
    )


def _mean(layers: Sequence[LayerTimes]) -> LayerTimes:
    n = len(layers)
    return LayerTimes(
        sum(lt.attention_us for lt in layers) / n,
        sum(lt.communication_us for lt in layers) / n,
        sum(lt.ffn_us for lt in layers) / n,
    )


def stage_budget_us(spec: ModelSpec, tpot_s: float = PAPER_TPOT_S, stages: int = PAPER_STAGES) -> float:
    """Per-layer, per-stage time budget: TPOT / stages / layers (about 272 us for Step-3, paper 6)."""
    return tpot_s / stages / spec.num_layers * 1e6

"""The full-size model's parameter shapes, from jax.eval_shape, against the spec's checkpoint table."""

from step3_jax.checkpoint import hf_shapes
from step3_jax.config import STEP3
from step3_jax.model import abstract_model

# ../shared/spec/step3-architecture.md, "Hugging Face checkpoint layout".
SPEC_LAYER = {
    "input_layernorm.weight": (7168,),
    "post_attention_layernorm.weight": (7168,),
    "self_attn.q_proj.weight": (2048, 7168),
    "self_attn.inter_norm.weight": (2048,),
    "self_attn.wq.weight": (16384, 2048),
    "self_attn.k_proj.weight": (256, 7168),
    "self_attn.v_proj.weight": (256, 7168),
    "self_attn.o_proj.weight": (7168, 16384),
}
SPEC_DENSE = {
    "mlp.gate_proj.weight": (18432, 7168),
    "mlp.up_proj.weight": (18432, 7168),
    "mlp.down_proj.weight": (7168, 18432),
}
SPEC_MOE = {
    "moe.gate.weight": (48, 7168),
    "moe.gate_proj.weight": (48, 5120, 7168),
    "moe.up_proj.weight": (48, 5120, 7168),
    "moe.down_proj.weight": (48, 7168, 5120),
    "share_expert.gate_proj.weight": (5120, 7168),
    "share_expert.up_proj.weight": (5120, 7168),
    "share_expert.down_proj.weight": (7168, 5120),
}


def test_full_size_shapes_match_checkpoint_table():
    model = abstract_model(STEP3)  # ShapeDtypeStructs only: 316B parameters are never allocated
    got = hf_shapes(model)
    want = {
        "model.embed_tokens.weight": (128815, 7168),
        "model.norm.weight": (7168,),
        "lm_head.weight": (128815, 7168),
    }
    for i in range(61):
        ffn = SPEC_DENSE if i in (0, 1, 2, 3, 60) else SPEC_MOE
        for key, shape in {**SPEC_LAYER, **ffn}.items():
            want[f"model.layers.{i}.{key}"] = shape
    assert got == want
    assert str(model.lm_head.get_value().dtype) == "bfloat16"

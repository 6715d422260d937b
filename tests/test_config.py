import dataclasses
import json

import pytest

from step3_jax import Step3Config, count_params, get_preset
from step3_jax.config import PRESETS, STEP3


def test_step3_preset_is_the_release():
    c = STEP3
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (7168, 61, 128815)
    assert (c.num_attention_heads, c.num_attention_groups, c.head_dim, c.share_q_dim) == (64, 1, 256, 2048)
    assert (c.moe_num_experts, c.moe_top_k, c.moe_intermediate_size, c.share_expert_dim) == (48, 3, 5120, 5120)
    assert c.moe_layers_enum == tuple(range(4, 60))
    assert [i for i in range(61) if not c.is_moe_layer(i)] == [0, 1, 2, 3, 60]
    assert c.rope_theta == 500000.0 and c.max_position_embedding == 65536 and c.rms_norm_eps == 1e-5
    assert c.norm_expert_weight is False and c.intermediate_size == 18432


def test_param_counts_eval_shape_match_closed_form_and_paper():
    counts = count_params(STEP3)  # eval_shape of the real module: nothing allocated
    closed = STEP3.closed_form_param_counts()
    assert counts["total"] == closed["total"]
    assert counts["active"] == closed["active"]
    assert round(counts["total"] / 1e9, 1) == 316.3
    assert round(counts["active"] / 1e9, 1) == 38.8
    assert round((counts["active"] - counts["embeddings"]) / 1e9, 1) == 37.0


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"step3"}))
def test_small_presets_count_consistently(name):
    cfg = get_preset(name)
    counts, closed = count_params(cfg), cfg.closed_form_param_counts()
    assert (counts["total"], counts["active"]) == (closed["total"], closed["active"])
    assert counts["active"] < counts["total"]


VLM_CONFIG = {
    "model_type": "step3_vl",
    "bos_token_id": 0,
    "eos_token_id": 128805,
    "vision_config": {"hidden_size": 1792, "num_hidden_layers": 63},
    "text_config": {
        "model_type": "step3_text",
        "hidden_size": 7168,
        "num_hidden_layers": 61,
        "vocab_size": 128815,
        "num_attention_heads": 64,
        "num_attention_groups": 1,
        "head_dim": 256,
        "share_q_dim": 2048,
        "intermediate_size": 18432,
        "moe_num_experts": 48,
        "moe_top_k": 3,
        "moe_intermediate_size": 5120,
        "share_expert_dim": 5120,
        "moe_layers_enum": ",".join(str(i) for i in range(4, 60)),
        "norm_expert_weight": False,
        "rope_theta": 500000,
        "max_position_embedding": 65536,
        "torch_dtype": "bfloat16",
    },
}


def test_from_vlm_config_equals_preset():
    assert Step3Config.from_hf_config(VLM_CONFIG) == STEP3


def test_from_bare_text_config_and_default_moe_layers():
    text = dict(VLM_CONFIG["text_config"])
    assert Step3Config.from_hf_config(text).moe_layers_enum == tuple(range(4, 60))
    del text["moe_layers_enum"]
    cfg = Step3Config.from_hf_config(text)
    assert cfg.moe_layers_enum == tuple(range(1, 61))  # the reference default: layers 1..L-1
    assert not cfg.is_moe_layer(0)


def test_rope_parameters_of_newer_exports():
    """Newer ``transformers`` write ``rope_parameters`` instead of ``rope_theta``: its theta is read, and any rope
    type other than the default (or a theta that contradicts the top-level one) is refused, naming the key."""
    text = dict(VLM_CONFIG["text_config"])
    del text["rope_theta"]
    cfg = Step3Config.from_hf_config(dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    assert cfg.rope_theta == 10000.0
    assert Step3Config.from_hf_config(dict(text, rope_parameters={"rope_type": "default"})) == STEP3
    with pytest.raises(ValueError, match="rope_parameters.*'yarn'"):
        Step3Config.from_hf_config(dict(text, rope_parameters={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="rope_theta 500000 and rope_parameters.rope_theta 10000"):
        Step3Config.from_hf_config(dict(text, rope_theta=500000, rope_parameters={"rope_theta": 10000}))
    with pytest.raises(ValueError, match="rope_parameters must be an object"):
        Step3Config.from_hf_config(dict(text, rope_parameters=[1]))


def test_hf_round_trip_through_json():
    for cfg in PRESETS.values():
        hf = json.loads(json.dumps(cfg.to_hf_config()))
        assert isinstance(hf["moe_layers_enum"], str)
        assert Step3Config.from_hf_config(hf) == cfg


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(num_attention_heads=6, num_attention_groups=4), "num_attention_heads"),
        (dict(moe_layers_enum=(1, 7)), "moe_layers_enum"),
        (dict(hidden_size="40"), "hidden_size"),
        (dict(hidden_size=40.0), "hidden_size"),
        (dict(moe_top_k=9), "moe_top_k"),
        (dict(head_dim=15), "head_dim"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(norm_expert_weight="no"), "norm_expert_weight"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(param_dtype="float8"), "param_dtype"),
        (dict(eos_token_id="x"), "eos_token_id"),
        (dict(eos_token_id=(2, -1)), "eos_token_id"),
        (dict(eos_token_id=()), "eos_token_id"),
        (dict(bos_token_id=True), "bos_token_id"),
    ],
)
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(get_preset("test"), **change)


def test_bad_hf_config_names_the_field():
    bad = dict(VLM_CONFIG["text_config"], moe_layers_enum="4,5,x")
    with pytest.raises(ValueError, match="moe_layers_enum"):
        Step3Config.from_hf_config(bad)
    bad = dict(VLM_CONFIG["text_config"], moe_layers_enum="4,61")
    with pytest.raises(ValueError, match="moe_layers_enum.*61"):
        Step3Config.from_hf_config(bad)
    qc = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": 128, "activation_scheme": "dynamic"}
    with pytest.raises(ValueError, match="weight_block_size 128 is not supported"):
        Step3Config.from_hf_config(dict(VLM_CONFIG["text_config"], quantization_config=qc))
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("step4")

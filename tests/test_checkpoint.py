"""Hugging Face checkpoint interop: tiny random checkpoints written in the exact HF layout (with the reference
``safetensors`` writer and layout code of this test, not the loader's), loaded, compared, saved, broken."""

import dataclasses
import functools
import json
import logging
import re
import shutil
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from infer import inspect_checkpoint as inspect_cli
from step3_jax import Step3Config, Step3ForCausalLM, get_preset, load_pretrained, make_mesh, save_pretrained
from step3_jax.checkpoint import hf as hf_mod
from step3_jax.checkpoint import safetensors_io
from step3_jax.checkpoint.safetensors_io import MIN_SKIP_BYTES, SafetensorsWriter, read_extent, read_header, read_tensor
from step3_jax.quant import FP8_DTYPE, dequantize_blockwise, quantize_blockwise
from step3_jax.sharding import DEFAULT_RULES
from step3_jax.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

BF16 = np.dtype(ml_dtypes.bfloat16)
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
ATTN_PROJ = ("q_proj", "wq", "k_proj", "v_proj", "o_proj")


# ---------------------------------------------------------------------- writing checkpoints the HF way


def hf_tensors(model) -> dict[str, np.ndarray]:
    """Every parameter under its HF key in torch [out, in] layout, spelled out here per module kind."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = np.asarray(var.get_value())
        names = [str(p) for p in path]
        leaf = names[-1]
        if leaf.endswith("_scale_inv"):  # FP8 scales, stored as in HF already
            key = ".".join(names[:-1] + [leaf.removesuffix("_scale_inv"), "weight_scale_inv"])
        elif leaf == "weight":  # norms
            key = ".".join(names)
        else:
            key = ".".join(names + ["weight"])
        key = key if key.startswith("lm_head") else "model." + key
        if a.dtype == F8 or leaf.endswith("_scale_inv") or leaf in ("embed_tokens", "weight"):
            hf = a
        elif leaf in ("q_proj", "k_proj", "v_proj"):  # [D, Q] / [D, G, K] -> [Q | G*K, D]
            hf = a.reshape(a.shape[0], -1).T
        elif leaf == "wq":  # [Q, H, K] -> [H*K, Q]
            hf = a.reshape(a.shape[0], -1).T
        elif leaf == "o_proj":  # [H, K, D] -> [D, H*K]
            hf = a.reshape(-1, a.shape[-1]).T
        elif a.ndim == 3:  # stacked experts [E, in, out] -> [E, out, in]
            hf = a.transpose(0, 2, 1)
        else:  # mlp / share_expert / router / lm_head [in, out] -> [out, in]
            hf = a.T
        out[key] = np.ascontiguousarray(hf)
    return out


VISION = {
    "vision_model.embeddings.patch_embedding.weight": np.ones((4, 3, 2, 2), np.float32),
    "vit_downsampler.weight": np.ones((4, 4), BF16),
    "vit_large_projector.weight": np.ones((6, 4), BF16),
}


def vlm_config(config: Step3Config) -> dict:
    text = config.to_hf_config()
    top = {
        "model_type": "step3_vl",
        "architectures": ["Step3VLForConditionalGeneration"],
        "text_config": text,
        "vision_config": {"hidden_size": 4, "num_hidden_layers": 1},
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }
    if "quantization_config" in text:
        top["quantization_config"] = text.pop("quantization_config")
    return top


def write_checkpoint(folder, tensors: dict, hf_config: dict, num_files: int = 3):
    """safetensors shards written by the reference library, an index over them, and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(tensors)
    weight_map = {}
    for i in range(num_files):
        name = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::num_files]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(v.nbytes for v in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(hf_config))
    return folder


def random_model(config: Step3Config, seed: int) -> Step3ForCausalLM:
    """The model with random numpy weights (no compilation needed): FP8 weights get e4m3 values spread over
    the format's range and positive per-block scales, so the real weights have a sensible size."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Step3ForCausalLM(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(state):
        shape, dtype, name = var.shape, np.dtype(var.dtype), str(path[-1])
        if dtype == F8:
            value = np.clip(rng.normal(size=shape) * 64, -448, 448)
        elif name.endswith("_scale_inv"):
            value = rng.uniform(0.5, 1.5, shape) * (var.shape[-1] * 128) ** -0.5 / 64
        elif name == "weight":  # norms
            value = 1 + 0.1 * rng.normal(size=shape)
        else:
            value = rng.normal(size=shape) * (1.0 if name == "embed_tokens" else shape[-2] ** -0.5)
        var.set_value(jnp.asarray(np.asarray(value, np.float32).astype(dtype)))
    return nnx.merge(graphdef, state)


def params(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_params_identical(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and pa[k].shape == pb[k].shape, k
        assert np.array_equal(pa[k].view(np.uint8), pb[k].view(np.uint8)), k


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def forward(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, ids))


def ids_for(config, batch=4, length=9):
    return jnp.asarray(np.random.default_rng(5).integers(3, config.vocab_size, (batch, length)), jnp.int32)


def fp8_config(test_config):
    # several full 128-blocks and partial ones in every FFN and attention dimension (q rank 136, heads x head_dim
    # 4 x 64 = 256: two whole blocks, so a tensor-parallel split of 2 keeps whole blocks), one dense and one MoE layer
    return dataclasses.replace(
        test_config,
        hidden_size=160,
        share_q_dim=136,
        head_dim=64,
        intermediate_size=300,
        moe_intermediate_size=288,
        share_expert_dim=200,
        moe_num_experts=4,
        num_hidden_layers=2,
        moe_layers_enum=(1,),
        quantization="fp8",
    )


# ---------------------------------------------------------------------- fixtures (built once per session)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    config = get_preset("test")  # bfloat16 parameters
    model = random_model(config, seed=11)
    tensors = hf_tensors(model)
    folder = write_checkpoint(tmp_path_factory.mktemp("bf16"), {**tensors, **VISION}, vlm_config(config))
    return folder, model, tensors


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory, test_config):
    config = fp8_config(test_config)
    model = random_model(config, seed=3)
    tensors = hf_tensors(model)
    folder = write_checkpoint(tmp_path_factory.mktemp("fp8"), tensors, vlm_config(config), num_files=2)
    return folder, model, tensors


# ---------------------------------------------------------------------- BF16: load, forward, save, round trip


def test_bf16_load_equals_source_model_and_skips_vision(bf16_ckpt, caplog):
    folder, source, tensors = bf16_ckpt
    assert {str(t.dtype) for t in tensors.values()} == {"bfloat16"}
    with caplog.at_level(logging.INFO, logger="step3_jax.checkpoint.hf"):
        model = load_pretrained(folder, progress=False)
    assert model.config == source.config
    assert_params_identical(model, source)
    ids = ids_for(model.config)
    np.testing.assert_array_equal(forward(model, ids), forward(source, ids))
    assert "skipping 3 vision tensors" in caplog.text


def test_save_load_round_trip_is_bit_exact(bf16_ckpt, tmp_path):
    folder, source, tensors = bf16_ckpt
    model = load_pretrained(folder, progress=False)
    out = save_pretrained(model, tmp_path / "a", shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert set(index["weight_map"]) == set(tensors)  # vision weights are not part of the text model
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for name in files:
        assert (out / name).stat().st_size <= 40_000 + 4096  # data plus header
        # the reference reader reads what we wrote: same keys, dtypes, bytes as the source checkpoint
        with safe_open(str(out / name), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert index["weight_map"][key] == name
                got = f.get_tensor(key)
                assert got.dtype == tensors[key].dtype and np.array_equal(
                    got.view(np.uint8), tensors[key].view(np.uint8)
                )
    assert Step3Config.from_hf_config(json.loads((out / "config.json").read_text())) == source.config
    again = load_pretrained(out, progress=False)
    assert_params_identical(again, source)
    out2 = save_pretrained(again, tmp_path / "b", shard_size=40_000)
    for name in [*files, "model.safetensors.index.json", "config.json"]:
        assert (out / name).read_bytes() == (out2 / name).read_bytes(), name
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def _fail_the_12th_tensor_write(monkeypatch) -> list[str]:
    """Make the 12th tensor a save writes fail with "disk full"; returns the files written to, in order."""
    real_write, writes = SafetensorsWriter.write, []

    def failing_write(self, array):
        writes.append(self.path.name)
        if len(writes) == 12:
            raise OSError("disk full")
        real_write(self, array)

    monkeypatch.setattr(SafetensorsWriter, "write", failing_write)
    return writes


def test_interrupted_save_leaves_nothing_that_looks_complete(bf16_ckpt, tmp_path, monkeypatch):
    source = bf16_ckpt[1]
    writes = _fail_the_12th_tensor_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(source, tmp_path / "x", shard_size=20_000)
    names = sorted(p.name for p in (tmp_path / "x").iterdir())
    assert writes[-1] not in names  # the shard being written never appears under its name
    assert "model.safetensors.index.json" not in names and not any(n.startswith(".") for n in names)
    for name in names:  # shards finished before the failure are whole files
        read_header(tmp_path / "x" / name)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "x", progress=False)  # no config.json / index: not mistaken for a checkpoint


def test_interrupted_save_over_a_checkpoint_is_not_loaded(bf16_ckpt, tmp_path, monkeypatch):
    """A save over an earlier checkpoint that fails part-way leaves old and new shards side by side: its index is
    gone before the first shard is replaced, and shards without an index are refused (never loaded as a mix)."""
    source = bf16_ckpt[1]
    out = save_pretrained(source, tmp_path / "x", shard_size=20_000)
    assert load_pretrained(out, progress=False) is not None
    _fail_the_12th_tensor_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(source, out, shard_size=20_000)
    monkeypatch.undo()
    assert (out / "config.json").exists() and not (out / "model.safetensors.index.json").exists()
    with pytest.raises(FileNotFoundError, match=r"shards of a sharded checkpoint .* but no model\.safetensors\.index"):
        load_pretrained(out, progress=False)


def test_single_file_and_dtype_override(bf16_ckpt, tmp_path):
    _, source, tensors = bf16_ckpt
    folder = tmp_path / "one"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(source.config.to_hf_config()))  # a bare step3_text config
    model = load_pretrained(folder, dtype="float32", progress=False)
    assert model.config.param_dtype == "float32"
    for k, v in params(model).items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, params(source)[k].astype(np.float32))  # bf16 -> f32 is exact


# ---------------------------------------------------------------------- block FP8


def test_fp8_load_keeps_fp8_and_equals_source(fp8_ckpt, tmp_path, monkeypatch):
    folder, source, tensors = fp8_ckpt
    expert = tensors["model.layers.1.moe.gate_proj.weight"]
    assert expert.dtype == F8 and expert.shape == (4, 288, 160)
    assert tensors["model.layers.1.moe.gate_proj.weight_scale_inv"].shape == (4, 3, 2)  # partial blocks
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)
    # the attention projections are block-FP8 too, in the HF [out, in] layout with their scales beside them
    for name, shape in {"q_proj": (136, 160), "wq": (256, 136), "k_proj": (64, 160), "o_proj": (160, 256)}.items():
        key = f"model.layers.0.self_attn.{name}.weight"
        assert tensors[key].dtype == F8 and tensors[key].shape == shape, key
        assert tensors[key + "_scale_inv"].shape == (-(-shape[0] // 128), -(-shape[1] // 128)), key
    # the checkpoint's FP8 bytes and scales are placed as they are: nothing is dequantised or requantised
    monkeypatch.setattr(hf_mod, "_host_blockwise", lambda *a, **k: pytest.fail("FP8 tensor converted on load"))
    model = load_pretrained(folder, progress=False)
    monkeypatch.undo()
    assert model.config.quantization == "fp8"
    assert model.layers[1].moe.gate_proj.get_value().dtype == FP8_DTYPE
    assert model.layers[0].self_attn.wq.get_value().dtype == FP8_DTYPE
    assert_params_identical(model, source)
    ids = ids_for(model.config)
    np.testing.assert_array_equal(forward(model, ids), forward(source, ids))
    # save -> load -> save: the block-FP8 format, bit-exact (attention projections included)
    out = save_pretrained(model, tmp_path / "fp8", shard_size=100_000)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    headers = {}
    for f in out.glob("model-*.safetensors"):
        headers.update(read_header(f)[0])
    assert headers.keys() == tensors.keys()
    assert headers["model.layers.1.self_attn.o_proj.weight"].dtype == "F8_E4M3"
    assert headers["model.layers.1.self_attn.o_proj.weight_scale_inv"].dtype == "F32"
    for key, info in headers.items():
        want = tensors[key]
        got = read_tensor(info)
        assert got.dtype == want.dtype and np.array_equal(got.view(np.uint8), want.view(np.uint8)), key
    assert_params_identical(load_pretrained(out, progress=False), source)


def test_fp8_checkpoint_with_a_float_weight_loads_it_quantised_and_says_so(fp8_ckpt, tmp_path, caplog):
    """An FP8 checkpoint may keep some weights in BF16 (its ignored layers): the model's FP8 weight is then that
    weight block-quantised, and the load says which."""
    folder = _copy(fp8_ckpt[0], tmp_path)
    key = "model.layers.0.mlp.gate_proj.weight"
    tensors = fp8_ckpt[2]
    dense = np.asarray(dequantize_blockwise(tensors[key], tensors[key + "_scale_inv"], dtype=jnp.float32))

    def to_float(t):  # (the weight and its scales may sit in different shards)
        t = {k: v for k, v in t.items() if k != key + "_scale_inv"}
        return {**t, key: dense.astype(ml_dtypes.bfloat16)} if key in t else t

    _rewrite(folder, to_float)
    with caplog.at_level(logging.WARNING, logger="step3_jax.checkpoint.hf"):
        model = load_pretrained(folder, progress=False)
    assert "1 weights the checkpoint stores in float are block-quantised to FP8 on load" in caplog.text
    assert key in caplog.text
    mlp = model.layers[0].mlp.gate_proj
    got = dequantize_blockwise(mlp.get_value(), model.layers[0].mlp.gate_proj_scale_inv.get_value(), dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), dense, rtol=0.07, atol=1e-3)


def test_fp8_dequantised_load_equals_direct_dequantisation(fp8_ckpt):
    folder, _, tensors = fp8_ckpt
    plain = load_pretrained(folder, quantization=None, progress=False)  # everything dequantised to float32
    assert plain.config.quantization is None
    assert plain.layers[0].self_attn.wq.get_value().shape == (136, 4, 64)  # the float model's own layout
    hf_plain = hf_tensors(plain)
    assert set(hf_plain) == {k for k in tensors if not k.endswith("_scale_inv")}
    for key, value in hf_plain.items():
        if tensors[key].dtype == F8:
            want = np.asarray(dequantize_blockwise(tensors[key], tensors[key + "_scale_inv"], dtype=jnp.float32))
        else:
            want = tensors[key]
        assert value.dtype == np.float32 and np.array_equal(value, want), key
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == F8  # attention was dequantised too


def test_bf16_checkpoint_quantised_on_load(tmp_path, test_config):
    # A float checkpoint of FP8-sized dims, loaded as an FP8 model: FFN and attention weights are block-quantised
    # on the way.
    config = dataclasses.replace(fp8_config(test_config), quantization=None)
    tensors = hf_tensors(random_model(config, seed=4))
    folder = write_checkpoint(tmp_path / "f32", tensors, config.to_hf_config(), num_files=1)
    model = load_pretrained(folder, quantization="fp8", progress=False)
    hf = hf_tensors(model)
    keys = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.moe.down_proj.weight"]
    keys += [f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ATTN_PROJ]
    for key in keys:
        q, s = quantize_blockwise(jnp.asarray(tensors[key]))
        assert hf[key].dtype == F8 and np.array_equal(hf[key].view(np.uint8), np.asarray(q).view(np.uint8)), key
        np.testing.assert_array_equal(hf[key.replace(".weight", ".weight_scale_inv")], s)
    assert hf["model.layers.0.self_attn.inter_norm.weight"].dtype == np.float32  # norms stay float


# ---------------------------------------------------------------------- on a mesh of 8 devices


def _assert_sharded_as_rules_say(model, mesh):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        want = DEFAULT_RULES.sharding(mesh, var.get_metadata()["logical_axes"], value.shape)
        assert value.sharding.is_equivalent_to(want, value.ndim), path


def test_load_onto_mesh_bf16_checkpoint(bf16_ckpt):
    folder, source, tensors = bf16_ckpt
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = load_pretrained(folder, dtype="float32", mesh=mesh, progress=False)
    _assert_sharded_as_rules_say(sharded, mesh)
    q = sharded.layers[0].self_attn.wq.get_value()  # [Q, H, K], heads over tensor
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2])
    single = load_pretrained(folder, dtype="float32", progress=False)
    assert_params_identical(sharded, single)
    ids = ids_for(single.config, batch=8)
    got = forward(sharded, jax.device_put(ids, DEFAULT_RULES.sharding(mesh, ("act_batch", None), ids.shape)))
    # float32 summation order differs with the sharding: up to ~1e-5 of the largest logit (4.3) by the last position
    np.testing.assert_allclose(got, forward(single, ids), rtol=2e-5, atol=1e-4)


def test_load_onto_mesh_fp8_checkpoint(fp8_ckpt):
    folder, source, _ = fp8_ckpt
    # no fsdp: splitting the model dim would reorder sums, and a last-bit difference can flip the FP8
    # rounding of an activation (a visible 2^-4 step), so only meshes that keep reductions whole compare tightly
    mesh = make_mesh(data=4, expert=2)
    sharded = load_pretrained(folder, mesh=mesh, progress=False)
    _assert_sharded_as_rules_say(sharded, mesh)
    experts = sharded.layers[1].moe.gate_proj.get_value()
    assert experts.dtype == FP8_DTYPE and experts.addressable_shards[0].data.shape[0] == 2
    assert_params_identical(sharded, source)
    ids = ids_for(source.config, batch=8)
    got = forward(sharded, jax.device_put(ids, DEFAULT_RULES.sharding(mesh, ("act_batch", None), ids.shape)))
    want = forward(source, ids)
    # Tokens agree to float32 noise, except where a last-bit difference in summation order flips the FP8
    # rounding of an activation (a 2^-4 step in one channel); a layout or scale error would hit every token.
    token_diff = np.abs(got - want).max(-1)
    assert np.mean(token_diff < 1e-4) >= 0.9, token_diff
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    # 288 FFN columns over tensor=2 leave 144 per shard: not whole 128-blocks, said clearly
    bad = load_pretrained(folder, mesh=make_mesh(data=2, tensor=2, expert=2), progress=False)
    with pytest.raises(ValueError, match="moe_intermediate_size = 288 .* 144 FFN columns per shard"):
        forward(bad, ids)


def test_load_tensors_reads_only_the_named_parameters(fp8_ckpt, monkeypatch):
    """``load_tensors``: the named parameters (an FP8 expert weight with its scales, a norm) read straight into
    the given shardings, bytes equal to the file's; no other tensor of the checkpoint is read; a path that no
    tensor loads into is refused before anything is read."""
    folder, source, _ = fp8_ckpt
    report = hf_mod.inspect_checkpoint(folder)
    experts = ("layers", 1, "moe", "gate_proj")
    scales = next(ld.scale_path for ld in report.loads if ld.path == experts)
    norm = ("layers", 0, "input_layernorm", "weight")
    mesh = make_mesh(expert=2, devices=jax.devices()[:2])
    by_expert = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    reads = []
    real = hf_mod.read_tensor
    monkeypatch.setattr(hf_mod, "read_tensor", lambda info, *a, **kw: reads.append(info.key) or real(info, *a, **kw))
    got = hf_mod.load_tensors(report, {experts: by_expert, scales: by_expert, norm: replicated}, progress=False)
    assert sorted(reads) == sorted(
        ["model.layers.1.moe.gate_proj.weight", "model.layers.1.moe.gate_proj.weight_scale_inv",
         "model.layers.0.input_layernorm.weight"]
    )  # fmt: skip
    assert set(got) == {experts, scales, norm}
    assert got[experts].sharding == by_expert and got[experts].dtype == FP8_DTYPE
    want = dict((tuple(p), v.get_value()) for p, v in nnx.to_flat_state(nnx.state(source)))
    for p in (experts, scales, norm):
        np.testing.assert_array_equal(np.asarray(got[p]).view(np.uint8), np.asarray(want[p]).view(np.uint8))
    reads.clear()
    with pytest.raises(ValueError, match="no checkpoint tensor loads into 1 of the named parameters"):
        hf_mod.load_tensors(report, {norm: replicated, ("layers", 0, "nope"): replicated}, progress=False)
    assert reads == []


def test_read_tensor_rows_reads_one_slice_of_the_first_axis(fp8_ckpt, monkeypatch):
    """``read_tensor(info, rows=(lo, hi))``: the slice ``[lo:hi]`` of the tensor, byte for byte, and with
    ``cols`` the slice of its second axis too, with ``spans`` any box; spans outside the tensor are refused with
    the tensor's name."""
    folder, _, tensors = fp8_ckpt
    key = "model.layers.1.moe.down_proj.weight"
    info = hf_mod.open_checkpoint(folder).tensors[key]
    for rows in ((0, 4), (1, 3), (3, 4), (2, 2)):
        got = read_tensor(info, rows)
        assert got.shape == (rows[1] - rows[0], *info.shape[1:])
        assert got.tobytes() == np.ascontiguousarray(tensors[key][rows[0] : rows[1]]).tobytes()
        for cols in ((0, info.shape[1]), (5, 77), (0, 1), (9, 9)):
            got = read_tensor(info, rows, cols)
            want = tensors[key][rows[0] : rows[1], cols[0] : cols[1]]
            assert got.shape == want.shape and got.tobytes() == np.ascontiguousarray(want).tobytes(), (rows, cols)
    # any box: one run of bytes per index of the axes before its last partial axis, or (runs closer than
    # MIN_SKIP_BYTES) the box widened to the whole of those axes, and a view of it
    e, f, n = info.shape
    boxes = (((1, 3), None, (128, 256)), (None, (5, 6), (0, 1)), ((0, e), (0, f), (0, n)), ((2, 2), None, None))
    for skip in (0, MIN_SKIP_BYTES, n * (f - 1)):
        monkeypatch.setattr(safetensors_io, "MIN_SKIP_BYTES", skip)
        for box in boxes:
            got = read_tensor(info, spans=box)
            want = tensors[key][tuple(slice(*span) if span else slice(None) for span in box)]
            assert got.shape == want.shape and got.tobytes() == np.ascontiguousarray(want).tobytes(), (skip, box)
        extents = [read_extent(info, spans=box) for box in boxes]
        assert read_extent(info, spans=(None, (5, 5), (0, 1))) == [(0, e), (5, 5), (0, 1)]  # (empty: none widened)
        assert read_tensor(info, spans=(None, (5, 5), (0, 1))).shape == (e, 0, 1)
        if skip == 0:
            assert extents == [[(1, 3), (0, f), (128, 256)], [(0, e), (5, 6), (0, 1)], [(0, e), (0, f), (0, n)],
                               [(2, 2), (0, f), (0, n)]]  # fmt: skip
        else:  # (FP8: the gaps along the last axis are n - 128 and n - 1 bytes, along the second n * (f - 1))
            widened = [(0, e), (0, f), (0, n)] if skip > n * (f - 1) else [(0, e), (5, 6), (0, n)]
            assert extents == [[(1, 3), (0, f), (0, n)], widened, [(0, e), (0, f), (0, n)], [(2, 2), (0, f), (0, n)]]
    n = info.shape[2]
    with pytest.raises(ValueError, match=rf"{key}: span \[0, {n + 1}\) is outside its axis 2 of {n}"):
        read_tensor(info, spans=(None, None, (0, n + 1)))
    with pytest.raises(ValueError, match=rf"{key}: 2 spans for a tensor of 3 axes"):
        read_tensor(info, spans=(None, None))
    with pytest.raises(ValueError, match=rf"{key}: rows \[3, 5\) are outside its first axis of 4"):
        read_tensor(info, (3, 5))
    with pytest.raises(ValueError, match=rf"{key}: columns \[0, 161\) are outside its second axis of 160"):
        read_tensor(info, (0, 4), (0, 161))


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory, test_config):
    """fp8_config's model in float32 (4 experts), as a checkpoint."""
    config = dataclasses.replace(fp8_config(test_config), quantization=None)
    return write_checkpoint(tmp_path_factory.mktemp("float"), hf_tensors(random_model(config, seed=5)),
                            config.to_hf_config())  # fmt: skip


@pytest.fixture(scope="module")
def fp8_tp_ckpt(tmp_path_factory, test_config):
    """An FP8 checkpoint whose FFN widths (256) split over tensor=2 into whole 128-blocks."""
    config = dataclasses.replace(
        fp8_config(test_config), intermediate_size=256, moe_intermediate_size=256, share_expert_dim=256
    )
    return write_checkpoint(tmp_path_factory.mktemp("fp8tp"), hf_tensors(random_model(config, seed=7)),
                            config.to_hf_config())  # fmt: skip


def test_two_processes_each_read_only_their_own_experts(fp8_ckpt, float_ckpt, fp8_tp_ckpt, tmp_path):
    """``load_pretrained`` on an expert-parallel mesh spanning two processes (one device each): each process reads
    only the experts its device holds, half of every stacked expert tensor and its scales, and every other tensor
    whole; the shards it holds equal a whole load's, for FP8 weights kept, FP8 dequantised, float, and float
    block-quantised on the way. On a tensor-parallel mesh the matrices split there are read by halves too: of a
    float checkpoint (stored transposed) those split along their output columns (dense, shared-expert and expert
    gate/up, the query heads ``wq``: HF rows, after the expert axis for stacked experts) and along their input
    rows (down, ``o_proj``: a run of each HF row), of an FP8 checkpoint (kept in the HF layout) every weight and
    scale (the experts' down along its third axis)."""
    from processes import free_port, run_processes

    cases = {"fp8": (fp8_ckpt[0], "auto"), "fp8-dequantised": (fp8_ckpt[0], "none"),
             "float": (float_ckpt, "auto"), "float-quantised": (float_ckpt, "fp8"),
             "float-tensor": (float_ckpt, "auto:tensor"), "fp8-tensor": (fp8_tp_ckpt, "auto:tensor")}  # fmt: skip
    port, out = free_port(), tmp_path / "reads.json"
    worker = [sys.executable, str(Path(__file__).with_name("load_worker.py"))]
    args = [f"{name}={folder}:{q}" for name, (folder, q) in cases.items()]
    # (every run of bytes read alone, as a real checkpoint's far wider rows would be: these tiny ones lie closer)
    args = ["--min-skip", "0", *args]
    runs = run_processes(lambda i: [*worker, str(i), str(port), str(out), *args], 240, "the two-process load")
    assert [rc for rc, _ in runs] == [0, 0], "".join(text[-3000:] for _, text in runs)
    for name, (folder, _) in cases.items():
        header = hf_mod.open_checkpoint(folder).tensors
        pattern = {
            "float-tensor": r"(mlp|share_expert|moe)\.(gate|up|down)_proj\.|self_attn\.(wq|o_proj)\.",
            "fp8-tensor": r"(mlp|share_expert|moe)\.(gate|up|down)_proj\.|self_attn\.(wq|o_proj)\.",
        }.get(name, r"\.moe\.(gate|up|down)_proj\.")
        halved = sum(i.nbytes for k, i in header.items() if re.search(pattern, k))
        assert halved > 0
        for p in (0, 1):
            got = json.loads(Path(f"{out}.{p}").read_text())[name]
            assert got["mismatched"] == [], (name, p)
            assert got["read"] == got["total"] - halved // 2, (name, p, got, halved)


# ---------------------------------------------------------------------- bad input: clear errors, nothing loaded


def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def _rewrite(folder, key_fn):
    """Rewrite every shard of ``folder`` through ``key_fn(tensors) -> tensors`` (index kept in step)."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name in sorted(set(index["weight_map"].values())):
        tensors = {}
        for key, info in read_header(folder / name)[0].items():
            tensors[key] = read_tensor(info)
        tensors = key_fn(tensors)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != name}
        index["weight_map"].update(dict.fromkeys(tensors, name))
    index_path.write_text(json.dumps(index))


def _edit(key, fn):
    def edit(tensors):
        if key in tensors:
            tensors[key] = fn(tensors[key])
        return tensors

    return edit


def _drop(key):
    return lambda t: {k: v for k, v in t.items() if k != key}


def _add(key, value):
    return lambda t: {**t, key: value} if "model.embed_tokens.weight" in t else t


def _index(change):
    def edit(folder):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        change(index)
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    return edit


def _truncate(folder):
    f = sorted(folder.glob("model-*.safetensors"))[1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])


def _corrupt_header(folder):
    f = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))


def _header_entry(key, change):
    """Rewrite one tensor's entry in its shard's header (same header length: padded with spaces)."""

    def edit(folder):
        for f in sorted(folder.glob("model-*.safetensors")):
            data = f.read_bytes()
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8 : 8 + n])
            if key in header:
                change(header[key])
                raw = json.dumps(header, separators=(",", ":")).encode()
                assert len(raw) <= n
                f.write_bytes(data[:8] + raw.ljust(n) + data[8 + n :])
                return
        raise AssertionError(key)

    return edit


def _huge_header(folder):
    f = sorted(folder.glob("model-*.safetensors"))[0]
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + data[8:])


def _config(change):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))

    return edit


L0 = "model.layers.0"
BAD_CASES = {
    "missing key": (
        lambda f: _rewrite(f, _drop(f"{L0}.self_attn.wq.weight")),
        ValueError,
        r"missing keys \(1\):\s+model\.layers\.0\.self_attn\.wq\.weight",
    ),
    "unexpected key": (
        lambda f: _rewrite(f, _add(f"{L0}.self_attn.extra.weight", np.ones(3, BF16))),
        ValueError,
        r"unexpected keys \(1\):\s+model\.layers\.0\.self_attn\.extra\.weight",
    ),
    "wrong shape": (
        lambda f: _rewrite(f, _edit(f"{L0}.mlp.up_proj.weight", lambda a: np.ascontiguousarray(a.T))),
        ValueError,
        r"model\.layers\.0\.mlp\.up_proj\.weight: expected \[56, 40\], found \[40, 56\]",
    ),
    "wrong dtype": (
        lambda f: _rewrite(f, _edit("model.norm.weight", lambda a: a.astype(np.int32))),
        ValueError,
        r"model\.norm\.weight: dtype I32 cannot be loaded into a bfloat16 parameter",
    ),
    "fp8 without scales": (
        lambda f: _rewrite(f, _edit(f"{L0}.mlp.gate_proj.weight", lambda a: a.astype(F8))),
        ValueError,
        r"model\.layers\.0\.mlp\.gate_proj\.weight_scale_inv \(the block scales of float8",
    ),
    "truncated file": (_truncate, ValueError, r"model-00002-of-00003\.safetensors: truncated"),
    "corrupt header": (_corrupt_header, ValueError, r"model-00001-of-00003\.safetensors: corrupt safetensors header"),
    "header dtype not a string": (
        _header_entry("model.norm.weight", lambda e: e.update(dtype=["BF16"])),
        ValueError,
        r"corrupt safetensors header entry for 'model\.norm\.weight' \(dtype must be a string",
    ),
    "header shape not a list of ints": (
        _header_entry("model.norm.weight", lambda e: e.update(shape="40")),
        ValueError,
        r"corrupt safetensors header entry for 'model\.norm\.weight'",
    ),
    "header offset not an int": (
        _header_entry("model.norm.weight", lambda e: e.update(data_offsets=[0, 8e1])),
        ValueError,
        r"corrupt safetensors header entry for 'model\.norm\.weight'",
    ),
    "impossible header length": (
        _huge_header,
        ValueError,
        r"model-00001-of-00003\.safetensors: not a valid safetensors",
    ),
    "index omits a key a shard holds": (
        _index(lambda index: index["weight_map"].pop("model.norm.weight")),
        ValueError,
        r"missing keys \(1\):\s+model\.norm\.weight \(in model-0000\d-of-00003\.safetensors, but the index does not",
    ),
    "index names an absent file": (
        lambda f: (f / "model-00003-of-00003.safetensors").unlink(),
        FileNotFoundError,
        r"names file\(s\) absent .*model-00003-of-00003\.safetensors",
    ),
    "not a step-3 config": (
        _config(lambda c: c.update(model_type="llama")),
        ValueError,
        r"config\.json is not a Step-3 config: model_type 'llama'",
    ),
    "config without text fields": (
        _config(lambda c: c["text_config"].pop("hidden_size")),
        ValueError,
        r"lacks the field\(s\) hidden_size",
    ),
    "unsupported quantization": (
        _config(lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})),
        ValueError,
        r"quant_method 'gptq' is not supported",
    ),
    "missing config": (lambda f: (f / "config.json").unlink(), FileNotFoundError, r"no config\.json"),
    "pickle index": (
        lambda f: (f / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}})
        ),
        ValueError,
        r"only safetensors checkpoints are supported.*pytorch_model-1\.bin",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_checkpoint_clear_error_and_nothing_loaded(bf16_ckpt, tmp_path, monkeypatch, case):
    mutate, error, message = BAD_CASES[case]
    folder = _copy(bf16_ckpt[0], tmp_path)
    mutate(folder)
    reads = []
    monkeypatch.setattr(hf_mod, "read_tensor", lambda info, *a, **kw: reads.append(info) or read_tensor(info, *a, **kw))
    with pytest.raises(error, match=message):
        load_pretrained(folder, progress=False)
    assert reads == []  # validation happens on the headers, before any tensor is read


def test_pickle_checkpoints_are_refused(tmp_path):
    folder = tmp_path / "torch"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(get_preset("test").to_hf_config()))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match="only safetensors checkpoints are supported.*pytorch_model.bin"):
        load_pretrained(folder, progress=False)
    (folder / "weights.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="only safetensors checkpoints are supported.*weights.pt"):
        load_pretrained(folder / "weights.pt", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere", progress=False)


def test_vision_keys_are_not_unexpected_but_other_prefixes_are(bf16_ckpt, tmp_path):
    folder = _copy(bf16_ckpt[0], tmp_path)
    _rewrite(folder, _add("vit_downsampler2.weight", np.ones(2, BF16)))
    load_pretrained(folder, progress=False)  # fine: a vision weight
    _rewrite(folder, _add("vision_tower.weight", np.ones(2, BF16)))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\):\s+vision_tower\.weight"):
        load_pretrained(folder, progress=False)


def test_wrong_fp8_scale_shape_named(fp8_ckpt, tmp_path):
    folder = _copy(fp8_ckpt[0], tmp_path)
    key = "model.layers.1.moe.up_proj.weight_scale_inv"
    _rewrite(folder, _edit(key, lambda a: np.ascontiguousarray(a[:, :2])))
    with pytest.raises(ValueError, match=rf"{key}: expected \[4, 3, 2\], found \[4, 2, 2\]"):
        load_pretrained(folder, progress=False)


# ---------------------------------------------------------------------- config, CLI, tokenizer


def test_hf_quantization_config_round_trip():
    cfg = dataclasses.replace(get_preset("test"), quantization="fp8")
    hf = json.loads(json.dumps(cfg.to_hf_config()))
    assert hf["quantization_config"]["weight_block_size"] == [128, 128]
    assert Step3Config.from_hf_config(hf) == cfg
    assert "quantization_config" not in get_preset("test").to_hf_config()
    for bad, field in [
        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "fmt"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}, "activation_scheme"),
        ({"quant_method": "awq"}, "quant_method"),
    ]:
        with pytest.raises(ValueError, match=f"quantization_config.{field}"):
            Step3Config.from_hf_config(dict(hf, quantization_config=bad))
    with pytest.raises(ValueError, match="quantization"):
        dataclasses.replace(cfg, quantization="int4")


def test_inspect_cli(bf16_ckpt, fp8_ckpt, tmp_path, capsys):
    assert inspect_cli.main([str(fp8_ckpt[0])]) == 0
    out = capsys.readouterr().out
    assert "step3_vl" in out and "hidden_size" in out and "F8_E4M3" in out and "quantization: fp8" in out
    assert "no problems" in out
    assert inspect_cli.main([str(fp8_ckpt[0]), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["parameters"]  # FP8 scales are counted apart, not as parameters
    assert counts["checkpoint_text"] == counts["model_total"] and counts["checkpoint_fp8_scales"] > 0
    folder = _copy(bf16_ckpt[0], tmp_path)
    _rewrite(folder, lambda t: _add("model.bogus.weight", np.ones(2, BF16))(_drop("model.norm.weight")(t)))
    assert inspect_cli.main([str(folder)]) == 1
    out = capsys.readouterr().out
    assert "model.norm.weight" in out and "model.bogus.weight" in out and "3 vision tensors skipped" in out
    assert inspect_cli.main([str(folder), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["missing"] == ["model.norm.weight"] and report["unexpected"] == ["model.bogus.weight"]
    assert report["parameters"]["checkpoint_text"] + 40 == report["parameters"]["model_total"] + 2


def test_tokenizer_from_checkpoint_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["hello world", "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.decoder = __import__("tokenizers").decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.bos_id, loaded.eos_id) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))
    ids = loaded.encode("hello the lazy fox")
    assert ids[0] == loaded.bos_id and ids[1:] == tok.encode("hello the lazy fox", add_special_tokens=False).ids
    assert loaded.decode(ids) == "hello the lazy fox"
    assert loaded.vocab_size == tok.get_vocab_size()
    # without tokenizer_config.json the ids come from config.json
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 7]}))
    assert (load_tokenizer(tmp_path).bos_id, load_tokenizer(tmp_path).eos_id) == (1, 2)
    # a folder without tokenizer.json, or none at all: the byte-level default
    assert isinstance(load_tokenizer(tmp_path / "elsewhere"), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(tmp_path)


def test_engine_takes_a_loaded_checkpoints_own_tokenizer(bf16_ckpt, tmp_path):
    """``Engine(load_pretrained(folder))`` encodes text with the folder's tokenizer.json, not bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from infer.engine import Engine
    from step3_jax.checkpoint import checkpoint_folder

    folder = _copy(bf16_ckpt[0], tmp_path)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["hello world", "the quick brown fox"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    model = load_pretrained(folder, progress=False)
    assert checkpoint_folder(model) == folder and checkpoint_folder(bf16_ckpt[1]) is None
    engine = Engine(model)
    assert isinstance(engine.tokenizer, HFTokenizer)
    assert engine.validate("hello world", None)[0] == engine.tokenizer.encode("hello world")
    assert isinstance(Engine(bf16_ckpt[1]).tokenizer, ByteTokenizer)  # a model not loaded from a folder: bytes
    # an AFD runner made from the loaded model keeps its folder (and so its tokenizer); forgetting it works too
    from infer.afd import AFDConfig, AFDRunner
    from step3_jax.checkpoint import set_checkpoint_folder

    runner = AFDRunner.from_model(model, AFDConfig(attention_devices=2, ffn_devices=2))
    assert checkpoint_folder(runner) == folder
    set_checkpoint_folder(runner, None)
    assert checkpoint_folder(runner) is None

"""Training: learning signal, sharded equals single-device, exact resume, balancing, non-finite steps, LoRA."""

import dataclasses
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from step3_jax import create_model, make_mesh
from step3_jax.tokenizer import ByteTokenizer, encode_chat, load_tokenizer
from train import lora
from train.data import BatchIterator, embedded_corpus, pack_documents, read_documents, split_documents
from train.lora import LoraConfig
from train.train import (
    TrainConfig,
    Trainer,
    TrainingError,
    _to_compute_dtype,
    checkpoint_fingerprint,
    log_to_stderr,
    lr_schedule,
    main,
    run,
)

TOK = ByteTokenizer()
DOCS = ["the quick brown fox jumps over the lazy dog. " * 3, "pack my box with five dozen liquor jugs! " * 3]


def small_tc(**kw):
    base = dict(seq_len=32, batch_size=8, steps=4, lr=3e-3, warmup_steps=2, compute_dtype="float32", save_every=0)
    return TrainConfig(**{**base, **kw})


def moe8(config):
    """One dense and one MoE layer with 8 experts (splits over 2 expert shards): the sharded and balancing tests
    share its single-device step program."""
    return dataclasses.replace(config, moe_num_experts=8, num_hidden_layers=2, moe_layers_enum=(1,))


def data_for(tc, docs=DOCS * 8):
    return pack_documents(docs, TOK, tc.seq_len, seed=0)


def test_packing_masks_documents_and_resumes_exactly():
    data = pack_documents(["ab", "cdef", "g" * 40], TOK, 8, seed=1)
    b = data.batch(np.arange(len(data)))
    # targets never cross into another document, positions restart in each document
    seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
    assert np.all(pos[seg != np.roll(seg, 1, axis=1)][1:] == 0) or np.all(pos[:, 0] == 0)
    assert set(np.unique(mask)) <= {0.0, 1.0} and mask.min() == 0.0
    it = BatchIterator(data, 2, seed=3)
    [next(it) for _ in range(5)]
    state = it.get_state()
    expect = [next(it)["input_ids"] for _ in range(4)]
    it2 = BatchIterator(data, 2, seed=3)
    it2.set_state(state)
    for e in expect:
        np.testing.assert_array_equal(next(it2)["input_ids"], e)


# a plain chat template for the byte tokenizer: roles in <>, one turn per line
BYTE_CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}" \
    "{% if add_generation_prompt %}<assistant>{% endif %}"  # fmt: skip
CHATS = [[{"role": "system", "content": "BE BRIEF"}, {"role": "user", "content": "SAY HI"},
          {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "AGAIN"},
          {"role": "assistant", "content": "hi again"}],
         [{"role": "user", "content": "COUNT"}, {"role": "assistant", "content": "one two three"}]]  # fmt: skip


def test_conversations_are_packed_with_only_the_answers_as_targets(tmp_path):
    """``{"messages": [...]}`` lines are conversations: rendered in the chat template, and only the assistant's
    tokens (here lower case, the prompts upper case) are targets; plain texts beside them stay fully trained.
    A conversation without an answer, a malformed message and a tokenizer without a template are refused."""
    lines = [json.dumps({"messages": c}) for c in CHATS] + [json.dumps({"text": "plain words"})]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines * 6))
    docs = read_documents([tmp_path / "chat.jsonl"])
    assert docs[:3] == [*CHATS, "plain words"]
    tok = ByteTokenizer()
    tok.chat_template = BYTE_CHAT
    data = pack_documents(docs, tok, 128, seed=0)
    b = data.batch(np.arange(len(data)))
    targets = b["targets"][b["loss_mask"] == 1]
    assert set(targets.tolist()) <= {c + tok.offset for c in b"hi there again one two three plain words\n"} | {2}
    assert not {b + tok.offset for b in b"<>ABCDEFGHIJKLMNOPQRSTUVWXYZ"} & set(targets.tolist())
    # every answer's bytes with its newline, the text's bytes with its EOS: none lost to a row's cut
    trained = 6 * (sum(len(c["content"]) + 1 for chat in CHATS for c in chat if c["role"] == "assistant") + 12)
    assert len(targets) == trained
    # conversations are never split over rows: each starts at position 0 with its first turn; padding after them
    for tokens, segs, pos in zip(data.tokens, data.segment_ids, data.positions, strict=True):
        for seg in set(segs.tolist()) - {-1}:
            where = np.flatnonzero(segs == seg)
            assert pos[where[0]] == 0 and tok.decode(tokens[where]).startswith(("<system>", "<user>", "plain"))
    with pytest.raises(ValueError, match="fewer than one row"):
        pack_documents(["plain"], tok, 128)
    bad = {"bad1.jsonl": ('{"messages": [{"role": "user", "content": "x"}]}', "bad1.jsonl:1: the conversation has no "
                          "assistant turn"),
           "bad2.jsonl": ('{"text": "ok"}\n{"messages": [{"content": "x"}]}', r"bad2.jsonl:2: chat message 0 is not"),
           "bad3.jsonl": ('{"messages": "hi"}', r"bad3.jsonl:1: expected an object with a string field 'text' \(a "
                          r"text\) or a list field 'messages'")}  # fmt: skip
    for name, (text, error) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=error):
            read_documents([tmp_path / name])
    with pytest.raises(ValueError, match=r"tokenizer \(byte-level\) has no chat template"):
        pack_documents(docs, ByteTokenizer(), 16)


def test_held_out_evaluation_scores_every_row_once(test_config, tmp_path):
    """``Trainer.evaluate``: the mean cross-entropy per target token over every held-out row, in micro-batches
    whose last one is filled up with masked rows (which count for nothing: the mean over 9 rows is the token-weighted
    mean of the first 8 and the 9th alone); ``run`` records it every ``eval_every`` steps and at the end, and it
    falls as the model learns; a run killed while evaluating resumes with no step's record lost (the checkpoint of
    a step is written after its record). ``split_documents`` holds whole documents out, by seed."""
    from train.data import PackedDataset

    tc = small_tc(eval_every=2, save_every=1)
    held_out = pack_documents(DOCS * 3, TOK, tc.seq_len, seed=5)
    assert len(held_out) > tc.batch_size

    def rows(index):
        return PackedDataset(held_out.tokens[index], held_out.segment_ids[index], held_out.positions[index])

    trainer = Trainer(test_config, tc, data_for(tc), eval_data=rows(np.arange(9)), workdir=tmp_path)
    nine, eight, ninth = trainer.evaluate(), trainer.evaluate(rows(np.arange(8))), trainer.evaluate(rows([8]))
    assert nine["eval_tokens"] == eight["eval_tokens"] + ninth["eval_tokens"] == int(rows(np.arange(9)).batch(
        np.arange(9))["loss_mask"].sum())  # fmt: skip
    weighted = (eight["eval_loss"] * eight["eval_tokens"] + ninth["eval_loss"] * ninth["eval_tokens"]) / (
        nine["eval_tokens"]
    )
    np.testing.assert_allclose(nine["eval_loss"], weighted, rtol=1e-5)
    before = nine

    def killed():
        raise KeyboardInterrupt("killed while evaluating")

    trainer.evaluate = killed
    with pytest.raises(KeyboardInterrupt):
        run(trainer, progress=False, log_path=tmp_path / "metrics.jsonl")
    trainer.close()
    trainer = Trainer(test_config, tc, data_for(tc), eval_data=rows(np.arange(9)), workdir=tmp_path)
    assert trainer.restore() and trainer.step == 1  # (step 2's checkpoint was never written)
    history = run(trainer, progress=False, log_path=tmp_path / "metrics.jsonl")
    trainer.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and [r["step"] for r in logged if "eval_loss" in r] == [2, 4]
    assert history[-1]["eval_loss"] < before["eval_loss"]
    train_docs, eval_docs = split_documents([str(i) for i in range(10)], 0.3, seed=1)
    assert len(eval_docs) == 3 and sorted(train_docs + eval_docs, key=int) == [str(i) for i in range(10)]
    assert split_documents([str(i) for i in range(10)], 0.3, seed=1) == (train_docs, eval_docs)
    with pytest.raises(ValueError, match="leaves none to train on"):
        split_documents(["only one"], 0.5)


def test_embedded_corpus_needs_no_download():
    docs = embedded_corpus()
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000


def test_loss_falls_on_a_repeated_corpus(test_config):
    tc = small_tc(steps=150, warmup_steps=10, lr=1e-2)
    trainer = Trainer(test_config, tc, data_for(tc))
    hist = run(trainer, progress=False)
    first, last = hist[0]["loss"], np.mean([h["loss"] for h in hist[-10:]])
    assert first > 4.0  # about log(vocab) at the start
    assert last < 0.4 * first, (first, last)
    schedule = lr_schedule(tc)  # warm-up then cosine decay, applied update by update
    assert [h["lr"] for h in hist] == pytest.approx([float(schedule(n)) for n in range(tc.steps)], rel=1e-6)
    assert hist[0]["lr"] == 0.0 and hist[tc.warmup_steps]["lr"] == pytest.approx(tc.lr)


@pytest.mark.parametrize("axes", [dict(data=2, tensor=2, expert=2)])  # data, tensor and expert parallel at once
def test_sharded_training_matches_single_device(test_config, axes):
    config = moe8(test_config)
    tc = small_tc(steps=3)
    single = run(Trainer(config, tc, data_for(tc)), progress=False)
    trainer = Trainer(config, tc, data_for(tc), mesh=make_mesh(**axes))
    sharded = run(trainer, progress=False)
    np.testing.assert_allclose([h["loss"] for h in sharded], [h["loss"] for h in single], rtol=1e-4)
    # Adam's moments live sharded like their parameters from the start, so the step compiles once
    same = optax.tree_map_params(
        trainer.tx,
        lambda m, p: m.sharding.is_equivalent_to(p.sharding, m.ndim),
        trainer.opt_state,
        trainer.params,
        transform_non_params=lambda _: True,
    )
    assert all(jax.tree.leaves(same))
    assert trainer._step_fn._cache_size() == 1
    # LoRA on the mesh (the adapters replicated over it; the base sharded by the rules) = LoRA on one device
    adapters = LoraConfig(rank=4, experts=True)
    single = run(Trainer(config, tc, data_for(tc), lora=adapters), progress=False)
    sharded = run(Trainer(config, tc, data_for(tc), mesh=make_mesh(**axes), lora=adapters), progress=False)
    np.testing.assert_allclose([h["loss"] for h in sharded], [h["loss"] for h in single], rtol=1e-4)


def test_grad_accumulation_matches_one_big_batch(test_config):
    """Also when the micro-batches hold very different numbers of targets (conversations train only their
    answers): every target token weighs the same, as in the one big batch."""
    tc = small_tc(steps=2)
    tok = ByteTokenizer()
    tok.chat_template = BYTE_CHAT
    for data in (data_for(tc), pack_documents((CHATS + DOCS) * 8, tok, tc.seq_len, seed=0)):
        one = run(Trainer(test_config, tc, data), progress=False)
        acc = run(Trainer(test_config, dataclasses.replace(tc, grad_accum=4), data), progress=False)
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose([h[key] for h in acc], [h[key] for h in one], rtol=1e-4)


def test_kill_and_resume_continues_the_same_trajectory(test_config, tmp_path):
    tc = small_tc(steps=6, save_every=3)
    straight = run(Trainer(test_config, tc, data_for(tc), workdir=tmp_path / "a"), progress=False)

    class Killed(Exception):
        pass

    def kill_after_step_4(record):
        if record["step"] == 4:
            raise Killed

    first = Trainer(test_config, tc, data_for(tc), workdir=tmp_path / "b")
    log = tmp_path / "b" / "metrics.jsonl"
    with pytest.raises(Killed):  # the same run, killed after step 4: its checkpoint at step 3 is the last good one
        run(first, progress=False, on_metrics=kill_after_step_4, log_path=log)
    first.close()
    with log.open("a") as f:
        f.write('{"step": 5, "loss": 2.')  # a record cut short by the kill
    resumed = Trainer(test_config, tc, data_for(tc), workdir=tmp_path / "b")
    assert resumed.restore() and resumed.step == 3
    # restored arrays sit where a running trainer's do, so the step compiles to the same program (no recompile)
    placement = lambda t: [(x.sharding, x.committed) for x in jax.tree.leaves(t._state())]  # noqa: E731
    assert placement(resumed) == placement(first)
    rest = run(resumed, progress=False, log_path=log)
    resumed.close()
    assert [h["step"] for h in rest] == [4, 5, 6]
    # the metrics log holds every step once: the redone step 4 replaced the killed run's record of it
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[3]["loss"] == rest[0]["loss"]
    np.testing.assert_allclose([h["loss"] for h in rest], [h["loss"] for h in straight[3:]], rtol=1e-6)


def test_resume_with_another_model_shape_is_refused(test_config, tmp_path):
    tc = small_tc(steps=1, save_every=1)
    t = Trainer(test_config, tc, data_for(tc), workdir=tmp_path)
    t.save(wait=True)  # a checkpoint at step 0 is enough: the run's model is what must be protected
    t.close()
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    other = dataclasses.replace(test_config, hidden_size=48)
    with pytest.raises(ValueError, match=r"holds another run \(differs in: model\.hidden_size\).*nothing was"):
        Trainer(other, tc, data_for(tc), workdir=tmp_path)
    with pytest.raises(ValueError, match=r"\(differs in: lora\)"):
        Trainer(test_config, tc, data_for(tc), workdir=tmp_path, lora=lora.LoraConfig(rank=4))
    longer = dataclasses.replace(tc, seq_len=64)
    with pytest.raises(ValueError, match=r"\(differs in: seq_len, data "):
        Trainer(test_config, longer, data_for(longer), workdir=tmp_path)
    # the data iterator's saved position means nothing for other rows, another batch size or seed
    with pytest.raises(ValueError, match=r"\(differs in: data \(the packed rows: other files"):
        Trainer(test_config, tc, pack_documents(DOCS * 30, TOK, tc.seq_len), workdir=tmp_path)
    with pytest.raises(ValueError, match=r"\(differs in: batch_size, seed\)"):
        Trainer(test_config, dataclasses.replace(tc, batch_size=4, seed=1), data_for(tc), workdir=tmp_path)
    with pytest.raises(ValueError, match=r"\(differs in: base \(the run started from scratch \(--preset\)\)\)"):
        Trainer(test_config, tc, data_for(tc), workdir=tmp_path, base_model=create_model(test_config))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    # the accumulation count only splits the same batch: another one resumes (e.g. to fit a smaller card)
    Trainer(test_config, dataclasses.replace(tc, grad_accum=2), data_for(tc), workdir=tmp_path).close()
    # a run that stopped before its first checkpoint left nothing to resume: another run may take its workdir
    Trainer(test_config, tc, data_for(tc), workdir=tmp_path / "fresh").close()
    Trainer(test_config, dataclasses.replace(tc, batch_size=4), data_for(tc), workdir=tmp_path / "fresh").close()
    assert json.loads((tmp_path / "fresh" / "run.json").read_text())["batch_size"] == 4


def test_balancing_loss_evens_out_a_skewed_router(test_config):
    config = moe8(test_config)
    tc = small_tc(steps=40, lr=1e-2, aux_loss_coef=1.0, z_loss_coef=0.0)
    trainer = Trainer(config, tc, data_for(tc))
    # skew: every router strongly prefers expert 0
    params = nnx.to_flat_state(trainer.params)
    for path, var in params:
        if path[-1] == "gate" and path[-2] == "moe":
            var.set_value(var.get_value().at[:, 0].add(3.0))
    hist = run(trainer, progress=False)
    start, end = np.max(hist[0]["expert_load"]), np.max(hist[-1]["expert_load"])
    assert start > 0.3 and end < 0.6 * start, (start, end)
    assert hist[-1]["aux_loss"] < hist[0]["aux_loss"]


def test_non_finite_steps_are_skipped_then_stop(test_config):
    tc = small_tc(steps=10, max_bad_steps=3)
    trainer = Trainer(test_config, tc, data_for(tc))
    for path, var in nnx.to_flat_state(trainer.params):
        if path[-1] == "lm_head":
            var.set_value(var.get_value().at[0, 0].set(jnp.nan))
    before = jax.tree.map(np.asarray, trainer.params)
    with pytest.raises(TrainingError, match="3 steps in a row had non-finite"):
        run(trainer, progress=False)
    assert trainer.skipped == 3
    same = jax.tree.map(
        lambda a, b: np.array_equal(a, b, equal_nan=True), before, jax.tree.map(np.asarray, trainer.params)
    )
    assert all(jax.tree.leaves(same))


def test_full_finetuning_of_a_bf16_model_keeps_float32_masters(test_config):
    """A loaded model is BF16 (load_pretrained's default): full finetuning trains float32 copies of its weights
    (with float32 AdamW moments), so small updates do not round away; the caller's model is left as it was."""
    base = create_model(dataclasses.replace(test_config, param_dtype="bfloat16"), seed=0)
    before = jax.tree.map(np.asarray, nnx.state(base))
    tc = small_tc(steps=2, lr=1e-5, warmup_steps=0)
    trainer = Trainer(base.config, tc, data_for(tc), base_model=base)
    assert {x.dtype for x in jax.tree.leaves(trainer.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(trainer.opt_state[1].inner_state[0].mu)} == {jnp.dtype(jnp.float32)}
    start = jax.tree.map(np.asarray, trainer.params)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(a.astype(np.float32), b)  # the same weights, widened
    run(trainer, progress=False)
    after = jax.tree.leaves(trainer.params)
    moved = [np.mean(a != b) for a, b in zip(jax.tree.leaves(start), after, strict=True) if a.ndim > 1]
    assert np.mean(moved) > 0.9  # updates of ~1e-5 are kept (in BF16 most would round away)
    assert trainer.model.config.param_dtype == "float32"
    assert base.config.param_dtype == "bfloat16"
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(base)), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, np.asarray(b))


def test_compute_dtype_keeps_fp8_weights_and_their_scales(test_config):
    """The BF16 forward of LoRA on an FP8 model: float weights in BF16, FP8 weights and their float32 block scales
    as stored (the numerics of inference)."""
    model = create_model(dataclasses.replace(test_config, quantization="fp8", param_dtype="float32"), seed=0)
    cast = jax.tree_util.tree_flatten_with_path(_to_compute_dtype(nnx.state(model), jnp.bfloat16))[0]
    dtypes = {}
    for path, x in cast:
        kind = "scale" if "scale_inv" in jax.tree_util.keystr(path) else str(x.dtype)
        dtypes.setdefault(kind, set()).add(str(x.dtype))
    assert dtypes == {"scale": {"float32"}, "float8_e4m3fn": {"float8_e4m3fn"}, "bfloat16": {"bfloat16"}}


def test_lora_trains_only_adapters_and_merges_exactly(test_config):
    cfg = lora.LoraConfig(rank=4, experts=True)
    tc = small_tc(steps=5, lr=1e-2)
    trainer = Trainer(test_config, tc, data_for(tc), lora=cfg)
    base_before = jax.tree.map(np.asarray, trainer.frozen)
    adapters_before = jax.tree.map(np.asarray, trainer.params)
    hist = run(trainer, progress=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(trainer.frozen), strict=True):
        np.testing.assert_array_equal(a, b)  # base weights untouched
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(adapters_before), jax.tree.leaves(trainer.params), strict=True)
    ]
    assert all(changed)
    assert any("moe/gate_proj" in k for k in trainer.params) and any("self_attn/wq" in k for k in trainer.params)
    merged = trainer.model  # base + adapters folded in
    graphdef = nnx.graphdef(merged)
    ids = jnp.asarray(data_for(tc).tokens[:2, :16])
    on_the_fly = nnx.merge(graphdef, lora.apply_lora(trainer.frozen, trainer.params, cfg))(ids)
    np.testing.assert_allclose(merged(ids), on_the_fly, rtol=1e-6, atol=1e-6)
    base_logits = nnx.merge(graphdef, trainer.frozen)(ids)
    assert not np.allclose(merged(ids), base_logits, atol=1e-4)


def test_bad_inputs(test_config, tmp_path):
    with pytest.raises(ValueError, match="no data files"):
        read_documents([])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="contain no text"):
        read_documents([tmp_path / "empty.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text"):
        read_documents([tmp_path / "latin1.txt"])
    with pytest.raises(ValueError, match="is a folder"):
        read_documents([tmp_path])
    # a byte-order mark (as some editors write) is not text; .JSONL is JSON lines too; U+2028 inside a string
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfplain")
    (tmp_path / "UP.JSONL").write_bytes(b'\xef\xbb\xbf{"text": "a\xe2\x80\xa8b"}\n{"text": "c"}\n')
    assert read_documents([tmp_path / "bom.txt", tmp_path / "UP.JSONL"]) == ["plain", "a\u2028b", "c"]
    tc = small_tc(seq_len=1024)
    with pytest.raises(ValueError, match="seq_len 1024 exceeds the model's max_position_embedding 512"):
        Trainer(test_config, tc, pack_documents(DOCS * 40, TOK, 1024))
    with pytest.raises(ValueError, match="grad_accum"):
        small_tc(batch_size=6, grad_accum=4)


def test_cli_trains_saves_and_refuses_to_clobber(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS * 20))
    args = [
        "--preset",
        "test",
        "--data",
        str(tmp_path / "d.jsonl"),
        "--workdir",
        str(tmp_path / "run"),
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "8",  # the other tests' shapes: the same compiled step (learning rate and schedule are not compiled in)
        "--no-progress",
        "--compute-dtype",
        "float32",
    ]
    assert main([*args, "--eval-fraction", "0.25", "--eval-every", "2"]) == 0
    out = capsys.readouterr().out
    assert "final loss" in out and (tmp_path / "run" / "loss.png").exists()
    assert re.search(r"\d+ held-out rows", out) and re.search(r"eval loss \d+\.\d+ \(perplexity", out)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and ["eval_loss" in r for r in records] == [False, True, True]
    with pytest.raises(SystemExit):
        main([*args, "--eval-fraction", "1.5"])
    assert "--eval-fraction must be in [0, 1)" in capsys.readouterr().err
    # resuming a finished run says so; the curve and the summary are the whole run's (metrics.jsonl)
    assert main([*args, "--eval-fraction", "0.25", "--eval-every", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already at step 3 of 3: nothing to train" in out and f"(first {records[0]['loss']:.3f})" in out
    # another seed or more data would resume the iterator on other rows: refused (--data given twice adds files)
    for changed in (["--seed", "1"], ["--data", str(tmp_path / "d.jsonl")]):
        assert main([*args, "--eval-fraction", "0.25", "--resume", "--steps", "4", *changed]) == 2
        assert "holds another run (differs in: data (the packed rows" in capsys.readouterr().err
    assert main([*args, "--workdir", str(tmp_path / "new"), "--clip-norm", "-1"]) == 2
    assert "TrainConfig.clip_norm must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main([*args, "--workdir", str(tmp_path / "new"), "--export", str(tmp_path / "afile")]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err and not (tmp_path / "new").exists()
    root = logging.getLogger()  # the command line logs at INFO whatever importing orbax did to the root logger
    saved = root.handlers[:], root.level
    try:
        log_to_stderr()
        assert logging.getLogger("train.train").isEnabledFor(logging.INFO)
        assert not logging.getLogger("absl").isEnabledFor(logging.INFO)  # (orbax's chatter: warnings only)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert main(args) == 2  # checkpoints exist and no --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--workdir", str(tmp_path / "other"), "--mesh", "data=2,fdsp=4"]) == 2
    assert "unknown axis 'fdsp' (the axes are data, fsdp, tensor, expert)" in capsys.readouterr().err
    # chat data: the byte tokenizer has no template of its own; --chat-template gives one, and goes with --export
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in CHATS * 20))
    (tmp_path / "chat.jinja").write_text(BYTE_CHAT)
    chat = [*args[:3], str(tmp_path / "chat.jsonl"), *args[4:5], str(tmp_path / "chat"), *args[6:]]
    assert main(chat) == 2
    assert "the tokenizer (byte-level) has no chat template" in capsys.readouterr().err
    assert main([*chat, "--chat-template", str(tmp_path / "chat.jinja"), "--export", str(tmp_path / "out")]) == 0
    assert "exported the trained model" in capsys.readouterr().out
    exported = load_tokenizer(tmp_path / "out")
    assert exported.chat_template == BYTE_CHAT and encode_chat(exported, CHATS[1][:1]) == TOK.encode(
        "<user>COUNT\n<assistant>", add_bos=False
    )


def test_cli_finetunes_a_checkpoint_and_exports_it(tmp_path, capsys, test_config):
    """``--init-from DIR``: LoRA (``--lora-rank``) changes only the adapted weights, full finetuning every matrix;
    ``--export`` writes a checkpoint in the base's dtype with the base's tokenizer files, which loads back."""
    from step3_jax import load_pretrained, save_pretrained

    base = create_model(dataclasses.replace(test_config, param_dtype="bfloat16"), seed=0)
    save_pretrained(base, tmp_path / "base")
    (tmp_path / "base" / "generation_config.json").write_text('{"max_new_tokens": 8}')
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS * 20))
    args = ["--init-from", str(tmp_path / "base"), "--data", str(tmp_path / "d.jsonl"), "--steps", "2",
            "--seq-len", "32", "--batch-size", "8", "--no-progress", "--compute-dtype", "float32", "--lr", "1e-2",
            "--warmup-steps", "0"]  # fmt: skip
    assert main([*args, "--workdir", str(tmp_path / "lora"), "--lora-rank", "4", "--export", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "training LoRA rank 4 adapters of checkpoint" in out and "exported the trained model" in out
    assert (tmp_path / "a" / "generation_config.json").read_text() == '{"max_new_tokens": 8}'
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(base))}
    lora_model = load_pretrained(tmp_path / "a", progress=False)
    assert lora_model.config.param_dtype == "bfloat16"
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(lora_model))}
    changed = {"/".join(map(str, k)) for k in before if not np.array_equal(before[k], after[k])}
    layers = range(test_config.num_hidden_layers)
    adapted = {f"layers/{i}/self_attn/{p}" for i in layers for p in lora.ATTENTION_TARGETS}
    assert changed == adapted

    assert main([*args, "--workdir", str(tmp_path / "full"), "--export", str(tmp_path / "b")]) == 0
    assert "training every weight of checkpoint" in capsys.readouterr().out
    full = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(load_pretrained(tmp_path / "b", progress=False)))}
    assert all(not np.array_equal(before[k], full[k]) for k in before if before[k].ndim > 1)

    assert main([*args, "--workdir", str(tmp_path / "again"), "--export", str(tmp_path / "b")]) == 2
    assert re.search(r"--export .*/b already holds a checkpoint", capsys.readouterr().err)
    # --resume finds the base the run started from (run.json); another base is refused
    no_base = [a for a in args if a not in ("--init-from", str(tmp_path / "base"))]
    assert main([*no_base, "--workdir", str(tmp_path / "lora"), "--lora-rank", "4", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resuming on the base the run started from: {(tmp_path / 'base').resolve()}" in out
    assert "training LoRA rank 4 adapters of checkpoint" in out and "already at step 2 of 2" in out
    other = [*no_base, "--init-from", str(tmp_path / "a"), "--workdir", str(tmp_path / "lora"), "--lora-rank", "4"]
    assert main([*other, "--resume"]) == 2
    assert "(differs in: base (the run started from" in capsys.readouterr().err
    # the base moved: --resume says where it was; --init-from at its new place resumes (the same weights), and is
    # remembered for the next --resume
    meta = tmp_path / "lora" / "run.json"  # (a run.json of the version before the fingerprint: upgraded on resume)
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "base_weights"}))
    assert main(resume_lora := [*no_base, "--workdir", str(tmp_path / "lora"), "--lora-rank", "4", "--resume"]) == 0
    assert json.loads(meta.read_text())["base_weights"] == checkpoint_fingerprint(tmp_path / "base")
    capsys.readouterr()
    (tmp_path / "base").rename(tmp_path / "moved")
    assert main(resume_lora) == 2
    assert "which is not a checkpoint folder now: pass --init-from" in capsys.readouterr().err
    assert main([*resume_lora, "--init-from", str(tmp_path / "moved")]) == 0
    assert "already at step 2 of 2" in capsys.readouterr().out
    assert main(resume_lora) == 0
    assert f"the run started from: {(tmp_path / 'moved').resolve()}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*args, "--lora-experts"])
    assert "--lora-experts and --lora-shared-expert need --lora-rank" in capsys.readouterr().err


def test_checkpoint_fingerprint_follows_the_weights_not_the_folder(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    big = rng.standard_normal((1024, 1024), np.float32)  # 4 MB on either side of a small tensor (stored by name)
    tensors = {"a_experts": big, "m_attn": rng.standard_normal((8, 8), np.float32), "z_experts": big}
    for name, ts in (("a", tensors), ("b", tensors), ("c", dict(tensors, m_attn=tensors["m_attn"] + 1e-3))):
        (tmp_path / name).mkdir()
        save_file(ts, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text("{}")
    fp = {name: checkpoint_fingerprint(tmp_path / name) for name in "abc"}
    assert fp["a"] == fp["b"]  # the same weights in another folder
    assert fp["c"] != fp["a"]  # one small tensor changed, beside a big one


def test_lora_on_an_fp8_model_dequantises_the_base_on_the_fly(test_config):
    """LoRA on block-FP8 attention projections: the adapters have the float model's shapes, the FP8 base stays
    untouched while they train, and the merged model is FP8 again (base + update block-quantised). Full training
    of FP8 weights is refused with a clear error."""
    config = dataclasses.replace(test_config, quantization="fp8")
    cfg = lora.LoraConfig(rank=4)  # the attention projections
    tc = small_tc(steps=3, lr=1e-2)
    with pytest.raises(ValueError, match="full training needs float weights.*block-FP8"):
        Trainer(config, tc, data_for(tc))
    trainer = Trainer(config, tc, data_for(tc), lora=cfg)
    assert sorted(trainer.params) == sorted(
        f"layers/{i}/self_attn/{p}" for i in range(config.num_hidden_layers) for p in lora.ATTENTION_TARGETS
    )
    d, q, h, k = config.hidden_size, config.share_q_dim, config.num_attention_heads, config.head_dim
    assert trainer.params["layers/0/self_attn/wq"]["a"].shape == (q, 4)  # [in, r], as for the float model
    assert trainer.params["layers/0/self_attn/o_proj"]["b"].shape == (4, d)
    assert trainer.params["layers/0/self_attn/o_proj"]["a"].shape == (h * k, 4)
    base_before = jax.tree.map(np.asarray, trainer.frozen)
    run(trainer, progress=False)
    # gradients reach every adapter through the FP8 GEMMs: each B starts at zero and has moved
    assert all(np.abs(np.asarray(adapter["b"])).max() > 0 for adapter in trainer.params.values())
    for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(trainer.frozen), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    merged = trainer.model
    assert merged.layers[0].self_attn.wq.get_value().dtype == jnp.float8_e4m3fn
    graphdef = nnx.graphdef(merged)
    ids = jnp.asarray(data_for(tc).tokens[:2, :16])
    on_the_fly = nnx.merge(graphdef, lora.apply_lora(trainer.frozen, trainer.params, cfg))(ids)
    base = nnx.merge(graphdef, trainer.frozen)(ids)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))  # noqa: E731
    # requantising base + update costs one more e4m3 rounding per weight; the trained update is far larger
    assert rel(merged(ids), on_the_fly) < 0.5 * rel(base, on_the_fly)

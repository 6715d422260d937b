"""Attention-FFN disaggregation (infer/afd.py) on 8 fake CPU devices: same tokens and logits as the colocated
model for several attention:FFN splits and micro-batch counts, FP8 / BF16 transfers, pipelining overlap checked
from the profiler trace, clear errors for impossible requests, and two- and four-process runs over
jax.distributed."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from processes import free_port, run_processes

from infer.afd import AFDConfig, AFDRunner, overlaps, plot_gantt, write_chrome_trace
from infer.generate import generate_ids
from infer.sampling import SamplingParams
from step3_jax.checkpoint import save_pretrained
from step3_jax.checkpoint.hf import open_checkpoint
from step3_jax.model import create_model

SEED = 3
NEW = 4
PROMPT_LENS = (5, 3, 7, 4, 6, 2, 5)  # 7 sequences: not divisible by 2 or 3 micro-batches


@pytest.fixture(scope="module")
def config(test_config):
    return dataclasses.replace(test_config, moe_num_experts=8)


@pytest.fixture(scope="module")
def prompts(config):
    rng = np.random.default_rng(0)
    return [[int(t) for t in rng.integers(3, config.vocab_size, size=n)] for n in PROMPT_LENS]


def colocated(config, prompts):
    model = create_model(config, seed=SEED)
    return model, generate_ids(model, prompts, SamplingParams(max_new_tokens=NEW)).tokens


def teacher_forced_logits(model, prompts, tokens):
    """Colocated logits of every generated token's position, from one full (causal, right-padded) forward over
    prompt + AFD tokens."""
    seqs = [p + t for p, t in zip(prompts, tokens, strict=True)]
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    graphdef, state = nnx.split(model)
    logits = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, jnp.asarray(ids)))
    out = [logits[i, len(p) - 1 : len(p) - 1 + len(t)] for i, (p, t) in enumerate(zip(prompts, tokens, strict=True))]
    return np.stack(out, axis=1)  # [steps, batch, V]


def greedy_of(logits) -> list[list[int]]:
    """Per-sequence argmax of teacher-forced logits [steps, batch, V]: the colocated model's greedy tokens exactly
    when they equal the AFD tokens (same prefix at every step, by induction)."""
    return np.argmax(logits, axis=-1).T.tolist()


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def clear_choices(got, want, k: float = 5.0):
    """Positions where ``want``'s top-2 margin exceeds ``k`` times the rms error (got - want) of a logit difference:
    there a different greedy token would be a real fault, not the rounding of a near-tie."""
    err = got - want
    top = np.argmax(want, axis=-1)[..., None]
    sigma = np.std(err - np.take_along_axis(err, top, axis=-1))
    top2 = np.sort(want, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0] > k * sigma


@pytest.fixture(scope="module")
def reference(config, prompts):
    return colocated(config, prompts)


FOUR_FOUR = AFDConfig(attention_devices=4, ffn_devices=4, micro_batches=3, transfer="model")


@pytest.fixture(scope="module")
def four_four(config, prompts):
    """The single-process 4A4F run (also the reference of the two-process test)."""
    runner = AFDRunner.create(config, FOUR_FOUR, seed=SEED)
    return runner, runner.generate(prompts, NEW, return_logits=True)


def test_a_second_generate_compiles_nothing(four_four, prompts):
    """The runner's programs and its page-pool fills compile once: generating again compiles no program at all."""
    from compiles import count_compiles

    runner, first = four_four
    with count_compiles() as compiled:
        again = runner.generate(prompts, NEW, return_logits=True)
    assert compiled == [] and again.tokens == first.tokens


@pytest.mark.parametrize(
    "attn, ffn, ep, micro", [(4, 4, None, 3), (2, 6, 2, 2)], ids=["4A4F-ep4-mb3", "2A6F-ep2tp3-mb2"]
)
def test_afd_equals_colocated(config, prompts, reference, four_four, attn, ffn, ep, micro):
    """Identical greedy tokens and logits (float32, exact transfer) for a batch of 7 split into 3 or 2 micro-batches,
    4 attention + 4 FFN devices (expert parallel 4) and 2 + 6 (expert parallel 2 x tensor parallel 3)."""
    model, want = reference
    afd = AFDConfig(attention_devices=attn, ffn_devices=ffn, expert_parallel=ep, micro_batches=micro, transfer="model")
    runner = four_four[0] if afd == FOUR_FOUR else AFDRunner.create(config, afd, seed=SEED)
    assert runner.attn_mesh.devices.size == attn and runner.ffn_mesh.devices.size == ffn
    assert not set(runner.attn_mesh.devices.flat) & set(runner.ffn_mesh.devices.flat)
    # the halves really live apart: experts only on the FFN mesh, attention and router only on the attention mesh
    experts = runner._ffn_layer[1]["moe"]["gate_proj"].get_value()
    assert set(experts.sharding.device_set) == set(runner.ffn_mesh.devices.flat)
    assert experts.addressable_shards[0].data.shape[0] == config.moe_num_experts // runner.ep
    router = runner._attn_layer[1]["moe"]["gate"].get_value()
    assert set(router.sharding.device_set) == set(runner.attn_mesh.devices.flat)
    assert "mlp" not in runner._attn_layer[0] and "self_attn" not in runner._ffn_layer[0]

    res = four_four[1] if afd == FOUR_FOUR else runner.generate(prompts, NEW, return_logits=True)
    assert res.tokens == want
    np.testing.assert_allclose(
        np.stack(res.logits), teacher_forced_logits(model, prompts, res.tokens), rtol=2e-5, atol=2e-5
    )


def test_sampling_draws_what_the_engine_draws_and_stops_early(config, prompts, four_four):
    """Per-prompt sampling (temperature, top-k, top-p, seed, max_new_tokens, stop tokens; one greedy row) through
    AFD picks exactly the tokens the colocated continuous-batching engine picks for the same requests: the same
    per-request keys on logits equal within float32 rounding. Sequences end at their own limits, and when every
    sequence has ended the runner stops decoding instead of running out the longest budget."""
    from infer.engine import Engine, EngineConfig

    runner, greedy = four_four
    per = [
        SamplingParams(temperature=1.0, seed=11, max_new_tokens=NEW),
        SamplingParams(temperature=0.7, top_k=5, seed=12, max_new_tokens=NEW - 1),
        SamplingParams(temperature=1.3, top_p=0.8, seed=13, max_new_tokens=NEW),
        SamplingParams(max_new_tokens=NEW),  # greedy
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=14, max_new_tokens=2),
        SamplingParams(max_new_tokens=NEW, stop_token_ids=(greedy.tokens[5][1],)),  # greedy, stops at its 2nd token
        SamplingParams(temperature=2.0, seed=15, max_new_tokens=NEW),
    ]
    res = runner.generate(prompts, sampling=per)
    engine = Engine(create_model(config, seed=SEED), EngineConfig(max_batch=4, page_size=8, max_seq_len=32))
    want = [o.token_ids for o in engine.generate_outputs(prompts, per)]
    assert res.tokens == want
    assert [len(t) for t in res.tokens] == [NEW, NEW - 1, NEW, NEW, 2, 2, NEW]
    assert res.tokens[3] == greedy.tokens[3]
    assert sum(a != b for a, b in zip(res.tokens, greedy.tokens, strict=True)) >= 4  # sampling really sampled

    # every sequence stops at its first token: no decode step runs although the budget is 50 steps
    stop_first = [SamplingParams(max_new_tokens=50, stop_token_ids=(t[0],)) for t in greedy.tokens]
    res = runner.generate(prompts, sampling=stop_first)
    assert res.tokens == [t[:1] for t in greedy.tokens] and res.decode_steps_timed == 0

    with pytest.raises(ValueError, match="give max_new_tokens and stop_token_ids in the SamplingParams"):
        runner.generate(prompts, 3, sampling=per[0])
    with pytest.raises(ValueError, match="one SamplingParams or a list of 7"):
        runner.generate(prompts, sampling=per[:3])


def test_fp8_transfer_is_lossless_for_fp8_experts(config, prompts):
    """With FP8 weights the FFN's GEMMs quantise their inputs per token and 128 channels anyway, so the FP8 wire
    format loses nothing more: identical greedy tokens and logits to the colocated FP8 model."""
    cfg = dataclasses.replace(config, quantization="fp8")
    runner = AFDRunner.create(cfg, AFDConfig(attention_devices=4, ffn_devices=4, micro_batches=3), seed=SEED)
    res = runner.generate(prompts, NEW, return_logits=True)
    want = teacher_forced_logits(create_model(cfg, seed=SEED), prompts, res.tokens)
    assert res.tokens == greedy_of(want)
    err = rel_err(np.stack(res.logits), want)
    assert err < 1e-5, err


def test_fp8_transfer_of_float_model_stays_within_fp8_error(config, prompts, reference):
    """FP8 hidden states on a float32 model with float weights: logits move by about
    e4m3's rounding (3 mantissa bits), never more; teacher-forced on the AFD tokens, so a near-tie of the random
    model that flips a token does not matter. 6 attention + 2 FFN devices, 3 micro-batches."""
    model, _ = reference
    afd = AFDConfig(attention_devices=6, ffn_devices=2, micro_batches=3, transfer="fp8")
    res = AFDRunner.create(config, afd, seed=SEED).generate(prompts, NEW, return_logits=True)
    got, want = np.stack(res.logits), teacher_forced_logits(model, prompts, res.tokens)
    assert 0 < rel_err(got, want) < 0.1, rel_err(got, want)
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) >= 0.9


def test_bf16_transfer_of_bf16_model_matches(config, prompts):
    """A BF16 model's hidden states go over the wire unchanged in the BF16 mode and its FFN outputs come back
    in its own dtype: logits equal up to BF16 accumulation order (teacher-forced on the AFD tokens), and the same
    greedy token wherever the colocated choice is not a near-tie at BF16 precision."""
    cfg = dataclasses.replace(config, param_dtype="bfloat16")
    afd = AFDConfig(attention_devices=6, ffn_devices=2, micro_batches=3, transfer="bf16")
    res = AFDRunner.create(cfg, afd, seed=SEED).generate(prompts, NEW, return_logits=True)
    got, want = np.stack(res.logits), teacher_forced_logits(create_model(cfg, seed=SEED), prompts, res.tokens)
    # a few BF16 roundings (2^-8 each) in another order: ~1% of the largest logit; FP8 on the wire would be ~5%
    assert rel_err(got, want) < 2e-2, rel_err(got, want)
    clear = clear_choices(got, want)
    assert clear.mean() > 0.5, clear.mean()
    np.testing.assert_array_equal(np.argmax(got, -1)[clear], np.argmax(want, -1)[clear])


def test_pipeline_overlaps_attention_and_ffn(config, tmp_path):
    """From the profiler trace of one decode step: the attention of one micro-batch runs while the FFN of another
    is running. One device per side: the CPU runtime runs multi-device programs one at a time (measured), so the
    fake-CPU overlap shows with single-device sides; a wide FFN makes its work outlast the host's dispatch."""
    wide = dataclasses.replace(config, moe_intermediate_size=4096, share_expert_dim=4096, intermediate_size=4096)
    runner = AFDRunner.create(wide, AFDConfig(attention_devices=1, ffn_devices=1, micro_batches=3), seed=SEED)
    rng = np.random.default_rng(1)
    prompts = [[int(t) for t in rng.integers(3, wide.vocab_size, size=5)] for _ in range(12)]
    res = runner.generate(prompts, 3, trace_dir=tmp_path / "trace")
    stages = {(r["stage"], r["layer"], r["mb"]) for r in res.trace}
    for layer in range(wide.num_hidden_layers):
        for mb in range(3):
            assert {("attention", layer, mb), ("a2f", layer, mb), ("ffn", layer, mb), ("f2a", layer, mb)} <= stages
    for r in res.trace:
        assert r["end"] >= r["start"]
        if r["stage"] == "attention":
            assert r["devices"] == [str(runner.attn_mesh.devices.flat[0].id)]
        if r["stage"] == "ffn":
            assert r["devices"] == [str(runner.ffn_mesh.devices.flat[0].id)]
    pairs = overlaps(res.trace)
    assert pairs, "no attention work overlapped FFN work of another micro-batch"
    assert all(a["mb"] != f["mb"] for a, f in pairs)
    write_chrome_trace(res.trace, tmp_path / "afd.json")
    events = json.loads((tmp_path / "afd.json").read_text())["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == len(res.trace)
    plot_gantt(res.trace, tmp_path / "afd.png")
    assert (tmp_path / "afd.png").stat().st_size > 1000


def test_engine_drives_afd_with_continuous_batching(config):
    """``Engine(AFDRunner)``: the continuous-batching scheduler over the disaggregated pipeline (2 attention + 2 FFN
    devices, decode steps in 2 micro-batches). Requests arriving at different times, greedy and sampled, prompts
    of 1 to 16 tokens, some ended by a stop token, a page pool too small for all of them at once (preemption and
    recompute): every request gets exactly the tokens (and log-probabilities) the colocated engine gives it. Each
    decode step is dispatched before the previous one's tokens are read (rows still decoding take their token on
    the device). A second wave of requests compiles nothing new. A batch the micro-batches cannot split is
    refused."""
    from infer.afd import StepTokens
    from infer.engine import Engine, EngineConfig

    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(3, config.vocab_size, size=n)] for n in rng.integers(1, 17, size=12)]
    params = [
        SamplingParams(max_new_tokens=int(k), temperature=0.0 if i % 2 else 0.9, top_k=0 if i % 3 else 20, seed=i)
        for i, k in enumerate(rng.integers(1, 14, size=12))
    ]
    sizes = dict(max_seq_len=32, page_size=8, prefill_chunk=16)
    colocated = Engine(create_model(config, seed=SEED), EngineConfig(max_batch=4, **sizes))
    free = colocated.generate_outputs(prompts, params)
    # every third request stops at its third token (a stop token ends it while its next step is in flight)
    params = [
        dataclasses.replace(p, stop_token_ids=(f.token_ids[2],)) if i % 3 == 0 and len(f.token_ids) > 3 else p
        for i, (p, f) in enumerate(zip(params, free, strict=True))
    ]
    want = colocated.generate_outputs(prompts, params)
    assert sum(o.finish_reason == "stop" for o in want) >= 2

    runner = AFDRunner.create(config, AFDConfig(attention_devices=2, ffn_devices=2, micro_batches=2, transfer="model"),
                              seed=SEED)  # fmt: skip
    engine = Engine(runner, EngineConfig(max_batch=8, num_pages=12, **sizes))
    calls, dispatch, read = [], runner.dispatch, StepTokens.read

    def logged_dispatch(pool, ids, *args, decode=False, **kw):
        out, pool = dispatch(pool, ids, *args, decode=decode, **kw)
        calls.append(("decode" if decode else "prefill", np.asarray(ids).copy(), out))
        return out, pool

    def logged_read(self):
        calls.append(("read", 0, self))  # (the objects themselves: no id is reused)
        return read(self)

    runner.dispatch, StepTokens.read = logged_dispatch, logged_read
    try:
        first = [engine.submit(p, sp) for p, sp in zip(prompts[:7], params[:7], strict=True)]
        done = {}
        for _ in range(3):
            done |= {ev.request_id: ev.output for ev in engine.step() if ev.finished}
        later = [engine.submit(p, sp) for p, sp in zip(prompts[7:], params[7:], strict=True)]
        done |= engine.run()
    finally:
        del runner.dispatch
        StepTokens.read = read
    got = [done[i] for i in first + later]
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    np.testing.assert_allclose(sum((o.logprobs for o in got), []), sum((o.logprobs for o in want), []), atol=1e-4)
    assert all(o.ok for o in got) and engine.stats["preemptions"] > 0
    # a step's tokens are read only after the next decode step is dispatched, which takes them on the device: a
    # decode step's (ids of -1) and a prefill step's first tokens (-2 - the prefill row); other prefills never
    read_at = {id(step): i for i, (kind, _, step) in enumerate(calls) if kind == "read"}
    decode_at = [i for i, c in enumerate(calls) if c[0] == "decode"]
    for i, (kind, _, step) in enumerate(calls):
        d = next((d for d in decode_at if d > i), None)
        if kind != "read" and d is not None and ((calls[d][1] == -1) if kind == "decode" else calls[d][1] <= -2).any():
            assert read_at.get(id(step), len(calls)) > d
    decodes = [ids for kind, ids, _ in calls if kind == "decode"]
    assert sum((ids == -1).any() for ids in decodes) > len(decodes) // 2
    assert sum((ids <= -2).any() for ids in decodes) >= 6  # (requests arrive 7 at once, then 5)
    assert engine.pages_in_use() == 0
    # steady state: a second wave of different requests compiles nothing new (one decode program per kind,
    # prefill ones per chunk bucket, all traced by the first wave)
    counts = dict(engine.trace_counts)
    programs = ("embed", "attention_dense", "attention_moe", "ffn_dense", "ffn_moe", "logits")
    assert set(counts) == {f"afd_{p}" for p in programs}
    more = [[int(t) for t in rng.integers(3, config.vocab_size, size=n)] for n in rng.integers(1, 17, size=10)]
    outs = engine.generate_outputs(more, [dataclasses.replace(p, seed=p.seed + 100) for p in params[:10]])
    assert all(o.ok for o in outs) and engine.trace_counts == counts

    with pytest.raises(ValueError, match="gives 3 decode slots per attention device, which the AFD runner's 2 "):
        Engine(runner, EngineConfig(max_batch=6, **sizes))
    # a token "still on the device" (-1) only where a decode step of the same shape ran before
    table, zeros = np.zeros((4, engine.max_pages_per_seq), np.int32), np.zeros((4,), np.int32)
    with pytest.raises(ValueError, match="negative token ids .* are for decode steps"):
        runner.dispatch(engine._pool, np.full((4, 2), -1), table, zeros, zeros)
    with pytest.raises(ValueError, match="decode step of 4 rows and 2 micro-batches, but no decode step of that"):
        runner.dispatch(engine._pool, np.full((4, 1), -1), table, zeros, zeros, decode=True)
    # a prefill's token (-2 - its row) only from the last prefill step's rows
    rows = engine.prefill_rows_per_group * engine.groups
    with pytest.raises(ValueError, match=f"token id {-2 - rows} in a decode step takes row {rows} of the last "
                                         f"prefill step, which had {rows} rows"):  # fmt: skip
        runner.dispatch(engine._pool, np.full((4, 1), -2 - rows), table, zeros, zeros, decode=True)


def test_impossible_requests_fail_before_work(config, test_config, prompts):
    with pytest.raises(ValueError, match=r"asks for 6 attention \+ 4 FFN = 10 devices, but only 8 exist"):
        AFDRunner.create(config, AFDConfig(attention_devices=6, ffn_devices=4))
    with pytest.raises(ValueError, match="at least one FFN device"):
        AFDRunner.create(config, AFDConfig(attention_devices=8, ffn_devices=0))
    with pytest.raises(ValueError, match="at least one attention device"):
        AFDRunner.create(config, AFDConfig(attention_devices=0, ffn_devices=8))
    with pytest.raises(ValueError, match="moe_num_experts = 5 cannot be split over expert_parallel = 4"):
        AFDRunner.create(test_config, AFDConfig(attention_devices=4, ffn_devices=4, expert_parallel=4))
    with pytest.raises(ValueError, match="moe_intermediate_size = 36 cannot be split over the tensor-parallel size 7"):
        AFDRunner.create(test_config, AFDConfig(attention_devices=1, ffn_devices=7, expert_parallel=1))
    with pytest.raises(ValueError, match="transfer must be one of"):
        AFDRunner.create(config, AFDConfig(transfer="int4"))
    with pytest.raises(
        ValueError, match=r"kv_dtype must be None \(the model's dtype\) or one of \('bfloat16', .*got 'int8'"
    ):
        AFDRunner.create(config, AFDConfig(kv_dtype="int8"))
    with pytest.raises(ValueError, match="peer_timeout_s must be a positive number of seconds, got -1"):
        AFDRunner.create(config, AFDConfig(peer_timeout_s=-1))
    with pytest.raises(ValueError, match=r"instances must be one of \('one', 'per-process'\), got 'each'"):
        AFDRunner.create(config, AFDConfig(instances="each"))
    runner = AFDRunner.create(config, AFDConfig(attention_devices=4, ffn_devices=4, micro_batches=3))
    with pytest.raises(ValueError, match="agree_round is for per-process attention instances"):
        runner.agree_round()
    with pytest.raises(ValueError, match="a batch of 2 sequences cannot fill 3 micro-batches"):
        runner.generate(prompts[:2], 2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        runner.generate(prompts, 0)
    context = config.max_position_embedding
    with pytest.raises(ValueError, match=f"prompt of {context - 1} tokens \\+ max_new_tokens 2 = {context + 1} exc"):
        runner.generate([[1] * (context - 1)] * 3, 2)


# ---------------------------------------------------------------------------------------------- two processes


def _run_workers(tmp_path, *extra, processes=2, timeout=150):
    """The processes of tests/afd_worker.py on localhost; returns [(returncode, output)] (tokens: tmp_path /
    tokens.json.<process id> of each attention process)."""
    port, out = free_port(), tmp_path / "tokens.json"
    worker = Path(__file__).with_name("afd_worker.py")
    command = lambda i: [sys.executable, str(worker), str(i), str(port), str(out), "--processes", str(processes),  # noqa: E731
                         *extra]  # fmt: skip
    return run_processes(command, timeout, f"{processes}-process AFD run", processes)


def _tokens_of(tmp_path, process_id: int) -> dict:
    return json.loads((tmp_path / f"tokens.json.{process_id}").read_text())


def test_two_processes_give_the_single_process_tokens(four_four, tmp_path):
    """Attention devices in process 0, FFN devices in process 1 (jax.distributed, gloo): the tokens of the
    single-process 4A4F run with the same weights, for unequal splits (rounds of ppermute over all devices): 3A2F
    (every FFN device gets all three attention blocks; two return rounds, the second partial) and 2A3F (more FFN
    than attention devices). (Equal splits: the four-process test below.)"""
    splits = ("3x2", "2x3")
    (rc0, out0), (rc1, out1) = _run_workers(tmp_path, "--splits", ",".join(splits), timeout=300)
    assert rc0 == 0 and rc1 == 0, out0[-3000:] + out1[-3000:]
    tokens = _tokens_of(tmp_path, 0)
    assert list(tokens) == list(splits)
    for split in splits:
        assert tokens[split] == four_four[1].tokens, split
    assert not (tmp_path / "tokens.json.1").exists()  # the FFN process never sees tokens


@pytest.fixture(scope="module")
def checkpoint_dir(config, tmp_path_factory):
    """The reference model (seed 3, float32) as a Hugging Face checkpoint folder."""
    return save_pretrained(create_model(config, seed=SEED), tmp_path_factory.mktemp("afd") / "model")


def test_from_checkpoint_reads_each_half_into_its_own_submesh(prompts, checkpoint_dir, four_four, tmp_path):
    """``AFDRunner.from_checkpoint``: every tensor read once, straight into its side's submesh (attention weights
    only on the attention devices, experts only on the FFN devices), giving the tokens of the runner built from
    the same seed; a checkpoint that does not match its config is refused before any tensor is read."""
    runner = AFDRunner.from_checkpoint(checkpoint_dir, FOUR_FOUR)
    experts = runner._ffn_layer[1]["moe"]["gate_proj"].get_value()
    assert set(experts.sharding.device_set) == set(runner.ffn_mesh.devices.flat)
    wq = runner._attn_layer[0]["self_attn"]["wq"].get_value()
    assert set(wq.sharding.device_set) == set(runner.attn_mesh.devices.flat)
    assert runner.generate(prompts, NEW).tokens == four_four[1].tokens

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint_dir, bad)
    hf = json.loads((bad / "config.json").read_text())
    hf["num_hidden_layers"] += 1
    (bad / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="does not match the Step-3 model of its config.json; nothing was loaded"):
        AFDRunner.from_checkpoint(bad, FOUR_FOUR)


def test_four_processes_with_both_sides_spanning_two_give_the_single_process_tokens(
    four_four, checkpoint_dir, tmp_path
):
    """Four processes of 2 devices: attention on processes 0 and 1, FFN on 2 and 3, so both sides' meshes span two
    processes (the paper's multi-node instances): the experts' all_to_all and the logits program's token gather
    run between processes of one side. 4A4F (ppermute to a partner over the role axis of one global mesh; experts
    split 4 ways over two processes) and 4A2F (rounds of ppermute; expert parallel 2 across processes 2 and 3),
    the weights read from a checkpoint (``AFDRunner.from_checkpoint``): the single-process tokens on both attention
    processes, and each process reads only its own side's tensors, an FFN process only half of the experts."""
    splits = ("4x4", "4x2")
    runs = _run_workers(tmp_path, "--devices", "2", "--splits", ",".join(splits), "--checkpoint", str(checkpoint_dir),
                        "--logits", processes=4, timeout=300)  # fmt: skip
    assert all(rc == 0 for rc, _ in runs), "".join(out[-2000:] for _, out in runs)
    for p in (0, 1):
        tokens = _tokens_of(tmp_path, p)
        assert list(tokens) == list(splits)
        for split in splits:
            assert tokens[split] == four_four[1].tokens, (p, split)
            # every row's logits (each attention process's rows gathered only on request) equal the single run's
            logits = np.load(tmp_path / f"tokens.json.{p}.{split}.npy")
            np.testing.assert_allclose(logits, np.stack(four_four[1].logits), rtol=1e-5, atol=1e-5)
    assert not any((tmp_path / f"tokens.json.{p}").exists() for p in (2, 3))
    loads = [re.findall(r"loaded (\d+) tensors .* this process read (\d+) of their (\d+) bytes", out)
             for _, out in runs]  # fmt: skip
    assert all(len(r) == len(splits) for r in loads), loads  # one checkpoint read per runner
    header = open_checkpoint(checkpoint_dir).tensors
    experts = sum(i.nbytes for k, i in header.items() if re.search(r"\.moe\.(gate|up|down)_proj\.", k))
    for s in range(len(splits)):  # the attention processes read the attention tensors, the FFN processes the rest
        (n_attn, read_attn, attn), (n_ffn, read_ffn, ffn) = ([int(v) for v in loads[p][s]] for p in (0, 2))
        assert [loads[1][s], loads[3][s]] == [loads[0][s], loads[2][s]], loads
        assert 0 < n_attn < len(header) and n_attn + n_ffn == len(header), loads
        assert attn + ffn == sum(i.nbytes for i in header.values()), loads
        # data-parallel attention: every attention process needs all of it; each FFN process half of the experts
        assert read_attn == attn and read_ffn == ffn - experts // 2, (loads, experts)


def test_per_process_attention_instances_share_the_ffn_side(config, prompts, tmp_path):
    """Three processes of 2 devices: two independent attention instances (processes 0 and 1, each its own engine,
    requests and pages on its 2 attention devices) sharing one FFN process (2 devices), stepping together round by
    round. Instance 0 gets the even prompts (greedy, 3 tokens: it closes early and then runs the other's steps on
    padding rows), instance 1 the odd ones (sampled, 9 tokens): every request gets exactly the tokens the
    colocated engine gives it. An instance whose engine differs (another max_batch) is refused with a clear error
    on every process before any step runs."""
    from afd_worker import instance_params

    from infer.engine import Engine, EngineConfig

    args = ("--devices", "2", "--splits", "4x2", "--attention-processes", "2", "--instances")
    runs = _run_workers(tmp_path, *args, processes=3, timeout=300)
    assert all(rc == 0 for rc, _ in runs), "".join(_log_lines(out) for _, out in runs)
    got = _tokens_of(tmp_path, 0) | _tokens_of(tmp_path, 1)
    assert sorted(map(int, _tokens_of(tmp_path, 1))) == [1, 3, 5]
    engine = Engine(create_model(config, seed=SEED), EngineConfig(max_batch=4, max_seq_len=32, page_size=8))
    want = engine.generate_outputs(prompts, [instance_params(i) for i in range(len(prompts))])
    assert {int(i): t for i, t in got.items()} == {i: o.token_ids for i, o in enumerate(want)}
    assert not (tmp_path / "tokens.json.2").exists()

    runs = _run_workers(tmp_path / "mismatch", *args, "--mismatch", processes=3, timeout=300)
    for rc, out in runs:
        assert rc != 0 and "the attention instances' engines differ" in out, _log_lines(out)


def test_a_dead_attention_instance_ends_the_others_with_a_clear_error(tmp_path):
    """One of two attention instances exits between two rounds (its 4th): the other instance and the FFN process
    end with status 75 and the reason (the round's exchange fails, or the watchdog fires), not a hang."""
    args = ("--devices", "2", "--splits", "4x2", "--attention-processes", "2", "--instances", "--die-at", "4")
    runs = _run_workers(tmp_path, *args, "--peer-timeout", "60", processes=3, timeout=240)
    assert runs[1][0] == 3, _log_lines(runs[1][1])
    for rc, out in (runs[0], runs[2]):
        assert rc == 75 and "the peer process failed or hangs" in out, _log_lines(out)


def test_round_plans_of_attention_instances():
    """The plan every process derives from the round's headers: a prefill at the widest chunk any instance wants,
    a decode step if any wants one, nothing from the FFN processes' rows, done only once every instance has closed;
    instances with different shapes are named in the error. Single-process runners refuse the round calls."""
    from infer.afd import InstanceShapes, RoundStep, agreed_shapes, round_plan

    shapes = InstanceShapes(1, 1, 4, 2, 4, 9, 8, 0)
    rows = np.array([[1, *dataclasses.astuple(shapes)], [1, *dataclasses.astuple(shapes)], [0] * 9])
    assert agreed_shapes(rows) == shapes
    rows[1, 3] = 8
    with pytest.raises(ValueError, match=r"engines differ \(process 0: .*decode_rows=4.*; process 1: .*decode_rows=8"):
        agreed_shapes(rows)

    plan = round_plan(np.array([[1, 0, 16, 0], [1, 1, 0, 1], [0, 0, 0, 0]]), shapes)
    assert not plan.done
    assert plan.steps == (RoundStep("prefill", 1, 16, 1, 4), RoundStep("decode", 4, 1, 2, 4))
    assert round_plan(np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]), shapes).steps == ()
    assert round_plan(np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]), shapes).done


def test_process_splits_that_cannot_be_made_are_refused(config):
    """:func:`split_processes` (run by every process before any work): which devices each side takes, and the
    errors for splits that cannot be made."""
    from types import SimpleNamespace

    from infer.afd import split_processes

    devices = [SimpleNamespace(id=10 * p + i, process_index=p) for p in range(4) for i in range(2)]
    ids = lambda ds: [d.id for d in ds]  # noqa: E731
    attn, ffn, k = split_processes(devices, AFDConfig(attention_devices=4, ffn_devices=2), 4)
    assert k == 2 and ids(attn) == [0, 1, 10, 11] and ids(ffn) == [20, 30]
    attn, ffn, k = split_processes(devices, AFDConfig(attention_devices=3, ffn_devices=2, attention_processes=3), 4)
    assert k == 3 and ids(attn) == [0, 10, 20] and ids(ffn) == [30, 31]
    attn, ffn, k = split_processes(devices[:4], AFDConfig(attention_devices=2, ffn_devices=1), 2)
    assert k == 1 and ids(attn) == [0, 1] and ids(ffn) == [10]
    bad = [
        (AFDConfig(attention_devices=3, ffn_devices=2), "3 attention devices cannot be split evenly over the 2 "
         "attention processes \\(0 .. 1\\); ask for a multiple of 2"),
        (AFDConfig(attention_devices=2, ffn_devices=1), "1 FFN devices cannot be split evenly over the 2 FFN "
         "processes \\(2 .. 3\\)"),
        (AFDConfig(attention_devices=6, ffn_devices=2), "process 0 has 2 devices, but each of the 2 attention "
         "processes \\(0 .. 1\\) must give 3 of the 6 attention devices"),
        (AFDConfig(attention_devices=2, ffn_devices=2, attention_processes=4), "attention_processes = 4 with 4 "
         "processes: each side needs at least one process, so choose 1 .. 3"),
    ]  # fmt: skip
    for afd, message in bad:
        with pytest.raises(ValueError, match=message):
            split_processes(devices, afd, 4)
    with pytest.raises(ValueError, match="AFD attention_processes must be a positive int, got 0"):
        AFDRunner.create(config, AFDConfig(attention_processes=0))


def test_a_dead_peer_ends_the_survivor_with_a_clear_error(tmp_path):
    """The FFN process exits right after joining: the attention process must not hang but exit with an error
    that says a peer died (JAX's heartbeat; the runner's own watchdog bounds it too)."""
    (rc0, out0), (rc1, _) = _run_workers(tmp_path, "--exit-early", timeout=120)
    assert rc1 == 0  # the early exit itself
    assert rc0 != 0
    assert "another task died" in out0 or "stopped sending heartbeats" in out0 or "peer process failed" in out0, out0[
        -3000:
    ]
    assert not (tmp_path / "tokens.json.0").exists()


def _log_lines(output: str, n: int = 60) -> str:
    """A process's output without native stack frames (the first ``n`` lines of it, then the last ``n``)."""
    lines = [line for line in output.splitlines() if not line.lstrip().startswith("@ ")]
    return "\n".join(lines if len(lines) <= 2 * n else [*lines[:n], "...", *lines[-n:]])


def test_engine_driver_and_servers_exit_with_a_clear_error_when_a_peer_hangs(tmp_path):
    """The engine over a two-process runner (process 0 schedules, process 1 serves the FFN side) whose FFN process
    hangs in its third step, alive and sending heartbeats, so JAX's heartbeat cannot tell: the step watchdog
    (``peer_timeout_s``, 45 s here: longer than any step's compilation on a loaded machine) ends the driver with
    an error that says why, instead of a hang, and the hung process goes too (its own watchdog, or JAX once the
    driver, which hosts the coordination service, is gone), while the wait between steps stays unbounded (the
    engine's idle time is not a failure). (The hung process's watchdog may fire first: then the driver's step
    fails on the closed connection, which ends it the same way.)"""
    args = ("--engine", "--devices", "2", "--splits", "2x2", "--hang-at", "3", "--peer-timeout", "45")
    (rc0, out0), (rc1, out1) = _run_workers(tmp_path, *args, timeout=180)
    assert rc0 == 75 and "the peer process failed or hangs" in out0, _log_lines(out0)  # the watchdog, not a crash
    assert rc1 != 0 and ("the peer process failed or hangs" in out1 or "another task died" in out1), _log_lines(out1)
    assert not (tmp_path / "tokens.json.0").exists()


def test_engine_driver_exits_with_a_clear_error_when_a_peer_dies_in_a_step(tmp_path):
    """The FFN process of an engine's two-process runner exits as its third step begins: the driver's collectives
    fail (the connection is gone) and it ends with status 75 and the reason, at once (not after the watchdog's
    timeout, and not in an abort from JAX's shutdown barrier, which would wait for the dead peer)."""
    args = ("--engine", "--devices", "2", "--splits", "2x2", "--die-at", "3", "--peer-timeout", "300")
    t0 = time.monotonic()
    (rc0, out0), (rc1, _) = _run_workers(tmp_path, *args, timeout=240)
    assert rc1 == 3, _log_lines(out0)
    assert rc0 == 75 and "a step failed" in out0 and "the peer process failed or hangs" in out0, _log_lines(out0)
    assert time.monotonic() - t0 < 200  # the watchdog (300 s) played no part
    assert not (tmp_path / "tokens.json.0").exists()


CLI_ARGS = ["--preset", "test", "--attention-devices", "2", "--ffn-devices", "1", "--micro-batches", "2"]
CLI_ARGS += ["--batch", "3", "--max-new-tokens", "3", "--transfer", "model", "--kv-dtype", "float8_e4m3fn"]


def _token_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("  ") and " -> [" in line]


def test_cli_single_and_two_process_runs_print_the_same_tokens(tmp_path, capsys):
    """``python -m infer.afd``: one process (2A1F on this process's devices, checked against the colocated engine),
    then the same arguments as two processes (``--coordinator`` / ``--process-id``: process 0 attention on 2
    devices, process 1 FFN on 1): the same tokens, also against the colocated engine (run by process 0), and
    with ``--trace-dir`` one trace of both processes on one time line, in which (once the processes' clocks are
    aligned) every micro-batch's FFN starts after its attention and ends before the next layer's attention needs
    it, and micro-batch 1's attention runs before the attention devices wait for micro-batch 0's F->A; a
    half-given multi-process request is refused."""
    from infer.afd import main

    assert main([*CLI_ARGS]) == 0
    single = capsys.readouterr().out
    # (FP8 KV pages on both sides: the colocated engine compared against takes --kv-dtype too)
    assert "colocated engine: 3/3 sequences with identical greedy tokens" in single, single
    want = _token_lines(single)
    assert len(want) == 3

    with pytest.raises(SystemExit) as err:
        main([*CLI_ARGS, "--coordinator", "127.0.0.1:1"])
    assert err.value.code == 2
    assert "--coordinator and --process-id go together" in capsys.readouterr().err
    for bad, message in [
        (["--attention-processes", "1"], "--num-processes and --attention-processes are for multi-process runs"),
        (["--coordinator", "127.0.0.1:1", "--process-id", "2"], "--process-id must be in 0 .. 1 (--num-processes)"),
        (["--coordinator", "127.0.0.1:1", "--process-id", "0", "--num-processes", "1"], "must be at least 2"),
    ]:
        with pytest.raises(SystemExit) as err:
            main([*CLI_ARGS, *bad])
        assert err.value.code == 2
        assert message in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    for bad, message in [
        (["--trace-dir", str(tmp_path / "file")], "is a file, not a folder"),
        (["--trace-dir", str(tmp_path), "--max-new-tokens", "1"], "it needs --max-new-tokens >= 2"),
    ]:
        with pytest.raises(SystemExit):
            main([*CLI_ARGS, *bad])
        assert message in capsys.readouterr().err
    assert main([*CLI_ARGS, "--max-new-tokens", "600"]) == 2  # before any generation
    assert "--max-new-tokens 600 exceeds the model's context of 512 tokens" in capsys.readouterr().err

    port = free_port()
    cli = [sys.executable, "-m", "infer.afd", *CLI_ARGS, "--cpu-devices", "2", "--coordinator", f"127.0.0.1:{port}"]
    cli += ["--trace-dir", str(tmp_path / "trace")]
    (rc0, out0), (rc1, out1) = run_processes(
        lambda i: [*cli, "--process-id", str(i), "--peer-timeout", "60"], 240, "two-process CLI run"
    )
    assert rc0 == 0 and rc1 == 0, out0[-3000:] + out1[-3000:]
    assert _token_lines(out0) == want
    assert "colocated engine: 3/3 sequences with identical greedy tokens" in out0, out0[-3000:]
    assert "process 1 (FFN side): served 3 sequences" in out1 and not _token_lines(out1)

    events = json.loads((tmp_path / "trace" / "afd_trace.json").read_text())["traceEvents"]
    stages = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    spans = {(e["pid"], stages[e["tid"]], e["args"]["layer"], e["args"]["micro_batch"]): (e["ts"], e["ts"] + e["dur"])
             for e in events if e["ph"] == "X"}  # fmt: skip
    assert (tmp_path / "trace" / "afd_gantt.png").stat().st_size > 0
    # microseconds of clock alignment error allowed: 300, plus the spread of the transfers' own offsets around the
    # one process 1 was shifted by (merge_process_intervals' clock_error; a loaded machine delays some transfer ends)
    clock_error = max(e["args"]["clock_error_us"] for e in events if e["ph"] == "X" and e["pid"] == 1)
    layers, slack = 3, 300.0 + clock_error  # (the test preset's layers)
    for layer in range(layers):
        for mb in range(2):
            attention, ffn = spans[(0, "attention", layer, mb)], spans[(1, "ffn", layer, mb)]
            after = spans[(0, "attention" if layer + 1 < layers else "logits", layer + 1, mb)]
            assert attention[1] - slack <= ffn[0] and ffn[1] - slack <= after[0], (layer, mb, attention, ffn, after)
    assert {p for p, *_ in spans} == {0, 1}
    # the attention devices run micro-batch 1's attention before waiting in micro-batch 0's F->A (its collective
    # holds them until the FFN side has finished micro-batch 0), so the two sides work at once
    for layer in range(layers):
        assert spans[(0, "attention", layer, 1)][0] < spans[(0, "f2a", layer, 0)][0], layer


def test_cli_peer_that_never_comes_ends_the_process_in_bounded_time(tmp_path):
    """The FFN process of a two-process CLI job whose attention process never starts exits (non-zero, naming the
    wait and JAX's deadline) after ``--peer-timeout`` instead of waiting forever."""
    cmd = [sys.executable, "-m", "infer.afd", *CLI_ARGS, "--cpu-devices", "2", "--coordinator",
           f"127.0.0.1:{free_port()}", "--process-id", "1", "--peer-timeout", "3"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the CLI waited more than 90 s for a peer it was told to wait 3 s for")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "waiting up to 3 s for the other processes" in out and "DEADLINE_EXCEEDED" in out, out[-3000:]

"""Continuous-batching engine (infer/engine.py): identical greedy results to each request alone and to the
contiguous cache, chunked prefill == one-shot prefill, preemption, a 500-request load test, per-request errors,
seeded sampling, streaming, no recompilation in steady state, data-parallel serving on a mesh, the CLI."""

import dataclasses
import json
import math
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compiles import count_compiles
from flax import nnx

from infer.engine import Engine, EngineConfig, StreamEvent
from infer.generate import generate_ids, main
from infer.sampling import SamplingParams, param_rows, request_keys, sample, sample_mode
from step3_jax import KVCache, create_model, make_mesh
from step3_jax.kv_cache import PageAllocator, PagedKVCache

SMALL = EngineConfig(max_batch=4, page_size=4, num_pages=16, max_seq_len=64, prefill_chunk=16, min_bucket=16)


@pytest.fixture(scope="module")
def model(test_config):
    return create_model(test_config, seed=1)


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, SMALL)


def alone(engine, prompt, params):
    """The request run by itself through an idle engine."""
    assert not engine.has_work()
    return engine.generate_outputs([prompt], params)[0].token_ids


def random_prompt(rng, n, vocab=263):
    return [1] + [rng.randrange(3, vocab) for _ in range(n - 1)]


def drive(engine, schedule):
    """Submit ``schedule[step] = [(prompt, params), ...]`` at those engine steps; returns outputs by id + events."""
    outputs, events, ids, step = {}, [], {}, 0
    last = max(schedule)
    while step <= last or engine.has_work():
        for i, (prompt, params) in enumerate(schedule.get(step, [])):
            ids[(step, i)] = engine.submit(prompt, params)
        for ev in engine.step():
            events.append(ev)
            if ev.finished:
                assert ev.request_id not in outputs, "a request finished twice"
                outputs[ev.request_id] = ev.output
        for a in engine.allocators:
            a.check()
        step += 1
    return {key: outputs[rid] for key, rid in ids.items()}, events


# ---------------------------------------------------------------------------------------------- correctness


def test_decode_overlaps_the_host_and_stop_tokens_still_end_requests(engine):
    """Each colocated decode step is dispatched before the previous step's tokens are read: rows that decoded in
    the previous step, or whose prompt this step's prefill completed, take their input token on the device, and
    the host reads those tokens afterwards, while this step runs. A request a stop token ends so runs one step too
    many, whose token is dropped: every output ends at its first stop token and equals the request run alone."""
    rng = random.Random(5)
    prompts = [random_prompt(rng, n) for n in (3, 8, 5, 12)]
    free = [alone(engine, p, SamplingParams(max_new_tokens=10)) for p in prompts]
    params = [SamplingParams(max_new_tokens=10, stop_token_ids=(f[3],)) for f in free]  # each stops early
    calls, real_decode, real_collect = [], engine._decode_fn, engine._collect

    def decode(state, pool, tokens, on_device, prev, *rest):
        calls.append(("dispatch", np.asarray(on_device).copy()))
        return real_decode(state, pool, tokens, on_device, prev, *rest)

    def collect(step):
        calls.append(("collect", None))
        return real_collect(step)

    engine._decode_fn, engine._collect = decode, collect
    try:
        outs = engine.generate_outputs(prompts, params)
    finally:
        engine._decode_fn = real_decode
        del engine._collect
    for f, p, o in zip(free, params, outs, strict=True):
        assert o.token_ids == f[: f.index(p.stop_token_ids[0]) + 1] and o.finish_reason == "stop"
    # step 1 prefills the first request and decodes it from its first token, still on the device; step 2 the
    # second request likewise, and the first from its step-1 token
    assert [kind for kind, _ in calls[:4]] == ["dispatch", "collect", "dispatch", "collect"]
    assert calls[0][1].sum() == 1 and calls[2][1].sum() == 2
    assert engine.pages_in_use() == 0 and not engine.has_work()


def test_prefill_chunks_are_not_waited_for(model, engine):
    """A 40-token prompt in chunks of 16: the host waits for no prefill chunk, and reads the last one's token (the
    first output token) only after the decode step that takes it on the device is dispatched; the output is the
    one-shot request's."""
    prompt = random_prompt(random.Random(9), 40)
    want = generate_ids(model, [prompt], SamplingParams(max_new_tokens=3)).tokens[0]
    reads, real_prefill, real_decode, real_read = [], engine._prefill_fn, engine._decode_fn, engine._read

    def prefill(state, pool, ids, *rest):
        reads.append(("prefill", ids.shape[1]))
        return real_prefill(state, pool, ids, *rest)

    def decode(state, pool, tokens, on_device, *rest):
        reads.append(("decode", int(np.asarray(on_device).sum())))
        return real_decode(state, pool, tokens, on_device, *rest)

    def read(out, logprobs):
        reads.append(("read", None))
        return real_read(out, logprobs)

    engine._prefill_fn, engine._decode_fn, engine._read = prefill, decode, read
    try:
        got = alone(engine, prompt, SamplingParams(max_new_tokens=3))
    finally:
        engine._prefill_fn, engine._decode_fn = real_prefill, real_decode
        del engine._read
    assert got == want
    # (the last chunk: 8 tokens in the 16 bucket; its token is the decode step's input on the device)
    assert reads[:5] == [("prefill", 16)] * 3 + [("decode", 1), ("read", None)]


def test_continuous_batching_greedy_equals_each_request_alone_and_contiguous_cache(model, engine):
    rng = random.Random(0)
    lengths = [1, 3, 9, 17, 33, 5, 12, 2, 26, 7]  # chunked prefill (chunk 16) for the long ones
    news = [6, 1, 9, 4, 12, 7, 3, 10, 5, 8]
    reqs = [(random_prompt(rng, n), SamplingParams(max_new_tokens=m)) for n, m in zip(lengths, news, strict=True)]
    schedule = {0: reqs[:3], 1: reqs[3:5], 4: reqs[5:6], 5: reqs[6:8], 11: reqs[8:]}  # arrivals over time
    outputs, _ = drive(engine, schedule)
    assert len(outputs) == len(reqs)
    # the contiguous-cache static batch (one compile): greedy tokens without stop tokens are prefixes of longer runs
    contiguous = generate_ids(model, [p for p, _ in reqs], SamplingParams(max_new_tokens=max(news))).tokens
    for (step, i), out in outputs.items():
        prompt, params = schedule[step][i]
        assert out.finish_reason == "length" and len(out.token_ids) == params.max_new_tokens
        assert out.token_ids == alone(engine, prompt, params)
        assert out.token_ids == contiguous[reqs.index((prompt, params))][: params.max_new_tokens]


def test_chunked_paged_prefill_and_paged_decode_equal_one_shot_contiguous(model, test_config):
    """Model level: the prompt prefilled in chunks of 8 through a paged cache (shuffled pages, a padded last
    chunk) gives the logits of a one-shot prefill through the contiguous cache; decode steps agree too."""
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache))
    n, chunk, decode = 21, 8, 5
    ids = jnp.asarray(np.random.default_rng(3).integers(3, test_config.vocab_size, (1, n + decode)), jnp.int32)
    contig = KVCache.create(test_config, 1, 32)
    ref, contig = step(state, ids[:, :n], contig)
    alloc = PageAllocator(num_pages=12, page_size=4, max_pages_per_seq=8, shuffle_seed=5)
    alloc.reserve(0, 32)
    paged = PagedKVCache.create(test_config, alloc.block_table([0]), num_pages=12, page_size=4)
    chunks = []
    for s in range(0, n, chunk):
        piece = np.zeros((1, chunk), np.int32)
        m = min(chunk, n - s)
        piece[0, :m] = np.asarray(ids[0, s : s + m])
        logits, paged = step(state, jnp.asarray(piece), paged.replace(lengths=jnp.array([s], jnp.int32)))
        chunks.append(np.asarray(logits[0, :m]))
    np.testing.assert_allclose(np.concatenate(chunks), np.asarray(ref[0]), rtol=2e-5, atol=2e-5)
    paged = paged.replace(lengths=jnp.array([n], jnp.int32))
    for t in range(n, n + decode):
        lc, contig = step(state, ids[:, t : t + 1], contig)
        lp, paged = step(state, ids[:, t : t + 1], paged)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(lc), rtol=2e-5, atol=2e-5)


def test_page_allocator_shares_published_pages_and_keeps_freed_ones_until_needed():
    """Prefix caching in the allocator: published pages are found by their keys (a prefix), shared by a new
    sequence, kept with their content once nobody holds them (counted free) and given up, least recently freed
    first, only when no never-used or unpublished page is left; the bookkeeping checks itself."""
    alloc = PageAllocator(num_pages=6, page_size=4, max_pages_per_seq=6)
    a = alloc.reserve("a", 10)  # 3 pages
    alloc.publish("a", 0, b"k0")
    alloc.publish("a", 1, b"k1")
    assert alloc.match([b"k0", b"k1", b"k2"]) == a[:2] and alloc.match([b"k1"]) == [a[1]] and alloc.match([]) == []
    b = alloc.reserve("b", 12, prefix=alloc.match([b"k0", b"k1"]))  # shares two pages, takes one
    assert b[:2] == a[:2] and b[2] not in a and alloc.num_free == 2
    alloc.check()
    alloc.free("a")  # its unpublished page is free again; the shared ones are still b's
    assert alloc.num_free == 3 and alloc.num_kept == 0
    alloc.free("b")
    assert alloc.num_free == 6 and alloc.num_kept == 2 and alloc.match([b"k0", b"k1"]) == a[:2]
    alloc.check()
    c = alloc.reserve("c", 16)  # four pages: the never-used and unpublished ones first
    assert not set(c) & set(a[:2]) and alloc.match([b"k0"]) == [a[0]]
    d = alloc.reserve("d", 4)  # then the least recently freed kept page gives up its content
    assert d == [a[1]] and alloc.match([b"k0", b"k1"]) == [a[0]] and alloc.num_kept == 1
    alloc.check()
    # a page published once keeps its first key; a key names one page
    alloc.publish("d", 0, b"k0")
    alloc.publish("c", 0, b"k9")
    assert alloc.match([b"k0"]) == [a[0]] and alloc.match([b"k9"]) == [c[0]]
    with pytest.raises(ValueError, match="sequence 'c' owns pages already: a shared prefix is for a new sequence"):
        alloc.reserve("c", 20, prefix=[a[0]])
    with pytest.raises(ValueError, match="names pages that hold no published content"):
        alloc.reserve("e", 4, prefix=[c[1]])
    with pytest.raises(RuntimeError, match="out of KV pages: sequence 'e' needs 2 more pages, 0 of 6 are free"):
        alloc.reserve("e", 12, prefix=[a[0]])
    assert alloc.num_owned("e") == 0 and alloc.num_kept == 1  # (refused: nothing taken)
    with pytest.raises(ValueError, match=r"a prefix for 'e' names a page twice: \[\d, \d\]"):
        alloc.reserve("e", 8, prefix=[a[0], a[0]])  # (would write its second page's tokens into a shared page)
    for bad in (-1, 9, True):
        with pytest.raises(ValueError, match=r"publish: sequence 'd' owns pages 0 \.\. 0, not page"):
            alloc.publish("d", bad, b"kx")
    with pytest.raises(ValueError, match="publish: sequence 'zz' owns no pages"):
        alloc.publish("zz", 0, b"kx")
    with pytest.raises(ValueError, match="num_tokens must be an int >= 0, got -4"):
        alloc.reserve("e", -4)
    alloc.reserve("e", 0)  # a sequence that owns nothing yet may still start with a shared prefix
    assert alloc.reserve("e", 4, prefix=[a[0]]) == [a[0]]
    alloc.free("e")
    alloc.check()
    alloc._refs[c[0]] += 1  # a corrupted count is caught
    with pytest.raises(AssertionError, match="page pool corrupted"):
        alloc.check()


def test_prefix_cache_shares_common_prompts_and_changes_no_output(model):
    """Prompts that begin with the same 20-token system prompt (5 pages of 4), and a conversation's next turn (a
    prompt that begins with an earlier prompt and its answer): with prefix caching the later requests take those
    pages from the cache, running requests hold the same pages at once, fewer prompt tokens are prefilled, and
    every output equals the one computed without the cache and the contiguous-cache reference. Requests that
    arrive together wait for the first one's prefill to publish the pages they share."""
    rng = random.Random(11)
    system = random_prompt(rng, 20)
    prompts = [system + [rng.randrange(3, 263) for _ in range(n)] for n in (3, 9, 5, 14)]
    params = SamplingParams(max_new_tokens=6)
    # (a pool that keeps every freed page: what is taken from the cache does not depend on evictions)
    engines = {on: Engine(model, dataclasses.replace(SMALL, num_pages=64, prefix_caching=on)) for on in (True, False)}
    cached = engines[True]
    first = {on: e.generate_outputs(prompts[:1], params)[0] for on, e in engines.items()}
    assert cached.stats["prefix_cached_tokens"] == 0
    ids = [cached.submit(p, params) for p in prompts[1:]]
    cached.step()  # admitted together: each takes the system prompt's 5 pages from the first request's
    held = [cached.allocators[0].pages(i) for i in ids]
    first_pages = {tuple(pages[:5]) for pages in held}
    assert len(first_pages) == 1 and not set(held[0][5:]) & set(held[1][5:])
    assert cached.stats["prefix_cached_tokens"] == 3 * 20
    outs = cached.run()
    rest = {True: [outs[i] for i in ids], False: engines[False].generate_outputs(prompts[1:], params)}
    # the next turn: the first prompt, its answer and more; every full page with the KV of known tokens (the
    # answer's last token has none: no step took it) comes from the cache
    turn = prompts[0] + first[True].token_ids + [rng.randrange(3, 263) for _ in range(7)]
    before = cached.stats["prefix_cached_tokens"]
    again = {on: e.generate_outputs([turn], params)[0] for on, e in engines.items()}
    assert cached.stats["prefix_cached_tokens"] - before == (len(prompts[0]) + len(first[True].token_ids) - 1) // 4 * 4
    assert engines[False].stats["prefix_cached_tokens"] == 0
    want = generate_ids(model, prompts + [turn], params).tokens
    assert first[True].token_ids == first[False].token_ids == want[0]
    for on in (True, False):
        assert [o.token_ids for o in rest[on]] == want[1:4]
        assert again[on].token_ids == want[4]
    # requests that arrive together: the later ones wait until the first one's prefill has published what they
    # share, then take it from the cache
    system = random_prompt(rng, 20)
    together = [system + [rng.randrange(3, 263) for _ in range(n)] for n in (4, 6, 2)]
    before = cached.stats["prefix_cached_tokens"]
    ids = [cached.submit(p, params) for p in together]
    cached.step()
    assert cached.num_running == 1 and cached.num_waiting == 2
    outs = cached.run()
    assert cached.stats["prefix_cached_tokens"] - before == 2 * 20
    alone = engines[False].generate_outputs(together, params)
    assert [outs[i].token_ids for i in ids] == [o.token_ids for o in alone]
    for e in engines.values():
        e.allocators[0].check()
        assert e.pages_in_use() == 0


def test_warmup_buckets_cover_the_chunks_a_cached_prefix_leaves(model):
    """``prefill_buckets`` (what ``warmup`` compiles): a 100-token prompt in chunks of 64 uses the 64 bucket twice;
    with prefix caching whatever prefix it finds in the cache may leave a last chunk of any length, so every
    bucket up to 64; a prompt within one page finds no prefix."""
    for on, want in ((False, {64}), (True, {8, 16, 32, 64})):
        cfg = EngineConfig(max_batch=4, page_size=4, num_pages=32, max_seq_len=128, prefill_chunk=64, min_bucket=8,
                           prefix_caching=on)  # fmt: skip
        e = Engine(model, cfg)
        assert e.prefill_buckets(100) == want and e.prefill_buckets(4) == {8} and e.prefill_buckets(40) <= want


def test_preemption_requeues_and_results_are_unchanged(engine):
    """Four long requests in a pool that holds one max-length sequence: requests are preempted (pages freed,
    requeued, recomputed) and still produce exactly their results alone."""
    rng = random.Random(1)
    reqs = [(random_prompt(rng, n), SamplingParams(max_new_tokens=30)) for n in (20, 14, 25, 9)]
    before = engine.stats["preemptions"]
    outputs, events = drive(engine, {0: reqs})
    assert engine.stats["preemptions"] > before
    assert sum(o.num_preemptions for o in outputs.values()) > 0
    for (_, i), out in outputs.items():
        assert len(out.token_ids) == 30
        assert out.token_ids == alone(engine, *reqs[i])
    # the stream never repeats a token of a preempted request: one event per generated token
    for out in outputs.values():
        assert sum(ev.request_id == out.request_id and ev.token_id is not None for ev in events) == 30
    assert engine.pages_in_use() == 0


def test_abort_frees_a_running_and_a_waiting_request_and_the_others_are_unchanged(engine):
    """``Engine.abort``: a decoding request (its slot and pages freed at once, its output the tokens streamed so
    far) and a queued one (never runs) end with one finished "abort" event each; the other requests produce
    exactly their results alone; a second abort, or an unknown id, is refused with the reason."""
    rng = random.Random(7)
    reqs = [(random_prompt(rng, n), SamplingParams(max_new_tokens=12)) for n in (9, 5, 7, 3, 6)]
    ids = [engine.submit(p, sp) for p, sp in reqs]
    events = []
    for _ in range(4):
        events += engine.step()
    running, waiting = ids[0], ids[4]  # 4 slots: the fifth request is still queued
    assert engine.num_running == 4 and engine.num_waiting == 1
    streamed = [ev.token_id for ev in events if ev.request_id == running and ev.token_id is not None]
    assert streamed, "the request to abort should be decoding"
    pages = engine.pages_in_use()
    out = engine.abort(running)
    assert out.finish_reason == "abort" and out.token_ids == streamed and out.ok
    assert engine.pages_in_use() < pages and engine.num_running == 3
    assert engine.abort(waiting).token_ids == [] and engine.num_waiting == 0
    for rid in (running, "no-such-request"):
        with pytest.raises(ValueError, match="no waiting or running request .* already finished"):
            engine.abort(rid)
    done = {}
    while engine.has_work():
        for ev in engine.step():
            if ev.finished:
                done.setdefault(ev.request_id, []).append(ev)
        for a in engine.allocators:
            a.check()
    assert {rid: len(evs) for rid, evs in done.items()} == dict.fromkeys(ids, 1)
    assert [done[rid][0].output.finish_reason for rid in ids] == ["abort", "length", "length", "length", "abort"]
    for rid, (prompt, params) in zip(ids[1:4], reqs[1:4], strict=True):
        assert done[rid][0].output.token_ids == alone(engine, prompt, params)
    assert engine.pages_in_use() == 0 and engine.stats["aborted"] >= 2


def test_logprobs_are_the_models_log_probabilities_of_the_emitted_tokens(model, engine):
    """``RequestOutput.logprobs`` / ``StreamEvent.logprob``: for greedy and sampled requests (sampling at
    temperature 0.8 with top-k; logprobs are of the raw distribution), each generated token's log-probability under
    a full forward pass over prompt + the tokens before it; the stream carries the same values in order."""
    rng = random.Random(3)
    prompts = [random_prompt(rng, n) for n in (4, 11, 20)]
    params = [SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=0.8, top_k=20, seed=4),
              SamplingParams(max_new_tokens=6, temperature=1.0, seed=9)]  # fmt: skip
    events = []
    outs = engine.generate_outputs(prompts, params, on_event=events.append)
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out.logprobs) == len(out.token_ids) == 6
        seq = jnp.asarray([prompt + out.token_ids[:-1]], jnp.int32)
        logp = np.asarray(jax.nn.log_softmax(model(seq)[0].astype(jnp.float32), axis=-1))
        want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(out.token_ids)]
        np.testing.assert_allclose(out.logprobs, want, atol=1e-4)
        assert all(lp <= 0 for lp in out.logprobs)
        assert [ev.logprob for ev in events if ev.request_id == out.request_id] == out.logprobs


def test_500_requests_under_load_all_complete_once_with_bounded_memory(model):
    """500 requests with random prompt / output lengths, arriving in waves, through a pool that holds less than a
    third of what the running batch would need: none lost or duplicated, preemption happens, the page pool never
    over-commits and the cache arrays never grow; preempted requests still equal their results alone."""
    cfg = EngineConfig(max_batch=8, page_size=4, num_pages=24, max_seq_len=48, prefill_chunk=16, min_bucket=8,
                       prefill_batch=2)  # fmt: skip
    eng = Engine(model, cfg)
    pool_shapes = [x.shape for x in eng._pool["k"]]
    rng = random.Random(7)
    reqs = [
        # (ignore_eos: every request runs to its own length, the load this test sets up)
        (random_prompt(rng, rng.randint(1, 20)), SamplingParams(max_new_tokens=rng.randint(1, 16), ignore_eos=True))
        for _ in range(500)
    ]
    schedule = {}
    for i, r in enumerate(reqs):  # 25 waves of 20 arrivals, every 10 steps
        schedule.setdefault(10 * (i // 20), []).append(r)
    outputs, events = drive(eng, schedule)
    assert len(outputs) == 500 and len({o.request_id for o in outputs.values()}) == 500
    finished = [ev.request_id for ev in events if ev.finished]
    assert sorted(finished) == sorted(o.request_id for o in outputs.values())  # each exactly once
    for (step, i), out in outputs.items():
        prompt, params = schedule[step][i]
        assert out.ok and out.prompt_ids == prompt and len(out.token_ids) == params.max_new_tokens
    assert eng.stats["preemptions"] > 0
    assert eng.stats["peak_pages_in_use"] <= 24 and eng.pages_in_use() == 0
    assert [x.shape for x in eng._pool["k"]] == pool_shapes
    assert eng.trace_counts["decode"] == 1 and eng.trace_counts["prefill"] <= 2  # buckets 8 and 16
    preempted = [(k, o) for k, o in outputs.items() if o.num_preemptions][:3]
    assert preempted
    for (step, i), out in preempted:
        prompt, params = schedule[step][i]
        assert out.token_ids == generate_ids(model, [prompt], params).tokens[0]


def test_an_aborted_requests_stream_adds_up_to_its_text(model):
    """Text held back for an unfinished UTF-8 character reaches the stream with the abort event: the streamed
    pieces always add up to the output's text."""
    from step3_jax.tokenizer import ByteTokenizer

    engine = Engine(model, SMALL, tokenizer=ByteTokenizer())
    held = 0
    for seed in range(16):
        rid = engine.submit([1, 40, 41], SamplingParams(temperature=1.0, seed=seed, max_new_tokens=30))
        streamed = []
        while not any(ev.token_id is not None for ev in streamed):
            streamed += engine.step()
        engine.abort(rid)
        streamed += list(engine.events())
        (last,) = [ev for ev in streamed if ev.finished]
        assert last.output.finish_reason == "abort"
        assert "".join(ev.text for ev in streamed) == last.output.text
        held += last.text != ""
    assert held  # (some aborts came while a character's first bytes were held back)


def test_automatic_request_ids_skip_the_ids_callers_chose(engine):
    """``req-N`` ids never collide with a live id a caller chose: generate_outputs returns each prompt's own
    output beside a caller's queued request named like the id it would have taken; an error output under a live
    id is refused."""
    prompts, params = [[1, 5, 6], [1, 7, 8]], SamplingParams(max_new_tokens=3)
    expected = [alone(engine, p, params) for p in prompts]
    n = int(engine.submit([1, 5], SamplingParams(max_new_tokens=1)).split("-")[1])  # the counter's next id
    engine.run()
    engine.submit([1, 9, 9, 9], SamplingParams(max_new_tokens=2), request_id=f"req-{n + 2}")
    outs = engine.generate_outputs(prompts, params)  # their ids: req-{n+1} and (skipping the caller's) req-{n+3}
    assert [o.request_id for o in outs] == [f"req-{n + 1}", f"req-{n + 3}"]
    assert [o.prompt_ids for o in outs] == prompts and [o.token_ids for o in outs] == expected
    engine.submit([1, 2], SamplingParams(max_new_tokens=1), request_id="x")
    with pytest.raises(ValueError, match="'x' is already in use"):
        engine.submit_or_reject([], request_id="x")
    engine.run()


def test_a_top_k_beyond_int32_keeps_every_token(engine):
    params = dict(temperature=1.0, seed=5, max_new_tokens=6)
    both = [SamplingParams(**params), SamplingParams(**params, top_k=2**40)]
    off, huge = engine.generate_outputs([[1, 7, 8]] * 2, both)
    assert huge.ok and huge.token_ids == off.token_ids


# ---------------------------------------------------------------------------------------------- bad input


BAD_REQUESTS = [
    ([1] * 64, None, "longer than the context limit"),
    ([], None, "prompt is empty"),
    ("", None, "prompt is empty"),
    ([1, 2], {"temperature": -1.0}, "temperature"),
    ([1, 2], {"temperature": float("nan")}, "temperature"),
    ([1, 2], {"temperature": 10**400}, "temperature"),
    ([1, 2], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ([1, 2], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ([1, 2], {"stop_token_ids": ("###",)}, "stop_token_ids must be non-negative ints.*str"),
    ([1, 2], {"stop_token_ids": (2.5,)}, "stop_token_ids must be non-negative ints.*float"),
    ([1, 2], {"stop_token_ids": "###"}, "stop_token_ids must be a sequence of token ids"),
    ([1, 2], {"stop_token_ids": (999,)}, r"outside the vocabulary \[0, 263\)"),
    ([1, 2], {"temprature": 0.5}, "unknown sampling parameter"),
    ([1, 999], None, r"outside \[0, 263\)"),
    ([{"role": "user", "content": "hi"}], None, r"tokenizer \(byte-level\) has no chat template"),
    ({"role": "user"}, None, "prompt must be text, a sequence of token ids or a list of chat messages, got dict"),
]


def test_bad_requests_are_rejected_per_request_while_others_continue(engine):
    good = [([1, 40, 41, 42], SamplingParams(max_new_tokens=8)), ([1, 9], SamplingParams(max_new_tokens=5))]
    expected = [alone(engine, *g) for g in good]
    for g in good:
        engine.submit(*g)
    engine.step()  # the good ones are running
    for prompt, params, msg in BAD_REQUESTS:
        with pytest.raises(ValueError, match=msg):
            engine.submit(prompt, params)
    done = engine.run()
    assert sorted(o.token_ids for o in done.values()) == sorted(expected)
    # the batch front end turns each bad request into an error output, in place, and runs the rest
    prompts = [good[0][0]] + [b[0] for b in BAD_REQUESTS] + [good[1][0]]
    params = [good[0][1]] + [b[1] for b in BAD_REQUESTS] + [good[1][1]]
    outs = engine.generate_outputs(prompts, params)
    assert outs[0].token_ids == expected[0] and outs[-1].token_ids == expected[1]
    for out, (_, _, msg) in zip(outs[1:-1], BAD_REQUESTS, strict=True):
        assert out.finish_reason == "error" and out.token_ids == [] and re_search(msg, out.error)
    with pytest.raises(ValueError, match="prompt 1: .*prompt is empty"):
        engine.generate(["hi", ""], SamplingParams(max_new_tokens=2))


def test_requests_end_at_the_end_of_sequence_token_unless_told_to_ignore_it(engine, monkeypatch):
    """As in other engines, a request ends ("stop") at the tokenizer's EOS without naming it in stop_token_ids;
    ``ignore_eos=True`` runs it on to max_new_tokens."""
    assert engine.eos_token_ids == (engine.tokenizer.eos_id,)
    free = engine.generate_outputs([[1, 40, 41]], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    monkeypatch.setattr(engine, "eos_token_ids", (free.token_ids[2],))  # (what this random model writes third)
    first = free.token_ids.index(free.token_ids[2])
    stopped = engine.generate_outputs([[1, 40, 41]], SamplingParams(max_new_tokens=8))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]
    again = engine.generate_outputs([[1, 40, 41]], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert again.finish_reason == "length" and again.token_ids == free.token_ids
    with pytest.raises(ValueError, match="ignore_eos must be True or False"):
        SamplingParams(ignore_eos="yes")


def test_a_conversation_prompt_is_rendered_in_the_chat_template(engine, monkeypatch):
    """A prompt given as chat messages runs as the ids ``encode_chat`` gives (up to the assistant's turn prompt);
    a malformed message is refused by position."""
    from step3_jax.tokenizer import encode_chat

    # (ChatML-style: joins each turn with +, as many templates do)
    template = "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\n' }}{% endfor %}" \
        "{% if add_generation_prompt %}<assistant>{% endif %}"  # fmt: skip
    monkeypatch.setattr(engine.tokenizer, "chat_template", template)
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    params = SamplingParams(max_new_tokens=4)
    out = engine.generate_outputs([chat], params)[0]
    assert out.prompt_ids == engine.tokenizer.encode("<system>be brief\n<user>hi\n<assistant>", add_bos=False)
    assert out.token_ids == alone(engine, encode_chat(engine.tokenizer, chat), params)
    with pytest.raises(ValueError, match="chat message 1 is not a"):
        engine.submit([chat[0], {"content": "no role"}])
    # content parts this template cannot join: that request is an error output, the others run
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    bad, good = engine.generate_outputs([parts, chat], params)
    assert bad.finish_reason == "error" and "chat template failed on these messages: TypeError" in bad.error
    assert bad.prompt_ids == [] and good.ok and good.token_ids == out.token_ids


def test_fp8_kv_pages_default_to_what_the_gpu_decode_kernel_takes():
    """Without an explicit page size, FP8 KV gets 64-token pages (the FP8 decode kernel's smallest), so a GPU serves
    it with the kernel rather than the reference; BF16 KV keeps 16-token pages; an explicit size is kept."""
    from infer.afd import AFDConfig
    from pallas_kernels.mfa_decode import kernel_supports

    for cfg_type in (EngineConfig, AFDConfig):
        fp8, bf16 = cfg_type(kv_dtype="float8_e4m3fn"), cfg_type(kv_dtype="bfloat16")
        assert (fp8.page_size, bf16.page_size, cfg_type().page_size) == (64, 16, 16)
        assert kernel_supports(256, jnp.float8_e4m3fn, fp8.page_size) is None
        assert kernel_supports(256, jnp.bfloat16, bf16.page_size) is None
        assert cfg_type(kv_dtype="float8_e4m3fn", page_size=16).page_size == 16
    assert "FP8" in kernel_supports(256, jnp.float8_e4m3fn, 16)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(kv_dtype="int8"), r"kv_dtype must be None \(the model's dtype\) or one of \('bfloat16', .*got 'int8'"),
        (dict(max_batch=0), "max_batch must be an int >= 1, got 0"),
        (dict(page_size=2.5), "page_size must be an int >= 1, got 2.5"),
        (dict(num_pages=True), "num_pages must be None or an int >= 1, got True"),
        (dict(min_bucket=12), "min_bucket must be a power of two, got 12"),
        (dict(prefill_chunk=8, min_bucket=16), r"prefill_chunk \(8\) must be >= min_bucket \(16\)"),
        (dict(prefix_caching="yes"), "prefix_caching must be True or False, got 'yes'"),
    ],
)
def test_bad_engine_configs_are_refused_with_the_field_named(kwargs, msg):
    with pytest.raises(ValueError, match="EngineConfig." + msg):
        EngineConfig(**kwargs)


def re_search(pattern, text):
    import re

    return re.search(pattern, text) is not None


# ---------------------------------------------------------------------------------------------- sampling


def test_temperature_zero_is_greedy_and_seeds_reproduce_whatever_the_neighbours(engine):
    prompt = [1, 33, 34, 35]
    greedy = alone(engine, prompt, SamplingParams(max_new_tokens=8))
    assert (
        alone(engine, prompt, SamplingParams(temperature=0.0, top_k=7, top_p=0.5, seed=9, max_new_tokens=8)) == greedy
    )
    hot = SamplingParams(temperature=1.5, seed=11, max_new_tokens=8)
    a = alone(engine, prompt, hot)
    # the same request among other sampled requests, arriving later, in another slot: the same tokens
    others = [([1, 50 + i, 60], SamplingParams(temperature=1.0, seed=i, max_new_tokens=6)) for i in range(5)]
    outputs, _ = drive(engine, {0: others[:3], 2: [(prompt, hot)] + others[3:]})
    assert outputs[(2, 0)].token_ids == a
    assert alone(engine, prompt, SamplingParams(temperature=1.5, seed=12, max_new_tokens=8)) != a
    assert alone(engine, prompt, SamplingParams(temperature=2.0, top_k=1, seed=3, max_new_tokens=8)) == greedy


def test_top_k_and_top_p_tokens_stay_in_their_set_on_the_model(model, engine, test_config):
    """Sampled tokens checked against the full-forward logits at their position: top-k tokens rank < k, and a
    top-p token's higher-ranked tokens hold less than top_p of the (tempered) probability."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    prompt = [1, 70, 71, 72]
    for params in (
        SamplingParams(temperature=1.3, top_k=3, seed=5, max_new_tokens=20),
        SamplingParams(temperature=1.3, top_p=0.3, seed=6, max_new_tokens=20),
    ):
        toks = alone(engine, prompt, params)
        seq = np.zeros((1, 32), np.int32)
        seq[0, : len(prompt) + len(toks)] = prompt + toks
        logits = np.asarray(forward(state, jnp.asarray(seq)))[0] / params.temperature
        for j, t in enumerate(toks):
            row = logits[len(prompt) - 1 + j]
            higher = row > row[t] + 1e-4
            if params.top_k:
                assert higher.sum() < params.top_k
            else:
                p = np.exp(row - row.max())
                p /= p.sum()
                assert p[higher].sum() < params.top_p + 1e-4


def test_sampler_top_k_top_p_sets_and_frequencies_with_per_row_keys():
    """Statistical test (fixed seed): 4000 rows of random logits; samples never leave the top-k / nucleus set, and
    within the set the frequencies match the renormalised probabilities."""
    n, v = 4000, 12
    logits = jnp.asarray(np.random.default_rng(0).standard_normal(v, np.float32)) * 2.0
    rows = jnp.broadcast_to(logits, (n, v))
    keys = request_keys(jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32))
    probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs)

    def draw(k, p):
        return np.asarray(sample(rows, keys, jnp.ones((n,)), jnp.full((n,), k, jnp.int32), jnp.full((n,), p)))

    for k, p, allowed in [
        (4, 1.0, order[:4]),
        (0, 0.5, order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1]),
        (3, 0.9, order[: min(3, int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1)]),
    ]:
        got = draw(k, p)
        assert set(got.tolist()) <= set(allowed.tolist())
        expect = probs[allowed] / probs[allowed].sum()
        freq = np.array([(got == a).sum() for a in allowed]) / n
        assert np.abs(freq - expect).max() < 4 * math.sqrt(0.25 / n) + 0.01
    # per-row keys: a row's draw depends only on its key, not on the other rows
    sub = np.asarray(sample(rows[:7], keys[:7], jnp.ones((7,)), jnp.zeros((7,), jnp.int32), jnp.ones((7,))))
    assert sub.tolist() == draw(0, 1.0)[:7].tolist()


def test_sampler_modes_give_each_row_the_same_token():
    """``sample_mode`` picks the cheapest mode a batch's rows allow, and every mode that serves a row gives it
    the token the general ("filter") mode gives: so a batch's mode, chosen by its other rows, never changes a
    row's result. Rows of a large vocabulary and flat logits, where a top-p of 1 summed in float32 would round."""
    n, v = 64, 50_000
    logits = jnp.asarray(np.random.default_rng(3).standard_normal((n, v), np.float32)) * 0.1
    keys = request_keys(jnp.arange(n, dtype=jnp.uint32), jnp.arange(n, dtype=jnp.int32))
    greedy, plain, top_k = SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_k=5)
    assert sample_mode([greedy, None], v) == "greedy" and sample_mode([greedy, plain, None], v) == "sample"
    assert sample_mode([plain, top_k], v) == sample_mode([SamplingParams(temperature=1.0, top_p=0.9)], v) == "filter"
    assert sample_mode([SamplingParams(temperature=1.0, top_k=v)], v) == "sample"  # (k = the vocabulary: no limit)
    assert sample_mode([SamplingParams(top_k=5)], v) == "greedy"  # (a greedy row's top-k changes nothing)

    def draw(params, mode):
        seeds, temperature, k, p = param_rows(params)
        return np.asarray(sample(logits, keys, temperature, k, p, mode))

    rows = [plain if i % 2 else greedy for i in range(n)]
    assert (draw(rows, "sample") == draw(rows, "filter")).all()
    assert (draw([greedy] * n, "greedy") == draw([greedy] * n, "filter")).all()
    assert (draw([greedy] * n, "greedy") == np.argmax(np.asarray(logits), -1)).all()
    # beside top-k rows (the batch runs "filter"), the other rows get what a batch without them gives them
    mixed = [(plain, greedy, top_k)[i % 3] for i in range(n)]
    without = [greedy if p is top_k else p for p in mixed]
    unrestricted = [i for i, p in enumerate(mixed) if p is not top_k]
    assert (draw(mixed, "filter")[unrestricted] == draw(without, "sample")[unrestricted]).all()
    top5 = np.argsort(-np.asarray(logits[2::3]), -1)[:, :5]
    assert all(t in row for t, row in zip(draw(mixed, "filter")[2::3], top5, strict=True))
    with pytest.raises(ValueError, match="mode must be one of"):
        sample(logits, keys, jnp.ones((n,)), jnp.zeros((n,), jnp.int32), jnp.ones((n,)), "beam")


# ---------------------------------------------------------------------------------------------- streaming, compiles


def test_streaming_events_and_callback(engine):
    prompts = ["Step-3", "MFA attention ✓"]
    params = SamplingParams(max_new_tokens=9)
    events = list(engine.stream(prompts, params))
    assert all(isinstance(e, StreamEvent) for e in events)
    outs = {e.request_id: e.output for e in events if e.finished}
    assert len(outs) == 2
    for rid, out in outs.items():
        mine = [e for e in events if e.request_id == rid]
        assert (
            [e.token_id for e in mine] == out.token_ids and mine[-1].finished and not any(e.finished for e in mine[:-1])
        )
        assert "".join(e.text for e in mine) == out.text == engine.tokenizer.decode(out.token_ids)
        assert out.time_to_first_token is not None and out.time_to_first_token >= 0
    seen = []
    texts = engine.generate(prompts, params)
    assert texts == [o.text for o in sorted(outs.values(), key=lambda o: int(o.request_id.split("-")[1]))]
    engine.generate_outputs(prompts, params, on_event=seen.append)
    assert sum(e.finished for e in seen) == 2 and len(seen) == 18


def test_steady_state_decoding_never_recompiles(model):
    """The model's decode step compiles once and its prefill once per chunk bucket, whatever the requests sample:
    the sampler is its own small program per mode (greedy: no random draw and no vocabulary sort; sampled; with
    top-k / top-p), compiled when a mode first appears, or by ``warmup()`` for every mode."""
    engine = Engine(model, SMALL)  # (fresh: no other test's requests have compiled its samplers)
    rng = random.Random(5)
    engine.generate_outputs([random_prompt(rng, n) for n in (3, 12, 30)], SamplingParams(max_new_tokens=3))
    counts = dict(engine.trace_counts)
    cache_sizes = engine._decode_fn._cache_size(), engine._prefill_fn._cache_size()
    # one decode program, one prefill bucket (16), and the greedy sampler after each of them (their row counts)
    assert counts == {"decode": 1, "prefill": 1, "sample": 2}
    assert cache_sizes == (1, 1)  # and each compiled once (a fresh pool placed as the steps return it)

    def mixed(seed):
        prompts = [random_prompt(rng, rng.randint(1, 40)) for _ in range(12)]
        params = [SamplingParams(temperature=rng.choice([0.0, 0.8]), top_k=rng.randint(0, 5), seed=seed + i,
                                 max_new_tokens=rng.randint(1, 12)) for i in range(12)]  # fmt: skip
        return prompts, params

    with count_compiles() as compiled:  # sampled rows: new sampler programs only, never the model's steps again
        engine.generate_outputs(*mixed(0))
    assert compiled and all(name == "jit(_sample_impl)" for name in compiled), compiled
    assert {k: v for k, v in engine.trace_counts.items() if k != "sample"} == {"decode": 1, "prefill": 1}
    assert (engine._decode_fn._cache_size(), engine._prefill_fn._cache_size()) == cache_sizes

    fresh = Engine(model, SMALL)
    fresh.warmup([40])
    counts = dict(fresh.trace_counts)
    assert counts["sample"] == 6  # 3 modes x (decode rows, prefill rows)
    for seed in (100, 200):
        with count_compiles() as compiled:
            fresh.generate_outputs(*mixed(seed))
        assert fresh.trace_counts == counts and compiled == []  # (no program at all: sampling rows included)


# ---------------------------------------------------------------------------------------------- mesh, CLI


def test_data_parallel_engine_on_a_mesh_equals_one_device(test_config, engine):
    """4 data-parallel attention groups x 2-way tensor-parallel FFN on 8 CPU devices: the page pool is split over
    the groups, each group keeps its own pages, and greedy results equal the single-device engine."""
    mesh = make_mesh(data=4, tensor=2)
    sharded = create_model(test_config, seed=1, mesh=mesh)
    eng = Engine(sharded, EngineConfig(max_batch=4, page_size=4, num_pages=64, max_seq_len=64, prefill_chunk=16,
                                       min_bucket=8, prefill_batch=4))  # fmt: skip
    assert eng.groups == 4 and eng.pages_per_group == 16
    assert eng._pool["k"][0].sharding.spec[0] == "data"
    rng = random.Random(3)
    prompts = [random_prompt(rng, n) for n in (5, 19, 2, 11, 8, 27)]
    params = SamplingParams(max_new_tokens=6)
    outs = eng.generate_outputs(prompts, params)
    for p, o in zip(prompts, outs, strict=True):
        assert o.token_ids == alone(engine, p, params)


def test_cli_reads_a_prompt_file_loads_a_checkpoint_and_reports_throughput(tmp_path, capsys, model):
    """``python -m infer.generate``: prompts from a file (an over-long one fails alone), a checkpoint folder, the
    figures and the JSON report; ``--mesh`` serves the same checkpoint sharded with the same tokens, and a mesh
    spec that cannot be made is refused with the reason."""
    from step3_jax import save_pretrained

    save_pretrained(model, tmp_path / "ckpt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond\n" + "x" * 600 + "\n")
    shapes = ["--max-batch", "4", "--page-size", "4", "--num-pages", "16", "--max-seq-len", "64", "--prefill-chunk",
              "16"]  # the engine fixture's shapes: compiled programs are reused  # fmt: skip
    rc = main(["--checkpoint", str(tmp_path / "ckpt"), "--prompts-file", str(prompts), "--max-new-tokens", "4",
               "--json-out", str(tmp_path / "out.json"), *shapes])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 1  # the over-long third prompt failed, the others ran
    assert "longer than the context limit" in captured.out + captured.err
    assert "tokens/s" in captured.out and "time per output token" in captured.out
    report = json.loads((tmp_path / "out.json").read_text())
    assert [r["ok"] for r in report["requests"]] == [True, True, False]
    assert report["engine"]["prefix_caching"] is True and "prompt tokens from the prefix cache" in captured.out
    assert report["stats"]["prefix_cached_tokens"] == 0  # (the two prompts share no page)
    assert report["requests"][0]["token_ids"] == generate_ids(model, [[1, *[b + 3 for b in b"first prompt"]]],
                                                              SamplingParams(max_new_tokens=4)).tokens[0]  # fmt: skip
    assert main(["--preset", "test", "--dtype", "float32", "--max-new-tokens", "3", "--prompt", "hi", "--stream",
                 *shapes]) == 0  # fmt: skip
    assert "tokens/s" in capsys.readouterr().out

    # --mesh: the same checkpoint served sharded (2 data-parallel groups x 2-way tensor parallel) gives the same tokens
    rc = main(["--checkpoint", str(tmp_path / "ckpt"), "--prompts-file", str(prompts), "--max-new-tokens", "4",
               "--json-out", str(tmp_path / "mesh.json"), "--mesh", "data=2, tensor=2", *shapes,
               "--num-pages", "32", "--no-prefix-caching"])  # fmt: skip
    assert rc == 1 and "on a data=2 x tensor=2 mesh" in capsys.readouterr().out
    assert json.loads((tmp_path / "mesh.json").read_text())["engine"]["prefix_caching"] is False
    sharded = json.loads((tmp_path / "mesh.json").read_text())["requests"]
    assert [r["token_ids"] for r in sharded[:2]] == [r["token_ids"] for r in report["requests"][:2]]
    for spec, message in [("data=2,foo=2", "unknown axis 'foo' \\(the axes are data, fsdp, tensor, expert\\)"),
                          ("data=16", "needs 16 devices, but there are 8"), ("data:2", "expected name=size pairs"),
                          ("data=2,data=2", "axis 'data' is given twice")]:  # fmt: skip
        assert main(["--preset", "test", "--prompt", "hi", "--mesh", spec]) == 2
        assert re.search(message, capsys.readouterr().err), spec
    with pytest.raises(SystemExit):
        main(["--preset", "test", "--prompt", "hi", "--mesh", "data=2", "--afd", "2x1"])
    assert "--mesh is for colocated serving" in capsys.readouterr().err

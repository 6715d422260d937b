"""The generation CLI (``python -m infer.generate``) on the continuous-batching engine, and ``generate_ids``.

``python -m infer.generate`` loads a checkpoint folder (``--checkpoint``) or builds a preset with random weights,
reads prompts from ``--prompt`` (repeatable) or ``--prompts-file`` (one per line), with ``--chat`` as user turns
in the checkpoint tokenizer's chat template (``--system`` adds a system message), runs them through
:class:`infer.engine.Engine`, streams the text of a single prompt as it is generated (``--stream``), shows a
progress bar for batches, and prints per-request and aggregate tokens/s and time per output token.

``generate_ids`` is the simple static-batch path over the contiguous KV cache: prompts right-padded to a
bucketed length, one prefill call, then a jitted decode step whose shapes never change. The engine's tests use
it as the reference that the paged, continuously batched engine must reproduce.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.cli import (
    add_model_args,
    add_pipeline_args,
    add_process_args,
    add_sampling_args,
    byte_tokenizer_for,
    check_pipeline_args,
    check_process_args,
    join_processes,
    load_checkpoint,
    preset_config,
    sampling_from_args,
    stop_ids,
)
from infer.sampling import SamplingParams, sample, sample_mode
from step3_jax.kv_cache import KV_DTYPES, KVCache
from step3_jax.model import Step3ForCausalLM, create_model
from step3_jax.sharding import mesh_from_spec
from step3_jax.tokenizer import encode_chat


def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (at least ``minimum``) so varying lengths reuse compiled programs."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass
class GenerationResult:
    """What :func:`generate_ids` returns: the generated ids per prompt and the prefill / decode timings."""

    tokens: list[list[int]]  # generated ids per prompt (stop token included if hit)
    prefill_seconds: float
    decode_seconds: float  # steps after the first decode step (which may compile)
    decode_steps_timed: int
    batch_size: int

    @property
    def decode_tokens_per_second(self) -> float:
        return self.batch_size * self.decode_steps_timed / self.decode_seconds if self.decode_seconds > 0 else 0.0


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnums=(3,))
def _prefill(graphdef, state, ids, cache, lengths, key, temperature, top_k, top_p, mode):
    model = nnx.merge(graphdef, state)
    logits, cache = model(ids, cache=cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    cache = cache.replace(lengths=lengths)  # slots past each prompt hold padding; later steps overwrite them
    return sample(last, key, temperature, top_k, top_p, mode), cache


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=(3,))
def _decode(graphdef, state, tokens, cache, key, temperature, top_k, top_p, mode):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens[:, None], cache=cache)
    return sample(logits[:, -1], key, temperature, top_k, top_p, mode), cache


def generate_ids(
    model: Step3ForCausalLM,
    prompts: list[list[int]],
    params: SamplingParams | None = None,
    *,
    on_token=None,
) -> GenerationResult:
    """Generate up to ``params.max_new_tokens`` tokens after each prompt (lists of token ids): the model-level
    reference (a contiguous cache, every prompt in one batch). A sequence ends only at ``params.stop_token_ids``:
    this takes no tokenizer, so unlike the engine it adds no end-of-sequence token of its own.

    ``on_token(step, tokens)`` is called with the numpy array of the batch's new tokens after every step.
    """
    params = params or SamplingParams()
    config = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    total = longest + params.max_new_tokens
    if total > config.max_position_embedding:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens {params.max_new_tokens} = {total} exceeds the model's "
            f"context of {config.max_position_embedding} tokens"
        )
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {config.vocab_size}): {bad[:5]}")

    b = len(prompts)
    width = min(bucket(longest), config.max_position_embedding)  # (a context need not be a power of two)
    max_len = min(bucket(width + params.max_new_tokens), config.max_position_embedding)
    ids = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    temperature = jnp.full((b,), params.temperature, jnp.float32)
    top_k = jnp.full((b,), min(params.top_k, np.iinfo(np.int32).max), jnp.int32)  # (k past the vocabulary: all)
    top_p = jnp.full((b,), params.top_p, jnp.float32)
    key = jax.random.key(params.seed)
    mode = sample_mode([params], config.vocab_size)  # (a greedy run never sorts the vocabulary)
    stops = np.asarray(params.stop_token_ids, np.int64)

    graphdef, state = nnx.split(model)
    cache = KVCache.create(config, b, max_len, mesh=model.ctx.mesh, rules=model.ctx.rules)
    t0 = time.perf_counter()
    key, sub = jax.random.split(key)
    tok, cache = _prefill(graphdef, state, jnp.asarray(ids), cache, lengths, sub, temperature, top_k, top_p, mode)
    tok_np = np.asarray(tok)
    prefill_seconds = time.perf_counter() - t0
    out = [[int(t)] for t in tok_np]
    done = np.isin(tok_np, stops)
    if on_token:
        on_token(0, tok_np)

    timed_start, timed_steps = None, 0
    for step in range(1, params.max_new_tokens):
        if done.all():
            break
        if step == 2:  # steps from here on reuse the compiled program
            timed_start = time.perf_counter()
        key, sub = jax.random.split(key)
        tok, cache = _decode(graphdef, state, tok, cache, sub, temperature, top_k, top_p, mode)
        tok_np = np.asarray(tok)
        if step >= 2:
            timed_steps += 1
        for i, t in enumerate(tok_np):
            if not done[i]:
                out[i].append(int(t))
        done |= np.isin(tok_np, stops)
        if on_token:
            on_token(step, tok_np)
    decode_seconds = time.perf_counter() - timed_start if timed_start is not None else 0.0
    return GenerationResult(out, prefill_seconds, decode_seconds, timed_steps, b)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file {path} does not exist")
        from_file = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not from_file:
            raise ValueError(f"--prompts-file {path} holds no prompts (every line is blank)")
        prompts += from_file
    return prompts or ["Step-3 decodes with MFA attention and a mixture of experts."]


def _load_model(args):
    """(model, tokenizer, description) from --checkpoint or --preset; with --afd an :class:`AFDRunner` instead of
    the model (the engine drives either)."""
    if args.afd:
        return _load_afd(args)
    mesh, on = None, ""
    if args.mesh:
        mesh = mesh_from_spec(args.mesh)
        on = f", on a {' x '.join(f'{k}={v}' for k, v in mesh.shape.items() if v > 1) or 'one-device'} mesh"
    if args.checkpoint:
        model, tokenizer = load_checkpoint(args, mesh=mesh)
        return model, tokenizer, f"checkpoint {args.checkpoint}{on}"
    config = preset_config(args)
    tokenizer = byte_tokenizer_for(config, args.preset)
    return (
        create_model(config, seed=args.seed, mesh=mesh),
        tokenizer,
        f"preset {args.preset!r} (random weights, so the text is noise){on}",
    )


def _load_afd(args):
    from infer.afd import AFDConfig, AFDRunner
    from step3_jax.tokenizer import load_tokenizer

    m, n = args.afd
    afd = AFDConfig(
        attention_devices=m,
        ffn_devices=n,
        micro_batches=args.micro_batches,
        transfer=args.transfer,
        attention_processes=args.attention_processes,
        peer_timeout_s=args.peer_timeout,
        instances=args.instances,
    )
    if args.checkpoint:
        runner = AFDRunner.from_checkpoint(args.checkpoint, afd, dtype=args.dtype)
        tokenizer, what = load_tokenizer(args.checkpoint), f"checkpoint {args.checkpoint}"
    else:
        config = preset_config(args)
        tokenizer = byte_tokenizer_for(config, args.preset)
        runner = AFDRunner.create(config, afd, seed=args.seed)
        what = f"preset {args.preset!r} (random weights, so the text is noise)"
    what += (
        f", disaggregated: {m} attention + {n} FFN devices (EP {runner.ep} x TP {runner.tp}), "
        f"{afd.micro_batches} micro-batches, {afd.transfer} A->F"
    )
    return runner, tokenizer, what


def _split(text: str) -> tuple[int, int]:
    """``--afd MxN`` -> (M, N)."""
    try:
        m, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MxN (attention x FFN devices, e.g. 2x2), got {text!r}") from None
    return m, n


def _fmt_ms(seconds) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.2f} ms"


def main(argv: list[str] | None = None) -> int:
    """``python -m infer.generate``: stream generations from a checkpoint folder or a preset."""
    from infer.afd import INSTANCES
    from infer.engine import Engine, EngineConfig

    ap = argparse.ArgumentParser(
        prog="python -m infer.generate",
        description="Generate text with a Step-3 model through the continuous-batching engine "
        "(default: the tiny preset with random weights).",
    )
    add_model_args(ap)
    ap.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    ap.add_argument("--prompts-file", help="file with one prompt per line (blank lines skipped)")
    ap.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user turn in the checkpoint tokenizer's chat template (its "
        "tokenizer_config.json chat_template, or chat_template.jinja), ending with the assistant's turn",
    )
    ap.add_argument("--system", help="with --chat: a system message before each user turn")
    add_sampling_args(ap)
    eng = ap.add_argument_group("engine")
    eng.add_argument("--max-batch", type=int, default=8, help="decode slots")
    eng.add_argument("--page-size", type=int, default=None, help="tokens per KV page (default 16; 64 for FP8 KV)")
    eng.add_argument("--num-pages", type=int, default=None, help="KV pages in the pool (default: no preemption)")
    eng.add_argument("--max-seq-len", type=int, default=None, help="context limit (default: fits the prompts)")
    eng.add_argument("--prefill-chunk", type=int, default=64)
    eng.add_argument("--kv-dtype", default=None, choices=KV_DTYPES)
    eng.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="compute every prompt's KV (default: prompts that begin as an earlier one did take its pages)",
    )
    eng.add_argument(
        "--mesh",
        metavar="SPEC",
        help="serve sharded on a mesh of the first devices, e.g. "
        "data=2,tensor=4 (data: data-parallel attention and page pools; tensor / expert: the weights; "
        "default one device)",
    )
    dis = ap.add_argument_group("attention-FFN disaggregation (the same engine over infer.afd's pipeline)")
    dis.add_argument("--afd", type=_split, metavar="MxN", help="attention on M devices, FFN on N others (e.g. 2x2)")
    add_pipeline_args(dis, micro_batches=2, prefix="with --afd: ")
    dis.add_argument("--instances", choices=INSTANCES, default="one",
                     help="with --afd over several processes: 'one' engine (process 0's) schedules every attention "
                     "device; 'per-process': every attention process is an independent attention instance with its "
                     "own engine and its share of the prompts (prompt i on attention process i mod K), all sharing "
                     "the FFN side")  # fmt: skip
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="print text as it is generated (default: when there is one prompt)")  # fmt: skip
    ap.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="compile with a short throwaway request first so timings exclude compilation")  # fmt: skip
    ap.add_argument(
        "--json-out",
        help="write every request's tokens, text and timings as JSON (with --instances "
        "per-process: each attention instance k to JSON_OUT.k)",
    )
    add_process_args(ap, "with --afd, processes 0 .. K-1 hold the attention devices, the others the FFN devices; "
                     "process 0 runs the engine and the others serve its steps (--instances one), or each attention "
                     "process runs its own (per-process)", attention_processes=True)  # fmt: skip
    args = ap.parse_args(argv)
    check_process_args(ap, args)
    check_pipeline_args(ap, args, afd=bool(args.afd))
    if args.json_out and not Path(args.json_out).resolve().parent.is_dir():
        ap.error(f"--json-out {args.json_out}: the folder {Path(args.json_out).resolve().parent} does not exist")
    if args.system is not None and not args.chat:
        ap.error("--system is for --chat")
    if args.instances != "one" and args.coordinator is None:
        ap.error("--instances per-process is for multi-process --afd runs (with --coordinator)")
    if args.coordinator is not None and not args.afd:
        ap.error("--coordinator (several processes) needs --afd: the processes split into attention and FFN sides")
    if args.mesh and args.afd:
        ap.error("--mesh is for colocated serving; with --afd the MxN split places the devices")
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.coordinator is not None:
        join_processes(args)

    model = engine = None
    try:
        params = sampling_from_args(args)
        prompts = _read_prompts(args)
        t0 = time.perf_counter()
        model, tokenizer, what = _load_model(args)
        build_seconds = time.perf_counter() - t0
        instanced = getattr(model, "instanced", False)
        if jax.process_index() != 0 and not (instanced and model.has_attention):
            # a multi-process --afd job: follow the steps of process 0's engine, or of every instance's
            steps = model.serve()
            side = "attention" if model.has_attention else "FFN"
            printing = "the attention processes print" if instanced else "process 0 prints"
            print(f"process {jax.process_index()} ({side} side): served {steps} steps; {printing} the results")
            if instanced:
                _instances_total(None)
            return 0
        config = model.config
        params = dataclasses.replace(params, stop_token_ids=stop_ids(tokenizer, config))
        inputs = prompts  # what the engine gets: the text, or with --chat the conversation's token ids
        if args.chat:
            system = [{"role": "system", "content": args.system}] if args.system else []
            inputs = [encode_chat(tokenizer, [*system, {"role": "user", "content": p}]) for p in prompts]
        max_seq_len = args.max_seq_len
        if max_seq_len is None:  # enough for the prompts (capped at the context), so the CPU demo stays small
            longest = max(_prompt_length(tokenizer, p) for p in inputs)
            max_seq_len = min(bucket(longest + args.max_new_tokens, 64), config.max_position_embedding)
        engine = Engine(
            model,
            EngineConfig(
                max_batch=args.max_batch,
                page_size=args.page_size,
                num_pages=args.num_pages,
                max_seq_len=max_seq_len,
                prefill_chunk=args.prefill_chunk,
                kv_dtype=args.kv_dtype,
                prefix_caching=not args.no_prefix_caching,
            ),
            tokenizer=tokenizer,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        _release(model, engine)
        return 2
    try:
        print(f"model: {what}, {config.param_dtype}, built in {build_seconds:.2f} s on {jax.devices()[0].platform}")
        if instanced:  # this attention instance's share of the prompts
            k, count = jax.process_index(), model.attention_processes
            mine = list(range(k, len(prompts), count))
            print(f"attention instance {k} of {count}: prompts {mine} of {len(prompts)}")
            prompts, inputs = [prompts[i] for i in mine], [inputs[i] for i in mine]
            if args.json_out:
                args.json_out = f"{args.json_out}.{k}"
        rc, agg = _serve(args, engine, prompts, params, what, inputs)
        if instanced:
            engine.close()
            _instances_total(agg)
        return rc
    finally:
        _release(model, engine)


def _instances_total(agg: dict | None) -> None:
    """Per-process instances, once every instance has closed: every process sends its aggregate (None from the FFN
    processes) and process 0 prints the job's."""
    from infer.afd import gather_json

    every = [a for a in gather_json(agg) if a is not None]
    if jax.process_index() == 0:
        tokens, wall = sum(a["output_tokens"] for a in every), max(a["wall_seconds"] for a in every)
        print(
            f"all {len(every)} attention instances: {sum(a['requests'] for a in every)} requests "
            f"({sum(a['failed'] for a in every)} failed), {tokens} tokens in {wall:.2f} s (the longest instance's "
            f"time): {tokens / wall if wall > 0 else 0.0:.1f} tokens/s"
        )


def _release(model, engine) -> None:
    """The end of a multi-process --afd job's scheduling process (nothing otherwise): process 0 of one engine lets
    the other processes stop serving; a per-process instance takes part in the others' steps until every instance
    has closed (one that stops with requests left just ends: the others' steps then fail on its absence)."""
    if model is None or not getattr(model, "multiprocess", False):
        return
    if model.instanced:
        if engine is not None and not engine.has_work():
            engine.close()
    elif jax.process_index() == 0:
        model.release()


def _prompt_length(tokenizer, prompt) -> int:
    return len(prompt) if isinstance(prompt, list) else len(tokenizer.encode(prompt))


def _serve(args, engine, prompts, params, what: str, inputs=None) -> tuple[int, dict]:
    """Run the prompts through the engine with progress / streaming (``inputs``, when given, is what the engine
    gets for each prompt: token ids of its chat turn); print per-request and aggregate figures. Returns (exit
    status, aggregate)."""
    from infer.engine import summarize

    tokenizer = engine.tokenizer
    if args.warmup:
        t0 = time.perf_counter()
        engine.warmup([_prompt_length(tokenizer, p) for p in inputs or prompts])
        print(f"warm-up (compilation): {time.perf_counter() - t0:.2f} s")
    stream = args.stream if args.stream is not None else len(prompts) == 1
    bar = None
    if not stream and len(prompts) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc="requests", unit="req", file=sys.stderr)
    if stream and len(prompts) == 1:
        print(f"\nprompt: {prompts[0]!r}\ntext:   ", end="", flush=True)

    def on_event(ev):
        if stream and ev.text:
            prefix = "" if len(prompts) == 1 else f"[{ev.request_id}] "
            print(prefix + ev.text, end="" if len(prompts) == 1 else "\n", flush=True)
        if bar is not None and ev.finished:
            bar.update(1)

    t0 = time.perf_counter()
    outputs = engine.generate_outputs(inputs or prompts, params, on_event=on_event)
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if stream and len(prompts) == 1:
        print()

    failed = 0
    for prompt, out in zip(prompts, outputs, strict=True):
        if not out.ok:
            failed += 1
            print(f"\n[{out.request_id}] prompt: {prompt[:60]!r}\n  error: {out.error}", file=sys.stderr)
            print(f"\n[{out.request_id}] error: {out.error}")
            continue
        if not (stream and len(prompts) == 1):
            print(f"\n[{out.request_id}] prompt: {prompt!r}\n  text:   {out.text!r}")
        print(
            f"  [{out.request_id}] {len(out.token_ids)} tokens ({out.finish_reason}), {out.tokens_per_second:.1f} "
            f"tokens/s, time to first token {_fmt_ms(out.time_to_first_token)}, time per output token "
            f"{_fmt_ms(out.time_per_output_token)}, preemptions {out.num_preemptions}"
        )
    agg = summarize(outputs, wall)
    print(
        f"\naggregate: {agg['requests']} requests ({failed} failed), {agg['output_tokens']} tokens in {wall:.2f} s: "
        f"{agg['tokens_per_second']:.1f} tokens/s, mean time per output token "
        f"{_fmt_ms(agg['mean_time_per_output_token'])}, max batch "
        f"{engine.config.max_batch}, {engine.stats['preemptions']} preemptions, "
        f"{engine.stats['prefix_cached_tokens']} prompt tokens from the prefix cache"
    )
    if args.json_out:
        report = {
            "model": what,
            "aggregate": agg,
            "engine": dataclasses.asdict(engine.config),
            "stats": dict(engine.stats),
            "requests": [
                {
                    "request_id": o.request_id,
                    "ok": o.ok,
                    "error": o.error,
                    "prompt": p,
                    "prompt_ids": o.prompt_ids,
                    "token_ids": o.token_ids,
                    "logprobs": [float(x) for x in o.logprobs],
                    "text": o.text,
                    "finish_reason": o.finish_reason,
                    "tokens_per_second": o.tokens_per_second,
                    "time_to_first_token": o.time_to_first_token,
                    "time_per_output_token": o.time_per_output_token,
                    "num_preemptions": o.num_preemptions,
                }
                for p, o in zip(prompts, outputs, strict=True)
            ],
        }
        try:
            Path(args.json_out).write_text(json.dumps(report, indent=2))
        except OSError as e:
            print(f"error: could not write --json-out: {e}", file=sys.stderr)
            return 1, agg
    return 1 if failed else 0, agg


if __name__ == "__main__":
    sys.exit(main())

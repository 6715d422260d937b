"""Batched generation with the contiguous KV cache, and the demo CLI (``python -m infer.generate``).

``generate_ids`` pads prompts on the right to a bucketed length, prefills them in one call, then decodes
one token per step with a jitted step function whose shapes never change, so decoding compiles once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.sampling import SamplingParams, sample
from step3_jax.config import PRESETS, get_preset
from step3_jax.kv_cache import KVCache
from step3_jax.model import Step3ForCausalLM, create_model
from step3_jax.tokenizer import ByteTokenizer


def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (at least ``minimum``) so varying lengths reuse compiled programs."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (stop token included if hit)
    prefill_seconds: float
    decode_seconds: float  # steps after the first decode step (which may compile)
    decode_steps_timed: int
    batch_size: int

    @property
    def decode_tokens_per_second(self) -> float:
        return self.batch_size * self.decode_steps_timed / self.decode_seconds if self.decode_seconds > 0 else 0.0


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(3,))
def _prefill(graphdef, state, ids, cache, lengths, key, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    logits, cache = model(ids, cache=cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    cache = cache.replace(lengths=lengths)  # slots past each prompt hold padding; later steps overwrite them
    return sample(last, key, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(3,))
def _decode(graphdef, state, tokens, cache, key, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens[:, None], cache=cache)
    return sample(logits[:, -1], key, temperature, top_k, top_p), cache


def generate_ids(
    model: Step3ForCausalLM,
    prompts: list[list[int]],
    params: SamplingParams | None = None,
    *,
    on_token=None,
) -> GenerationResult:
    """Generate up to ``params.max_new_tokens`` tokens after each prompt (lists of token ids).

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
    width = bucket(longest)
    max_len = min(bucket(width + params.max_new_tokens), config.max_position_embedding)
    ids = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    temperature = jnp.full((b,), params.temperature, jnp.float32)
    top_k = jnp.full((b,), params.top_k, jnp.int32)
    top_p = jnp.full((b,), params.top_p, jnp.float32)
    key = jax.random.key(params.seed)
    stops = np.asarray(params.stop_token_ids, np.int64)

    graphdef, state = nnx.split(model)
    cache = KVCache.create(config, b, max_len, mesh=model.ctx.mesh, rules=model.ctx.rules)
    t0 = time.perf_counter()
    key, sub = jax.random.split(key)
    tok, cache = _prefill(graphdef, state, jnp.asarray(ids), cache, lengths, sub, temperature, top_k, top_p)
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
        tok, cache = _decode(graphdef, state, tok, cache, sub, temperature, top_k, top_p)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m infer.generate",
        description="Generate text with a Step-3 model (default: the tiny preset with random weights).",
    )
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset to build")
    ap.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="seed for the weights and for sampling")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="parameter dtype")
    args = ap.parse_args(argv)

    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
        )
        config = get_preset(args.preset)
        if args.dtype:
            config = dataclasses.replace(config, param_dtype=args.dtype)
        tokenizer = ByteTokenizer()
        if config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"preset {args.preset!r} has vocab {config.vocab_size}, too small for the byte tokenizer "
                f"({tokenizer.vocab_size}); checkpoint tokenizers come with the checkpoint loader"
            )
        prompts = args.prompt or ["Step-3 decodes with MFA attention and a mixture of experts."]
        params = dataclasses.replace(params, stop_token_ids=(tokenizer.eos_id,))
        t0 = time.perf_counter()
        model = create_model(config, seed=args.seed)
        build_seconds = time.perf_counter() - t0
        result = generate_ids(model, [tokenizer.encode(p) for p in prompts], params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(
        f"model: preset {args.preset!r} (random weights, so the text is noise), {config.param_dtype}, "
        f"built in {build_seconds:.2f} s on {jax.devices()[0].platform}"
    )
    for prompt, toks in zip(prompts, result.tokens, strict=True):
        print(f"\nprompt: {prompt!r}\ntokens: {toks}\ntext:   {tokenizer.decode(toks)!r}")
    n_new = sum(len(t) for t in result.tokens)
    print(f"\nprefill: {result.prefill_seconds * 1e3:.1f} ms (includes compilation)")
    if result.decode_steps_timed:
        print(
            f"decode: {result.decode_tokens_per_second:.1f} tokens/s "
            f"({result.decode_seconds / result.decode_steps_timed * 1e3:.2f} ms per step, batch {result.batch_size}, "
            f"{result.decode_steps_timed} steps after compilation; {n_new} tokens generated in all)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

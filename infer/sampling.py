"""Sampling parameters and a batched sampler (greedy, temperature, top-k, top-p), one setting per row."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_INT32_MAX = (1 << 31) - 1


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()
    # the engine also ends a request at its end-of-sequence token(s) (the tokenizer's, else the model config's),
    # unless this is set (then only stop_token_ids and max_new_tokens end it)
    ignore_eos: bool = False

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not _finite(t) or t < 0:
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {t!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SamplingParams.seed must be an int, got {self.seed!r}")
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {m!r}")
        stops = self.stop_token_ids
        if isinstance(stops, int) and not isinstance(stops, bool):
            stops = (stops,)
        if isinstance(stops, (str, bytes)) or not isinstance(stops, Iterable):
            raise ValueError(
                f"SamplingParams.stop_token_ids must be a sequence of token ids (non-negative ints), got "
                f"{type(stops).__name__} {stops!r}"
            )
        stops = tuple(stops)
        for s in stops:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(
                    f"SamplingParams.stop_token_ids must be non-negative ints (token ids), got {type(s).__name__} "
                    f"{s!r} in {self.stop_token_ids!r}"
                )
        object.__setattr__(self, "stop_token_ids", stops)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def restricts(self, vocab_size: int) -> bool:
        """Whether top-k or top-p leave out any token of a ``vocab_size`` vocabulary (a sampled row only)."""
        return not self.greedy and (0 < self.top_k < vocab_size or self.top_p < 1)


# What a batch's sampling needs, cheapest first; every mode gives each row it can serve the same token, so the
# mode a batch runs never changes a row's result (its neighbours only choose the program).
SAMPLE_MODES = ("greedy", "sample", "filter")


def sample_mode(params: Iterable[SamplingParams | None], vocab_size: int) -> str:
    """The cheapest :func:`sample` mode for a batch of rows with these parameters (None: a padding row, greedy):
    "greedy" (every row: argmax, no random draw), "sample" (no row restricts the vocabulary: no sort), else
    "filter" (top-k / top-p over the sorted vocabulary)."""
    mode = 0
    for p in params:
        if p is not None and not p.greedy:
            mode = max(mode, 2 if p.restricts(vocab_size) else 1)
            if mode == 2:
                break
    return SAMPLE_MODES[mode]


def sample(logits: jax.Array, key: jax.Array, temperature, top_k, top_p, mode: str = "filter") -> jax.Array:
    """Pick one token per row. logits [B, V]; temperature, top_p float [B]; top_k int [B] -> ids int32 [B].

    Rows with temperature 0 take the argmax. Otherwise logits are divided by the temperature, restricted to
    the top_k largest (if 0 < top_k < V), then to the smallest set whose probability reaches top_p (if top_p <
    1), and sampled. ``key`` is one PRNG key for the batch, or one key per row (a key array of shape [B]): then a
    row's sample depends only on its own key and logits, never on its batch neighbours (what continuous batching
    needs).

    ``mode`` (static; :func:`sample_mode` picks it from the rows' parameters) leaves out the work no row needs:
    "greedy" the random draw and the sort (every row must be greedy), "sample" the sort of the vocabulary (no row
    may restrict it), "filter" nothing. A row gets the same token in every mode that serves it.
    """
    if mode not in SAMPLE_MODES:
        raise ValueError(f"sample: mode must be one of {SAMPLE_MODES}, got {mode!r}")
    logits = logits.astype(jnp.float32)
    greedy_ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy_ids
    vocab = logits.shape[-1]
    temperature = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    if mode == "filter":
        top_k, top_p = jnp.asarray(top_k), jnp.asarray(top_p, jnp.float32)
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
        kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None].astype(jnp.int32), axis=-1)  # [B, 1]
        ranks = jnp.arange(vocab)[None, :]
        sorted_masked = jnp.where(ranks < k[:, None], sorted_desc, -jnp.inf)
        probs = jax.nn.softmax(sorted_masked, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = (mass_before < top_p[:, None]) & (ranks < k[:, None])
        # Smallest logit still kept by top-p (rank 0 is always kept).
        p_threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        # top-p only below 1, so a row that restricts nothing keeps every token (kth is then its smallest logit),
        # as in "sample" mode (no rounding of the probability mass at p = 1)
        threshold = jnp.maximum(kth, jnp.where(top_p[:, None] < 1, p_threshold, -jnp.inf))
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    if jnp.ndim(key) == 1:
        sampled = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, scaled)
    else:
        sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy_ids).astype(jnp.int32)


def request_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """Per-row PRNG keys ``fold_in(key(seed), counter)``: a request's ``n``-th sampled token uses its seed and
    ``n`` only, so it is the same whatever batch, slot or step it lands in (and after a preemption)."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)


def param_rows(params: Sequence[SamplingParams | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-row ``(seeds uint32, temperature float32, top_k int32, top_p float32)`` arrays of a batch for
    :func:`sample` / :func:`request_keys`; a ``None`` row (an empty slot, padding) is greedy."""
    n = len(params)
    seeds = np.zeros((n,), np.uint32)
    temperature = np.zeros((n,), np.float32)
    top_k = np.zeros((n,), np.int32)
    top_p = np.ones((n,), np.float32)
    for i, p in enumerate(params):
        if p is not None:
            seeds[i], temperature[i], top_p[i] = p.seed % (1 << 32), p.temperature, p.top_p
            top_k[i] = min(p.top_k, _INT32_MAX)  # (any k beyond the vocabulary keeps every token)
    return seeds, temperature, top_k, top_p


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """The model's log-probability of each row's token: ``log_softmax(logits [B, V])[b, tokens[b]]`` in float32
    (the raw distribution, before temperature, top-k or top-p)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None].astype(jnp.int32), axis=-1)[:, 0]

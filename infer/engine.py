"""Continuous-batching inference engine over a paged KV cache.

    engine = Engine(model, EngineConfig(max_batch=8, page_size=16))
    engine.generate(["Hello", "Step-3 is"], SamplingParams(max_new_tokens=32))        # -> list[str]
    for event in engine.stream(["Hello"]): print(event.text, end="")                   # streaming
    rid = engine.submit([1, 72, 105], {"temperature": 0.7, "seed": 3}); engine.run()  # request by request

Design (docs/engine.md has the long version):

* **Slots.** Decoding runs on a fixed batch of ``max_batch`` slots; a slot without a decoding request is a padded
  row (token 0 at position 0, its block-table row pointing at the group's null page). Prefill runs on a fixed
  ``prefill_batch`` rows of one chunk of at most ``prefill_chunk`` tokens, the chunk length rounded up to a power
  of two. So the jitted decode step compiles once and the prefill step once per chunk bucket; steady-state decoding
  never recompiles (``Engine.trace_counts`` counts the traces).
* **Pages.** A :class:`~step3_jax.kv_cache.PageAllocator` per data-parallel attention group hands out pages of
  a fixed pool; each group's pool has one extra "null" page that padded rows and padding tokens write into and
  nothing reads. A request reserves the pages of its prompt at admission (admitted in arrival order while a slot
  and pages last) and one more page whenever decoding crosses a page boundary. Each slot's block-table row is kept
  between steps and rewritten only when its pages change.
* **Steps.** ``step()`` = admit what fits, run one prefill chunk for the oldest admitted-but-not-prefilled
  requests, run one decode step for every decoding slot, then retire finished requests and free their pages.
  Colocated, a decode step is dispatched before the previous one's tokens are read (they feed it on the device),
  so the host's bookkeeping for step k overlaps the device's step k + 1.
* **Prefix caching.** Full pages of known tokens are published under a hash of their tokens and everything before
  them; a request whose prompt begins with published pages takes them (shared, never written) and prefills the
  rest. Freed published pages keep their content until a page is needed (``EngineConfig.prefix_caching``).
* **Preemption.** When a decoding request needs a page and its group has none free, the most recently admitted
  request of that group is preempted: its pages are freed and it goes back to the queue (in arrival order) with
  its prompt + generated tokens as the new prompt (recompute), its remaining budget and sampling state.
* **Sampling.** Per-row temperature / top-k / top-p, and per-request PRNG keys ``fold_in(key(seed), n)`` for the
  ``n``-th generated token: a request's samples depend on nothing but its own seed (not on batch neighbours,
  slots, arrival times or preemptions). The sampler is its own small program after each step, in the cheapest
  mode the rows allow (``infer.sampling.sample_mode``: a greedy batch never sorts the vocabulary).
* **Mesh.** With a model created on a mesh, the decode batch and the page pool are split over the batch mesh axes
  (data-parallel attention groups, the paper's attention instances; ``model.paged_write_attend``); the experts
  follow the model's own expert / tensor sharding.
* **Disaggregated.** Given an :class:`~infer.afd.AFDRunner` instead of a model, the same scheduler drives
  attention-FFN disaggregation: the groups are the attention devices, the pool lives on the attention submesh,
  and every prefill / decode step runs through the runner's micro-batch pipeline (``AFDRunner.step``). Under
  several processes the engine runs in process 0, and every other process (attention or FFN, either side may span
  processes) follows its steps with ``AFDRunner.serve``; or (``AFDConfig.instances = "per-process"``, the paper's
  independent attention instances) every attention process runs its own engine over its own devices, requests
  and pages, the instances stepping together round by round (``AFDRunner.agree_round``), and the FFN processes
  serve them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.cli import stop_ids
from infer.sampling import SAMPLE_MODES, SamplingParams, param_rows, request_keys, sample, sample_mode, token_logprobs
from step3_jax import kv_cache as kvc
from step3_jax.checkpoint import checkpoint_folder
from step3_jax.model import Step3ForCausalLM
from step3_jax.tokenizer import ByteTokenizer, StreamDecoder, encode_chat, load_tokenizer

if TYPE_CHECKING:
    from infer.afd import AFDRunner

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "error")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static sizes of an :class:`Engine` (they fix the compiled shapes).

    max_batch: decode slots (padded rows when fewer requests run); divisible by the data-parallel groups.
    page_size: tokens per KV page (default 16; 64 for FP8 pages, the smallest the GPU decode kernel takes).
    num_pages: pages in the pool over all groups (default: every slot can hold ``max_seq_len`` tokens). Each group
      needs at least ``max_seq_len / page_size`` pages, so any single request fits on its own.
    max_seq_len: the context limit (prompt + generated tokens); default the model's ``max_position_embedding``.
    prefill_chunk: most prompt tokens prefilled per request per step (a power of two >= ``min_bucket``).
    prefill_batch: requests prefilled per prefill call (rows; divisible by the data-parallel groups; default one
      per group).
    min_bucket: shortest prefill chunk shape (power of two); chunks are rounded up to powers of two.
    kv_dtype: KV page dtype: None (the model's dtype), "bfloat16", "float32" or "float8_e4m3fn" (per-token scales).
    prefix_caching: a request whose first full pages of tokens equal an earlier request's (a shared system prompt,
      a conversation's next turn, a preempted request coming back) takes those pages' KV instead of computing it
      again, while the pages last (freed pages keep theirs until they are needed).
    """

    max_batch: int = 8
    page_size: int | None = None
    num_pages: int | None = None
    max_seq_len: int | None = None
    prefill_chunk: int = 64
    prefill_batch: int | None = None
    min_bucket: int = 16
    kv_dtype: str | None = None
    prefix_caching: bool = True

    def __post_init__(self):
        kvc.check_kv_dtype(self.kv_dtype, "EngineConfig.kv_dtype")
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"EngineConfig.prefix_caching must be True or False, got {self.prefix_caching!r}")
        if self.page_size is None:
            object.__setattr__(self, "page_size", kvc.default_page_size(self.kv_dtype))
        for name in ("max_batch", "page_size", "prefill_chunk", "min_bucket"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("num_pages", "max_seq_len", "prefill_batch"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"EngineConfig.{name} must be None or an int >= 1, got {v!r}")
        for name in ("prefill_chunk", "min_bucket"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"EngineConfig.{name} must be a power of two, got {v}")
        if self.prefill_chunk < self.min_bucket:
            raise ValueError(
                f"EngineConfig.prefill_chunk ({self.prefill_chunk}) must be >= min_bucket ({self.min_bucket})"
            )


@dataclasses.dataclass
class RequestOutput:
    """The result of one request. ``finish_reason``: "stop" (a stop token, included in ``token_ids``), "length"
    (``max_new_tokens`` or the context limit), "abort" (:meth:`Engine.abort`: the tokens generated until then), or
    "error" (rejected; ``error`` says why, nothing was generated). ``logprobs``: the model's log-probability of
    each generated token (``log_softmax`` of its logits, before temperature, top-k or top-p)."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    error: str | None = None
    logprobs: list[float] = dataclasses.field(default_factory=list)
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.finish_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds between output tokens after the first (None with fewer than two tokens)."""
        if self.first_token_time is None or len(self.token_ids) < 2:
            return None
        return (self.finish_time - self.first_token_time) / (len(self.token_ids) - 1)

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.latency if self.latency > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One streamed step of a request: a new token (``token_id``, with the ``text`` it completes, possibly "" for
    an unfinished UTF-8 sequence), and/or the end of the request (``finished``, with its ``output``). A rejected
    request gets one event with ``token_id=None``, ``finished=True`` and an output carrying the error.
    ``logprob``: the model's log-probability of ``token_id`` (None without a token)."""

    request_id: str
    token_id: int | None
    text: str
    finished: bool
    output: RequestOutput | None = None
    logprob: float | None = None


# request states
_WAITING, _PREFILL, _DECODE = "waiting", "prefill", "decode"


@dataclasses.dataclass(eq=False)
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    arrival: int  # submission order: queue priority, also after a preemption
    arrival_time: float
    output: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)  # the model's log-probability of each output
    state: str = _WAITING
    group: int = -1
    slot: int = -1
    admitted: int = -1  # admission order (the preemption victim is the largest)
    target: list[int] = dataclasses.field(default_factory=list)  # tokens to prefill into the cache
    cached: int = 0  # tokens of the sequence already in the cache
    keys: list[bytes] = dataclasses.field(default_factory=list)  # content keys of the sequence's first full pages
    published: int = 0  # of its pages, how many are published (prefix caching)
    preemptions: int = 0
    first_token_time: float | None = None
    detok: StreamDecoder | None = None  # the output's text, piece by piece (with a tokenizer)

    @property
    def seq(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:  # len(seq), without building it
        return len(self.prompt) + len(self.output)

    @property
    def last_token(self) -> int:  # seq[-1], without building it
        return self.output[-1] if self.output else self.prompt[-1]


def _pow2_at_least(n: int, minimum: int) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


class Engine:
    """Continuous batching over a paged KV cache for a :class:`~step3_jax.model.Step3ForCausalLM`, or for an
    :class:`~infer.afd.AFDRunner` (attention and FFN on separate device groups, each step pipelined over its
    micro-batches).

    ``tokenizer`` (``encode(text) -> ids``, ``decode(ids) -> text``) lets prompts be strings and results carry
    text; default: the byte tokenizer when the model's vocabulary holds it, else token ids only.
    ``clock`` (default ``time.perf_counter``) stamps arrival / first token / finish times.
    """

    def __init__(
        self,
        model: Step3ForCausalLM | AFDRunner,
        config: EngineConfig | None = None,
        *,
        tokenizer=None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        from infer.afd import AFDRunner

        cfg = config or EngineConfig()
        self.afd = model if isinstance(model, AFDRunner) else None
        if self.afd is not None:  # several processes: this must be the driver (process 0), the others serve()
            self.afd.check_driver("Engine(AFDRunner)")
        mc = model.config
        self.model = model
        self.model_config = mc
        self.clock = clock
        if tokenizer is None:  # a loaded checkpoint's own tokenizer, else bytes (when the vocabulary holds them)
            folder = checkpoint_folder(model)
            tokenizer = load_tokenizer(folder) if folder is not None else ByteTokenizer()
            if isinstance(tokenizer, ByteTokenizer) and mc.vocab_size < ByteTokenizer.vocab_size:
                tokenizer = None
        self.tokenizer = tokenizer
        # what ends a request besides its own stop tokens (unless it sets ignore_eos), as in other engines
        self.eos_token_ids: tuple[int, ...] = stop_ids(tokenizer, mc)
        if self.afd is not None:
            mesh, rules = self.afd.attn_mesh, self.afd.rules
        else:
            mesh, rules = model.ctx.mesh, model.ctx.rules
        self.mesh = mesh
        # per-process AFD attention instances: this engine schedules its own process's attention devices only
        self._instanced = self.afd is not None and self.afd.instanced
        groups = self.afd.local_attention_devices if self._instanced else kvc.num_page_groups(mesh, rules)
        self.groups = groups
        max_seq_len = cfg.max_seq_len or mc.max_position_embedding
        if max_seq_len > mc.max_position_embedding:
            raise ValueError(
                f"EngineConfig.max_seq_len {max_seq_len} exceeds the model's max_position_embedding "
                f"{mc.max_position_embedding}"
            )
        if cfg.prefill_batch is None:
            cfg = dataclasses.replace(cfg, prefill_batch=groups)
        for name in ("max_batch", "prefill_batch"):
            if getattr(cfg, name) % groups:
                raise ValueError(
                    f"EngineConfig.{name} ({getattr(cfg, name)}) must be divisible by the {groups} data-parallel "
                    f"attention groups of the mesh"
                )
        self.max_pages_per_seq = -(-max_seq_len // cfg.page_size)
        slots_per_group = cfg.max_batch // groups
        num_pages = cfg.num_pages or groups * slots_per_group * self.max_pages_per_seq
        if num_pages % groups:
            raise ValueError(f"EngineConfig.num_pages ({num_pages}) must be divisible by the {groups} groups")
        pages_per_group = num_pages // groups
        if pages_per_group < self.max_pages_per_seq:
            raise ValueError(
                f"EngineConfig.num_pages = {num_pages} gives {pages_per_group} pages per data-parallel group, fewer "
                f"than the {self.max_pages_per_seq} pages of one max_seq_len={max_seq_len} request; raise num_pages "
                f"or lower max_seq_len"
            )
        self.config = dataclasses.replace(cfg, num_pages=num_pages, max_seq_len=max_seq_len)
        self.max_seq_len = max_seq_len
        self.pages_per_group = pages_per_group
        self.null_page = pages_per_group  # local id of each group's extra page: padding writes land there
        self.slots_per_group = slots_per_group
        self.prefill_rows_per_group = cfg.prefill_batch // groups
        self.allocators = [
            kvc.PageAllocator(pages_per_group, cfg.page_size, self.max_pages_per_seq) for _ in range(groups)
        ]
        # traces (compilations) of the jitted steps; over AFD the runner's, per program (AFDRunner.trace_counts)
        self.trace_counts = {"prefill": 0, "decode": 0, "sample": 0} if self.afd is None else self.afd.trace_counts
        if self.afd is not None:  # (refuses a max_batch its micro-batches cannot split, before the pool exists)
            self._state = None
            self._decode_fn, self._prefill_fn = self._afd_steps(self.afd)
        else:
            self._graphdef, self._state = nnx.split(model)
            self._decode_fn = jax.jit(self._decode_impl, donate_argnums=(1,))
            self._prefill_fn = jax.jit(self._prefill_impl, donate_argnums=(1,))
            self._sample_fn = jax.jit(self._sample_impl, static_argnums=0)
        if self._instanced:  # (every instance must step with the same shapes, on one pool array: check first)
            self.afd.join_instances(self._shapes)
        if self.afd is not None:  # (under several processes every attention process makes its own pages)
            devices = self.afd.afd.attention_devices  # (the pool holds every attention device's pages)
            self._pool = self.afd.create_pool(devices * (pages_per_group + 1), cfg.page_size, cfg.kv_dtype)
        else:
            self._pool = kvc.create_page_pool(
                mc, groups * (pages_per_group + 1), cfg.page_size, dtype=cfg.kv_dtype, mesh=mesh, rules=rules
            )
        self._slots: list[_Request | None] = [None] * cfg.max_batch
        # every slot's block-table row (local page ids, then the null page), updated as its pages change
        self._tables = np.full((cfg.max_batch, self.max_pages_per_seq), self.null_page, np.int32)
        self._null_row = self._tables[0].copy()
        self._closed = False  # (close() done)
        # (rows, tokens, logprobs) of a dispatched decode step not yet read; over AFD (rows, StepTokens, None)
        self._inflight: tuple | None = None
        # colocated: (prefill rows, tokens, logprobs) of a prefill step's first tokens not yet read (None elsewhere)
        self._first: tuple | None = None
        self._last_step: tuple | None = None  # (tokens, logprobs) of the last step dispatched, prefill or decode
        if self.afd is None:  # the last decode step's tokens, on the device (the next step's input), replicated
            replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            self._tokens_sharding = replicated
            self._prev_tokens = jax.device_put(
                np.zeros((cfg.max_batch,), np.int32), self._tokens_sharding or self._pool["k"][0].sharding
            )
            self._slot_ids = np.arange(cfg.max_batch, dtype=np.int32)  # (a decode step's sampler writes every slot)
        self._queue: list[tuple[int, _Request]] = []  # heap by arrival
        self._requests: dict[str, _Request] = {}
        self._pending_events: list[StreamEvent] = []
        self._no_admit: set[int] = set()  # groups that preempted this step
        self._arrivals = itertools.count()
        self._admissions = itertools.count()
        self._ids = itertools.count()
        self.stats = {
            "steps": 0,
            "decode_steps": 0,
            "prefill_calls": 0,
            "preemptions": 0,
            "finished": 0,
            "rejected": 0,
            "aborted": 0,
            "generated_tokens": 0,
            "prefix_cached_tokens": 0,  # prompt tokens whose KV came from the prefix cache, not a prefill
            "peak_pages_in_use": 0,
        }

    # ------------------------------------------------------------------ jitted steps

    def _cache(self, pool, block_table, start) -> kvc.PagedKVCache:
        return kvc.PagedKVCache(
            k=pool["k"],
            v=pool["v"],
            k_scale=pool["k_scale"],
            v_scale=pool["v_scale"],
            block_table=block_table,
            lengths=start,
        )

    @staticmethod
    def _pool_of(cache: kvc.PagedKVCache) -> dict:
        return {"k": cache.k, "v": cache.v, "k_scale": cache.k_scale, "v_scale": cache.v_scale}

    def _decode_impl(self, state, pool, tokens, on_device, prev, block_table, start):
        """One decode step's model: a row with ``on_device`` set takes its input token from ``prev`` (the previous
        step's output, still on the device), the others from ``tokens``. Returns ``(logits [B, V], pool)``; the
        sampler is its own program (:meth:`_sample_impl`)."""
        self.trace_counts["decode"] += 1  # runs only while tracing: counts compilations
        model = nnx.merge(self._graphdef, state)
        tokens = jnp.where(on_device, prev, tokens)
        logits, cache = model(tokens[:, None], cache=self._cache(pool, block_table, start))
        return logits[:, -1], self._pool_of(cache)

    def _prefill_impl(self, state, pool, ids, block_table, start, last):
        """One prefill chunk's model: ``(logits [n, V] at each row's position last, pool)``."""
        self.trace_counts["prefill"] += 1
        model = nnx.merge(self._graphdef, state)
        logits, cache = model(ids, cache=self._cache(pool, block_table, start))
        return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0], self._pool_of(cache)

    def _sample_impl(self, mode, logits, seeds, counters, temperature, top_k, top_p, prev, dest):
        """A step's sampler, its own small program per :func:`~infer.sampling.sample_mode` (static), so that a
        greedy batch never sorts the vocabulary and the model's step compiles once whatever the rows sample.
        The token of row ``i`` also goes into ``prev`` at slot ``dest[i]`` (out of range: nowhere): a decode
        step's tokens, and a fresh request's first token, are their slots' input to the next decode step on the
        device. Returns ``(tokens, logprobs, prev)``."""
        self.trace_counts["sample"] += 1
        tokens = sample(logits, request_keys(seeds, counters), temperature, top_k, top_p, mode)
        prev = prev.at[dest].set(tokens, mode="drop")
        if self._tokens_sharding is not None:  # as _prev_tokens starts, so the next step needs no other program
            prev = jax.lax.with_sharding_constraint(prev, self._tokens_sharding)
        return tokens, token_logprobs(logits, tokens), prev

    def _afd_steps(self, runner):
        """Decode and prefill steps through an AFD runner's pipeline, with the jitted steps' signatures. Decoding
        splits every group's slots into ``AFDConfig.micro_batches`` micro-batches (they must divide evenly);
        prefill too when its rows per group divide evenly, else it runs as one micro-batch."""
        from infer.afd import InstanceShapes, kv_code

        n_mb = runner.afd.micro_batches
        if self.slots_per_group % n_mb:
            raise ValueError(
                f"EngineConfig.max_batch ({self.config.max_batch}) gives {self.slots_per_group} decode slots per "
                f"attention device, which the AFD runner's {n_mb} micro-batches must divide; use a max_batch that "
                f"is a multiple of {self.groups * n_mb}"
            )
        prefill_mb = n_mb if self.prefill_rows_per_group % n_mb == 0 else 1
        self._shapes = InstanceShapes(
            self.prefill_rows_per_group, prefill_mb, self.slots_per_group, n_mb, self.max_pages_per_seq,
            self.pages_per_group + 1, self.config.page_size, kv_code(self.config.kv_dtype),
        )  # fmt: skip

        # a greedy batch samples in the runner's greedy logits program (no vocabulary sort), others in its sampling one
        def decode(state, pool, tokens, table, start, mode, *rows):  # (not read: StepTokens.read() when collected)
            zeros, rows = np.zeros_like(start), None if mode == "greedy" else rows
            out, pool = runner.dispatch(
                pool, tokens[:, None], table, start, zeros, rows, micro_batches=n_mb, decode=True
            )
            return (out, None), pool

        def prefill(state, pool, ids, table, start, last, mode, *rows):
            rows = None if mode == "greedy" else rows
            out, pool = runner.dispatch(pool, ids, table, start, last, rows, micro_batches=prefill_mb)
            return (out, None), pool

        return decode, prefill

    # ------------------------------------------------------------------ submission

    def validate(self, prompt, params=None) -> tuple[list[int], SamplingParams]:
        """Check one request; returns (prompt ids, SamplingParams) or raises ValueError naming the bad field.
        ``prompt``: text, token ids, or a conversation (``[{"role": "user", "content": ...}, ...]``, rendered in the
        tokenizer's chat template up to the assistant's turn prompt, :func:`~step3_jax.tokenizer.encode_chat`)."""
        if params is None:
            params = SamplingParams()
        elif isinstance(params, Mapping):
            fields = {f.name for f in dataclasses.fields(SamplingParams)}
            unknown = sorted(set(params) - fields)
            if unknown:
                raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(fields)}")
            params = SamplingParams(**params)
        elif not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams or a dict, got {type(params).__name__}")
        vocab = self.model_config.vocab_size
        bad_stops = [s for s in params.stop_token_ids if s >= vocab]
        if bad_stops:
            raise ValueError(f"stop_token_ids {bad_stops} are outside the vocabulary [0, {vocab})")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the engine has no tokenizer; pass token ids")
            if not prompt:
                raise ValueError("prompt is empty: it needs at least one token")
            ids = list(self.tokenizer.encode(prompt))
        elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            if self.tokenizer is None:
                raise ValueError("prompt is a conversation but the engine has no tokenizer to render it")
            ids = encode_chat(self.tokenizer, prompt)  # (ValueError: no chat template, or a malformed message)
        elif isinstance(prompt, (Sequence, np.ndarray)) and not isinstance(prompt, (bytes, bytearray)):
            ids = list(prompt.tolist() if isinstance(prompt, np.ndarray) else prompt)
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise ValueError(f"prompt token ids must be ints, got {type(t).__name__} {t!r}")
            ids = [int(t) for t in ids]
        else:
            raise ValueError(
                f"prompt must be text, a sequence of token ids or a list of chat messages, got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError("prompt is empty: it needs at least one token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token ids outside [0, {vocab}): {bad[:5]}")
        if len(ids) >= self.max_seq_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens is longer than the context limit: max_seq_len {self.max_seq_len} "
                f"leaves no room for a new token"
            )
        return ids, params

    def submit(self, prompt, params: SamplingParams | Mapping | None = None, *, request_id: str | None = None) -> str:
        """Queue one request (text or token ids); returns its id. Raises ValueError for a bad request (nothing is
        queued; requests already running are unaffected)."""
        request_id = self._new_id() if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        try:
            ids, params = self.validate(prompt, params)
        except ValueError as e:
            raise ValueError(f"request {request_id!r} rejected: {e}") from None
        req = _Request(request_id, ids, params, next(self._arrivals), self.clock())
        req.target = list(ids)
        if self.tokenizer is not None:
            req.detok = StreamDecoder(self.tokenizer)
        self._requests[request_id] = req
        heapq.heappush(self._queue, (req.arrival, req))
        return request_id

    def _new_id(self) -> str:
        """The next automatic id ``req-N`` that no waiting or running request has (a caller may have chosen one)."""
        while (rid := f"req-{next(self._ids)}") in self._requests:
            pass
        return rid

    def _reject(self, request_id: str, prompt, error: str) -> RequestOutput:
        now = self.clock()
        ids = list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
            ids = []  # (a conversation, or ids that were not ints: no prompt ids to report)
        out = RequestOutput(request_id, ids, [], None, "error", error=error, arrival_time=now, finish_time=now)
        self.stats["rejected"] += 1
        self._pending_events.append(StreamEvent(request_id, None, "", True, out))
        return out

    def submit_or_reject(self, prompt, params=None, *, request_id: str | None = None) -> str:
        """Like :meth:`submit`, but a bad request becomes a finished "error" output (streamed as an event) instead
        of an exception: what batch front ends use so one bad request does not stop the others. (A ``request_id``
        already in use still raises ValueError: an error output under it would stand for the live request.)"""
        rid = self._new_id() if request_id is None else str(request_id)
        if rid in self._requests:  # (an error output under a live request's id would stand for that request)
            raise ValueError(f"request_id {rid!r} is already in use")
        try:
            return self.submit(prompt, params, request_id=rid)
        except ValueError as e:
            self._reject(rid, prompt, str(e))
            return rid

    def abort(self, request_id: str) -> RequestOutput:
        """Stop a waiting or running request now (e.g. its client went away): its slot and KV pages are freed at
        once, the other requests are unaffected, and its stream ends with a finished event whose output has
        ``finish_reason="abort"`` and the tokens generated so far. Returns that output. Raises ValueError for an
        id that is not waiting or running (unknown, or already finished)."""
        req = self._requests.get(str(request_id))
        if req is None:
            raise ValueError(f"no waiting or running request {request_id!r} (unknown, or already finished)")
        if req.state == _WAITING:
            self._queue = [(a, r) for a, r in self._queue if r is not req]
            heapq.heapify(self._queue)
        rest = req.detok.finish() if req.detok is not None else ""  # text held back for an unfinished character
        out = self._finish(req, "abort", self.clock())
        self._pending_events.append(StreamEvent(req.id, None, rest, True, out))
        return out

    # ------------------------------------------------------------------ scheduling

    @property
    def num_running(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    def has_work(self) -> bool:
        unread = self._inflight is not None or self._first is not None
        return bool(self._queue) or self.num_running > 0 or bool(self._pending_events) or unread

    def pages_in_use(self) -> int:
        return sum(a.num_pages - a.num_free for a in self.allocators)

    def _group_slots(self, g: int) -> range:
        return range(g * self.slots_per_group, (g + 1) * self.slots_per_group)

    def _admit(self) -> None:
        """Admit queued requests in arrival order while a slot and the pages of their prompt are free."""
        ps = self.config.page_size
        while self._queue:
            _, req = self._queue[0]
            need = -(-(len(req.target) + 1) // ps)
            # the group with the longest cached prefix of the prompt (at least its last token is prefilled, for
            # its logits), then the most free pages
            keys = self._keys(req, (len(req.target) - 1) // ps) if self.config.prefix_caching else []
            best, best_rank, best_prefix = None, None, []
            for g in range(self.groups):
                if g in self._no_admit or all(self._slots[s] is not None for s in self._group_slots(g)):
                    continue
                prefix = self.allocators[g].match(keys)
                free = self.allocators[g].num_free_besides(prefix)
                if free >= need - len(prefix) and (best is None or (len(prefix), free) > best_rank):
                    best, best_rank, best_prefix = g, (len(prefix), free), prefix
            if best is None:
                return
            if len(best_prefix) < len(keys) and self._soon_published(keys[len(best_prefix)], len(best_prefix)):
                return  # a running prefill is about to publish its next page: wait for it (arrival order kept)
            heapq.heappop(self._queue)
            slot = next(s for s in self._group_slots(best) if self._slots[s] is None)
            self.allocators[best].reserve(req.id, len(req.target), prefix=best_prefix)
            req.state, req.group, req.slot, req.cached = _PREFILL, best, slot, len(best_prefix) * ps
            req.published = len(best_prefix)
            self.stats["prefix_cached_tokens"] += req.cached
            req.admitted = next(self._admissions)
            self._slots[slot] = req
            self._sync_table(req)

    def _preempt(self, req: _Request) -> None:
        """Free ``req``'s pages and requeue it; its prompt + generated tokens are recomputed when it returns.
        Its group admits nothing more this step (re-admitting at once would only thrash)."""
        self._no_admit.add(req.group)
        self.allocators[req.group].free(req.id)
        self._tables[req.slot] = self.null_page
        self._slots[req.slot] = None
        req.state, req.group, req.slot, req.cached, req.published = _WAITING, -1, -1, 0, 0
        req.target = req.seq[:-1] if req.output else list(req.prompt)
        req.preemptions += 1
        self.stats["preemptions"] += 1
        heapq.heappush(self._queue, (req.arrival, req))
        log.debug("preempted %s (%d tokens to recompute)", req.id, len(req.target))

    def _ensure_page(self, req: _Request) -> bool:
        """Make sure ``req`` owns a page for its next token, preempting the group's most recently admitted requests
        while none is free. Returns False if ``req`` itself was preempted."""
        alloc = self.allocators[req.group]
        need = -(-(req.cached + 1) // self.config.page_size)
        if alloc.num_owned(req.id) >= need:  # (most steps: the page is there)
            return True
        while alloc.num_free == 0:
            holders = [r for r in self._slots if r is not None and r.group == req.group]
            victim = max(holders, key=lambda r: r.admitted)
            self._preempt(victim)
            if victim is req:
                return False
        alloc.reserve(req.id, req.cached + 1)
        self._sync_table(req)
        return True

    def _keys(self, req: _Request, n: int) -> list[bytes]:
        """The content keys of ``req``'s first ``n`` full pages: each a hash of its tokens and the previous key,
        so it names the page's tokens and every token before them (what its KV depends on)."""
        ps, seq = self.config.page_size, None
        while len(req.keys) < n:
            seq = seq or req.seq
            i = len(req.keys)
            tokens = np.asarray(seq[i * ps : (i + 1) * ps], np.int64).tobytes()
            req.keys.append(hashlib.blake2b((req.keys[-1] if i else b"") + tokens, digest_size=16).digest())
        return req.keys[:n]

    def _soon_published(self, key: bytes, index: int) -> bool:
        """Whether a request still prefilling will publish its page ``index`` under ``key`` (its prompt begins as
        the waiting one's does, and its prefill has not reached that page yet)."""
        ps = self.config.page_size
        return any(
            r is not None and r.state == _PREFILL and r.published <= index < len(r.target) // ps
            and self._keys(r, index + 1)[index] == key
            for r in self._slots
        )  # fmt: skip

    def _publish(self, reqs: Sequence[_Request | None]) -> None:
        """Prefix caching: publish the pages of these requests that are full of written KV of known tokens."""
        if not self.config.prefix_caching:
            return
        ps = self.config.page_size
        for r in reqs:
            if r is None or r.state == _WAITING:
                continue
            full = min(r.cached, r.length) // ps  # (a token still in flight is not known here yet)
            if full > r.published:
                alloc = self.allocators[r.group]
                for i, key in enumerate(self._keys(r, full)[r.published :], r.published):
                    alloc.publish(r.id, i, key)
                r.published = full

    def _sampling(self, reqs: Sequence[_Request | None], counters: Sequence[int]):
        """A step's sampler mode (:func:`~infer.sampling.sample_mode`) and its rows' (seeds, counters, temperature,
        top_k, top_p) arrays."""
        params = [None if r is None else r.params for r in reqs]
        seeds, temperature, top_k, top_p = param_rows(params)
        mode = sample_mode(params, self.model_config.vocab_size)
        return mode, (seeds, np.asarray(counters, np.int32), temperature, top_k, top_p)

    def _sync_table(self, req: _Request) -> None:
        """Refresh ``req``'s slot's row of the block tables (kept between steps) after its pages changed."""
        pages = self.allocators[req.group].pages(req.id)
        row = self._tables[req.slot]
        row[: len(pages)] = pages
        row[len(pages) :] = self.null_page

    def _table_row(self, req: _Request | None) -> np.ndarray:
        """``req``'s block-table row (its pages, then the null page), or a null row for a padding row."""
        return self._tables[req.slot] if req is not None else self._null_row

    def _prefill_rows(self) -> tuple[list[_Request | None], list[int], int]:
        """The next prefill chunk: up to ``prefill_rows_per_group`` admitted requests of each group, oldest admission
        first (None: a padding row), their chunk lengths, and the chunk's bucketed width (0: nothing to prefill)."""
        cfg = self.config
        rows: list[_Request | None] = []
        for g in range(self.groups):
            todo = sorted(
                (r for r in self._slots if r is not None and r.group == g and r.state == _PREFILL),
                key=lambda r: r.admitted,
            )[: self.prefill_rows_per_group]
            rows += todo + [None] * (self.prefill_rows_per_group - len(todo))
        lens = [0 if r is None else min(cfg.prefill_chunk, len(r.target) - r.cached) for r in rows]
        if all(r is None for r in rows):
            return rows, lens, 0
        return rows, lens, min(_pow2_at_least(max(lens), cfg.min_bucket), cfg.prefill_chunk)

    def _prefill(self, width: int | None = None, chunk: tuple | None = None) -> list[StreamEvent]:
        """Run the next prefill chunk (:meth:`_prefill_rows`, or ``chunk`` when the caller has it), if there is one;
        with ``width`` (per-process AFD instances: the round's agreed width, at least this engine's own) always, on
        padding rows if need be."""
        rows, lens, own = chunk or self._prefill_rows()
        if width is None:
            if not own:
                return []
            width = own
        n = len(rows)
        ids = np.zeros((n, width), np.int32)
        table = np.stack([self._table_row(r) for r in rows])
        start = np.zeros((n,), np.int32)
        last = np.zeros((n,), np.int32)
        for i, r in enumerate(rows):
            if r is None:
                continue
            ids[i, : lens[i]] = r.target[r.cached : r.cached + lens[i]]
            start[i] = r.cached
            last[i] = lens[i] - 1
        counters = [0 if r is None else len(r.output) for r in rows]
        # fresh requests whose prompt this chunk completes: their first token comes from its last logits
        first = [
            i for i, r in enumerate(rows) if r is not None and not r.output and r.cached + lens[i] == len(r.target)
        ]
        mode, sampling = self._sampling(rows, counters)
        if self.afd is None:  # colocated: the first tokens also go to their slots' next decode input, on the device
            dest = np.full((n,), self.config.max_batch, np.int32)
            dest[first] = [rows[i].slot for i in first]
            logits, self._pool = self._prefill_fn(self._state, self._pool, ids, table, start, last)
            tokens, logprobs, self._prev_tokens = self._sample_fn(mode, logits, *sampling, self._prev_tokens, dest)
            self._last_step = (tokens, logprobs)
        else:
            self._last_step, self._pool = self._prefill_fn(None, self._pool, ids, table, start, last, mode, *sampling)
        self.stats["prefill_calls"] += 1
        for i, r in enumerate(rows):
            if r is not None:
                r.cached += lens[i]
                if r.cached == len(r.target):
                    r.state = _DECODE
        self._publish(rows)
        if first:  # read after the next decode step is dispatched (which takes them on the device)
            self._first = ([r if i in first else None for i, r in enumerate(rows)], *self._last_step)
        return []  # (a chunk that ends no prompt, or a recompute after preemption: nothing to wait for)

    def _decode(self, always: bool = False) -> list[StreamEvent]:
        """One decode step for every decoding request. The step is dispatched before the previous one's tokens are
        read: a row whose token is still in flight (its previous decode step's, or colocated the first token of the
        prompt this step's prefill completed) takes it on the device (colocated ``_prev_tokens``; over AFD an id
        of -1, which the runner fills from its previous decode step), and the host turns those tokens into events
        while the devices run this step. A request that a stop token ended in the previous step
        has run one step too many then, and that token is dropped; one that its length ends is left out. With
        ``always`` (per-process AFD instances, in a round whose plan has a decode step) it runs even on padding
        rows only."""
        # steps whose tokens the host has not read: the last decode step, and (colocated) the first tokens of the
        # prompts this step's prefill completed; their rows take those tokens on the device
        waiting = [step for step in (self._inflight, self._first) if step is not None]
        # their requests' ids in this step (over AFD; colocated only whether they are pending): -1 for the last
        # decode step's token, -2 - i for the token of row i of the prefill step
        pending = {}
        if self._inflight is not None:
            pending |= {id(r): -1 for r in self._inflight[0] if r is not None}
        if self._first is not None:
            pending |= {id(r): -2 - i for i, r in enumerate(self._first[0]) if r is not None}
        self._inflight = self._first = None
        decoding = sorted((r for r in self._slots if r is not None and r.state == _DECODE), key=lambda r: r.admitted)
        ending = {id(r) for r in decoding if id(r) in pending and self._ends_with_next_token(r)}  # no step for these
        for r in decoding:
            if id(r) not in ending and r.state == _DECODE:  # (may have been preempted for an earlier one meanwhile)
                self._ensure_page(r)
        rows = [r if r is not None and r.state == _DECODE and id(r) not in ending else None for r in self._slots]
        events = []
        if always or any(r is not None for r in rows):
            n = len(rows)
            tokens, on_device = np.zeros((n,), np.int32), np.zeros((n,), bool)
            start, counters = np.zeros((n,), np.int32), np.zeros((n,), np.int32)
            for i, r in enumerate(rows):
                if r is None:
                    continue
                on_device[i] = id(r) in pending
                tokens[i] = pending.get(id(r), r.last_token)  # (the negative ids: over AFD, the runner's tokens)
                start[i] = r.cached
                counters[i] = len(r.output) + on_device[i]  # the index of the token this step samples
            active = np.fromiter((r is not None for r in rows), bool, len(rows))  # (slot order: the tables' rows)
            table = np.where(active[:, None], self._tables, self.null_page)
            mode, sampling = self._sampling(rows, counters)
            if self.afd is None:
                logits, self._pool = self._decode_fn(
                    self._state, self._pool, tokens, on_device, self._prev_tokens, table, start
                )
                # (every slot's token, padding rows' included, becomes the next decode step's input on the device)
                out, logprobs, self._prev_tokens = self._sample_fn(
                    mode, logits, *sampling, self._prev_tokens, self._slot_ids
                )
            else:
                (out, logprobs), self._pool = self._decode_fn(None, self._pool, tokens, table, start, mode, *sampling)
            self._last_step = (out, logprobs)
            self.stats["decode_steps"] += 1
            for r in rows:
                if r is not None:
                    r.cached += 1
            self._publish(rows)
            if any(r is not None for r in rows):  # (a step on padding rows only has nothing to read)
                self._inflight = (rows, out, logprobs)
        return [ev for step in waiting for ev in self._collect(step)] + events

    @staticmethod
    def _read(out, logprobs) -> tuple[np.ndarray, np.ndarray]:
        """A step's tokens and log-probabilities on the host: colocated its device arrays, over AFD (logprobs None)
        the runner's ``StepTokens``."""
        return out.read() if logprobs is None else (np.asarray(out), np.asarray(logprobs))

    def _ends_with_next_token(self, req: _Request) -> bool:
        """Whether the length limits end ``req`` once its next token is appended (as :meth:`_append` decides)."""
        return len(req.output) + 1 >= req.params.max_new_tokens or req.length + 1 >= self.max_seq_len

    def _collect(self, step: tuple) -> list[StreamEvent]:
        """A decode step's tokens -> events, for the rows whose request still decodes in that slot (not finished,
        aborted or preempted since the step was dispatched)."""
        rows, out, logprobs = step
        out, logprobs = self._read(out, logprobs)
        events = []
        for i, r in enumerate(rows):
            if r is not None and r.state == _DECODE and self._slots[r.slot] is r:
                events += self._append(r, int(out[i]), float(logprobs[i]))
        return events

    def _append(self, req: _Request, token: int, logprob: float) -> list[StreamEvent]:
        now = self.clock()
        if req.first_token_time is None:
            req.first_token_time = now
        req.output.append(token)
        req.logprobs.append(logprob)
        self.stats["generated_tokens"] += 1
        reason = None
        if token in req.params.stop_token_ids or (not req.params.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif len(req.output) >= req.params.max_new_tokens or req.length >= self.max_seq_len:
            reason = "length"
        text = self._text_delta(req, final=reason is not None)
        if reason is None:
            return [StreamEvent(req.id, token, text, False, logprob=logprob)]
        return [StreamEvent(req.id, token, text, True, self._finish(req, reason, now), logprob=logprob)]

    def _text_delta(self, req: _Request, final: bool) -> str:
        """The text the newest output token completes (the rest of the text, when it is the last)."""
        if req.detok is None:
            return ""
        piece = req.detok.push(req.output[-1])
        return piece + req.detok.finish() if final else piece

    def _finish(self, req: _Request, reason: str, now: float) -> RequestOutput:
        if req.state != _WAITING:  # (an aborted request may be queued: no slot, no pages)
            self._publish([req])  # (its last tokens are known now: a next turn may take their pages)
            self.allocators[req.group].free(req.id)
            self._tables[req.slot] = self.null_page
            self._slots[req.slot] = None
        del self._requests[req.id]
        self.stats["finished" if reason != "abort" else "aborted"] += 1
        text = None
        if req.detok is not None:
            req.detok.finish()  # (decodes nothing when the last piece already did)
            text = req.detok.text
        return RequestOutput(
            req.id,
            list(req.prompt),
            list(req.output),
            text,
            reason,
            logprobs=list(req.logprobs),
            num_preemptions=req.preemptions,
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            finish_time=now,
        )

    # ------------------------------------------------------------------ driving

    def step(self) -> list[StreamEvent]:
        """One engine iteration: admit, one prefill chunk, one decode step. Returns the events it produced.

        A per-process AFD instance's step is one round with the other instances (even with nothing to do): keep
        stepping, or :meth:`close`, for as long as the others run (their rounds wait for this one's)."""
        events, self._pending_events = self._pending_events, []
        self._no_admit = set()
        self._admit()
        if self._instanced:
            events += self._round(closing=False)[1]
        else:
            events += self._prefill()
            events += self._decode()
        self._admit()  # slots freed by finished requests take new ones before the next step's prefill
        self.stats["steps"] += 1
        self.stats["peak_pages_in_use"] = max(self.stats["peak_pages_in_use"], self.pages_in_use())
        return events

    def _round(self, closing: bool) -> tuple[bool, list[StreamEvent]]:
        """Per-process AFD instances: agree this round's steps with the other instances (:meth:`AFDRunner.
        agree_round`: a prefill if any instance has a chunk to prefill, at the widest chunk; a decode step if any
        has a request to decode) and run them, on padding rows where this engine has none. Returns (every instance
        has closed, events)."""
        if self._last_step is not None:
            # the last round's steps must be over before this round's exchange (the events of its decode step come
            # after this round's decode is dispatched, as ever): a round is then a point where no step is in
            # flight, so an instance that dies between rounds leaves no collective waiting for it (the others'
            # exchange fails at once; a step still running would wait for it until JAX's heartbeat aborts them)
            self._read(*self._last_step)
        chunk = rows, lens, width = self._prefill_rows()
        finishing = any(r is not None and r.cached + n >= len(r.target) for r, n in zip(rows, lens, strict=True))
        decode = finishing or any(r is not None and r.state == _DECODE for r in self._slots)
        plan = self.afd.agree_round(prefill_width=width, decode=decode, done=closing)
        events = []
        for st in plan.steps:  # (the prefill comes first: nothing has changed the chunk since it was chosen)
            events += self._prefill(st.width, chunk) if st.kind == "prefill" else self._decode(always=True)
        return plan.done, events

    def close(self) -> None:
        """End this engine's part in a multi-process AFD run (a no-op otherwise). With one scheduler, let every
        other process's ``AFDRunner.serve`` return; with per-process attention instances, keep taking part (on
        padding rows) in the other instances' steps until every instance has closed, and then every process is
        done. Requests still queued or running are an error: run or abort them first."""
        if self.afd is None or not self.afd.multiprocess:
            return
        if self.has_work():
            raise RuntimeError(
                f"Engine.close() with {self.num_running} requests running and {self.num_waiting} waiting: run() "
                f"or abort them first"
            )
        if self._closed:
            return
        self._closed = True
        if not self._instanced:
            self.afd.release()
            return
        while not self._round(closing=True)[0]:
            pass

    def events(self) -> Iterator[StreamEvent]:
        """Step until every submitted request has finished, yielding events as they come (submitting more from
        the consumer is fine: they are picked up)."""
        while self.has_work():
            yield from self.step()

    def run(self, on_event: Callable[[StreamEvent], None] | None = None) -> dict[str, RequestOutput]:
        """Step until idle; returns the outputs of the requests that finished, by request id."""
        done = {}
        for ev in self.events():
            if on_event is not None:
                on_event(ev)
            if ev.finished:
                done[ev.request_id] = ev.output
        return done

    def _submit_all(self, prompts, params) -> list[str]:
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list (of texts or token-id lists), got one string")
        prompts = list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
            per = list(params)
        else:
            per = [params] * len(prompts)
        return [self.submit_or_reject(p, sp) for p, sp in zip(prompts, per, strict=True)]

    def stream(self, prompts, params=None) -> Iterator[StreamEvent]:
        """Submit ``prompts`` (bad ones become error events) and yield events until every request has finished."""
        self._submit_all(prompts, params)
        yield from self.events()

    def generate_outputs(
        self, prompts, params=None, *, on_event: Callable[[StreamEvent], None] | None = None
    ) -> list[RequestOutput]:
        """Run ``prompts`` (texts or token-id lists) to completion; ``params`` is one SamplingParams / dict for all
        or one per prompt. A bad request gets an "error" output; the others run normally. Outputs in prompt order."""
        ids = self._submit_all(prompts, params)
        done = self.run(on_event)
        return [done[i] for i in ids]

    def generate(self, prompts, params=None) -> list[str]:
        """Synchronous text generation for notebooks: one completion string per prompt. Raises ValueError naming
        every bad request (after the good ones have run; ``generate_outputs`` returns per-request errors instead)."""
        outs = self.generate_outputs(prompts, params)
        errors = [f"prompt {i}: {o.error}" for i, o in enumerate(outs) if not o.ok]
        if errors:
            raise ValueError("; ".join(errors))
        if self.tokenizer is None:
            raise ValueError("the engine has no tokenizer to turn tokens into text; use generate_outputs")
        return [o.text for o in outs]

    def prefill_buckets(self, prompt_length: int) -> set[int]:
        """The prefill chunk shapes a prompt of ``prompt_length`` tokens may use (alone in its prefill call): with
        prefix caching, whatever cached prefix it finds may leave a last chunk of any length, so every bucket up to
        the widest."""
        cfg, out = self.config, set()
        for s in range(0, prompt_length, cfg.prefill_chunk):
            n = min(cfg.prefill_chunk, prompt_length - s)
            out.add(min(_pow2_at_least(n, cfg.min_bucket), cfg.prefill_chunk))
        if cfg.prefix_caching and prompt_length > cfg.page_size:
            out |= {b for b in (cfg.min_bucket << i for i in range(max(out).bit_length())) if b <= max(out)}
        return out

    def warmup(self, prompt_lengths: Sequence[int] = (1,)) -> None:
        """Compile the decode step, the prefill buckets that prompts of these lengths use and the sampler of every
        :data:`~infer.sampling.SAMPLE_MODES` mode, with throwaway requests (so later timings exclude compilation,
        whatever the requests sample). The engine must be idle."""
        if self.has_work():
            raise RuntimeError("warmup() needs an idle engine")
        buckets = sorted(set().union(*(self.prefill_buckets(min(max(int(n), 1), self.max_seq_len - 1))
                                       for n in prompt_lengths)))  # fmt: skip
        # one pass per sampler mode: greedy, sampled, sampled with top-k (a batch of one mode runs that mode); over
        # AFD the runner has a greedy and a sampling program, which the last two passes would compile alike
        passes = {"greedy": {}, "sample": {"temperature": 1.0}, "filter": {"temperature": 1.0, "top_k": 1}}
        i = 0
        for mode in SAMPLE_MODES if self.afd is None else ("greedy", "filter"):
            kw = passes[mode]
            for b in buckets:  # (no two share a first page: none takes another's from the cache)
                prompt = [i % self.model_config.vocab_size] + [0] * (min(b, self.max_seq_len - 2) - 1)
                self.submit(prompt, SamplingParams(max_new_tokens=2, **kw), request_id=f"warmup-{mode}-{i}")
                i += 1
            self.run()
        self.reset_stats()

    def reset_stats(self) -> None:
        for k in self.stats:
            self.stats[k] = 0


def summarize(outputs: Sequence[RequestOutput], wall_seconds: float) -> dict[str, float]:
    """Aggregate throughput of a batch of outputs: tokens, tokens/s over the wall time, mean time per output token."""
    ok = [o for o in outputs if o.ok]
    tokens = sum(len(o.token_ids) for o in ok)
    tpots = [o.time_per_output_token for o in ok if o.time_per_output_token is not None]
    ttfts = [o.time_to_first_token for o in ok if o.time_to_first_token is not None]
    return {
        "requests": len(outputs),
        "failed": len(outputs) - len(ok),
        "output_tokens": tokens,
        "wall_seconds": wall_seconds,
        "tokens_per_second": tokens / wall_seconds if wall_seconds > 0 else 0.0,
        "mean_time_per_output_token": float(np.mean(tpots)) if tpots else math.nan,
        "mean_time_to_first_token": float(np.mean(ttfts)) if ttfts else math.nan,
    }

"""Attention-FFN disaggregation (AFD): attention and FFN of every layer on separate device groups.

The paper's decoding system (sections 3 and 7 of the Step-3 report): *attention instances* hold the embedding,
the KV cache, the attention layers, the MoE routers, the final norm and the lm_head, and run data-parallel
attention (each device its own sequences and its own KV pages); *FFN instances* hold the dense FFNs, the shared
experts and the routed experts, split by expert and/or tensor parallelism. Per layer the attention side sends the
post-attention-normed hidden states (FP8 with per-token 128-channel scales) plus the routing (top-k weights and
expert ids) to the FFN side, which sends the FFN output back in BF16; the decode batch is split into micro-batches
so that the attention of one micro-batch runs while the FFN of another (and the transfers) are in flight.

Here both sides call the model's own layer halves, ``DecoderLayer.attention`` (+ ``MoE.route``) and
``DecoderLayer.ffn``: there is no second copy of the model. One set of parameters is split by path into the
attention half and the FFN half; each half lives only on its own submesh (``jax.make_mesh(..., devices=...)``), and
each side runs its own jitted per-layer programs (one per layer kind, reused across layers), with the model's
``shard_map`` paths inside (paged data-parallel attention; expert/tensor-parallel MoE on the FFN mesh).

Transfers (single process): per-shard single-device copies in one batched ``jax.device_put``, reassembled with
``jax.make_array_from_single_device_arrays``. A plain ``jax.device_put`` of a batch-sharded attention array onto a
replicated FFN sharding goes through the host and blocks the dispatching thread until the producer has finished
(measured on the CPU backend of jax 0.11.2), which would serialise the pipeline; the per-shard copies are
asynchronous. Each attention shard is broadcast to every FFN device (the paper's A->F broadcast); each FFN output
row block goes back to the one attention device that owns those rows.

Transfers (several processes, ``jax.distributed``): the attention devices in processes ``0 .. K-1``, the FFN
devices in the others (:func:`split_processes`; either side's mesh may span several processes, as the paper's
multi-node instances do); jitted ``shard_map`` programs of ``lax.ppermute`` over one global mesh of both sides move
the rows (to an FFN partner and back when the two sides have as many devices; otherwise in rounds that give every
FFN device every attention block, and each attention device its rows back; see :class:`CollectiveTransport`).
Every process runs the same driver loop (multi-controller JAX), dispatching only its own side's programs and
joining every transfer.

Wire format per layer and micro-batch of ``b`` rows and ``T`` tokens (A->F): ``x [b, T, D]`` (float8_e4m3fn with
``scale [b, T, D/128]`` float32, or bfloat16, or the model dtype), and for MoE layers ``weights [b, T, top_k]``
float32 and ``ids [b, T, top_k]`` int32, packed into one byte array per message. F->A: the FFN output ``[b, T, D]``
in the model's activation dtype (bfloat16 for Step-3).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import gzip
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from infer.sampling import SamplingParams, param_rows, request_keys, sample, token_logprobs
from step3_jax import kv_cache as kvc
from step3_jax.checkpoint import (
    CheckpointReport,
    checkpoint_folder,
    inspect_checkpoint,
    load_tensors,
    set_checkpoint_folder,
)
from step3_jax.config import Step3Config
from step3_jax.init_rng import init_key
from step3_jax.model import Step3ForCausalLM, param_shardings
from step3_jax.quant import BLOCK, dequantize_activations, quantize_activations
from step3_jax.sharding import DEFAULT_RULES, ShardingRules, make_mesh

log = logging.getLogger(__name__)

TRANSFERS = ("fp8", "bf16", "model")
INSTANCES = ("one", "per-process")
STAGES = ("attention", "a2f", "ffn", "f2a")
# jit program name (as profiler traces name it) -> pipeline stage; one compiled program per name in a decode step,
# so a name's executions in run-id order are its dispatches in order
_PROGRAMS = {
    "jit_afd_embed": "embed",
    "jit_afd_attention_dense": "attention",
    "jit_afd_attention_moe": "attention",
    "jit_afd_ffn_dense": "ffn",
    "jit_afd_ffn_moe": "ffn",
    "jit_afd_logits": "logits",
    "jit_afd_a2f": "a2f",
    "jit_afd_f2a": "f2a",
}


def _named(fn, name: str, traces: collections.Counter | None = None):
    """``fn`` renamed ``name`` (profiler traces call its program ``jit_<name>``); with ``traces``, every trace of
    it (a compilation when jitted) adds one to ``traces[name]``."""
    if traces is not None:
        inner = fn

        @functools.wraps(inner)  # (keeps the signature: donate_argnames resolves through __wrapped__)
        def fn(*args, **kwargs):
            traces[name] += 1
            return inner(*args, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    return fn


# ---------------------------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class AFDConfig:
    """How to disaggregate. ``expert_parallel`` of the ``ffn_devices`` split the experts, the remaining factor
    splits every expert's FFN columns (tensor parallel); ``None`` picks the largest expert-parallel size that
    divides both the FFN devices and the number of experts."""

    attention_devices: int = 4
    ffn_devices: int = 4
    expert_parallel: int | None = None
    micro_batches: int = 3
    transfer: str = "fp8"  # A->F hidden states: "fp8" (+ scales), "bf16", or "model" (the model dtype, exact)
    page_size: int | None = None  # tokens per KV page; default 16, 64 for FP8 pages (kv_cache.default_page_size)
    kv_dtype: str | None = None  # paged KV cache dtype (default: the model's; "float8_e4m3fn" for FP8 pages)
    # several processes: a step that makes no progress for this long means the peer failed: exit with an error
    # (it must exceed the longest step, compilation included)
    peer_timeout_s: float = 120.0
    # several processes: processes 0 .. attention_processes - 1 run the attention side, the rest the FFN side
    # (None: half of them, rounded down); each side's devices are split evenly over its processes
    attention_processes: int | None = None
    # several processes, step by step (the engine): "one" scheduler (process 0's) for every attention device, the
    # other processes follow its steps (serve); "per-process": every attention process is an independent attention
    # instance (the paper's) with its own engine, requests and pages, all of them sharing the FFN side
    instances: str = "one"

    def __post_init__(self):
        if self.page_size is None and self.kv_dtype in (None, *kvc.KV_DTYPES):  # a bad kv_dtype: validate() says so
            object.__setattr__(self, "page_size", kvc.default_page_size(self.kv_dtype))


def _positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"AFD {name} must be a positive int, got {v!r}")


def ffn_layout(config: Step3Config, afd: AFDConfig) -> tuple[int, int]:
    """``(expert_parallel, tensor_parallel)`` of the FFN devices; raises ``ValueError`` for impossible splits."""
    n = afd.ffn_devices
    experts = config.moe_num_experts
    if afd.expert_parallel is None:
        ep = max(d for d in range(1, n + 1) if n % d == 0 and experts % d == 0)
    else:
        _positive_int("expert_parallel", afd.expert_parallel)
        ep = afd.expert_parallel
        if n % ep:
            raise ValueError(f"expert_parallel = {ep} does not divide the {n} FFN devices")
        if experts % ep:
            raise ValueError(
                f"moe_num_experts = {experts} cannot be split over expert_parallel = {ep} FFN devices; choose an "
                f"expert-parallel size that divides {experts}"
            )
    tp = n // ep
    ffn = config.moe_intermediate_size
    if ffn % tp:
        raise ValueError(
            f"moe_intermediate_size = {ffn} cannot be split over the tensor-parallel size {tp} "
            f"({n} FFN devices / expert_parallel {ep}); choose an expert_parallel or ffn_devices that fits"
        )
    if config.quantization == "fp8" and tp > 1 and ffn > BLOCK and (ffn // tp) % BLOCK:
        raise ValueError(
            f"FP8 experts need whole {BLOCK}-wide scale blocks per tensor-parallel shard: moe_intermediate_size = "
            f"{ffn} over tensor-parallel size {tp} leaves {ffn // tp} columns"
        )
    return ep, tp


def validate(config: Step3Config, afd: AFDConfig, num_devices: int) -> tuple[int, int]:
    """Check an AFD request before any work starts; returns the FFN ``(expert_parallel, tensor_parallel)``."""
    if isinstance(afd.attention_devices, int) and afd.attention_devices == 0:
        raise ValueError("AFD needs at least one attention device, got attention_devices = 0")
    if isinstance(afd.ffn_devices, int) and afd.ffn_devices == 0:
        raise ValueError("AFD needs at least one FFN device, got ffn_devices = 0")
    kvc.check_kv_dtype(afd.kv_dtype, "AFD kv_dtype")
    for name in ("attention_devices", "ffn_devices", "micro_batches", "page_size"):
        _positive_int(name, getattr(afd, name))
    if isinstance(afd.peer_timeout_s, bool) or not (
        isinstance(afd.peer_timeout_s, int | float) and afd.peer_timeout_s > 0
    ):
        raise ValueError(f"AFD peer_timeout_s must be a positive number of seconds, got {afd.peer_timeout_s!r}")
    need = afd.attention_devices + afd.ffn_devices
    if need > num_devices:
        raise ValueError(
            f"AFD asks for {afd.attention_devices} attention + {afd.ffn_devices} FFN = {need} devices, but only "
            f"{num_devices} exist"
        )
    if afd.transfer not in TRANSFERS:
        raise ValueError(f"AFD transfer must be one of {TRANSFERS}, got {afd.transfer!r}")
    if afd.attention_processes is not None:
        _positive_int("attention_processes", afd.attention_processes)
    if afd.instances not in INSTANCES:
        raise ValueError(f"AFD instances must be one of {INSTANCES}, got {afd.instances!r}")
    return ffn_layout(config, afd)


def split_processes(
    devices: Sequence[jax.Device], afd: AFDConfig, num_processes: int
) -> tuple[list[jax.Device], list[jax.Device], int]:
    """The two sides' devices under ``num_processes`` processes: processes ``0 .. K-1`` (``K`` =
    ``afd.attention_processes``, default ``num_processes // 2``) give ``attention_devices / K`` devices each (their
    first local ones, in process order), the other processes ``ffn_devices / (num_processes - K)`` each. Every
    process serves exactly one side, and every process has work. Returns ``(attention devices, FFN devices, K)``;
    raises ``ValueError`` naming the problem for splits that cannot be made."""
    k = num_processes // 2 if afd.attention_processes is None else afd.attention_processes
    if not 1 <= k < num_processes:
        raise ValueError(
            f"attention_processes = {k} with {num_processes} processes: each side needs at least one process, so "
            f"choose 1 .. {num_processes - 1}"
        )
    sides = (("attention", afd.attention_devices, range(k)), ("FFN", afd.ffn_devices, range(k, num_processes)))
    chosen = []
    for side, count, procs in sides:
        first, last = procs[0], procs[-1]
        if count % len(procs):
            raise ValueError(
                f"{count} {side} devices cannot be split evenly over the {len(procs)} {side} processes "
                f"({first} .. {last}); ask for a multiple of {len(procs)}"
            )
        each = count // len(procs)
        for p in procs:
            local = [d for d in devices if d.process_index == p]
            if len(local) < each:
                raise ValueError(
                    f"process {p} has {len(local)} devices, but each of the {len(procs)} {side} processes "
                    f"({first} .. {last}) must give {each} of the {count} {side} devices"
                )
            chosen.append(local[:each])
    attn = [d for devs in chosen[:k] for d in devs]
    return attn, [d for devs in chosen[k:] for d in devs], k


def is_ffn_param(path, _value=None) -> bool:
    """Parameters of the FFN side: dense FFNs, shared experts, routed experts (not the router ``moe.gate``)."""
    names = [str(p) for p in path]
    return "mlp" in names or "share_expert" in names or ("moe" in names and names[-1] != "gate")


def _is_top_param(path, _value=None) -> bool:
    return str(path[0]) in ("embed_tokens", "norm", "lm_head")


def microbatch_sizes(batch: int, micro_batches: int) -> list[int]:
    """Contiguous split of ``batch`` rows into ``micro_batches`` as even as possible (larger ones first)."""
    if batch < micro_batches:
        raise ValueError(f"a batch of {batch} sequences cannot fill {micro_batches} micro-batches")
    return [batch // micro_batches + (i < batch % micro_batches) for i in range(micro_batches)]


# ---------------------------------------------------------------------------------------------- wire format


def encode(normed: jax.Array, transfer: str) -> dict[str, jax.Array]:
    """Attention side: the post-attention-normed hidden states as they go on the wire."""
    if transfer == "fp8":
        q, scale = quantize_activations(normed)
        return {"x": q, "scale": scale}
    if transfer == "bf16":
        return {"x": normed.astype(jnp.bfloat16)}
    return {"x": normed}


def decode(payload: dict[str, jax.Array], dtype) -> jax.Array:
    """FFN side: back to the model's activation dtype."""
    if "scale" in payload:
        return dequantize_activations(payload["x"], payload["scale"], dtype=dtype)
    return payload["x"].astype(dtype)


def payload_struct(config: Step3Config, transfer: str, is_moe: bool, b: int, t: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The A->F message fields of one layer and micro-batch (``b`` rows, ``t`` tokens each)."""
    d, k = config.hidden_size, config.moe_top_k
    x_dtype = {"fp8": jnp.float8_e4m3fn, "bf16": jnp.bfloat16, "model": config.dtype}[transfer]
    out = {"x": jax.ShapeDtypeStruct((b, t, d), x_dtype)}
    if transfer == "fp8":
        out["scale"] = jax.ShapeDtypeStruct((b, t, math.ceil(d / BLOCK)), jnp.float32)
    if is_moe:
        out["weights"] = jax.ShapeDtypeStruct((b, t, k), jnp.float32)
        out["ids"] = jax.ShapeDtypeStruct((b, t, k), jnp.int32)
    return out


def pack(fields: dict[str, jax.Array]) -> jax.Array:
    """All fields of a message as one byte array ``[b, t, bytes]`` (one transfer per layer and micro-batch)."""
    parts = []
    for name in sorted(fields):
        v = fields[name]
        u = jax.lax.bitcast_convert_type(v, jnp.uint8)  # [..., n] or [..., n, itemsize]
        parts.append(u.reshape(*v.shape[:2], -1))
    return jnp.concatenate(parts, axis=-1)


def unpack(buf: jax.Array, struct: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Inverse of :func:`pack`: the named fields of ``struct`` read back from a ``[b, T, bytes]`` uint8 message."""
    out, offset = {}, 0
    for name in sorted(struct):
        s = struct[name]
        n = math.prod(s.shape[2:])
        size = n * jnp.dtype(s.dtype).itemsize
        u = buf[..., offset : offset + size]
        offset += size
        if jnp.dtype(s.dtype).itemsize > 1:
            u = u.reshape(*buf.shape[:2], n, jnp.dtype(s.dtype).itemsize)
        out[name] = jax.lax.bitcast_convert_type(u, s.dtype).reshape(*buf.shape[:2], *s.shape[2:])
    return out


def message_struct(struct: dict[str, jax.ShapeDtypeStruct]) -> jax.ShapeDtypeStruct:
    """Shape of the packed uint8 message ``[b, T, bytes]`` that carries the fields of ``struct``."""
    any_field = next(iter(struct.values()))
    nbytes = sum(math.prod(s.shape[2:]) * jnp.dtype(s.dtype).itemsize for s in struct.values())
    return jax.ShapeDtypeStruct((*any_field.shape[:2], nbytes), jnp.uint8)


def return_dtype(config: Step3Config, transfer: str):
    """F->A: the FFN output in the model's activation dtype (BF16 for Step-3), keeping the residual stream's
    precision as the paper does; rounding a float32 test model's outputs to BF16 would only add error."""
    del transfer
    return config.dtype


def _by_rows(arr: jax.Array) -> list[jax.Array]:
    """The single-device shards of a batch-sharded array, in row order."""
    return [s.data for s in sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0)]


# ---------------------------------------------------------------------------------------------- per-layer stages
#
# What each side runs per layer and micro-batch, as module-level functions so that the runner and the per-layer
# benchmark (infer/bench_afd_layers.py) time and run the same programs.


def attention_stage(layer, x, f, positions, kv, start, transfer: str):
    """Attention side of one layer (a ``DecoderLayer`` holding at least its attention half): the previous
    layer's residual add, ``DecoderLayer.attention`` (input norm, MFA over the cache, post-attention norm), the
    router's top-k for MoE layers, and the wire encoding of the normed hidden states.
    Returns ``(h, fields, kv)``: the residual stream, the A->F message fields and the updated cache layer."""
    x = x + f.astype(x.dtype)  # the previous layer's residual add, on the attention side
    h, normed, kv = layer.attention(x, positions, kv, start)
    fields = encode(normed, transfer)
    if layer.is_moe:
        fields["weights"], fields["ids"] = layer.moe.route(normed)
    return h, fields, kv


def ffn_stage(layer, buf: jax.Array, config: Step3Config, transfer: str) -> jax.Array:
    """FFN side of one layer (a ``DecoderLayer`` holding at least its FFN half) on one A->F message
    ``buf [b, T, bytes]``: unpack and decode it, ``DecoderLayer.ffn`` (the dense MLP, or the routed experts on the
    sent routing plus the shared expert), and the F->A dtype."""
    payload = unpack(buf, payload_struct(config, transfer, layer.is_moe, buf.shape[0], buf.shape[1]))
    normed = decode(payload, config.dtype)
    routing = (payload["weights"], payload["ids"]) if layer.is_moe else None
    return layer.ffn(normed, routing).astype(return_dtype(config, transfer))


def attention_program(graphdef, abstract_ffn, transfer: str, *, moe: bool, constrain=None, traces=None):
    """The jitted attention-side program of one layer kind: ``(params, x, f, positions, pages, table, start)``
    -> ``(h, message, pages)`` with ``pages = (k, v, k_scale, v_scale)`` donated and ``message`` the packed A->F
    bytes. ``graphdef`` / ``abstract_ffn`` come from ``nnx.split(layer, is_ffn_param, ...)`` (the FFN half is
    shape-only and never read); ``constrain`` places the message (the runner's data-parallel sharding);
    ``traces`` (a ``Counter``) counts its compilations by program name."""

    def afd_attention(params, x, f, positions, pages, table, start):
        layer = nnx.merge(graphdef, abstract_ffn, params)
        kv = kvc.PagedLayer(*pages, block_table=table)
        h, fields, kv = attention_stage(layer, x, f, positions, kv, start, transfer)
        message = pack(fields)
        if constrain is not None:
            message = constrain(message)
        return h, message, (kv.k, kv.v, kv.k_scale, kv.v_scale)

    name = "afd_attention_moe" if moe else "afd_attention_dense"
    return jax.jit(_named(afd_attention, name, traces), donate_argnames=("pages",))


def ffn_program(
    graphdef,
    abstract_attention,
    config: Step3Config,
    transfer: str,
    *,
    moe: bool,
    out_parts: int = 1,
    out_sharding=None,
    traces=None,
):
    """The jitted FFN-side program of one layer kind: ``(params, parts)`` -> ``out_parts`` row blocks of the FFN
    output, ``parts`` being the A->F messages (one per attention device when broadcast), concatenated by rows;
    ``traces`` as for :func:`attention_program`."""

    def afd_ffn(params, parts):
        layer = nnx.merge(graphdef, params, abstract_attention)
        out = ffn_stage(layer, jnp.concatenate(parts, axis=0), config, transfer)
        return tuple(jnp.split(out, out_parts, axis=0))

    name = "afd_ffn_moe" if moe else "afd_ffn_dense"
    kw = {} if out_sharding is None else {"out_shardings": (out_sharding,) * out_parts}
    return jax.jit(_named(afd_ffn, name, traces), **kw)


# ---------------------------------------------------------------------------------------------- transports


class LocalTransport:
    """Both sides in this process: asynchronous single-device copies between the two submeshes.

    With as many FFN as attention devices, attention device ``i`` sends its rows to FFN device ``i`` (in the FFN
    program they stay there for the routed experts' ``all_to_all`` dispatch; what needs them whole gathers them)
    and gets the same rows back. Otherwise every attention shard is
    broadcast to every FFN device (one part per attention device, concatenated inside the FFN program) and row
    block ``i`` of the output comes back from FFN device ``i mod N``."""

    def __init__(self, attn_mesh: Mesh, ffn_mesh: Mesh):
        self.attn_devices = list(attn_mesh.devices.flat)
        self.ffn_devices = list(ffn_mesh.devices.flat)
        self.paired = len(self.attn_devices) == len(self.ffn_devices)
        self.replicated = NamedSharding(ffn_mesh, PartitionSpec())
        self.ffn_rows = NamedSharding(ffn_mesh, PartitionSpec(tuple(ffn_mesh.axis_names)))
        self.out_parts = 1 if self.paired else len(self.attn_devices)
        self.out_sharding = self.ffn_rows if self.paired else self.replicated

    def to_ffn(self, message, struct):
        shards = _by_rows(message)
        if self.paired:
            copies = jax.device_put(shards, self.ffn_devices)
            return (jax.make_array_from_single_device_arrays(struct.shape, self.ffn_rows, copies),)
        n = len(self.ffn_devices)
        copies = jax.device_put([s for s in shards for _ in range(n)], self.ffn_devices * len(shards))
        return tuple(
            jax.make_array_from_single_device_arrays(s.shape, self.replicated, copies[i * n : (i + 1) * n])
            for i, s in enumerate(shards)
        )

    def to_attention(self, parts, struct, sharding):
        if self.paired:
            srcs = _by_rows(parts[0])
        else:
            n = len(self.ffn_devices)
            srcs = [p.addressable_shards[i % n].data for i, p in enumerate(parts)]
        copies = jax.device_put(srcs, self.attn_devices)
        return jax.make_array_from_single_device_arrays(struct.shape, sharding, copies)


class CollectiveTransport:
    """Attention devices in one process, FFN devices in another; both processes run every transfer program, and
    the side without data feeds zeros (never read).

    As many attention as FFN devices: ``lax.ppermute`` over the ``role`` axis of one global ``(role, x)`` mesh
    (row 0 attention, row 1 FFN) moves each attention device's rows to its FFN partner and back (in the FFN program
    they stay there for the routed experts' ``all_to_all`` dispatch; what needs them whole gathers them).
    Otherwise (M attention, N FFN devices): one global mesh over all M + N devices, and rounds of ``ppermute`` that
    never send two blocks from, or to, one device at once: A -> F delivers every attention device's rows to every
    FFN device (max(M, N) rounds, each block crossing once per FFN device), F -> A returns row block ``i`` of the
    (replicated) FFN output from FFN device ``i mod N`` (ceil(M / N) rounds)."""

    def __init__(self, attn_mesh: Mesh, ffn_mesh: Mesh, has_attention: bool, has_ffn: bool):
        a, f = list(attn_mesh.devices.flat), list(ffn_mesh.devices.flat)
        self.m, self.n = len(a), len(f)
        self.paired = self.m == self.n
        self.has_attention, self.has_ffn = has_attention, has_ffn
        me = jax.process_index()
        self.local_devices = [d for d in (a if has_attention else f) if d.process_index == me]
        self._dummies: dict = {}
        if self.paired:
            self.mesh = Mesh(np.array([a, f], dtype=object), ("role", "x"))
            self.global_rows = NamedSharding(self.mesh, PartitionSpec(("role", "x")))
            self.out_sharding = NamedSharding(ffn_mesh, PartitionSpec(tuple(ffn_mesh.axis_names)))
            self._a2f = self._permute(0, 1, "afd_a2f")
            self._f2a = self._permute(1, 0, "afd_f2a")
        else:
            self.mesh = Mesh(np.array(a + f, dtype=object), ("all",))
            self.global_rows = NamedSharding(self.mesh, PartitionSpec("all"))
            self.out_sharding = NamedSharding(ffn_mesh, PartitionSpec())
            self._a2f, self._f2a = self._broadcast_program(), self._return_program()
        self.out_parts = 1

    def _permute(self, src: int, dst: int, name: str):
        spec = PartitionSpec(("role", "x"))

        def move(x):
            return jax.lax.ppermute(x, "role", [(src, dst)])

        move.__name__ = name
        return jax.jit(jax.shard_map(move, mesh=self.mesh, in_specs=spec, out_specs=spec, check_vma=False))

    def _broadcast_program(self):
        """A -> F, M != N: device ``k`` of the global mesh holds ``[r, ...]`` (attention device ``k``'s rows, or
        zeros); every FFN device ends with all M blocks ``[M * r, ...]`` in attention order."""
        m, n = self.m, self.n
        if m <= n:  # round t: attention i -> FFN (i + t) mod n
            rounds = [[(i, m + (i + t) % n) for i in range(m)] for t in range(n)]
        else:  # round t: attention (j + t) mod m -> FFN j
            rounds = [[((j + t) % m, m + j) for j in range(n)] for t in range(m)]
        source = np.full((len(rounds), m + n), -1, np.int32)  # which block device k receives in round t
        for t, pairs in enumerate(rounds):
            for src, dst in pairs:
                source[t, dst] = src

        def afd_a2f(x):
            me = jax.lax.axis_index("all")
            out = jnp.zeros((m, *x.shape), x.dtype)
            for t, pairs in enumerate(rounds):
                got = jax.lax.ppermute(x, "all", pairs)
                src = jnp.asarray(source[t])[me]
                out = jnp.where(src >= 0, jax.lax.dynamic_update_index_in_dim(out, got, jnp.maximum(src, 0), 0), out)
            return out.reshape(m * x.shape[0], *x.shape[1:])

        spec = PartitionSpec("all")
        return jax.jit(jax.shard_map(afd_a2f, mesh=self.mesh, in_specs=spec, out_specs=spec, check_vma=False))

    def _return_program(self):
        """F -> A, M != N: device ``k`` holds ``[M * r, ...]`` (the FFN output on FFN devices, zeros elsewhere);
        attention device ``i`` ends with row block ``i``, sent by FFN device ``i mod N``."""
        m, n = self.m, self.n
        rounds = [[(m + j, j + t * n) for j in range(n) if j + t * n < m] for t in range(-(-m // n))]
        block = np.zeros((len(rounds), m + n), np.int32)  # which row block device k sends in round t
        for t, pairs in enumerate(rounds):
            for src, dst in pairs:
                block[t, src] = dst

        def afd_f2a(x):
            me = jax.lax.axis_index("all")
            blocks = x.reshape(m, x.shape[0] // m, *x.shape[1:])
            out = jnp.zeros(blocks.shape[1:], x.dtype)
            for t, pairs in enumerate(rounds):  # each attention device receives in exactly one round
                send = jax.lax.dynamic_index_in_dim(blocks, jnp.asarray(block[t])[me], 0, keepdims=False)
                out = out + jax.lax.ppermute(send, "all", pairs)
            return out

        spec = PartitionSpec("all")
        return jax.jit(jax.shard_map(afd_f2a, mesh=self.mesh, in_specs=spec, out_specs=spec, check_vma=False))

    def _globalise(self, shards, rows: int, struct, own: bool):
        """This side's per-device ``[rows, ...]`` shards (zeros on the side without data) -> one global array over
        every device of ``self.mesh``."""
        total = rows * (self.m + self.n)
        if not own:
            key = (rows, tuple(struct.shape[1:]), jnp.dtype(struct.dtype))
            if key not in self._dummies:
                zero = np.zeros((rows, *struct.shape[1:]), struct.dtype)
                self._dummies[key] = jax.device_put([zero] * len(self.local_devices), self.local_devices)
            shards = self._dummies[key]
        return jax.make_array_from_single_device_arrays((total, *struct.shape[1:]), self.global_rows, shards)

    def _localise(self, garr, shape, sharding):
        return jax.make_array_from_single_device_arrays(shape, sharding, _by_rows(garr))

    def to_ffn(self, message, struct):
        b = struct.shape[0]
        own = self.has_attention
        g = self._a2f(self._globalise(_by_rows(message) if own else None, b // self.m, struct, own))
        # the FFN program's input is laid out as its output: rows split over the FFN mesh, or replicated
        return (self._localise(g, struct.shape, self.out_sharding),) if self.has_ffn else None

    def to_attention(self, parts, struct, sharding):
        b = struct.shape[0]
        own = self.has_ffn
        rows = b // self.n if self.paired else b  # a row block per FFN device, or the whole replicated output
        g = self._f2a(self._globalise(_by_rows(parts[0]) if own else None, rows, struct, own))
        if not self.has_attention:
            return None
        return self._localise(g, struct.shape, sharding)


# ---------------------------------------------------------------------------------------------- the runner


@dataclasses.dataclass(frozen=True)
class InstanceShapes:
    """What every per-process attention instance's engine must share with the others (they run each step
    together, on one page pool array), per attention device: prefill rows and micro-batches, decode rows and
    micro-batches, block-table width (pages per sequence), and the page pool (pages, tokens per page, KV dtype:
    0 the model's, else 1 + its index in ``kv_cache.KV_DTYPES``)."""

    prefill_rows: int
    prefill_micro_batches: int
    decode_rows: int
    decode_micro_batches: int
    table_width: int
    pool_pages: int
    page_size: int
    kv_dtype: int


@dataclasses.dataclass(frozen=True)
class RoundStep:
    """One step of a round of per-process attention instances: ``kind`` ("prefill" / "decode"), rows per
    attention device, chunk width in tokens, micro-batches, block-table width."""

    kind: str
    rows: int
    width: int
    micro_batches: int
    table_width: int


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """What every process runs in one round of per-process attention instances (:meth:`AFDRunner.agree_round`)."""

    done: bool  # every instance has closed: no steps, no more rounds
    steps: tuple[RoundStep, ...] = ()


def agreed_shapes(every: np.ndarray) -> InstanceShapes:
    """The instances' common :class:`InstanceShapes` from every process's row (``[is attention, *shapes]``, in
    process order; :meth:`AFDRunner.join_instances`). Raises ``ValueError`` naming each instance's when they
    differ."""
    attention = np.flatnonzero(every[:, 0] == 1)
    shapes = {InstanceShapes(*(int(v) for v in every[p, 1:])) for p in attention}
    if len(shapes) != 1:
        each = "; ".join(f"process {p}: {InstanceShapes(*(int(v) for v in every[p, 1:]))}" for p in attention)
        raise ValueError(
            f"the attention instances' engines differ ({each}); every instance needs the same EngineConfig "
            f"(max_batch, prefill_batch, max_seq_len, page_size, num_pages, kv_dtype)"
        )
    return shapes.pop()


def round_plan(every: np.ndarray, shapes: InstanceShapes) -> RoundPlan:
    """A round's plan from every process's header (``[is attention, done, prefill width, wants decode]``, in
    process order; :meth:`AFDRunner.agree_round`), the same on every process."""
    heads = every[every[:, 0] == 1]
    if heads[:, 1].all():
        return RoundPlan(True)
    steps = []
    if (width := int(heads[:, 2].max())) > 0:
        steps.append(RoundStep("prefill", shapes.prefill_rows, width, shapes.prefill_micro_batches, shapes.table_width))
    if heads[:, 3].any():
        steps.append(RoundStep("decode", shapes.decode_rows, 1, shapes.decode_micro_batches, shapes.table_width))
    return RoundPlan(False, tuple(steps))


@dataclasses.dataclass
class AFDResult:
    """What :meth:`AFDRunner.generate` returns: tokens per prompt, optional per-step logits, timings, trace."""

    tokens: list[list[int]]  # generated ids per prompt (cut after a stop token)
    logits: list[np.ndarray] | None  # per step, float32 [batch, vocab] of the token chosen at that step
    prefill_seconds: float
    decode_seconds: float  # decode steps after the first (which compiles)
    decode_steps_timed: int
    batch_size: int
    trace: list[dict] | None = None  # per-stage intervals of the traced decode step (see stage_intervals)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.batch_size * self.decode_steps_timed / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclasses.dataclass
class _MicroBatch:
    rows: int  # real sequences
    padded: int  # rows incl. padding to a multiple of the attention devices
    kv: list  # per layer PagedLayer (attention side)
    block_table: jax.Array | None
    h: jax.Array | None = None  # residual stream after the last attention
    f: jax.Array | None = None  # FFN output of the last layer, back on the attention side


class StepTokens:
    """The tokens and log-probabilities of a step :meth:`AFDRunner.dispatch` dispatched, read from the devices by
    :meth:`read` (under several processes within ``AFDConfig.peer_timeout_s``, as the step itself)."""

    def __init__(self, runner: AFDRunner, order: list[np.ndarray], results: list[tuple]):
        # per micro-batch (tokens, logprobs) on the devices (not the logits: nothing keeps those alive past the step)
        self._runner, self._order, self._results = runner, order, [(tok, logp) for tok, _, logp in results]
        self._read: tuple[np.ndarray, np.ndarray] | None = None

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [n] int32, logprobs [n] float32)`` in the step's row order (waits for the step)."""
        if self._read is None:
            runner = self._runner
            n = sum(len(sel) for sel in self._order)
            tokens, logprobs = np.empty((n,), np.int32), np.empty((n,), np.float32)
            with runner._watched() if runner.multiprocess else contextlib.nullcontext():
                for sel, (tok, logp) in zip(self._order, self._results, strict=True):
                    tokens[sel], logprobs[sel] = runner._own(_host(tok)), runner._own(_host(logp))
            self._read, self._results = (tokens, logprobs), None
        return self._read


class AFDRunner:
    """Batched generation (greedy or sampled) with attention and FFN on disjoint device groups (see the module
    docstring).

    Build it with :meth:`create` (initialise each half directly on its submesh) or :meth:`from_model` (place a
    built or loaded model's halves). Under ``jax.distributed`` (two or more processes) processes ``0 .. K-1`` run
    the attention side and the others the FFN side (:func:`split_processes`); every process calls :meth:`generate`
    with the same arguments, and every attention process gets the tokens."""

    def __init__(
        self,
        config: Step3Config,
        afd: AFDConfig,
        *,
        attention_params=None,
        ffn_params=None,
        seed: int = 0,
        devices: Sequence[jax.Device] | None = None,
        rules: ShardingRules = DEFAULT_RULES,
        checkpoint: CheckpointReport | None = None,
        progress: bool = False,
    ):
        devices = list(jax.devices() if devices is None else devices)
        self.ep, self.tp = validate(config, afd, len(devices))
        self.config, self.afd, self.rules = config, afd, rules
        m, n = afd.attention_devices, afd.ffn_devices
        self.multiprocess = jax.process_count() > 1
        if self.multiprocess:
            attn_devs, ffn_devs, k = split_processes(devices, afd, jax.process_count())
            self.has_attention = jax.process_index() < k
            self.has_ffn = not self.has_attention
        else:
            attn_devs, ffn_devs = devices[:m], devices[m : m + n]
            self.has_attention = self.has_ffn = True
        self.instanced = self.multiprocess and afd.instances == "per-process"
        # this process's attention devices (a process's are contiguous in the attention mesh): a per-process
        # instance's engine schedules their rows only
        mine = [i for i, d in enumerate(attn_devs) if d.process_index == jax.process_index()]
        self.local_attention_devices, self._first_local = len(mine), (mine[0] if mine else 0)
        self.attention_processes = k if self.multiprocess else 1
        self._shapes: InstanceShapes | None = None  # per-process instances: their common shapes (join_instances)
        self._round: list[RoundStep] = []  # per-process instances: the agreed steps of this round not yet run
        self._closed = False  # per-process instances: every instance has closed (no more rounds)
        # the last decode step's (rows, micro-batches) and per micro-batch tokens on the device (the next one's input)
        self._decoded: tuple[tuple[int, int], list[jax.Array]] | None = None
        # the last prefill step's rows, each row's index in its tokens concatenated over the micro-batches, and per
        # micro-batch tokens on the device (a decode step's id -2 - i takes row i's)
        self._prefilled: tuple[int, np.ndarray, list[jax.Array]] | None = None
        self.attn_mesh = make_mesh(data=m, devices=attn_devs)
        self._attention_spans = len({d.process_index for d in attn_devs}) > 1  # the attention side: several processes
        self.ffn_mesh = make_mesh(tensor=self.tp, expert=self.ep, devices=ffn_devs)
        if self.multiprocess:
            self.transport = CollectiveTransport(self.attn_mesh, self.ffn_mesh, self.has_attention, self.has_ffn)
        else:
            self.transport = LocalTransport(self.attn_mesh, self.ffn_mesh)
        self._place(attention_params, ffn_params, seed, checkpoint, progress)
        self._build_programs()
        self._dispatch_log: list[tuple[str, str, int, int]] | None = None
        self._watchdog: _Watchdog | None = None  # step-by-step serving under several processes (step / serve)
        log.info(
            "AFD: %d attention devices (data parallel), %d FFN devices (EP %d x TP %d), %d micro-batches, %s transfer",
            m, n, self.ep, self.tp, afd.micro_batches, afd.transfer,
        )  # fmt: skip

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, config: Step3Config, afd: AFDConfig, *, seed: int = 0, **kw) -> AFDRunner:
        """Random weights (same seed, same weights as ``create_model(config, seed=seed)``), each half initialised
        directly in its shards on its own submesh."""
        return cls(config, afd, seed=seed, **kw)

    @classmethod
    def from_checkpoint(
        cls, path, afd: AFDConfig, *, dtype=None, quantization: str | None = "auto", progress: bool = False, **kw
    ) -> AFDRunner:
        """Read a Hugging Face checkpoint folder (as :func:`~step3_jax.checkpoint.load_pretrained` does, FP8 weights
        staying FP8) straight into the two submeshes: each side's tensors go only to its own devices, and under
        several processes each process reads only its side's tensors and keeps only its own devices' slices, so
        no process ever holds the whole model. The checkpoint is checked (keys, shapes, dtypes, config) before
        anything is read."""
        report = inspect_checkpoint(path, dtype=dtype, quantization=quantization)
        if not report.ok:
            raise ValueError(report.error_message())
        runner = cls(report.config, afd, checkpoint=report, progress=progress, **kw)
        set_checkpoint_folder(runner, report.folder)  # (its tokenizer: see checkpoint_folder)
        return runner

    @classmethod
    def from_model(cls, model: Step3ForCausalLM, afd: AFDConfig, **kw) -> AFDRunner:
        """Place an existing (built or loaded) model's two halves on the two submeshes."""
        _, ffn, attn = nnx.split(model, is_ffn_param, ...)
        runner = cls(model.config, afd, attention_params=attn, ffn_params=ffn, **kw)
        set_checkpoint_folder(runner, checkpoint_folder(model))  # a loaded model's tokenizer goes with it
        return runner

    def _view(self, mesh: Mesh) -> Step3ForCausalLM:
        return nnx.eval_shape(lambda: Step3ForCausalLM(self.config, rngs=nnx.Rngs(0), mesh=mesh, rules=self.rules))

    def _place(self, attention_params, ffn_params, seed: int, checkpoint, progress: bool) -> None:
        """Materialise each side's half on its submesh (only the local side's under several processes): from the
        given parameters, from a checkpoint, or initialised in place."""
        self.attn_graph, attn_abs_ffn, attn_abs = nnx.split(self._view(self.attn_mesh), is_ffn_param, ...)
        self.ffn_graph, ffn_abs, ffn_abs_attn = nnx.split(self._view(self.ffn_mesh), is_ffn_param, ...)
        self._attn_abs_ffn, self._ffn_abs_attn = attn_abs_ffn, ffn_abs_attn
        self.attention_params = self.ffn_params = None
        if checkpoint is not None:
            sides = [(abs_, mesh) for abs_, mesh, mine in ((attn_abs, self.attn_mesh, self.has_attention),
                     (ffn_abs, self.ffn_mesh, self.has_ffn)) if mine]  # fmt: skip
            targets = {
                tuple(p): s
                for abs_, mesh in sides
                for p, s in nnx.to_flat_state(param_shardings(abs_, mesh, self.rules))
            }
            values = load_tensors(checkpoint, targets, progress=progress)
            for abs_, _ in sides:
                for p, var in nnx.to_flat_state(abs_):
                    var.set_value(values.pop(tuple(p)))
            self.attention_params = attn_abs if self.has_attention else None
            self.ffn_params = ffn_abs if self.has_ffn else None
            return
        # under several processes a side's mesh may span processes: each places its slices of host values
        host = jax.device_get if self.multiprocess else (lambda tree: tree)
        if self.has_attention:
            shard = param_shardings(attn_abs, self.attn_mesh, self.rules)
            self.attention_params = (
                jax.device_put(host(attention_params), shard)
                if attention_params is not None
                else self._init_half(self.attn_mesh, False, shard, seed)
            )
        if self.has_ffn:
            shard = param_shardings(ffn_abs, self.ffn_mesh, self.rules)
            self.ffn_params = (
                jax.device_put(host(ffn_params), shard)
                if ffn_params is not None
                else self._init_half(self.ffn_mesh, True, shard, seed)
            )

    def _init_half(self, mesh, ffn_side: bool, shardings, seed: int):
        config, rules = self.config, self.rules

        def init(seed):  # the unused half's initialisers are dead code: XLA drops them
            model = Step3ForCausalLM(config, rngs=nnx.Rngs(init_key(seed)), mesh=mesh, rules=rules)
            _, ffn, attn = nnx.split(model, is_ffn_param, ...)
            return ffn if ffn_side else attn

        return jax.jit(init, out_shardings=shardings)(jnp.asarray(seed, jnp.int32))

    def _build_programs(self) -> None:
        config, transfer = self.config, self.afd.transfer
        # traces (compilations) of this runner's programs by name: a scheduler's steady state must not add any
        self.trace_counts: collections.Counter[str] = collections.Counter()
        self.layer_kind = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
        act = lambda mesh, shape: self.rules.sharding(mesh, ("act_batch",) + (None,) * (len(shape) - 1), shape)  # noqa: E731
        self._act_sharding = act
        out_parts, out_sharding = self.transport.out_parts, self.transport.out_sharding

        # per-layer graphdefs and parameters; one graphdef per layer kind (dense / MoE) serves all its layers
        self._attn_layer, self._ffn_layer = [], []
        attn_kind, ffn_kind = {}, {}
        if self.has_attention:
            half = nnx.merge(self.attn_graph, self._attn_abs_ffn, self.attention_params)
            gd, rest, self._top_params = nnx.split(half, lambda p, v: not _is_top_param(p, v), ...)
            self._top = (gd, rest)
            for i, layer in enumerate(half.layers):
                gd, abs_ffn, params = nnx.split(layer, is_ffn_param, ...)
                attn_kind.setdefault(self.layer_kind[i], (gd, abs_ffn))
                self._attn_layer.append(params)
        if self.has_ffn:
            half = nnx.merge(self.ffn_graph, self.ffn_params, self._ffn_abs_attn)
            for i, layer in enumerate(half.layers):
                gd, params, abs_attn = nnx.split(layer, is_ffn_param, ...)
                ffn_kind.setdefault(self.layer_kind[i], (gd, abs_attn))
                self._ffn_layer.append(params)

        def constrain(message):
            return jax.lax.with_sharding_constraint(message, act(self.attn_mesh, message.shape))

        self._attn_fn = {
            k: attention_program(gd, abs_ffn, transfer, moe=k, constrain=constrain, traces=self.trace_counts)
            for k, (gd, abs_ffn) in attn_kind.items()
        }
        self._ffn_fn = {
            k: ffn_program(
                gd,
                abs_attn,
                config,
                transfer,
                moe=k,
                out_parts=out_parts,
                out_sharding=out_sharding,
                traces=self.trace_counts,
            )  # fmt: skip
            for k, (gd, abs_attn) in ffn_kind.items()
        }

        if self.has_attention:
            top_gd, top_abs = self._top

            def afd_embed(params, ids, prev=None, fresh=None):
                """A decode step's: rows whose id is -1 take their token of ``prev`` (the previous decode step's
                tokens), rows whose id is ``-2 - k`` token ``k`` of ``fresh`` (the last prefill step's tokens,
                concatenated over its micro-batches), still on the device."""
                if prev is not None:
                    ids = jnp.where(ids == -1, prev[:, None], ids)
                if fresh is not None:
                    flat = jnp.concatenate(fresh)
                    ids = jnp.where(ids <= -2, flat[jnp.clip(-2 - ids, 0, flat.shape[0] - 1)], ids)
                x = nnx.merge(top_gd, top_abs, params).embed(ids)
                return x, jnp.zeros_like(x)  # (residual, "FFN output") so every layer runs the same program

            def afd_logits(params, h, f, last, rows=None):
                """Next tokens, logits and the tokens' log-probabilities; ``rows`` = per-row (seeds, counters,
                temperature, top_k, top_p) samples as the engine does (``request_keys``: a row's n-th token
                depends on its seed and n only), None is greedy (its own program, without the vocabulary sort)."""
                x = h + f.astype(h.dtype)
                x = jnp.take_along_axis(x, last[:, None, None], axis=1)  # [b, 1, D]
                logits = nnx.merge(top_gd, top_abs, params).logits(x)[:, 0]
                if rows is None:
                    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
                else:
                    seeds, counters, temperature, top_k, top_p = rows
                    tokens = sample(logits, request_keys(seeds, counters), temperature, top_k, top_p)
                return tokens, logits, token_logprobs(logits, tokens)

            self._embed_fn = jax.jit(_named(afd_embed, "afd_embed", self.trace_counts))
            # an attention mesh over several processes: every attention process gets all tokens and log-probs; the
            # logits (rows x vocabulary) stay with their rows' devices, and generate(return_logits=True) gathers them
            everywhere = NamedSharding(self.attn_mesh, PartitionSpec())
            by_row = self.rules.sharding(self.attn_mesh, ("act_batch", None))
            spans = self._attention_spans
            # tokens replicated on the attention mesh in every case: a decode step's are the next one's input
            # (``prev``), which must keep one sharding so that the embedding never compiles twice
            self._logits_fn = jax.jit(
                _named(afd_logits, "afd_logits", self.trace_counts),
                out_shardings=(everywhere, by_row, everywhere),
            )
            self._tokens_sharding = everywhere
            self._gather_rows = jax.jit(lambda x: x, out_shardings=everywhere) if spans else (lambda x: x)

    # ------------------------------------------------------------------ generation

    def _log(self, program: str, layer: int, mb: int) -> None:
        if self._dispatch_log is not None:
            self._dispatch_log.append((program, _PROGRAMS[program], layer, mb))

    def _kv_for(self, padded: int, max_len: int):
        """Per-micro-batch paged cache: each attention device owns the pages of its own rows (local page ids)."""
        ps = self.afd.page_size
        max_pages = -(-max_len // ps)
        m = self.afd.attention_devices
        local_rows = padded // m
        pool = self._make_pool(padded * max_pages, ps, self.afd.kv_dtype)
        local = np.arange(local_rows * max_pages, dtype=np.int32).reshape(local_rows, max_pages)
        table = np.concatenate([local] * m, axis=0)
        table = jax.device_put(table, self._act_sharding(self.attn_mesh, table.shape))
        return _pool_layers(pool), table  # the block table is shared by every layer

    def _forward(self, mbs: list[_MicroBatch], ids, positions, start, last, rows=None, prev=None, fresh=None):
        """One pipelined pass over all layers for every micro-batch; returns per micro-batch (tokens, logits,
        logprobs). ``prev``: per micro-batch the tokens of the previous decode step, for the rows whose id is -1;
        ``fresh`` (with ``prev``): per micro-batch the last prefill step's, for the rows whose id is ``-2 - k``
        (``k``: a row's index in them concatenated).

        Under several processes the transfers are collective programs that hold the devices they run on until
        the other side takes part, so their order matters: the F->A of a micro-batch is dispatched one step later,
        after the next micro-batch's attention and A->F (the same order on every process), so that the attention
        devices run micro-batch j+1's attention while the FFN devices run micro-batch j's FFN instead of waiting
        in j's F->A. (In one process the transfers are asynchronous copies and run in plain order.)"""
        cfg = self.config
        t = None
        for j, mb in enumerate(mbs):
            if self.has_attention:
                self._log("jit_afd_embed", -1, j)
                carried = () if prev is None else (prev[j], tuple(fresh))
                mb.h, mb.f = self._embed_fn(self._top_params, ids[j], *carried)
            t = positions[j].shape[1]
        back = {mb.padded: jax.ShapeDtypeStruct((mb.padded, t, cfg.hidden_size), return_dtype(cfg, self.afd.transfer))
                for mb in mbs}  # fmt: skip
        lag = self.multiprocess and len(mbs) > 1  # (with one micro-batch its next attention needs the F->A first)
        pending = None  # (layer, micro-batch index, FFN output) whose F->A is still to be dispatched

        def return_to_attention(i, j, out):
            mb = mbs[j]
            if self.multiprocess:
                self._log("jit_afd_f2a", i, j)
            struct = back[mb.padded]
            mb.f = self.transport.to_attention(out, struct, self._act_sharding(self.attn_mesh, struct.shape))

        for i in range(cfg.num_hidden_layers):
            kind = self.layer_kind[i]
            for j, mb in enumerate(mbs):
                struct = message_struct(payload_struct(cfg, self.afd.transfer, kind, mb.padded, t))
                payload = None
                if self.has_attention:
                    self._log("jit_afd_attention_moe" if kind else "jit_afd_attention_dense", i, j)
                    mb.h, payload, mb.kv[i] = self._attn_fn[kind](
                        self._attn_layer[i], mb.h, mb.f, positions[j], mb.kv[i], mb.block_table, start[j]
                    )
                if self.multiprocess:
                    self._log("jit_afd_a2f", i, j)
                parts = self.transport.to_ffn(payload, struct)
                if pending is not None:
                    return_to_attention(*pending)
                    pending = None
                out = None
                if self.has_ffn:
                    self._log("jit_afd_ffn_moe" if kind else "jit_afd_ffn_dense", i, j)
                    out = self._ffn_fn[kind](self._ffn_layer[i], parts)
                if lag:
                    pending = (i, j, out)
                else:
                    return_to_attention(i, j, out)
        if pending is not None:
            return_to_attention(*pending)
        if not self.has_attention:
            return None
        results = []
        for j, mb in enumerate(mbs):
            self._log("jit_afd_logits", cfg.num_hidden_layers, j)
            results.append(self._logits_fn(self._top_params, mb.h, mb.f, last[j], None if rows is None else rows[j]))
        return results

    def create_pool(self, num_pages: int, page_size: int, dtype=None) -> dict:
        """A zeroed page pool on the attention mesh for :meth:`step` (``kv_cache.create_page_pool``: per layer
        ``k``, ``v`` and for FP8 ``k_scale``, ``v_scale``; ``num_pages`` counts every attention device's pages).
        Under several processes the driver calls this and every serving attention process makes the same pool
        (its own devices' pages), which its :meth:`serve` then passes to each step."""
        kvc.check_kv_dtype(dtype if dtype is None else jnp.dtype(dtype).name, "the page pool's dtype")
        kvc.check_pool_size(num_pages, page_size, self.afd.attention_devices)
        if self.multiprocess:
            self.check_driver("AFDRunner.create_pool")
            if not self.instanced:  # (per-process instances each make it themselves, with the same arguments)
                _announce(np.array([_OP_POOL, num_pages, page_size, kv_code(dtype), 0, 0], np.int32))
        return self._make_pool(num_pages, page_size, dtype)

    def _make_pool(self, num_pages: int, page_size: int, dtype) -> dict:
        return kvc.create_page_pool(
            self.config, num_pages, page_size, dtype=dtype, mesh=self.attn_mesh, rules=self.rules
        )

    def step(self, pool: dict, ids, block_table, start, last, rows=None, *, micro_batches: int | None = None):
        """One pass of a batch through the pipeline on a shared page pool (:meth:`dispatch` with its tokens read at
        once): returns ``(tokens [n], logprobs [n], pool)``."""
        out, pool = self.dispatch(pool, ids, block_table, start, last, rows, micro_batches=micro_batches)
        return (*out.read(), pool)

    def dispatch(
        self,
        pool: dict,
        ids,
        block_table,
        start,
        last,
        rows=None,
        *,
        micro_batches: int | None = None,
        decode: bool = False,
    ) -> tuple[StepTokens, dict]:
        """Dispatch one pass of a batch through the pipeline on a shared page pool, for a scheduler such as the
        continuous-batching :class:`~infer.engine.Engine` (which drives an ``AFDRunner`` through this), without
        waiting for it: returns ``(StepTokens, pool)``, the tokens read when wanted (:meth:`StepTokens.read`).

        The batch is laid out as the engine lays out its slots: ``n = M * r`` rows, attention device ``g``'s rows
        ``g*r .. (g+1)*r - 1``, with ``block_table`` rows of that device's local page ids into ``pool`` (per layer
        ``k``, ``v``, ``k_scale``, ``v_scale`` pages on the attention mesh, as :meth:`create_pool` makes them;
        donated, the updated pool is returned). ``ids [n, T]`` are written at positions ``start ..
        start + T - 1``, ``last [n]`` picks each row's logits, ``rows`` = (seeds, counters, temperature, top_k,
        top_p) sample as the engine does (None: greedy). Micro-batch ``j`` of ``micro_batches`` (default
        ``AFDConfig.micro_batches``; it must divide ``r``) takes the ``j``-th ``r / micro_batches`` rows of every
        device, so each keeps its own rows and pages. Host (numpy) inputs; the tokens come with ``logprobs``, the
        model's log-probability of each token (float32, before any sampling filter).

        A ``decode`` step (``T = 1``) keeps its tokens on the device for the next decode step of the same shape:
        there a row whose id is -1 takes the token its row got here, so a scheduler can dispatch the next step
        before it reads this one's tokens (and turn them into text while the devices run). Likewise a prefill
        step (not ``decode``) keeps its tokens until the next prefill step: in a decode step after it, a row whose
        id is ``-2 - i`` takes the token its row ``i`` got (a fresh request's first token, whose prefill need not be
        read before the request's first decode step is dispatched).

        Under several processes the driver is process 0 (an attention process); every other process runs
        :meth:`serve`, which follows each step (its shapes, and for the other attention processes its inputs, are
        announced to them), until the driver calls :meth:`release`. With per-process attention instances
        (``AFDConfig.instances = "per-process"``) every attention process drives its own devices' rows (``n = L *
        r`` for its ``L`` devices, block tables of their pages), and each step must be the next one of the round
        the instances agreed (:meth:`agree_round`). A step that does not finish within
        ``AFDConfig.peer_timeout_s`` there (a peer died or hangs) ends the process with an error."""
        inputs = _step_inputs(ids, block_table, start, last, rows)
        n, width = inputs[0].shape
        mb_count = self.afd.micro_batches if micro_batches is None else micro_batches
        self._check_step(n, mb_count)
        self._check_carried(inputs[0], n, mb_count, decode)
        if not self.multiprocess:
            return self._step(pool, *inputs, mb_count, decode)
        self.check_driver("AFDRunner.step")
        if self.instanced:
            self._take_round_step(n // self.local_attention_devices, width, mb_count, inputs[1].shape[1])
            if inputs[4] is None:  # (every instance runs the same logits program: the sampling one, greedy rows)
                seeds, temperature, top_k, top_p = param_rows([None] * n)
                inputs = (*inputs[:4], (seeds, np.zeros((n,), np.int32), temperature, top_k, top_p))
        with self._watched():
            if not self.instanced:  # (the instances agreed this step's shapes in their round)
                flags = (rows is not None) | decode << 1
                _announce(np.array([_OP_STEP, n, width, mb_count, inputs[1].shape[1], flags], np.int32))
                if self._attention_spans:  # the other attention processes run this step too: they need its inputs
                    _announce(inputs)
            return self._step(pool, *inputs, mb_count, decode)

    def _check_carried(self, ids: np.ndarray, n: int, mb_count: int, decode: bool) -> None:
        """Ids of -1 (a token still on the device) only in a decode step after one of the same shape, ids of
        ``-2 - i`` only in a decode step after a prefill step of more than ``i`` rows."""
        if not (ids < 0).any():
            return
        if not decode or ids.shape[1] != 1:
            raise ValueError(
                "negative token ids (-1: the previous decode step's token, -2 - i: row i's of the last prefill "
                "step) are for decode steps (one token)"
            )
        if (ids == -1).any() and self._carried_tokens(n, mb_count) is None:
            raise ValueError(
                f"token ids of -1 in a decode step of {n} rows and {mb_count} micro-batches, but no decode step of "
                f"that shape ran before it"
            )
        fresh = ids[ids <= -2]
        if fresh.size:
            rows = 0 if self._prefilled is None else self._prefilled[0]
            if -2 - int(fresh.min()) >= rows:
                raise ValueError(
                    f"token id {int(fresh.min())} in a decode step takes row {-2 - int(fresh.min())} of the last "
                    f"prefill step, which had {rows or 'no'} rows{'' if rows else ' (none ran)'}"
                )

    def _carried_tokens(self, n: int, mb_count: int) -> list[jax.Array] | None:
        """Per micro-batch, the tokens of the previous decode step if it had ``n`` rows in ``mb_count``
        micro-batches (the ones a -1 id takes), else None."""
        decoded = self._decoded
        return decoded[1] if decoded is not None and decoded[0] == (n, mb_count) else None

    @contextlib.contextmanager
    def _watched(self):
        """Under several processes: a step that does not finish within ``AFDConfig.peer_timeout_s`` (a peer died
        or hangs) ends this process with an error (:class:`_Watchdog`); nothing bounds the wait between steps."""
        if self._watchdog is None:
            self._watchdog = _Watchdog(self.afd.peer_timeout_s, armed=False)
        self._watchdog.arm()
        try:
            with _peer_guard(self._watchdog, stop=False):
                yield
        finally:
            self._watchdog.disarm()

    def _step(self, pool: dict, ids, block_table, start, last, rows, mb_count: int, decode: bool = False):
        n, width = ids.shape
        m = self.local_attention_devices if self.instanced else self.afd.attention_devices  # the devices of the rows
        r, q = n // m, n // m // mb_count
        fp8 = pool["k_scale"] is not None
        kv = _pool_layers(pool)  # one list for every micro-batch: each one's attention writes the pool the next reads
        put = self._put_own if self.instanced else self._put_all
        order = [
            np.concatenate([np.arange(g * r + j * q, g * r + (j + 1) * q) for g in range(m)]) for j in range(mb_count)
        ]
        every = self.afd.attention_devices * q  # a micro-batch's rows on all attention devices
        mbs = [_MicroBatch(every, every, kv, put(block_table[sel])) for sel in order]
        positions = [put(start[sel][:, None] + np.arange(width, dtype=np.int32)[None]) for sel in order]
        per_mb_rows = None if rows is None else [tuple(put(a[sel]) for a in rows) for sel in order]
        prev = fresh = None
        if decode:  # (every decode step takes the previous one's tokens, zeros at first: one program)
            prev = self._carried_tokens(n, mb_count)
            if prev is None:
                zeros = np.zeros((every,), np.int32)
                prev = [jax.device_put(zeros, self._tokens_sharding)] * mb_count
            # and the last prefill's (a scheduler always prefills before it decodes: one program)
            fresh = prev if self._prefilled is None else self._prefilled[2]
            if (ids <= -2).any():  # row i of the prefill -> -2 - (its index in the concatenated tokens)
                ids = np.where(ids <= -2, -2 - self._prefilled[1][np.maximum(-2 - ids, 0)], ids)
        res = self._forward(
            mbs, [put(ids[sel]) for sel in order], positions, [put(start[sel]) for sel in order],
            [put(last[sel]) for sel in order], per_mb_rows, prev, fresh,
        )  # fmt: skip
        tokens = [tok for tok, _, _ in res]
        if decode:
            self._decoded = ((n, mb_count), tokens)
        else:  # each row's place in the tokens concatenated (the rows of every attention device, per micro-batch)
            flat = np.empty((n,), np.int32)
            offset = self._first_local * q if self.instanced else 0
            for j, sel in enumerate(order):
                flat[sel] = j * every + offset + np.arange(len(sel))
            self._prefilled = (n, flat, tokens)
        new_pool = {
            name: tuple(layer[c] for layer in kv) if (c < 2 or fp8) else None
            for c, name in enumerate(("k", "v", "k_scale", "v_scale"))
        }
        return StepTokens(self, order, res), new_pool

    def _put_all(self, a: np.ndarray) -> jax.Array:
        """Host rows of every attention device -> an array on the attention mesh."""
        return jax.device_put(a, self._act_sharding(self.attn_mesh, a.shape))

    def _put_own(self, a: np.ndarray) -> jax.Array:
        """Per-process instances: this process's devices' rows -> their part of an array of every device's rows."""
        shape = (a.shape[0] // self.local_attention_devices * self.afd.attention_devices, *a.shape[1:])
        return jax.make_array_from_process_local_data(self._act_sharding(self.attn_mesh, shape), a, shape)

    def _own(self, rows: np.ndarray) -> np.ndarray:
        """Per-process instances: this process's devices' rows of a micro-batch's (replicated) outputs."""
        if not self.instanced:
            return rows
        per = rows.shape[0] // self.afd.attention_devices
        return rows[self._first_local * per : (self._first_local + self.local_attention_devices) * per]

    def _check_step(self, n: int, mb_count: int) -> None:
        m = self.local_attention_devices if self.instanced else self.afd.attention_devices
        if n % m or (n // m) % mb_count:
            raise ValueError(
                f"a step of {n} rows over {m} attention devices and {mb_count} micro-batches: each device's rows "
                f"({n} / {m}) must split into {mb_count} equal micro-batches"
            )

    def check_driver(self, what: str) -> None:
        """Under several processes, raise ``ValueError`` unless this process drives :meth:`step`: process 0 (which
        always holds attention devices), or with per-process instances every attention process."""
        if self.instanced:
            if not self.has_attention:
                raise ValueError(
                    f"{what} on an FFN process: with per-process attention instances every attention process "
                    f"drives its own steps, and the FFN processes call serve()"
                )
            return
        if self.multiprocess and jax.process_index() != 0:
            raise ValueError(
                f"{what} under several processes: process 0 drives the steps; every other process calls serve()"
            )

    def serve(self) -> int:
        """A process other than 0 of a multi-process runner driven step by step from process 0 (:meth:`step`,
        e.g. by the engine): make the page pool the driver makes (:meth:`create_pool`, attention processes) and
        run this process's side of every step the driver announces, until it calls :meth:`release`. Returns the
        number of steps served. A driver that dies ends this process through JAX's heartbeat; a step that does not
        finish within ``AFDConfig.peer_timeout_s`` (a peer died or hangs) ends it with an error, as it ends the
        driver; waiting for the next step is not bounded (a scheduler may idle)."""
        if self.instanced:
            return self._serve_instances()
        if not self.multiprocess or jax.process_index() == 0:
            raise ValueError("AFDRunner.serve is for the processes other than 0 of a multi-process runner")
        served, pool = 0, None
        while True:
            op, a, b, c, d, e = (int(v) for v in _announce(np.zeros((6,), np.int32)))
            if op == _OP_RELEASE:
                self._stop_watchdog()
                return served
            if op == _OP_POOL:
                if self.has_attention:
                    pool = self._make_pool(a, b, None if c == 0 else kvc.KV_DTYPES[c - 1])
                continue
            with self._watched():
                pool = self._serve_step(pool, n=a, width=b, mb_count=c, table_width=d, flags=e)
            served += 1

    def _serve_step(self, pool, *, n: int, width: int, mb_count: int, table_width: int, flags: int):
        """This process's side of one announced step (the FFN side needs only the shapes); returns the pool. An
        attention process waits for the step's tokens, so that a step that never ends is caught here too."""
        inputs = _step_inputs(
            np.zeros((n, width)), np.zeros((n, table_width)), np.zeros((n,)), np.zeros((n,)),
            tuple(np.zeros((n,)) for _ in range(5)) if flags & 1 else None,
        )  # fmt: skip
        if self._attention_spans:
            inputs = _announce(inputs)
        if self.has_attention:
            out, pool = self._step(pool, *inputs, mb_count, decode=bool(flags & 2))
            out.read()
            return pool
        self._ffn_step(n, width, mb_count)
        return pool

    def _ffn_step(self, n: int, width: int, mb_count: int) -> None:
        """An FFN process's side of a step of ``n`` rows (all attention devices') of ``width`` tokens."""
        q = n // mb_count
        mbs = [_MicroBatch(q, q, [None] * self.config.num_hidden_layers, None) for _ in range(mb_count)]
        shapes = [np.zeros((q, width), np.int32)] * mb_count
        self._forward(mbs, shapes, shapes, None, None)

    # ------------------------------------------------------------------ per-process attention instances

    def join_instances(self, shapes: InstanceShapes | None = None) -> InstanceShapes:
        """Per-process attention instances (``AFDConfig.instances = "per-process"`` under several processes): every
        process calls this once, before any step: each attention instance (its engine, before it makes its page
        pool) with its :class:`InstanceShapes`, each FFN process with none (:meth:`serve` does it). Returns the
        instances' common shapes; raises ``ValueError`` on every process when they differ."""
        self._check_instanced("join_instances")
        if self._shapes is not None:
            raise ValueError("join_instances: this process has joined already (one engine per attention process)")
        if self.has_attention and shapes is None:
            raise ValueError("an attention instance joins with its engine's InstanceShapes")
        row = np.zeros((1 + len(dataclasses.fields(InstanceShapes)),), np.int32)
        if self.has_attention:
            row[:] = (1, *dataclasses.astuple(shapes))
        with self._watched():
            every = _gather(row)
        self._shapes = agreed_shapes(every)
        return self._shapes

    def agree_round(self, *, prefill_width: int = 0, decode: bool = False, done: bool = False) -> RoundPlan:
        """Per-process attention instances, after :meth:`join_instances`: every process calls this once per round
        and then runs the round's steps (:attr:`RoundPlan.steps`, in order, with :meth:`step`), so that the
        instances, each scheduling only its own devices' rows, step together over the shared FFN side.

        An attention instance gives the prefill chunk width it wants (0: none) and whether it wants a decode step;
        ``done`` says it has closed (it still runs the others' steps, on padding rows, until every instance has
        closed). An FFN process gives nothing (:meth:`serve` does this). The plan is the same on every process: a
        prefill at the widest chunk wanted (if any instance wants one), then a decode step (if any wants one); an
        instance that wants neither runs them on padding rows. ``RoundPlan.done`` once every instance has closed:
        no rounds follow.

        So every instance must keep stepping (``Engine.step()`` runs a round even with nothing to do) until it
        closes: the others' rounds wait for it. A round that does not complete within ``AFDConfig.peer_timeout_s``
        (an instance died, hangs or stopped stepping), or whose exchange fails, ends the process with an error."""
        self._check_instanced("agree_round")
        if self._shapes is None:
            raise ValueError("agree_round before join_instances")
        if self._closed:
            raise ValueError("every attention instance of this runner has closed: no rounds follow")
        if self._round:
            raise ValueError(f"agree_round before the last round's {len(self._round)} remaining steps ran")
        header = np.array([self.has_attention, done, prefill_width, decode], np.int32) * self.has_attention
        with self._watched():  # (every instance keeps stepping, so a round that never completes means a failure)
            every = _gather(header)
        plan = round_plan(every, self._shapes)
        self._round = list(plan.steps)
        if plan.done:
            self._closed = True
            self._stop_watchdog()
        return plan

    def _check_instanced(self, what: str) -> None:
        if not self.instanced:
            raise ValueError(
                f"{what} is for per-process attention instances (AFDConfig.instances = 'per-process' under several "
                f"processes)"
            )

    def _take_round_step(self, rows: int, width: int, mb_count: int, table_width: int) -> None:
        """Per-process instances: check that a step is the next one of the agreed round (a different one would
        leave the processes waiting for each other forever) and mark it run."""
        want = self._round[0] if self._round else None
        got = RoundStep(want.kind if want else "?", rows, width, mb_count, table_width)
        if got != want:
            raise ValueError(
                f"a step of {rows} rows per attention device, {width} tokens, {mb_count} micro-batches, block tables "
                f"{table_width} wide is not the next step the attention instances agreed on "
                f"({'none: call agree_round first' if want is None else want})"
            )
        self._round.pop(0)

    def _serve_instances(self) -> int:
        """An FFN process under per-process attention instances: every round's steps, until all instances close."""
        if self.has_attention:
            raise ValueError(
                "AFDRunner.serve on an attention process: with per-process attention instances every attention "
                "process runs its own engine (Engine(runner)); serve() is for the FFN processes"
            )
        served = 0
        self.join_instances()
        while not (plan := self.agree_round()).done:
            for st in plan.steps:
                self._round.pop(0)
                with self._watched():
                    self._ffn_step(st.rows * self.afd.attention_devices, st.width, st.micro_batches)
                served += 1
        return served

    def release(self) -> None:
        """Driver (process 0) of a multi-process runner: tell every other process's :meth:`serve` that no step
        follows."""
        if self.instanced:
            raise ValueError(
                "AFDRunner.release under per-process attention instances: each instance's Engine.close() ends its "
                "part, and the FFN processes stop once every instance has closed"
            )
        if self.multiprocess:
            self.check_driver("AFDRunner.release")
            _announce(np.zeros((6,), np.int32))
            self._stop_watchdog()

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int | None = None,
        *,
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        return_logits: bool = False,
        trace_dir: str | Path | None = None,
    ) -> AFDResult:
        """Generate after each prompt (lists of token ids); prompts are right-padded to one bucket and prefilled
        through the same pipeline, and every step runs the whole batch (fixed shapes).

        Greedy by default: ``max_new_tokens`` (16 if not given) and ``stop_token_ids`` for every prompt. Or
        ``sampling``: one :class:`~infer.sampling.SamplingParams` for all prompts or one per prompt (temperature,
        top-k, top-p, seed, max_new_tokens, stop tokens per row; then ``max_new_tokens`` / ``stop_token_ids``
        must not be given). Sampling draws exactly as the engine does, so with the same seeds and (within
        rounding) the same logits it picks the same tokens. A sequence ends at its first stop token or its own
        ``max_new_tokens``; decoding stops when every sequence has ended. With ``trace_dir``, the last decode step
        (the second, when every sequence ends sooner) runs under the JAX profiler and ``result.trace`` holds its
        per-stage intervals (:func:`stage_intervals`); under several processes each profiles its own devices
        (into ``trace_dir/process-<i>``) and every process gets all of them on one time line
        (:func:`merge_process_intervals`)."""
        from infer.generate import bucket

        cfg, afd = self.config, self.afd
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        per_row = _row_params(len(prompts), max_new_tokens, sampling, stop_token_ids)
        steps_needed = max(p.max_new_tokens for p in per_row)
        for i, p in enumerate(prompts):
            bad = [x for x in p if not 0 <= int(x) < cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}")
        sizes = microbatch_sizes(len(prompts), afd.micro_batches)
        longest = max(len(p) for p in prompts)
        if longest + steps_needed > cfg.max_position_embedding:
            raise ValueError(
                f"prompt of {longest} tokens + max_new_tokens {steps_needed} = {longest + steps_needed} exceeds the "
                f"model's context of {cfg.max_position_embedding} tokens"
            )
        # the prompt bucket, narrowed where the context has no room for all of it (a non-power-of-two context)
        width = min(bucket(longest), cfg.max_position_embedding - steps_needed)
        max_len = width + steps_needed
        m = afd.attention_devices
        mbs, ids, lengths, offsets = [], [], [], []
        row = 0
        for size in sizes:
            padded = -(-size // m) * m
            kv, table = self._kv_for(padded, max_len) if self.has_attention else ([None] * cfg.num_hidden_layers, None)
            mbs.append(_MicroBatch(size, padded, kv, table))
            block = np.zeros((padded, width), np.int32)
            lens = np.ones((padded,), np.int32)  # padding rows: one token 0
            for r, p in enumerate(prompts[row : row + size]):
                block[r, : len(p)] = p
                lens[r] = len(p)
            ids.append(block)
            lengths.append(lens)
            offsets.append(row)
            row += size

        put = lambda a: jax.device_put(a, self._act_sharding(self.attn_mesh, a.shape)) if self.has_attention else a  # noqa: E731
        consts = None  # per micro-batch (seeds, temperature, top_k, top_p) rows; padding rows greedy
        if self.has_attention and not all(p.greedy for p in per_row):
            consts = [
                tuple(
                    put(a)
                    for a in param_rows(per_row[offsets[j] : offsets[j] + mb.rows] + [None] * (mb.padded - mb.rows))
                )
                for j, mb in enumerate(mbs)
            ]

        def rows_at(step):  # the logits program's sampling rows at this step (None: every row greedy)
            if consts is None:
                return None
            return [
                (seeds, put(np.full((mb.padded,), step, np.int32)), *rest)
                for (seeds, *rest), mb in zip(consts, mbs, strict=True)
            ]

        positions = [put(np.broadcast_to(np.arange(width, dtype=np.int32), (mb.padded, width)).copy()) for mb in mbs]
        zeros = [put(np.zeros((mb.padded,), np.int32)) for mb in mbs]
        watchdog = _Watchdog(self.afd.peer_timeout_s) if self.multiprocess else None
        with _peer_guard(watchdog):
            t0 = time.perf_counter()
            res = self._forward(mbs, [put(x) for x in ids], positions, zeros, [put(x - 1) for x in lengths], rows_at(0))
            tokens: list[list[int]] = [[] for _ in prompts]
            ended = np.zeros((len(prompts),), bool)
            step_logits: list[np.ndarray] = []

            def collect(res):
                """Append this step's tokens to the sequences still running; returns the device tokens (next input)."""
                if res is None:
                    return None
                toks = np.concatenate([_host(tok)[: mb.rows] for (tok, *_), mb in zip(res, mbs, strict=True)])
                for i, t in enumerate(toks):
                    if not ended[i]:
                        tokens[i].append(int(t))
                        p = per_row[i]
                        ended[i] = int(t) in p.stop_token_ids or len(tokens[i]) >= p.max_new_tokens
                if return_logits:
                    step_logits.append(
                        np.concatenate(
                            [_host(self._gather_rows(lg))[: mb.rows] for (_, lg, _), mb in zip(res, mbs, strict=True)]
                        )
                    )
                return [tok for tok, *_ in res]

            def all_ended() -> bool:  # under several processes attention process 0 decides for all
                done = bool(ended.all()) if self.has_attention else False
                if watchdog:
                    done = _agree(done)
                    watchdog.tick()
                return done

            last_tok = collect(res)
            finished = all_ended()
            if not watchdog and res is not None:
                jax.block_until_ready(res)
            prefill_seconds = time.perf_counter() - t0
            trace = None
            timed_start, timed = None, 0
            trace_step = steps_needed - 1 if trace_dir is not None and steps_needed > 1 else None
            for step in range(1, steps_needed):
                if finished and (trace_step is None or trace is not None):
                    break
                if step == 2:
                    timed_start = time.perf_counter()
                traced = trace_step is not None and trace is None and (step == trace_step or (finished and step >= 2))
                profile_dir = trace_dir
                if traced and self.multiprocess:  # each process profiles its own devices
                    profile_dir = Path(trace_dir) / f"process-{jax.process_index()}"
                ctx = (
                    jax.profiler.trace(str(profile_dir), profiler_options=_profile_options())
                    if traced
                    else contextlib.nullcontext()
                )
                if traced:
                    self._dispatch_log = []
                with ctx:
                    cur = [lengths[j] + (step - 1) for j in range(len(mbs))]
                    pos = [put(c[:, None]) for c in cur]
                    st = [put(c) for c in cur]
                    toks = [tok[:, None] for tok in last_tok] if self.has_attention else [None] * len(mbs)
                    if not self.has_attention:  # the FFN process only needs shapes
                        toks = [np.zeros((mb.padded, 1), np.int32) for mb in mbs]
                    last = [put(np.zeros((mb.padded,), np.int32)) for mb in mbs]
                    res = self._forward(mbs, toks, pos, st, last, rows_at(step))
                    last_tok = collect(res)
                    finished = all_ended()
                    if not watchdog and res is not None:
                        jax.block_until_ready(res)
                if traced:
                    trace = stage_intervals(profile_dir, self._dispatch_log)
                    self._dispatch_log = None
                    if self.multiprocess:
                        trace = merge_process_intervals(gather_json(trace))
                if step >= 2:
                    timed += 1
        decode_seconds = time.perf_counter() - timed_start if timed_start is not None else 0.0
        return AFDResult(
            tokens=tokens if self.has_attention else [],
            logits=step_logits if return_logits else None,
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            decode_steps_timed=timed,
            batch_size=len(prompts),
            trace=trace,
        )


def _host(arr: jax.Array) -> np.ndarray:
    """A token / logits array on this host: replicated over an attention mesh of several processes (read the local
    copy), else addressable here."""
    return np.asarray(arr.addressable_data(0) if not arr.is_fully_addressable else arr)


def _row_params(
    n: int, max_new_tokens: int | None, sampling, stop_token_ids: Sequence[int] | None
) -> list[SamplingParams]:
    """One :class:`SamplingParams` per prompt from :meth:`AFDRunner.generate`'s arguments."""
    if sampling is None:
        new = 16 if max_new_tokens is None else max_new_tokens
        return [SamplingParams(max_new_tokens=new, stop_token_ids=tuple(stop_token_ids or ()))] * n
    if max_new_tokens is not None or stop_token_ids is not None:
        raise ValueError("with sampling=..., give max_new_tokens and stop_token_ids in the SamplingParams")
    if isinstance(sampling, SamplingParams):
        return [sampling] * n
    per = list(sampling)
    if len(per) != n or not all(isinstance(p, SamplingParams) for p in per):
        raise ValueError(f"sampling must be one SamplingParams or a list of {n} (one per prompt)")
    return per


class _Watchdog:
    """Multi-process runs block inside cross-process collectives when the peer is gone or hangs; JAX's heartbeat
    ends the process when a peer dies (usually first), and this bounds the wait in every case, a peer that hangs
    included: while armed, no step finished for ``timeout_s`` -> log the reason and exit the process (status 75).
    Disarmed (between the steps of a scheduler, which may idle for as long as it likes) it never fires."""

    def __init__(self, timeout_s: float, *, armed: bool = True):
        import threading

        self.timeout_s = timeout_s
        self.last = time.monotonic()
        self.armed = armed
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="afd-watchdog", daemon=True)
        self.thread.start()

    def tick(self) -> None:
        self.last = time.monotonic()

    def arm(self) -> None:
        self.last, self.armed = time.monotonic(), True

    def disarm(self) -> None:
        self.armed = False

    def stop(self) -> None:
        self.done.set()

    def _run(self) -> None:
        while not self.done.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if self.armed and idle > self.timeout_s:
                _peer_exit(f"no step finished for {idle:.0f} s (peer_timeout_s)")


def _peer_exit(reason: str) -> NoReturn:
    """End this process of a multi-process run whose peer failed or hangs: log why and exit (status 75) without
    JAX's distributed shutdown, whose barrier would wait for the peer and then abort the process."""
    import os

    log.critical("AFD process %d: %s; the peer process failed or hangs. Exiting.", jax.process_index(), reason)
    logging.shutdown()
    os._exit(75)


@contextlib.contextmanager
def _peer_guard(watchdog: _Watchdog | None, *, stop: bool = True):
    """Under several processes (``watchdog`` given): a runtime error in a step (a collective whose peer is gone:
    the processes cannot go on together) ends the process through :func:`_peer_exit`; with ``stop`` the watchdog
    stops at the end either way."""
    try:
        yield
    except jax.errors.JaxRuntimeError as exc:
        if watchdog is None:
            raise
        _peer_exit(f"a step failed ({type(exc).__name__}: {str(exc).splitlines()[0][:400]})")
    finally:
        if watchdog is not None and stop:
            watchdog.stop()


def _announce(message):
    """Process 0's ``message`` (an array or a tuple of them) to every process (the others pass the same shapes and
    dtypes)."""
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(message))


# what the driver of step-by-step serving announces (a 6-int header: the op, then its arguments)
_OP_RELEASE, _OP_STEP, _OP_POOL = 0, 1, 2


def _pool_layers(pool: dict) -> list[tuple]:
    """A page pool (``kv_cache.create_page_pool``) as per-layer ``(k, v, k_scale, v_scale)`` (scales None unless
    FP8)."""
    fp8 = pool["k_scale"] is not None
    return [
        (k, v, pool["k_scale"][i] if fp8 else None, pool["v_scale"][i] if fp8 else None)
        for i, (k, v) in enumerate(zip(pool["k"], pool["v"], strict=True))
    ]


def _step_inputs(ids, block_table, start, last, rows) -> tuple:
    """:meth:`AFDRunner.step`'s host inputs with the dtypes every process agrees on: ``(ids, block_table, start,
    last, rows)``, ``rows`` None or (seeds, counters, temperature, top_k, top_p)."""
    i32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
    if rows is not None:
        dtypes = (np.uint32, np.int32, np.float32, np.int32, np.float32)
        rows = tuple(np.asarray(a, dt) for a, dt in zip(rows, dtypes, strict=True))
    return i32(ids), i32(block_table), i32(start), i32(last), rows


def _agree(done: bool) -> bool:
    """Multi-process step end: every process meets here, and process 0 (an attention process: the attention
    processes see the tokens) tells the others whether every sequence has ended."""
    return bool(_announce(np.asarray(done)))


# ---------------------------------------------------------------------------------------------- traces


def _profile_options() -> jax.profiler.ProfileOptions:
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0  # Python function events would slow the dispatching thread many times over
    return opts


def _load_trace_events(trace_dir: str | Path) -> list[dict]:
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir} (did the profiler run?)")
    with gzip.open(files[-1]) as fh:
        return json.load(fh)["traceEvents"]


def stage_intervals(trace_dir: str | Path, dispatch_log: list[tuple[str, str, int, int]]) -> list[dict]:
    """Per-stage intervals of one traced step from the profiler's trace: the device work of every program
    execution (first op start to last op end over its devices, matched to its layer and micro-batch by dispatch
    order), and for single-process runs the transfers as "in flight" intervals between the producer's end and the
    consumer's start (A->F: attention end -> FFN start; F->A: FFN end -> next attention / logits start).
    Times in microseconds from the first recorded op."""
    events = _load_trace_events(trace_dir)
    ops: dict[tuple[str, int], list[float]] = {}
    devices: dict[tuple[str, int], set] = {}
    for e in events:
        args = e.get("args") or {}
        mod, run = args.get("hlo_module"), args.get("run_id")
        if e.get("ph") != "X" or mod not in _PROGRAMS or run is None:
            continue
        key = (mod, int(run))
        span = ops.setdefault(key, [math.inf, -math.inf])
        span[0] = min(span[0], e["ts"])
        span[1] = max(span[1], e["ts"] + e.get("dur", 0))
        devices.setdefault(key, set()).add(str(args.get("device_ordinal", e.get("pid"))))
    runs: dict[str, list[int]] = {}
    for mod, run in ops:
        runs.setdefault(mod, []).append(run)
    seen: dict[str, int] = {}
    out = []
    for program, stage, layer, mb in dispatch_log:
        k = seen.get(program, 0)
        seen[program] = k + 1
        ids = sorted(runs.get(program, []))
        if k >= len(ids):
            continue  # not executed on this process's devices
        key = (program, ids[k])
        start, end = ops[key]
        out.append(dict(stage=stage, layer=layer, mb=mb, start=start, end=end, devices=sorted(devices[key])))
    if not out:
        raise ValueError(f"no AFD program executions found in the trace under {trace_dir}")
    by = {(r["stage"], r["layer"], r["mb"]): r for r in out}
    if not any(r["stage"] in ("a2f", "f2a") for r in out):

        def gap(stage, r, nxt):  # a transfer interval: from the end of r to the start of what consumes it
            return dict(
                stage=stage, layer=r["layer"], mb=r["mb"], start=r["end"], end=max(r["end"], nxt["start"]), devices=[]
            )

        for r in list(out):
            if r["stage"] == "attention" and ("ffn", r["layer"], r["mb"]) in by:
                out.append(gap("a2f", r, by[("ffn", r["layer"], r["mb"])]))
            if r["stage"] == "ffn":
                nxt = by.get(("attention", r["layer"] + 1, r["mb"])) or by.get(("logits", r["layer"] + 1, r["mb"]))
                if nxt is not None:
                    out.append(gap("f2a", r, nxt))
    return _from_zero(out)


def _from_zero(intervals: list[dict]) -> list[dict]:
    """Intervals shifted so the earliest starts at 0, in time order (then by stage, then by process)."""
    t0 = min(r["start"] for r in intervals)
    for r in intervals:
        r["start"] -= t0
        r["end"] -= t0
    return sorted(intervals, key=lambda r: (r["start"], r["stage"], r.get("process", 0)))


def kv_code(dtype) -> int:
    """A page pool dtype as an int the processes exchange: 0 for None (the model's), else 1 + its index in
    ``kv_cache.KV_DTYPES``."""
    return 0 if dtype is None else 1 + kvc.KV_DTYPES.index(jnp.dtype(dtype).name)


def _gather(row: np.ndarray) -> np.ndarray:
    """Every process's ``row`` (the same shape and dtype everywhere), stacked in process order, on every process."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row)).reshape(jax.process_count(), -1)


def gather_json(obj) -> list:
    """Every process's ``obj`` (JSON-serialisable), in process order, on every process (every process must call
    it)."""
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = _gather(np.array([data.size], np.int64)).reshape(-1)
    buf = np.zeros((int(sizes.max()),), np.uint8)
    buf[: data.size] = data
    every = _gather(buf)
    return [json.loads(bytes(row[:n])) for row, n in zip(every, sizes, strict=True)]


def merge_process_intervals(per_process: list[list[dict]]) -> list[dict]:
    """One time line from the :func:`stage_intervals` of each process of a multi-process step (each measured
    from its own profiler's start), every interval tagged with its ``process``. The processes' clocks are aligned
    on the transfers: every process runs every A->F and F->A program (collectives), which end at about the same
    moment on all of them; a process is shifted by the median, over the transfers, of how much later they end
    there than on process 0 (one transfer alone is off by up to a millisecond on a CPU: a sender may finish
    before the receiver has copied the block in). Each interval also gets that alignment's ``clock_error``: twice
    the median distance of a transfer's own offset from the shift (microseconds; 0 on process 0)."""

    def ends(intervals):
        return {(r["stage"], r["layer"], r["mb"]): r["end"] for r in intervals if r["stage"] in ("a2f", "f2a")}

    ref = ends(per_process[0])
    out = []
    for p, intervals in enumerate(per_process):
        mine = ends(intervals)
        shared = sorted(set(ref) & set(mine))
        if not shared:
            raise ValueError(f"process {p}'s trace shares no A->F / F->A transfer with process 0's to align it on")
        offsets = np.array([mine[k] - ref[k] for k in shared])
        shift = float(np.median(offsets))
        error = 2 * float(np.median(np.abs(offsets - shift)))  # (robust: a transfer alone may be off by ms)
        out += [
            dict(r, start=r["start"] - shift, end=r["end"] - shift, process=p, clock_error=error) for r in intervals
        ]
    return _from_zero(out)


def overlaps(intervals: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs (attention of micro-batch a, FFN of micro-batch b != a) whose device work overlaps in time."""
    att = [r for r in intervals if r["stage"] == "attention"]
    ffn = [r for r in intervals if r["stage"] == "ffn"]
    return [
        (a, f) for a in att for f in ffn if a["mb"] != f["mb"] and max(a["start"], f["start"]) < min(a["end"], f["end"])
    ]


def write_chrome_trace(intervals: list[dict], path: str | Path) -> None:
    """Chrome-trace JSON (chrome://tracing, Perfetto): one row per stage (per process when the intervals carry
    one, :func:`merge_process_intervals`), events named by layer and micro-batch."""
    rows = {s: i for i, s in enumerate(("embed", "attention", "a2f", "ffn", "f2a", "logits"))}
    procs = sorted({r.get("process", 0) for r in intervals}) or [0]
    events = [{"ph": "M", "pid": p, "name": "process_name", "args": {"name": f"process {p}"}} for p in procs]
    events += [
        {"ph": "M", "pid": p, "tid": i, "name": "thread_name", "args": {"name": s}}
        for p in procs
        for s, i in rows.items()
    ]
    for r in intervals:
        events.append(
            {
                "ph": "X",
                "pid": r.get("process", 0),
                "tid": rows[r["stage"]],
                "ts": r["start"],
                "dur": max(r["end"] - r["start"], 0.001),
                "name": f"{r['stage']} L{r['layer']} mb{r['mb']}",
                "args": {"layer": r["layer"], "micro_batch": r["mb"], "devices": r["devices"]}
                | ({"clock_error_us": r["clock_error"]} if "clock_error" in r else {}),
            }
        )
    Path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def plot_gantt(intervals: list[dict], path: str | Path | None = None, title: str = "AFD pipeline"):
    """Gantt chart of the stages (rows) coloured by micro-batch; written as PNG to ``path`` if given. Returns the
    matplotlib ``Figure`` (made without pyplot, so it leaves a notebook's plotting backend alone)."""
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    order = ["embed", "attention", "a2f", "ffn", "f2a", "logits"]
    several = len({r.get("process", 0) for r in intervals}) > 1

    def row(r):  # a stage, or under several processes a (stage, process) pair
        return f"{r['stage']} (process {r.get('process', 0)})" if several else r["stage"]

    rank = {s: i for i, s in enumerate(order)}
    present = sorted({row(r): (rank[r["stage"]], r.get("process", 0)) for r in intervals}.items(), key=lambda kv: kv[1])
    present = [name for name, _ in present]
    colors = matplotlib.colormaps["tab10"]
    fig = Figure(figsize=(12, 0.6 * len(present) + 1.5))
    ax = fig.subplots()
    for r in intervals:
        y = present.index(row(r))
        ax.barh(
            y, (r["end"] - r["start"]) / 1e3, left=r["start"] / 1e3, color=colors(r["mb"] % 10), edgecolor="k", lw=0.3
        )
    ax.set_yticks(range(len(present)), present)
    ax.invert_yaxis()
    ax.set_xlabel("ms")
    mbs = sorted({r["mb"] for r in intervals})
    ax.legend(
        handles=[Rectangle((0, 0), 1, 1, color=colors(m % 10)) for m in mbs],
        labels=[f"micro-batch {m}" for m in mbs],
        loc="upper right",
        fontsize=8,
    )
    ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m infer.afd``: generation (greedy or sampled) with attention and FFN on separate device groups."""
    from infer.cli import (
        add_model_args,
        add_pipeline_args,
        add_process_args,
        add_sampling_args,
        byte_tokenizer_for,
        check_fits_context,
        check_pipeline_args,
        check_process_args,
        join_processes,
        preset_config,
        sampling_from_args,
        stop_ids,
    )
    from step3_jax.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(
        prog="python -m infer.afd",
        description="Generation with attention and FFN on separate device groups (attention-FFN "
        "disaggregation), pipelined over micro-batches. On a CPU, --cpu-devices fakes several devices.",
    )
    add_model_args(ap)
    grp = ap.add_argument_group("disaggregation")
    grp.add_argument("--attention-devices", type=int, default=4)
    grp.add_argument("--ffn-devices", type=int, default=4)
    grp.add_argument("--expert-parallel", type=int, default=None, help="FFN expert-parallel size (rest: tensor)")
    add_pipeline_args(grp, micro_batches=3)
    grp.add_argument("--page-size", type=int, default=None, help="tokens per KV page (default 16; 64 for FP8 KV)")
    grp.add_argument("--kv-dtype", default=None, choices=kvc.KV_DTYPES)
    ap.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    ap.add_argument("--batch", type=int, default=6, help="without --prompt: this many copies of a demo prompt")
    add_sampling_args(ap, max_new_tokens=16)
    ap.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the colocated model and compare tokens")  # fmt: skip
    ap.add_argument("--trace-dir", help="profile the last decode step here; writes afd_trace.json + afd_gantt.png")
    add_process_args(
        ap,
        "processes 0 .. K-1 run the attention side, the others the FFN side, each side's devices split evenly over "
        "its processes",
        attention_processes=True,
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_process_args(ap, args)
    check_pipeline_args(ap, args)
    if args.trace_dir:
        if Path(args.trace_dir).exists() and not Path(args.trace_dir).is_dir():
            ap.error(f"--trace-dir {args.trace_dir} is a file, not a folder")
        if args.max_new_tokens < 2:
            ap.error("--trace-dir profiles a decode step after the first: it needs --max-new-tokens >= 2")
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.coordinator is not None:
        join_processes(args)
    attention_process = jax.process_index() == 0
    try:
        afd = AFDConfig(
            attention_devices=args.attention_devices,
            ffn_devices=args.ffn_devices,
            expert_parallel=args.expert_parallel,
            micro_batches=args.micro_batches,
            transfer=args.transfer,
            page_size=args.page_size,
            kv_dtype=args.kv_dtype,
            peer_timeout_s=args.peer_timeout,
            attention_processes=args.attention_processes,
        )
        sampling_from_args(args)  # bad sampling values fail before any model is built
        t0 = time.perf_counter()
        if args.checkpoint:  # each side (each process) reads only its own half, into its own devices
            runner = AFDRunner.from_checkpoint(args.checkpoint, afd, dtype=args.dtype)
            tokenizer = load_tokenizer(args.checkpoint)
        else:
            config = preset_config(args)
            tokenizer = byte_tokenizer_for(config, args.preset)
            runner = AFDRunner.create(config, afd, seed=args.seed)
        config = runner.config
        params = sampling_from_args(args, stop_ids(tokenizer, config))
        texts = args.prompt or ["Attention and FFN on different devices."] * args.batch
        prompts = [tokenizer.encode(x) for x in texts]
        microbatch_sizes(len(prompts), afd.micro_batches)
        check_fits_context(max(map(len, prompts)), params.max_new_tokens, config)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"AFD on {jax.devices()[0].platform}: {afd.attention_devices} attention devices (data parallel) + "
        f"{afd.ffn_devices} FFN devices (EP {runner.ep} x TP {runner.tp}), {afd.micro_batches} micro-batches, "
        f"{afd.transfer} A->F; built in {time.perf_counter() - t0:.2f} s"
    )
    trace_dir = Path(args.trace_dir) if args.trace_dir else None
    res = runner.generate(prompts, sampling=params, trace_dir=trace_dir)
    if not attention_process:
        side = "attention" if runner.has_attention else "FFN"
        print(f"process {jax.process_index()} ({side} side): served {len(prompts)} sequences; process 0 prints the "
              "tokens")  # fmt: skip
        return 0
    rate = f"{res.decode_tokens_per_second:.1f} tokens/s" if res.decode_steps_timed else "- (no step after the first)"
    print(f"prefill {res.prefill_seconds:.2f} s, decode {rate} (after compile)")
    for text, toks in zip(texts, res.tokens, strict=True):
        print(f"  {text[:40]!r} -> {toks}")
    if args.compare:
        if args.checkpoint:
            print("(--compare skipped for checkpoints: it would load the model a second time)")
        else:
            _compare_colocated(config, args.seed, prompts, params, res.tokens, afd)
    if trace_dir is not None and res.trace:
        write_chrome_trace(res.trace, trace_dir / "afd_trace.json")
        plot_gantt(res.trace, trace_dir / "afd_gantt.png", title=f"AFD {afd.attention_devices}A{afd.ffn_devices}F, "
                   f"{afd.micro_batches} micro-batches, one decode step")  # fmt: skip
        pairs = overlaps(res.trace)
        print(f"trace: {trace_dir / 'afd_trace.json'}, {trace_dir / 'afd_gantt.png'}; {len(pairs)} overlapping "
              f"(attention, FFN) pairs of different micro-batches")  # fmt: skip
    return 0


def _compare_colocated(config, seed: int, prompts, params: SamplingParams, tokens, afd: AFDConfig) -> None:
    """The same prompts and sampling through the colocated continuous-batching engine; prints how many agree."""
    from infer.engine import Engine, EngineConfig
    from step3_jax.model import create_model

    max_seq_len = min(max(map(len, prompts)) + params.max_new_tokens + 1, config.max_position_embedding)
    engine = Engine(
        create_model(config, seed=seed),
        EngineConfig(max_batch=len(prompts), page_size=afd.page_size, max_seq_len=max_seq_len, kv_dtype=afd.kv_dtype),
    )
    want = [o.token_ids for o in engine.generate_outputs(prompts, params)]
    same = sum(list(a) == list(b) for a, b in zip(tokens, want, strict=True))
    kind = "greedy" if params.greedy else "sampled (same seeds)"
    print(f"colocated engine: {same}/{len(prompts)} sequences with identical {kind} tokens")
    if same < len(prompts) and afd.transfer == "fp8" and config.quantization != "fp8":
        note = "FP8 hidden states round what a model without FP8 GEMMs keeps exact, which can flip near-ties"
        print(f"  ({note} of random weights; --transfer bf16 / model are exact for such models)")


if __name__ == "__main__":
    sys.exit(main())

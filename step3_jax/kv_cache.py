"""KV cache for MFA: one K and one V vector of ``head_dim`` per KV head (Step-3: a single 256-wide head).

The contiguous cache keeps, per layer, ``k`` and ``v`` arrays ``[B, S_max, G, K]`` and one ``lengths``
vector ``[B]`` (tokens already written per sequence). A forward step of ``T`` tokens writes them at
slots ``lengths[b] .. lengths[b] + T - 1`` and attends to every slot ``<=`` its own, so slots past a
sequence's length (padding written by a batched prefill) are never read and get overwritten later.

The paged cache (:class:`PagedKVCache`, below) holds the same tokens in fixed-size pages shared by all
sequences, addressed through a block table, in BF16 or FP8 (per-token scales); decode steps read it with the
MFA decode kernel of ``pallas_kernels.mfa_decode``.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from step3_jax.config import Step3Config
from step3_jax.quant import quantize_per_token
from step3_jax.sharding import DEFAULT_RULES, ShardingRules

CACHE_AXES = ("act_batch", "cache_seq", "kv_heads", "head_dim")


@struct.dataclass
class KVCache:
    """Contiguous KV cache: per layer ``[B, S_max, G, K]`` key and value buffers and each row's filled length."""

    k: tuple[jax.Array, ...]  # per layer [B, S_max, G, K]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32

    @classmethod
    def create(
        cls,
        config: Step3Config,
        batch_size: int,
        max_length: int,
        *,
        dtype=None,
        mesh: jax.sharding.Mesh | None = None,
        rules: ShardingRules = DEFAULT_RULES,
    ) -> KVCache:
        if max_length > config.max_position_embedding:
            raise ValueError(
                f"KV cache max_length {max_length} exceeds the model's max_position_embedding "
                f"{config.max_position_embedding}"
            )
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"KV cache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}")
        if dtype is not None and str(jnp.dtype(dtype)) not in ("bfloat16", "float32"):
            raise ValueError(
                f"KVCache dtype must be bfloat16 or float32, got {dtype!r} (FP8 KV, with its per-token scales, is "
                "the paged cache's: PagedKVCache / create_page_pool)"
            )
        dtype = jnp.dtype(dtype or config.dtype)
        shape = (batch_size, max_length, config.num_kv_heads, config.head_dim)

        def zeros():
            if mesh is None:
                return jnp.zeros(shape, dtype)
            return _filled(shape, 0, dtype, rules.sharding(mesh, CACHE_AXES, shape))()

        n = config.num_hidden_layers
        return cls(
            k=tuple(zeros() for _ in range(n)),
            v=tuple(zeros() for _ in range(n)),
            lengths=jnp.zeros((batch_size,), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


def write(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array):
    """Write ``k, v [B, T, G, K]`` into ``cache_k, cache_v [B, S, G, K]`` at per-sequence slot ``start [B]``."""

    def one(ck, cv, kb, vb, s):
        ck = jax.lax.dynamic_update_slice(ck, kb.astype(ck.dtype), (s, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, vb.astype(cv.dtype), (s, 0, 0))
        return ck, cv

    return jax.vmap(one)(cache_k, cache_v, k, v, start)


# ---------------------------------------------------------------------------------------------- paged cache
#
# Layout (per layer): ``k, v [num_pages, page_size, G, K]`` (bf16, or float8_e4m3fn with per-token float32
# scales ``k_scale, v_scale [num_pages, page_size, G]``), shared by all sequences; ``block_table [B, max_pages]``
# lists each sequence's pages in order, so token ``s`` of sequence ``b`` lives at page
# ``block_table[b, s // page_size]``, row ``s % page_size``. For Step-3 (G = 1) a reshape (free, no copy) gives
# the ``[num_pages, page_size, K]`` pages that the MFA decode kernel (``pallas_kernels.mfa_decode``) reads.
# Pages are handed out on the host by :class:`PageAllocator`; the device-side cache only sees the block table.


@struct.dataclass
class PagedLayer:
    """One layer's view of a :class:`PagedKVCache` (what ``MFAAttention`` receives as ``kv``)."""

    k: jax.Array  # [P, page_size, G, K]
    v: jax.Array
    k_scale: jax.Array | None  # [P, page_size, G] float32, FP8 only
    v_scale: jax.Array | None
    block_table: jax.Array  # [B, max_pages] int32

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    @property
    def is_fp8(self) -> bool:
        return self.k_scale is not None


@struct.dataclass
class PagedKVCache:
    """Paged KV cache: per-layer page pools, one block table and one ``lengths`` vector for the batch."""

    k: tuple[jax.Array, ...]  # per layer [P, page_size, G, K]
    v: tuple[jax.Array, ...]
    k_scale: tuple[jax.Array, ...] | None  # per layer [P, page_size, G] float32 (FP8 pages) or None
    v_scale: tuple[jax.Array, ...] | None
    block_table: jax.Array  # [B, max_pages] int32
    lengths: jax.Array  # [B] int32

    @classmethod
    def create(
        cls,
        config: Step3Config,
        block_table,
        *,
        num_pages: int,
        page_size: int,
        lengths=None,
        dtype=None,
    ) -> PagedKVCache:
        """Zeroed pages for every layer. ``block_table [B, max_pages]`` (e.g. from :class:`PageAllocator`);
        ``dtype`` defaults to the model dtype, ``"float8_e4m3fn"`` stores FP8 with per-token scales."""
        block_table = jnp.asarray(block_table, jnp.int32)
        if block_table.ndim != 2:
            raise ValueError(f"block_table must be [batch, max_pages], got shape {block_table.shape}")
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"paged cache needs num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        capacity = block_table.shape[1] * page_size
        if capacity > config.max_position_embedding:
            raise ValueError(
                f"block table capacity {capacity} tokens exceeds the model's max_position_embedding "
                f"{config.max_position_embedding}"
            )
        b = block_table.shape[0]
        lengths = jnp.zeros((b,), jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        if lengths.shape != (b,):
            raise ValueError(f"lengths must be [batch] = ({b},) like the block table's rows, got {lengths.shape}")
        check_kv_dtype(None if dtype is None else str(jnp.dtype(dtype)), "PagedKVCache dtype")
        if not isinstance(block_table, jax.core.Tracer) and block_table.size:  # (numpy: also under a jit's trace)
            ids = np.asarray(block_table)
            if ids.min() < 0 or ids.max() >= num_pages:
                raise ValueError(
                    f"block_table page ids span {ids.min()} .. {ids.max()}, outside the pool of {num_pages} pages"
                )
        dtype = jnp.dtype(dtype or config.dtype)
        fp8 = dtype == jnp.dtype(jnp.float8_e4m3fn)
        g, kd, n = config.num_kv_heads, config.head_dim, config.num_hidden_layers
        pages = lambda: jnp.zeros((num_pages, page_size, g, kd), dtype)  # noqa: E731
        scales = (lambda: jnp.ones((num_pages, page_size, g), jnp.float32)) if fp8 else None
        return cls(
            k=tuple(pages() for _ in range(n)),
            v=tuple(pages() for _ in range(n)),
            k_scale=tuple(scales() for _ in range(n)) if fp8 else None,
            v_scale=tuple(scales() for _ in range(n)) if fp8 else None,
            block_table=block_table,
            lengths=lengths,
        )

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]

    @property
    def max_length(self) -> int:
        return self.block_table.shape[1] * self.page_size

    def layer(self, i: int) -> PagedLayer:
        return PagedLayer(
            k=self.k[i],
            v=self.v[i],
            k_scale=None if self.k_scale is None else self.k_scale[i],
            v_scale=None if self.v_scale is None else self.v_scale[i],
            block_table=self.block_table,
        )

    @classmethod
    def from_layers(cls, layers, block_table, lengths) -> PagedKVCache:
        fp8 = layers[0].is_fp8
        return cls(
            k=tuple(x.k for x in layers),
            v=tuple(x.v for x in layers),
            k_scale=tuple(x.k_scale for x in layers) if fp8 else None,
            v_scale=tuple(x.v_scale for x in layers) if fp8 else None,
            block_table=block_table,
            lengths=lengths,
        )


def paged_write(layer: PagedLayer, k: jax.Array, v: jax.Array, start: jax.Array) -> PagedLayer:
    """Append ``k, v [B, T, G, K]`` at token positions ``start[b] + t`` through the block table.

    Positions past the block table's capacity are dropped (allocate pages for every written token,
    padding included, to keep them)."""
    ps, num_pages = layer.page_size, layer.k.shape[0]
    b, t = k.shape[:2]
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    idx = pos // ps
    max_pages = layer.block_table.shape[1]
    page = jnp.take_along_axis(layer.block_table, jnp.minimum(idx, max_pages - 1), axis=1)
    page = jnp.where(idx < max_pages, page, num_pages)  # out of the table: an out-of-range page -> dropped
    row = pos % ps
    if layer.is_fp8:
        kq, ks = quantize_per_token(k)
        vq, vs = quantize_per_token(v)
        return layer.replace(
            k=layer.k.at[page, row].set(kq, mode="drop"),
            v=layer.v.at[page, row].set(vq, mode="drop"),
            k_scale=layer.k_scale.at[page, row].set(ks, mode="drop"),
            v_scale=layer.v_scale.at[page, row].set(vs, mode="drop"),
        )
    return layer.replace(
        k=layer.k.at[page, row].set(k.astype(layer.k.dtype), mode="drop"),
        v=layer.v.at[page, row].set(v.astype(layer.v.dtype), mode="drop"),
    )


def paged_gather(layer: PagedLayer, dtype) -> tuple[jax.Array, jax.Array]:
    """Contiguous dequantised ``k, v [B, max_pages * page_size, G, K]`` in ``dtype`` (the prefill path)."""

    def one(pages, scales):
        g = jnp.take(pages, layer.block_table, axis=0, mode="clip")  # [B, M, ps, G, K]
        if scales is not None:
            s = jnp.take(scales, layer.block_table, axis=0, mode="clip")
            g = g.astype(jnp.float32) * s[..., None]
        return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:]).astype(dtype)

    return one(layer.k, layer.k_scale), one(layer.v, layer.v_scale)


class PageAllocator:
    """Host-side page bookkeeping for a :class:`PagedKVCache` (what a continuous-batching engine drives).

    A free list of page ids; ``reserve(seq, n)`` makes sure sequence ``seq`` owns enough pages for ``n`` tokens,
    ``free(seq)`` returns them. ``shuffle_seed`` hands pages out in a random order (tests use it to make page
    tables non-contiguous).

    Prefix caching: :meth:`publish` names a full page of a sequence by a key of its content (its tokens and every
    token before them); a later sequence whose first pages have the same keys (:meth:`match`) starts with those
    pages (``reserve(..., prefix=pages)``), shared, and does not compute them again. A page no sequence holds any
    more keeps its content while it is not needed (it counts as free, and the least recently freed of those is
    the first taken), so a request that comes back after preemption, or one that continues an earlier one, finds
    its pages there."""

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int, *, shuffle_seed: int | None = None):
        if num_pages < 1 or page_size < 1 or max_pages_per_seq < 1:
            raise ValueError(
                f"PageAllocator needs positive sizes, got num_pages={num_pages}, page_size={page_size}, "
                f"max_pages_per_seq={max_pages_per_seq}"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_pages_per_seq = max_pages_per_seq
        order = list(range(num_pages))
        if shuffle_seed is not None:
            import random

            random.Random(shuffle_seed).shuffle(order)
        self._free = order[::-1]  # pop() hands out order[0] first
        self._pages: dict[object, list[int]] = {}
        self._refs: dict[int, int] = {}  # page -> the sequences holding it (more than one: a shared prefix)
        self._key_of: dict[int, bytes] = {}  # published page -> its content key
        self._by_key: dict[bytes, int] = {}
        self._kept: dict[int, None] = {}  # published pages no sequence holds, least recently freed first

    @property
    def num_free(self) -> int:
        """Pages a sequence can take: never used or freed, and freed pages that keep a published content."""
        return len(self._free) + len(self._kept)

    @property
    def num_kept(self) -> int:
        """Free pages that keep a published content (:meth:`match` can still find them)."""
        return len(self._kept)

    def pages(self, seq) -> list[int]:
        return list(self._pages.get(seq, []))

    def num_owned(self, seq) -> int:
        """How many pages ``seq`` owns."""
        return len(self._pages.get(seq, ()))

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The pages published under ``keys[0]``, ``keys[1]``, ... for as long as there is one (a prefix)."""
        pages = []
        for key in keys:
            page = self._by_key.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def num_free_besides(self, prefix: Sequence[int]) -> int:
        """:attr:`num_free` once a sequence has started with the pages ``prefix`` (some of them may be free)."""
        return self.num_free - sum(p in self._kept for p in prefix)

    def reserve(self, seq, num_tokens: int, prefix: Sequence[int] = ()) -> list[int]:
        """Own pages for ``num_tokens`` tokens of ``seq`` (allocating what is missing); returns its page ids. A new
        sequence may start with the published pages ``prefix`` (:meth:`match`), shared with their holders."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0:
            raise ValueError(f"sequence {seq!r}: num_tokens must be an int >= 0, got {num_tokens!r}")
        need = -(-num_tokens // self.page_size)
        if need > self.max_pages_per_seq:
            raise ValueError(
                f"sequence {seq!r} needs {need} pages for {num_tokens} tokens but a block table row holds "
                f"{self.max_pages_per_seq} pages of {self.page_size}"
            )
        if prefix and self._pages.get(seq):
            raise ValueError(f"sequence {seq!r} owns pages already: a shared prefix is for a new sequence")
        if len(set(prefix)) != len(prefix):
            raise ValueError(f"a prefix for {seq!r} names a page twice: {list(prefix)}")
        if any(p not in self._key_of for p in prefix):
            raise ValueError(f"a prefix for {seq!r} names pages that hold no published content: {list(prefix)}")
        missing = need - len(self._pages.get(seq, ())) - len(prefix)
        if missing > self.num_free_besides(prefix):
            raise RuntimeError(
                f"out of KV pages: sequence {seq!r} needs {missing} more pages, {self.num_free_besides(prefix)} of "
                f"{self.num_pages} are free"
            )
        owned = self._pages.setdefault(seq, [])
        for page in prefix:
            self._kept.pop(page, None)
            self._refs[page] = self._refs.get(page, 0) + 1
            owned.append(page)
        owned.extend(self._take() for _ in range(max(missing, 0)))
        return list(owned)

    def _take(self) -> int:
        if self._free:
            page = self._free.pop()
        else:  # the least recently freed page that keeps a content gives it up
            page = next(iter(self._kept))
            del self._kept[page], self._by_key[self._key_of.pop(page)]
        self._refs[page] = 1
        return page

    def publish(self, seq, index: int, key: bytes) -> None:
        """Page ``index`` of ``seq`` is full and holds the content ``key`` names: later sequences may share it (the
        first page published under a key keeps it)."""
        owned = self._pages.get(seq)
        if owned is None:
            raise ValueError(f"publish: sequence {seq!r} owns no pages")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(owned):
            raise ValueError(f"publish: sequence {seq!r} owns pages 0 .. {len(owned) - 1}, not page {index!r}")
        page = owned[index]
        if key not in self._by_key and page not in self._key_of:
            self._by_key[key], self._key_of[page] = page, key

    def free(self, seq) -> None:
        """Let ``seq`` go of its pages (a no-op for an unknown sequence); those no other sequence holds are free,
        the published ones keeping their content until they are taken."""
        for page in reversed(self._pages.pop(seq, [])):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                del self._refs[page]
                if page in self._key_of:
                    self._kept[page] = None
                else:
                    self._free.append(page)

    def block_table(self, seqs) -> np.ndarray:
        """``[len(seqs), max_pages_per_seq]`` int32; unused entries hold page 0 (valid, never read)."""
        table = np.zeros((len(seqs), self.max_pages_per_seq), np.int32)
        for row, seq in enumerate(seqs):
            owned = self._pages.get(seq, [])
            table[row, : len(owned)] = owned
        return table

    def check(self) -> None:
        """Raise AssertionError unless the bookkeeping is whole: every page held (as often as its count says),
        free or kept, exactly once; keys and pages named both ways; only published pages kept."""
        held = collections.Counter(p for pages in self._pages.values() for p in pages)
        every = sorted([*held, *self._free, *self._kept])
        if every != list(range(self.num_pages)) or held != collections.Counter(self._refs):
            raise AssertionError(
                f"page pool corrupted: {len(held)} held + {len(self._free)} free + {len(self._kept)} kept != "
                f"{self.num_pages}, or reference counts {dict(self._refs)} != holders {dict(held)}"
            )
        if {k: p for p, k in self._key_of.items()} != self._by_key or any(p not in self._key_of for p in self._kept):
            raise AssertionError("prefix cache keys corrupted")


# ---------------------------------------------------------------------------------------------- paged cache on a mesh
#
# Data-parallel attention (the paper's attention instances): the batch is split over the mesh axes of the logical
# axis ``act_batch`` and the page pool is split the same way, so each data-parallel attention group owns a
# contiguous shard of ``num_pages / groups`` pages, addressed by LOCAL page ids (0 .. pages per shard - 1) in the
# block-table rows of its own sequences. ``model.paged_write_attend`` runs the write and the attention per group
# under ``shard_map``; pages are replicated over the other mesh axes (tensor / expert), which only the FFN uses.


KV_DTYPES = ("bfloat16", "float32", "float8_e4m3fn")  # what the paged KV cache can store (None: the model's dtype)


def check_kv_dtype(kv_dtype, name: str) -> None:
    """Raise a ValueError naming ``name`` unless ``kv_dtype`` is None or one of :data:`KV_DTYPES`."""
    if kv_dtype not in (None, *KV_DTYPES):
        raise ValueError(f"{name} must be None (the model's dtype) or one of {KV_DTYPES}, got {kv_dtype!r}")


def default_page_size(kv_dtype) -> int:
    """Tokens per KV page when none is asked for: 16, or 64 for FP8 pages (the smallest FP8 page the MFA decode
    kernel takes on a GPU; smaller FP8 pages run the pure-JAX reference there)."""
    return 64 if kv_dtype is not None and jnp.dtype(kv_dtype) == jnp.dtype(jnp.float8_e4m3fn) else 16


PAGE_AXES = ("act_batch", None, "kv_heads", "head_dim")  # pages [P, page_size, G, K]
PAGE_SCALE_AXES = ("act_batch", None, "kv_heads")  # FP8 scales [P, page_size, G]


def page_group_axes(mesh: jax.sharding.Mesh | None, rules: ShardingRules = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes that split the batch and the page pool into data-parallel attention groups (size > 1 only)."""
    if mesh is None:
        return ()
    return tuple(a for a in rules.mesh_axes("act_batch") if mesh.shape.get(a, 1) > 1)


def num_page_groups(mesh: jax.sharding.Mesh | None, rules: ShardingRules = DEFAULT_RULES) -> int:
    """How many data-parallel attention groups (page-pool shards) a mesh has; 1 without a mesh."""
    n = 1
    for a in page_group_axes(mesh, rules):
        n *= mesh.shape[a]
    return n


def check_pool_size(num_pages: int, page_size: int, groups: int) -> None:
    """Raise a ValueError unless a pool of ``num_pages`` pages of ``page_size`` tokens splits over ``groups``
    data-parallel attention groups."""
    if num_pages < 1 or page_size < 1 or num_pages % groups:
        raise ValueError(
            f"page pool needs num_pages >= 1 divisible by the {groups} data-parallel attention groups and "
            f"page_size >= 1, got num_pages={num_pages}, page_size={page_size}"
        )


@functools.cache
def _filled(shape: tuple[int, ...], fill, dtype, sharding) -> Callable[[], jax.Array]:
    """The compiled program that makes a ``fill``-valued array directly in its shards (cached, so caches and pools
    of one shape reuse it instead of compiling a fresh one each time)."""
    return jax.jit(lambda: jnp.full(shape, fill, dtype), out_shardings=sharding)


def create_page_pool(
    config: Step3Config,
    num_pages: int,
    page_size: int,
    *,
    dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
) -> dict[str, tuple[jax.Array, ...] | None]:
    """Zeroed page pools of every layer (``k``, ``v``, and for FP8 ``k_scale``, ``v_scale``) for a
    :class:`PagedKVCache` whose block table is supplied per step. With a mesh the pools are created directly in
    their shards (split over the data-parallel attention groups); ``num_pages`` counts all groups together."""
    check_pool_size(num_pages, page_size, num_page_groups(mesh, rules))
    dtype = jnp.dtype(dtype or config.dtype)
    fp8 = dtype == jnp.dtype(jnp.float8_e4m3fn)
    g, kd, n = config.num_kv_heads, config.head_dim, config.num_hidden_layers
    shape, scale_shape = (num_pages, page_size, g, kd), (num_pages, page_size, g)

    def make(shape, axes, fill, dt):
        # committed to its sharding (one device without a mesh), as the steps' donated outputs are: a step then
        # compiles once, not once for the fresh pool and again for the pool it returns
        if mesh is None:
            return jax.device_put(jnp.full(shape, fill, dt), jax.devices()[0])
        return _filled(shape, fill, dt, rules.sharding(mesh, axes, shape))()

    return {
        "k": tuple(make(shape, PAGE_AXES, 0, dtype) for _ in range(n)),
        "v": tuple(make(shape, PAGE_AXES, 0, dtype) for _ in range(n)),
        "k_scale": tuple(make(scale_shape, PAGE_SCALE_AXES, 1, jnp.float32) for _ in range(n)) if fp8 else None,
        "v_scale": tuple(make(scale_shape, PAGE_SCALE_AXES, 1, jnp.float32) for _ in range(n)) if fp8 else None,
    }

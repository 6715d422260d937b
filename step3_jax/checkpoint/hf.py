"""Hugging Face Step-3 checkpoints (``stepfun-ai/step3``, ``stepfun-ai/step3-fp8``): load, save, inspect.

``load_pretrained`` validates the whole checkpoint against the model its ``config.json`` describes (keys,
shapes, dtypes, file integrity) from the safetensors headers alone, before any tensor is read. Then it streams
the tensors one at a time: read into one host buffer (only the part that this process's devices hold, so
stacked experts split over processes, and matrices split by tensor parallelism, are read once in all),
converted to the module layout (a view), and placed with ``jax.make_array_from_callback`` so every device
receives only its own slice of its sharding. Host memory stays near the size of the largest tensor, never the
model.

Block-FP8 checkpoints (``X.weight`` float8_e4m3fn + ``X.weight_scale_inv`` float32 per 128 x 128 block) load
into an FP8 model (``quantization="fp8"``, the default for such a checkpoint) as they are: the attention
projections (q_proj, wq, k_proj, v_proj, o_proj), dense MLPs, shared and routed experts keep the checkpoint's
FP8 bytes and scales, with no dequantise / requantise step; a float checkpoint loaded with ``quantization="fp8"``
has those weights block-quantised on the way. With ``quantization=None`` every FP8 tensor is dequantised to the
parameter dtype. Norms, embeddings, the router and lm_head are float in both formats.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from step3_jax import quant
from step3_jax.checkpoint.hf_keys import (
    HF_SCALE_SUFFIX,
    SCALE_SUFFIX,
    VISION_PREFIXES,
    from_hf_layout,
    hf_layout_shape,
    hf_name,
    is_fp8,
    is_scale,
    is_vision_key,
    matrix_split,
    scale_key,
    shares_first_axis,
    to_hf_layout,
)
from step3_jax.checkpoint.safetensors_io import (
    DTYPES,
    SafetensorsWriter,
    TensorInfo,
    TensorSpec,
    dtype_name,
    read_extent,
    read_header,
    read_tensor,
)
from step3_jax.config import Step3Config
from step3_jax.model import Step3ForCausalLM, count_params, param_shardings
from step3_jax.sharding import DEFAULT_RULES, ShardingRules

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r".*-\d{5}-of-\d{5}\.safetensors")  # one file of a sharded checkpoint, by HF's naming
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
STEP3_MODEL_TYPES = ("step3_vl", "step3_text")
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size")
FLOAT_SOURCES = ("F32", "BF16", "F16", "F64")  # loadable (converted) into a float parameter
SCALE_SOURCES = ("F32", "BF16", "F16")
FP8_SOURCE = "F8_E4M3"
MAX_LISTED = 20
_AUTO = "auto"


# ---------------------------------------------------------------------- finding and validating the files


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint folder as found on disk: its config.json and the header entry of every tensor."""

    folder: Path
    hf_config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[Path]
    unindexed: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> file: in a shard, not in the index


def _refuse_pickle(folder: Path, names: list[str]):
    raise ValueError(
        f"only safetensors checkpoints are supported; {folder} has {', '.join(names)} (PyTorch pickle format, "
        "which is never unpickled here: it can run arbitrary code). Convert the weights to safetensors first."
    )


def _find_files(path: Path) -> tuple[Path, Path | None, list[Path]]:
    """(folder, index file or None, safetensors files when there is no index)."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path.parent, [path.name])
        if path.name.endswith(".safetensors"):
            return path.parent, None, [path]
        if path.name.endswith(".index.json"):
            return path.parent, path, []
        raise ValueError(f"{path}: not a checkpoint folder, a .safetensors file or a safetensors index")
    if (path / INDEX_NAME).is_file():
        return path, path / INDEX_NAME, []
    if (path / SINGLE_NAME).is_file():
        return path, None, [path / SINGLE_NAME]
    files = sorted(path.glob("*.safetensors"))
    shards = [f.name for f in files if _SHARD_NAME.fullmatch(f.name)]
    if shards:
        raise FileNotFoundError(
            f"{path} holds shards of a sharded checkpoint ({', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''})"
            f" but no {INDEX_NAME} naming them: an interrupted save or an incomplete download? Save or download it "
            "again (the shards alone may mix two saves, so they are not loaded)"
        )
    if files:
        return path, None, files
    pickles = sorted(
        f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES or f.name.endswith(".bin.index.json")
    )
    if pickles:
        _refuse_pickle(path, pickles)
    raise FileNotFoundError(f"{path}: no {INDEX_NAME}, {SINGLE_NAME} or other *.safetensors file")


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{index}: not valid JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(f"{index}: no 'weight_map' object mapping tensor names to file names")
    return weight_map


def read_hf_config(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``config.json`` of a checkpoint folder and check that it describes Step-3."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG_NAME} (it defines the model the weights belong to)")
    try:
        hf = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    check_step3_config(hf, str(path))
    return hf


def check_step3_config(hf: Any, where: str = "config") -> None:
    """Raise ValueError unless ``hf`` is a Step-3 config (VLM ``step3_vl`` with ``text_config``, or ``step3_text``)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where} is not a Step-3 config: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    text = hf.get("text_config", hf)
    text_type = text.get("model_type") if isinstance(text, dict) else None
    if model_type not in STEP3_MODEL_TYPES or (model_type == "step3_vl" and text_type not in (None, "step3_text")):
        raise ValueError(
            f"{where} is not a Step-3 config: model_type {model_type!r}"
            + (f" with text_config model_type {text_type!r}" if model_type == "step3_vl" else "")
            + " (expected 'step3_vl' with a 'step3_text' text_config, or 'step3_text')"
        )
    if not isinstance(text, dict):
        raise ValueError(f"{where}: text_config must be an object, got {type(text).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in text]
    if missing:
        raise ValueError(f"{where}: Step-3 config lacks the field(s) {', '.join(missing)}")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Find the files of a checkpoint, read config.json and every safetensors header (no tensor data)."""
    folder, index, files = _find_files(Path(path))
    hf_config = read_hf_config(folder)
    if index is not None:
        weight_map = _read_index(index)
        names = sorted(set(weight_map.values()))
        pickles = [n for n in names if Path(n).suffix in PICKLE_SUFFIXES]
        if pickles:
            _refuse_pickle(folder, pickles)
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names file(s) absent from {folder}: {', '.join(absent)}")
        files = [folder / n for n in names]
    headers = {f: read_header(f)[0] for f in files}
    tensors: dict[str, TensorInfo] = {}
    if index is not None:
        for key, name in weight_map.items():
            info = headers[folder / name].get(key)
            if info is None:
                raise ValueError(f"{index} maps {key!r} to {name}, which has no such tensor")
            tensors[key] = info
        unindexed = {key: f.name for f, header in headers.items() for key in header if key not in weight_map}
    else:
        for f, header in headers.items():
            for key, info in header.items():
                if key in tensors:
                    raise ValueError(f"tensor {key!r} is in both {tensors[key].file.name} and {f.name}")
                tensors[key] = info
    return Checkpoint(folder, hf_config, tensors, files, unindexed if index is not None else {})


# ---------------------------------------------------------------------- matching tensors to parameters


@dataclasses.dataclass(frozen=True)
class _Load:
    """One module weight (plus its FP8 scale parameter, if the model keeps it in FP8) and its source tensors."""

    path: tuple
    shape: tuple[int, ...]
    dtype: np.dtype
    source: TensorInfo
    scale_path: tuple | None = None  # the model's X_scale_inv parameter (an FP8 weight)
    scale_shape: tuple[int, ...] | None = None
    source_scale: TensorInfo | None = None  # the checkpoint's X.weight_scale_inv (an FP8 tensor)

    @property
    def nbytes(self) -> int:
        return self.source.nbytes + (self.source_scale.nbytes if self.source_scale else 0)


@dataclasses.dataclass
class CheckpointReport:
    """How a checkpoint matches the model of its config: what would load, and every problem found."""

    folder: Path
    config: Step3Config
    tensors: dict[str, TensorInfo]
    loads: list[_Load]
    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[str]
    wrong_dtype: list[str]
    vision: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape or self.wrong_dtype)

    def problems(self) -> list[str]:
        out = []
        for title, items in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("wrong shapes", self.wrong_shape),
            ("wrong dtypes", self.wrong_dtype),
        ):
            if items:
                shown = "\n    ".join(items[:MAX_LISTED])
                more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
                out.append(f"{title} ({len(items)}):\n    {shown}{more}")
        return out

    def error_message(self) -> str:
        return f"checkpoint {self.folder} does not match the Step-3 model of its config.json; nothing was loaded.\n" + (
            "\n".join(self.problems())
        )

    @property
    def dtype_breakdown(self) -> dict[str, tuple[int, int, int]]:
        """safetensors dtype -> (tensors, elements, bytes), over every tensor in the files."""
        out: dict[str, list[int]] = {}
        for t in self.tensors.values():
            row = out.setdefault(t.dtype, [0, 0, 0])
            row[0] += 1
            row[1] += t.size
            row[2] += t.nbytes
        return {k: tuple(v) for k, v in sorted(out.items())}

    def parameter_counts(self) -> dict[str, int]:
        """Elements in the files (text weights without FP8 scales, scales, vision) and the model's own counts."""
        text = scales = vision = 0
        for key, t in self.tensors.items():
            if is_vision_key(key):
                vision += t.size
            elif key.endswith(".weight_scale_inv"):
                scales += t.size
            else:
                text += t.size
        model = count_params(self.config)
        return {
            "checkpoint_text": text,
            "checkpoint_fp8_scales": scales,
            "checkpoint_vision": vision,
            "model_total": model["total"],
            "model_active": model["active"],
        }


def _block_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-2], math.ceil(shape[-2] / quant.BLOCK), math.ceil(shape[-1] / quant.BLOCK))


def _plan(
    folder: Path, config: Step3Config, state, tensors: dict[str, TensorInfo], unindexed: dict[str, str] | None = None
) -> CheckpointReport:
    """Match the model's parameters (``state``) to the checkpoint's tensors. ``unindexed``: tensors its shards hold
    that its index does not name (a missing key found there says so)."""
    unindexed = unindexed or {}
    flat = {tuple(path): var for path, var in nnx.to_flat_state(state)}
    loads, missing, wrong_shape, wrong_dtype, used = [], [], [], [], set()
    for path, var in flat.items():
        if is_scale(path):
            continue  # handled with its weight
        shape, dtype = tuple(var.shape), np.dtype(var.dtype)
        scale_path = (*path[:-1], str(path[-1]) + SCALE_SUFFIX)
        scale_var = flat.get(scale_path)
        key = hf_name(path)
        info = tensors.get(key)
        if info is None:
            where = unindexed.get(key)
            missing.append(key if where is None else f"{key} (in {where}, but the index does not name it)")
            continue
        used.add(key)
        skey = scale_key(key)
        sinfo = tensors.get(skey)
        if sinfo is not None:
            used.add(skey)
        want = hf_layout_shape(path, shape, dtype)
        if info.shape != want:
            wrong_shape.append(f"{key}: expected {list(want)}, found {list(info.shape)}")
            continue
        if info.dtype == FP8_SOURCE and len(want) >= 2:
            if sinfo is None:
                missing.append(f"{skey} (the block scales of float8 {key})")
                continue
            if sinfo.shape != _block_shape(want):
                wrong_shape.append(f"{skey}: expected {list(_block_shape(want))}, found {list(sinfo.shape)}")
                continue
            if sinfo.dtype not in SCALE_SOURCES:
                wrong_dtype.append(f"{skey}: dtype {sinfo.dtype}, expected F32 block scales")
                continue
        elif info.dtype in FLOAT_SOURCES:
            if sinfo is not None:
                wrong_dtype.append(f"{key}: dtype {info.dtype}, but it has block scales {skey}: expected F8_E4M3")
                continue
            sinfo = None
        else:
            allowed = ", ".join(FLOAT_SOURCES) + (", F8_E4M3 with scales" if len(want) >= 2 else "")
            wrong_dtype.append(f"{key}: dtype {info.dtype} cannot be loaded into a {dtype} parameter ({allowed})")
            continue
        loads.append(
            _Load(
                path=path,
                shape=shape,
                dtype=dtype,
                source=info,
                scale_path=scale_path if scale_var is not None else None,
                scale_shape=tuple(scale_var.shape) if scale_var is not None else None,
                source_scale=sinfo,
            )
        )
    vision = [k for k in tensors if k not in used and is_vision_key(k)]
    unexpected = [k for k in tensors if k not in used and not is_vision_key(k)]
    return CheckpointReport(folder, config, tensors, loads, missing, unexpected, wrong_shape, wrong_dtype, vision)


def _normalise_dtype(dtype) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    return name


def config_from_checkpoint(hf_config: dict, *, dtype=None, quantization: str | None = _AUTO) -> Step3Config:
    """The model config of a checkpoint: ``dtype`` (default: the config's torch_dtype) and ``quantization``
    ("auto": what the checkpoint's quantization_config says; "fp8"; None: plain ``dtype`` weights)."""
    overrides: dict[str, Any] = {}
    if dtype is not None:
        overrides["param_dtype"] = _normalise_dtype(dtype)
    if quantization != _AUTO:
        if quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be 'auto', 'fp8' or None, got {quantization!r}")
        overrides["quantization"] = quantization
    return Step3Config.from_hf_config(hf_config, **overrides)


def inspect_checkpoint(
    path: str | os.PathLike, *, dtype=None, quantization: str | None = _AUTO, mesh: Mesh | None = None, rules=None
) -> CheckpointReport:
    """Check a checkpoint against the model of its config.json from the headers alone (no tensor is read)."""
    ckpt = open_checkpoint(path)
    try:
        config = config_from_checkpoint(ckpt.hf_config, dtype=dtype, quantization=quantization)
    except ValueError as e:
        raise ValueError(f"{ckpt.folder / CONFIG_NAME}: {e}") from e
    rules = rules or DEFAULT_RULES
    abstract = nnx.eval_shape(lambda: Step3ForCausalLM(config, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
    return _plan(ckpt.folder, config, nnx.state(abstract), ckpt.tensors, ckpt.unindexed)


# ---------------------------------------------------------------------- loading


def _host_device():
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu): use the default device
        return jax.local_devices()[0]


@functools.cache
def _jitted(fn, **kwargs):
    return jax.jit(functools.partial(fn, **kwargs))


def _host_blockwise(fn, *arrays: np.ndarray, **kwargs):
    """Run a ``quant`` helper on the host CPU, one expert at a time for stacked weights (so its float32
    temporaries stay the size of one expert), into preallocated numpy outputs."""
    device = _host_device()
    jfn = _jitted(fn, **kwargs)

    def one(*xs):
        return jax.tree.map(np.asarray, jfn(*(jax.device_put(x, device) for x in xs)))

    if arrays[0].ndim <= 2:
        return one(*arrays)
    outs, treedef = None, None
    for i in range(arrays[0].shape[0]):
        leaves, treedef = jax.tree.flatten(one(*(a[i] for a in arrays)))
        if outs is None:
            outs = [np.empty((arrays[0].shape[0], *leaf.shape), leaf.dtype) for leaf in leaves]
        for out, leaf in zip(outs, leaves, strict=True):
            out[i] = leaf
    return jax.tree.unflatten(treedef, outs)


def _rows(shape: tuple[int, ...], sharding) -> tuple[int, int] | None:
    """The rows ``[lo, hi)`` along the first axis of an array of ``shape`` in ``sharding`` that this process's
    devices hold (a covering span); None for a scalar."""
    if not shape:
        return None
    spans = [index[0].indices(shape[0])[:2] for index in sharding.addressable_devices_indices_map(shape).values()]
    return _union(*spans) if spans else (0, 0)


def _union(*spans: tuple[int, int]) -> tuple[int, int]:
    return min(lo for lo, _ in spans), max(hi for _, hi in spans)


def _box(shape: tuple[int, ...], sharding) -> list[tuple[int, int]]:
    """Per axis, the span of an array of ``shape`` in ``sharding`` that this process's devices hold (the box
    covering them)."""
    indices = list(sharding.addressable_devices_indices_map(shape).values())
    if not indices:
        return [(0, 0)] * len(shape)
    return [_union(*(index[a].indices(n)[:2] for index in indices)) for a, n in enumerate(shape)]


def _flat_span(shape: tuple[int, ...], box: list[tuple[int, int]], axes: range) -> tuple[int, int] | None:
    """The span of ``axes`` flattened into one (as the HF layout stores a matrix's input or output axes) that the
    box covers, if it is one run (None otherwise)."""
    partial = [a for a in axes if box[a] != (0, shape[a])]
    if not partial:
        return 0, math.prod(shape[a] for a in axes)
    first = partial[0]
    if partial[1:] or any(shape[a] != 1 for a in axes if a < first):
        return None
    inner = math.prod(shape[a] for a in axes if a > first)
    return box[first][0] * inner, box[first][1] * inner


def _extent_bytes(info: TensorInfo, spans: Sequence[tuple[int, int]]) -> int:
    """The bytes :func:`read_tensor` reads of this box (:func:`read_extent`)."""
    return math.prod(hi - lo for lo, hi in read_extent(info, spans=spans)) * np.dtype(info.np_dtype).itemsize


def _place(
    host: np.ndarray, dtype: np.dtype, sharding, shape: tuple[int, ...], offsets: Sequence[tuple[int, int]] = ()
) -> jax.Array:
    """Put a host array (any layout, any float dtype) holding part of an array of ``shape`` into ``sharding``:
    along each ``(axis, lo)`` of ``offsets`` it starts at ``lo`` (elsewhere it is whole). Each device receives only
    its slice, converted to ``dtype`` slice by slice."""

    def shard(index):
        index = list(index)
        for axis, lo in offsets:
            start, stop = index[axis].indices(shape[axis])[:2]
            index[axis] = slice(start - lo, stop - lo)
        return np.asarray(host[tuple(index)], dtype=dtype)

    return jax.make_array_from_callback(shape, sharding, shard, dtype=dtype)


def _load_one(load: _Load, shardings: dict) -> tuple[dict[tuple, jax.Array], int]:
    """Read one checkpoint tensor (and its scales) into its parameter(s): of a float tensor for a float parameter
    and of an FP8 weight kept with its scales, only the box this process's devices hold (for a matrix stored
    transposed, the runs of its HF rows that hold their inputs and outputs); of one (de)quantised on the way only
    the rows, where the parameter's first axis is the tensor's and the quantisation blocks allow. Returns the
    arrays and the number of bytes read."""
    sharding = shardings[load.path]
    fp8_source, kept = load.source.dtype == FP8_SOURCE, load.scale_path is not None
    out = {}
    if fp8_source and kept:  # an FP8 parameter: keep the checkpoint's bytes and scales, each read for its sharding
        nread = 0
        parts = ((load.path, load.source, load.shape, load.dtype),
                 (load.scale_path, load.source_scale, load.scale_shape, np.float32))  # fmt: skip
        for path, info, shape, dtype in parts:
            box = _box(shape, shardings[path])
            data = read_tensor(info, spans=box)
            out[path] = _place(data.astype(dtype, copy=False), np.dtype(dtype), shardings[path], shape,
                               [(a, lo) for a, (lo, _) in enumerate(box)])  # fmt: skip
            nread += _extent_bytes(info, box)
        return out, nread
    if not (fp8_source or kept):  # a float tensor for a float parameter: read the box this process holds
        box = _box(load.shape, sharding)
        split, spans = matrix_split(load.path), box
        if split is not None:  # a matrix, stored transposed: [experts,] output axes flattened, input axes flattened
            lead = int(shares_first_axis(load.path, load.dtype))  # (the expert axis, which the HF layout shares)
            groups = (range(lead, split), range(split, len(load.shape)))
            flat = [_flat_span(load.shape, box, axes) for axes in groups]
            for axes, span in zip(groups, flat, strict=True):
                if span is None:  # not one run of the HF tensor: read all of these axes
                    box[axes.start : axes.stop] = [(0, load.shape[a]) for a in axes]
            spans = [*box[:lead], *(span or (0, math.prod(load.shape[a] for a in axes))
                                     for axes, span in reversed(list(zip(groups, flat, strict=True))))]  # fmt: skip
        data = read_tensor(load.source, spans=spans)
        value = from_hf_layout(load.path, data, tuple(hi - lo for lo, hi in box), load.dtype)
        out[load.path] = _place(value, load.dtype, sharding, load.shape, [(a, lo) for a, (lo, _) in enumerate(box)])
        return out, _extent_bytes(load.source, spans)
    # FP8 dequantised, or float block-quantised, on the way: the rows this process holds where the first axis is
    # the parameter's too and the quantisation blocks do not span it
    rows = None
    if shares_first_axis(load.path, load.dtype) and load.shape:
        rows = _rows(load.shape, sharding)
        if kept:  # block-quantise: the weight and its scales come from the same rows
            rows = _union(rows, _rows(load.scale_shape, shardings[load.scale_path]))
        scales = load.scale_shape if kept else load.source_scale.shape
        if scales[0] != load.source.shape[0]:
            rows = None  # quantisation blocks span the first axis (a 2-D weight): read it whole
    shape = list(load.shape)
    if rows is not None:
        shape[0] = rows[1] - rows[0]
    shape, lo = tuple(shape), rows[0] if rows else 0
    data = read_tensor(load.source, rows)
    nread = data.nbytes
    if kept:  # a float checkpoint weight for an FP8 parameter: block-quantise it
        q, scale = _host_blockwise(quant.quantize_blockwise, data)
        out[load.path] = _place(q, load.dtype, sharding, load.shape, ((0, lo),))
        out[load.scale_path] = _place(
            scale, np.dtype(np.float32), shardings[load.scale_path], load.scale_shape, ((0, lo),)
        )
        return out, nread
    scale = read_tensor(load.source_scale, rows).astype(np.float32)
    nread += scale.nbytes
    value = _host_blockwise(quant.dequantize_blockwise, data, scale, dtype=load.dtype)
    del data, scale
    value = from_hf_layout(load.path, value, shape, load.dtype)
    out[load.path] = _place(value, load.dtype, sharding, load.shape, ((0, lo),))
    return out, nread


def load_tensors(
    report: CheckpointReport, shardings: Mapping[tuple, jax.sharding.Sharding], *, progress: bool = True
) -> dict[tuple, jax.Array]:
    """Read the tensors of the parameters named in ``shardings`` (model paths as ``nnx.to_flat_state`` gives them,
    each with its target sharding) straight into those shardings, in file order; the checkpoint's other tensors
    are not read. An FP8 weight and its scale parameter go together (name both, or neither). A process reads of
    each tensor only the part its own devices hold, so experts split over processes are read once in all: of a
    tensor in the parameter's layout (FP8 weights and scales, embeddings, norms) the box those devices hold, one
    contiguous read per index of the axes before its last split axis; of a float matrix stored transposed
    (``[out, in]``) the runs of its HF rows that hold the outputs (tensor parallel gate/up, query heads) and
    inputs (tensor parallel down, ``o_proj``) they hold, after the expert axis for stacked experts (where a split
    makes them no single run, all of that side). A weight (de)quantised on the way is read by rows where its
    first axis is the parameter's and its quantisation blocks do not span it, else whole. ``report`` is an ``ok``
    :func:`inspect_checkpoint` result. Returns ``{path: array}``."""
    if not report.ok:
        raise ValueError(report.error_message())
    known = {ld.path for ld in report.loads} | {ld.scale_path for ld in report.loads if ld.scale_path}
    unknown = sorted(map(str, set(shardings) - known))
    if unknown:
        raise ValueError(f"no checkpoint tensor loads into {len(unknown)} of the named parameters: {unknown[:5]}")
    loads = [ld for ld in report.loads if ld.path in shardings]
    loads.sort(key=lambda ld: (str(ld.source.file), ld.source.offset))
    total = sum(ld.nbytes for ld in loads)
    values: dict[tuple, jax.Array] = {}
    nread = 0
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
        for i, load in enumerate(loads):
            arrays, n = _load_one(load, shardings)
            values.update(arrays)
            nread += n
            bar.update(load.nbytes)
            bar.set_postfix_str(f"{i + 1}/{len(loads)} tensors", refresh=False)
    log.info(
        "loaded %d tensors (%.2f GB) from %s in %.1f s; this process read %d of their %d bytes",
        len(loads),
        total / 1e9,
        report.folder,
        time.perf_counter() - t0,
        nread,
        total,
    )
    return values


def load_pretrained(
    path: str | os.PathLike,
    *,
    dtype=None,
    quantization: str | None = _AUTO,
    mesh: Mesh | None = None,
    rules: ShardingRules | None = None,
    progress: bool = True,
) -> Step3ForCausalLM:
    """Load a Hugging Face Step-3 checkpoint (folder with config.json and safetensors) into the model.

    Args:
      path: the checkpoint folder (``model.safetensors.index.json`` + shards, or one ``model.safetensors``),
        or one ``.safetensors`` file / index inside it.
      dtype: parameter dtype, ``bfloat16`` or ``float32``; default the checkpoint's ``torch_dtype``.
      quantization: ``"auto"`` (as the checkpoint's ``quantization_config`` says), ``"fp8"`` (attention
        projections, dense MLP, shared and routed expert weights kept / made block-FP8), or ``None`` (every FP8
        tensor dequantised to ``dtype``).
      mesh, rules: place every parameter directly in its sharding on ``mesh`` (default: one device).
      progress: show a progress bar (tensors and bytes).

    Raises FileNotFoundError for a missing folder / config / shard, and ValueError naming every missing,
    unexpected, mis-shaped or mis-typed key (vision weights are skipped, not unexpected), a corrupt or
    truncated file, a config that is not Step-3, or a pickle checkpoint; all before any tensor is loaded.
    """
    rules = rules or DEFAULT_RULES
    report = inspect_checkpoint(path, dtype=dtype, quantization=quantization, mesh=mesh, rules=rules)
    if not report.ok:
        raise ValueError(report.error_message())
    config = report.config
    if report.vision:
        log.info(
            "skipping %d vision tensors (%s...) of %s: the text model does not use them",
            len(report.vision),
            "/".join(p.rstrip(".") for p in VISION_PREFIXES),
            report.folder,
        )
    casts = Counter(
        (ld.source.dtype, ld.dtype.name)
        for ld in report.loads
        if ld.source.np_dtype != ld.dtype and not is_fp8(ld.dtype) and ld.source.dtype != FP8_SOURCE
    )
    for (src, dst), n in casts.items():
        log.info("converting %d %s tensors to %s", n, src, dst)
    quantised = [ld.source.key for ld in report.loads if is_fp8(ld.dtype) and ld.source.dtype != FP8_SOURCE]
    if quantised and any(k.endswith(HF_SCALE_SUFFIX) for k in report.tensors):  # (an FP8 checkpoint)
        # an FP8 checkpoint that keeps some weights in float (e.g. its quantization_config's ignored layers): the
        # model holds every such weight in FP8, so they are block-quantised here and move by FP8 rounding
        log.warning(
            "%d weights the checkpoint stores in float are block-quantised to FP8 on load (the model keeps every "
            "attention, MLP and expert weight in FP8): %s%s; load with quantization=None to keep them exact",
            len(quantised),
            ", ".join(quantised[:3]),
            ", ..." if len(quantised) > 3 else "",
        )

    abstract = nnx.eval_shape(lambda: Step3ForCausalLM(config, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(param_shardings(state, mesh, rules)))
    else:
        single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = {tuple(p): single for p, _ in nnx.to_flat_state(state)}

    values = load_tensors(report, shardings, progress=progress)
    for p, var in nnx.to_flat_state(state):
        var.set_value(values.pop(tuple(p)))
    model = nnx.merge(graphdef, state)
    set_checkpoint_folder(model, report.folder)
    return model


# The folder each loaded model came from (weakly held: forgotten with the model), for its tokenizer.
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checkpoint_folder(model) -> Path | None:
    """The checkpoint folder ``model`` was loaded from (:func:`load_pretrained`, or an AFD runner's
    ``from_checkpoint``), else None. The engine takes its tokenizer from there when none is given."""
    try:
        return _SOURCES.get(model)
    except TypeError:  # (not weakly referable)
        return None


def set_checkpoint_folder(model, folder) -> None:
    """Record that ``model`` (a model, or anything that runs one, such as an AFD runner) holds the weights of the
    checkpoint in ``folder``, so that :func:`checkpoint_folder` (and so the engine's tokenizer) finds it. Held
    weakly: forgotten with ``model``. ``folder=None`` forgets it."""
    if folder is None:
        _SOURCES.pop(model, None)
    else:
        _SOURCES[model] = Path(folder)


# ---------------------------------------------------------------------- saving


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"`` (GB = 10**9, GiB = 2**30)."""
    if isinstance(size, bool):
        raise ValueError(f"shard_size must be a number of bytes or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise ValueError(f"shard_size must be a number of bytes or a string like '5GB', got {size!r}")
        unit = (m.group(2) or "B").upper()
        scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"shard_size must be positive, got {size!r}")
    return value


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_pretrained(
    model: Step3ForCausalLM,
    path: str | os.PathLike,
    *,
    shard_size: int | str = "5GB",
    dtype=None,
    progress: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint: safetensors shards ``model-0000i-of-0000N.safetensors`` of at
    most ``shard_size`` bytes each (a bigger tensor gets a shard of its own), ``model.safetensors.index.json``
    and ``config.json``. FP8 models are written in the block-FP8 format (``X.weight`` float8_e4m3fn +
    ``X.weight_scale_inv`` + ``quantization_config``). ``dtype`` casts the non-FP8 weights (default: as stored).

    Tensors are gathered to the host one at a time; each file is written under a temporary name and renamed
    when complete; an index already in ``path`` is removed first and the new one written last, so an interrupted
    save never looks like a checkpoint (not even over an earlier one).
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    limit = parse_size(shard_size)
    config: Step3Config = model.config
    if dtype is not None:
        config = dataclasses.replace(config, param_dtype=_normalise_dtype(dtype))
    entries = []
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        keep = is_fp8(value.dtype) or is_scale(p)
        out_dtype = np.dtype(value.dtype) if keep or dtype is None else np.dtype(jnp.dtype(config.param_dtype))
        spec = TensorSpec(hf_name(p), dtype_name(out_dtype), hf_layout_shape(p, value.shape, value.dtype))
        entries.append((tuple(p), value, spec))

    shards: list[list] = [[]]
    used = 0
    for entry in entries:
        nbytes = entry[2].nbytes
        if shards[-1] and used + nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += nbytes
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    stale = sorted(
        f.name for f in folder.glob("model*.safetensors") if f.name not in names and not f.name.startswith(".")
    )
    if stale:
        log.warning("%s also holds %s from an earlier save; the new index does not use them", folder, stale)

    # An earlier checkpoint here stops being one before its shards are replaced, so a save that fails part-way
    # leaves no index that points at a mix of old and new shards (and the loader refuses shards without one).
    (folder / INDEX_NAME).unlink(missing_ok=True)
    total = sum(e[2].nbytes for e in entries)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="saving", disable=not progress) as bar:
        for name, shard in zip(names, shards, strict=True):
            with SafetensorsWriter(folder / name, [e[2] for e in shard], {"format": "pt"}) as writer:
                for p, value, spec in shard:
                    host = to_hf_layout(p, np.asarray(jax.device_get(value)))
                    writer.write(host.astype(DTYPES[spec.dtype], copy=False))
                    weight_map[spec.key] = name
                    bar.update(spec.nbytes)
    _write_json(folder / CONFIG_NAME, config.to_hf_config())
    _write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    log.info("saved %d tensors (%.2f GB) in %d file(s) to %s", len(entries), total / 1e9, n, folder)
    return folder

"""Reading and writing safetensors files one tensor at a time, with numpy (+ ml_dtypes for BF16 / FP8).

The format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative to the
end of the header), then the raw little-endian tensor bytes. Parsing the header here (rather than through
``safetensors.safe_open``, whose numpy backend has no float8) lets every tensor be validated, truncation
included, before any data is read, and lets a tensor be read straight into one fresh buffer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype name, shape, absolute byte offset and size."""

    key: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def dtype_name(dtype) -> str:
    """numpy / jax dtype -> safetensors dtype name."""
    try:
        return DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors encoding") from None


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of a safetensors file: ``({key: TensorInfo}, metadata)``.

    Raises ValueError naming the file on anything malformed: a short or oversized header, bad JSON, an unknown
    dtype, a size that disagrees with the shape, overlapping tensors, or data past the end of the file (a
    truncated download).
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {file_size} bytes; truncated or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > file_size:
            raise ValueError(
                f"{path}: not a valid safetensors file (header length {n} does not fit a file of {file_size} "
                "bytes; truncated or corrupt)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (JSON is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, file_size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for {key!r}: {entry!r}") from None
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not all(_is_int(v) for v in (*shape, begin, end))
        ):
            raise ValueError(
                f"{path}: corrupt safetensors header entry for {key!r} (dtype must be a string, shape and "
                f"data_offsets lists of integers): {entry!r}"
            )
        shape = tuple(shape)
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
        if any(s < 0 for s in shape) or begin < 0 or end < begin:
            raise ValueError(f"{path}: tensor {key!r} has invalid shape {shape} or offsets [{begin}, {end}]")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise ValueError(
                f"{path}: tensor {key!r} of dtype {dtype} and shape {list(shape)} needs {nbytes} bytes but its "
                f"offsets [{begin}, {end}] span {end - begin} (corrupt header)"
            )
        if end > data_size:
            raise ValueError(
                f"{path}: truncated: tensor {key!r} ends at byte {data_start + end} but the file has {file_size} "
                "bytes (an incomplete download or copy?)"
            )
        tensors[key] = TensorInfo(key, path, dtype, shape, data_start + begin, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.key) for t in tensors.values() if t.nbytes)
    for (_, end_a, key_a), (begin_b, _, key_b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise ValueError(f"{path}: corrupt safetensors header: tensors {key_a!r} and {key_b!r} overlap")
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    return tensors, metadata


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Runs of a tensor closer than this are read as one (the bytes between them too): the OS reads whole pages and
# ahead, so skipping a smaller gap saves no reading, and one read per small run costs more than it saves.
MIN_SKIP_BYTES = 64 * 1024


def _spans(info: TensorInfo, rows, cols, spans) -> list[tuple[int, int]]:
    """One ``(lo, hi)`` per axis from read_tensor's arguments, checked against the tensor's shape."""
    shape = info.shape
    box = list(spans) if spans is not None else [None] * len(shape)
    if len(box) != len(shape):
        raise ValueError(f"{info.key}: {len(box)} spans for a tensor of {len(shape)} axes")
    if rows is not None and shape:
        box[0] = rows
    if cols is not None and len(shape) >= 2:
        box[1] = cols
    for a, span in enumerate(box):
        box[a] = span = (0, shape[a]) if span is None else (int(span[0]), int(span[1]))
        if not 0 <= span[0] <= span[1] <= shape[a]:
            lo, hi = span
            what = f"{('rows', 'columns')[a]} [{lo}, {hi}) are" if a < 2 else f"span [{lo}, {hi}) is"
            where = ("first", "second")[a] + " axis" if a < 2 else f"axis {a}"
            raise ValueError(f"{info.key}: {what} outside its {where} of {shape[a]}")
    return box


def read_extent(
    info: TensorInfo,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
    *,
    spans: Sequence[tuple[int, int] | None] | None = None,
) -> list[tuple[int, int]]:
    """The box :func:`read_tensor` reads for these arguments: theirs, widened to the whole of an axis wherever the
    runs of bytes it would read one by one lie closer than :data:`MIN_SKIP_BYTES`."""
    return _widen(info, _spans(info, rows, cols, spans))


def _widen(info: TensorInfo, box: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """:func:`read_extent` of a checked box (a new list)."""
    shape, box = info.shape, list(box)
    if any(lo == hi for lo, hi in box):
        return box  # (an empty box: nothing is read)
    item = np.dtype(info.np_dtype).itemsize
    partial = [a for a, span in enumerate(box) if span != (0, shape[a])]
    while partial and partial[-1] > 0:  # (a box split only along the first axis is one run)
        last = partial[-1]
        stride = item * math.prod(shape[last + 1 :])
        if stride * (shape[last] - (box[last][1] - box[last][0])) >= MIN_SKIP_BYTES:
            break
        box[last] = (0, shape[last])
        partial.pop()
    return box


def read_tensor(
    info: TensorInfo,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
    *,
    spans: Sequence[tuple[int, int] | None] | None = None,
) -> np.ndarray:
    """Read one tensor into a fresh numpy array (nothing else of the file is read or mapped); with ``rows=(lo,
    hi)``, only its slice ``[lo:hi]`` along the first axis (one contiguous read), with ``cols`` also only
    ``[lo:hi]`` along the second, and with ``spans`` (one ``(lo, hi)`` or None = whole per axis) the box they
    give: one contiguous read per index of the axes before the last partial one. Where those runs would lie
    closer than :data:`MIN_SKIP_BYTES`, the box widened as :func:`read_extent` says is read, and the result is a
    view of it."""
    shape, want = info.shape, _spans(info, rows, cols, spans)
    box = _widen(info, want)
    out = np.empty(tuple(hi - lo for lo, hi in box), info.np_dtype)
    partial = [a for a, (lo, hi) in enumerate(box) if (lo, hi) != (0, shape[a])]
    last = partial[-1] if partial else 0  # one run of bytes per index of the axes before it
    item = np.dtype(info.np_dtype).itemsize
    strides = [item * math.prod(shape[a + 1 :]) for a in range(len(shape))]
    starts = np.array([info.offset + (box[last][0] * strides[last] if shape else 0)], np.int64)
    for a in range(last):
        starts = (starts[:, None] + np.arange(*box[a], dtype=np.int64) * strides[a]).reshape(-1)
    size = out.nbytes // max(len(starts), 1)
    buf = out.reshape(-1).view(np.uint8)
    got = 0
    if out.size:
        with open(info.file, "rb") as f:
            for i, start in enumerate(starts.tolist()):
                f.seek(start)
                n = f.readinto(buf[i * size : (i + 1) * size])
                got += n
                if n != size:
                    break
    if got != out.nbytes:
        raise ValueError(f"{info.file}: truncated while reading {info.key!r} ({got} of {out.nbytes} bytes)")
    if box == want:
        return out
    return out[tuple(slice(w[0] - b[0], w[1] - b[0]) for w, b in zip(want, box, strict=True))]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: key, safetensors dtype name, shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor: the header (from ``specs``) first, then each tensor's bytes
    in the order of ``specs`` via :meth:`write`. The file appears under its name only when :meth:`close`
    has checked that every tensor was written (it is written to a hidden temporary name and renamed), so an
    interrupted save never leaves a file that looks complete."""

    def __init__(self, path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for spec in self.specs:
            if spec.key in header:
                raise ValueError(f"{self.path}: tensor {spec.key!r} given twice")
            header[spec.key] = {
                "dtype": spec.dtype,
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned, as the reference writer does
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, array: np.ndarray) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: more tensors written than declared")
        spec = self.specs[self._next]
        array = np.asarray(array)
        if dtype_name(array.dtype) != spec.dtype or tuple(array.shape) != spec.shape:
            raise ValueError(
                f"{self.path}: tensor {spec.key!r} declared {spec.dtype} {list(spec.shape)}, "
                f"got {dtype_name(array.dtype)} {list(array.shape)}"
            )
        self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self.specs):
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: only {self._next} of {len(self.specs)} tensors were written")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_file(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write a dict of numpy arrays as one safetensors file."""
    specs = [TensorSpec(k, dtype_name(v.dtype), tuple(v.shape)) for k, v in tensors.items()]
    with SafetensorsWriter(path, specs, metadata) as w:
        for v in tensors.values():
            w.write(v)

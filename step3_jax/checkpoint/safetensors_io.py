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
from collections.abc import Iterable
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
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for {key!r}: {entry!r}") from None
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


def read_tensor(
    info: TensorInfo, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
) -> np.ndarray:
    """Read one tensor into a fresh numpy array (nothing else of the file is read or mapped); with ``rows=(lo,
    hi)``, only its slice ``[lo:hi]`` along the first axis (one contiguous read), and with ``cols`` also only
    ``[lo:hi]`` along the second (one contiguous read per row)."""
    shape, offset, nbytes = info.shape, info.offset, info.nbytes
    if rows is not None and shape and shape[0]:
        lo, hi = rows
        if not 0 <= lo <= hi <= shape[0]:
            raise ValueError(f"{info.key}: rows [{lo}, {hi}) are outside its first axis of {shape[0]}")
        row = nbytes // shape[0]
        shape, offset, nbytes = (hi - lo, *shape[1:]), offset + lo * row, (hi - lo) * row
    chunks = [(offset, nbytes)]  # (file offset, bytes) read one after the other into the array
    if cols is not None and len(shape) >= 2:
        lo, hi = cols
        if not 0 <= lo <= hi <= shape[1]:
            raise ValueError(f"{info.key}: columns [{lo}, {hi}) are outside its second axis of {shape[1]}")
        col = np.dtype(info.np_dtype).itemsize * math.prod(shape[2:])  # bytes of one index of the second axis
        chunks = [(offset + (r * shape[1] + lo) * col, (hi - lo) * col) for r in range(shape[0])]
        shape, nbytes = (shape[0], hi - lo, *shape[2:]), shape[0] * (hi - lo) * col
    out = np.empty(shape, info.np_dtype)
    buf = out.reshape(-1).view(np.uint8)
    got, at = 0, 0
    with open(info.file, "rb") as f:
        for start, size in chunks:
            f.seek(start)
            n = f.readinto(buf[at : at + size])
            got, at = got + n, at + size
            if n != size:
                break
    if got != nbytes:
        raise ValueError(f"{info.file}: truncated while reading {info.key!r} ({got} of {nbytes} bytes)")
    return out


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

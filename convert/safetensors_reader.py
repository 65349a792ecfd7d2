"""A safetensors reader that trusts nothing in the header.

Layout: 8-byte little-endian header size, a JSON header, then the data.  Every
offset and size is checked against the real file size before any tensor is
built, so a lying header gives a clear error instead of a huge allocation.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ..config import MAX_JSON_DEPTH, json_depth
from ..errors import CheckpointError
from .tensors import DTYPES, LazyTensor, contiguous_strides

_ST_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",  # MLX's packed quantized weights
}  # fmt: skip
_MAX_HEADER = 100 * 2**20


def read_safetensors(path: str | Path) -> dict[str, LazyTensor]:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(
                    f"{path}: safetensors header claims {n} bytes but the file has {size - 8} after the size field"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: safetensors header is not valid JSON (truncated or corrupt file)") from None
    except RecursionError:
        raise CheckpointError(f"{path}: safetensors header nests too deeply (a hostile file?)") from None
    if json_depth(header) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{path}: safetensors header nests more than {MAX_JSON_DEPTH} levels deep")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    tensors: dict[str, LazyTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor(path, name, info, data_start, data_len)
    _check_disjoint(path, tensors, data_start)
    return tensors


def _check_disjoint(path: Path, tensors: dict[str, LazyTensor], data_start: int) -> None:
    """Tensors may not share bytes (the format says so): otherwise a header of many entries over
    one region expands a file without bound, the sum of declared sizes far past the file's."""
    spans = sorted((t.data_offset, t.data_offset + t.nbytes, name) for name, t in tensors.items() if t.nbytes)
    reach, first = 0, ""
    for begin, end, second in spans:
        if begin < reach:
            raise CheckpointError(
                f"{path}: tensors {first!r} and {second!r} overlap in the file (bytes {begin - data_start}.."
                f"{reach - data_start}); a safetensors file holds each tensor's bytes once"
            )
        reach, first = end, second


def _tensor(path: Path, name: str, info: object, data_start: int, data_len: int) -> LazyTensor:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(info, dict):
        raise bad("header entry is not an object")
    dtype = _ST_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise bad(f"unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise bad(f"invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise bad(f"invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise bad(f"data_offsets {offsets} lie outside the file's {data_len} data bytes (truncated or corrupt)")
    nbytes = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != nbytes:
        raise bad(f"data_offsets span {end - begin} bytes but shape {shape} of {dtype} needs {nbytes}")
    numel = math.prod(shape)
    return LazyTensor(path, data_start + begin, numel, dtype, tuple(shape), contiguous_strides(tuple(shape)), 0, name)

"""A tensor inside a checkpoint file, read only when asked for.

Readers validate every offset and size against the file before they build a
``LazyTensor``; reading then pulls just that tensor's bytes from disk, so a
12 GB checkpoint is never held in memory at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import CheckpointError

# dtype name -> (numpy storage dtype, itemsize). bfloat16 is carried as raw uint16 bits.
DTYPES: dict[str, tuple[Any, int]] = {
    "float32": (np.float32, 4),
    "float16": (np.float16, 2),
    "bfloat16": (np.uint16, 2),
    "float64": (np.float64, 8),
    "int64": (np.int64, 8),
    "int32": (np.int32, 4),
    "int16": (np.int16, 2),
    "int8": (np.int8, 1),
    "uint8": (np.uint8, 1),
    "uint16": (np.uint16, 2),
    "uint32": (np.uint32, 4),
    "uint64": (np.uint64, 8),
    "bool": (np.bool_, 1),
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class LazyTensor:
    """``shape``/``strides``/``storage_offset`` are in elements, as in PyTorch."""

    file: Path
    data_offset: int  # byte offset of the storage's first element in ``file``
    storage_numel: int  # elements the storage holds (bounds for strided views)
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    storage_offset: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise CheckpointError(f"{self.file}: tensor {self.name!r} has unsupported dtype {self.dtype}")
        if len(self.shape) != len(self.strides) or any(s < 0 for s in self.shape + self.strides):
            raise CheckpointError(f"{self.file}: tensor {self.name!r} has an invalid shape or stride")
        if self.storage_offset < 0 or self.storage_offset + self._span() > self.storage_numel:
            raise CheckpointError(
                f"{self.file}: tensor {self.name!r} of shape {list(self.shape)} reaches past the end of its storage"
            )

    def __setstate__(self, state: Any) -> None:
        # pickle's BUILD could otherwise point a tensor at another file
        raise CheckpointError("a checkpoint's pickle tried to modify a tensor reference")

    def _span(self) -> int:
        if any(s == 0 for s in self.shape):
            return 0
        return 1 + sum((n - 1) * st for n, st in zip(self.shape, self.strides, strict=True))

    @property
    def span(self) -> int:
        """Stored elements the view reaches: fewer than ``numel`` for stride-0 or overlapping views."""
        return self._span()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype][1]

    def renamed(self, name: str) -> LazyTensor:
        return replace(self, name=name)

    def first_rows(self, n: int) -> LazyTensor:
        """The first ``n`` rows (a view: CoreNet pads the vocabulary to 32128)."""
        return replace(self, shape=(n, *self.shape[1:]))

    def read(self) -> np.ndarray:
        """A contiguous NumPy array of the raw storage dtype (uint16 bits for bfloat16)."""
        np_dtype, itemsize = DTYPES[self.dtype]
        span = self._span()
        start = self.data_offset + self.storage_offset * itemsize
        try:
            with open(self.file, "rb") as f:
                f.seek(start)
                raw = f.read(span * itemsize)
        except OSError as e:
            raise CheckpointError(f"{self.file}: cannot read tensor {self.name!r}: {e}") from None
        if len(raw) != span * itemsize:
            raise CheckpointError(
                f"{self.file}: tensor {self.name!r} is truncated (the file ends or changed while reading)"
            )
        flat = np.frombuffer(raw, dtype=np_dtype)
        if span == self.numel and self._is_contiguous():
            return flat.reshape(self.shape)
        strided = np.lib.stride_tricks.as_strided(
            flat, shape=self.shape, strides=tuple(s * itemsize for s in self.strides), writeable=False
        )
        return np.ascontiguousarray(strided)

    def _is_contiguous(self) -> bool:
        expected, acc = [], 1
        for n in reversed(self.shape):
            expected.append(acc)
            acc *= n
        return all(n == 1 or s == e for n, s, e in zip(self.shape, self.strides, reversed(expected), strict=True))

    def to_mlx(self) -> mx.array:
        """An MLX array in the tensor's own dtype (bfloat16 stays bit-exact)."""
        data = self.read()
        if self.dtype == "bfloat16":
            return mx.array(data).view(mx.bfloat16)
        return mx.array(data)

    def to_numpy_float(self) -> np.ndarray:
        data = self.read()
        return bf16_bits_to_float32(data) if self.dtype == "bfloat16" else data

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = self.to_numpy_float()
        return data if dtype is None else data.astype(dtype)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))

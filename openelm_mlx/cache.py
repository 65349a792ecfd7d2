"""Key/value cache for incremental decoding.

Buffers are allocated in steps of ``step`` positions and written in place, so a
decode step appends one position without copying the history.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def reserve(self, n: int, like: mx.array | None = None) -> None:
        """Make room for ``n`` more positions (buffers shaped after ``like`` when there are none yet)."""
        prev = self.offset
        if self.keys is not None and prev + n <= self.keys.shape[2]:
            return
        B, H, _, D = (self.keys if self.keys is not None else like).shape
        dtype = (self.keys if self.keys is not None else like).dtype
        grow = ((n + self.step - 1) // self.step) * self.step
        new_k, new_v = mx.zeros((B, H, grow, D), dtype), mx.zeros((B, H, grow, D), dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` ([B, kv_heads, S, head_dim]); return the whole history."""
        prev, n = self.offset, keys.shape[2]
        self.reserve(n, like=keys)
        self.keys[..., prev : prev + n, :] = keys
        self.values[..., prev : prev + n, :] = values
        self.offset += n
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @staticmethod
    def mask(n: int) -> str | None:
        """The attention mask for ``n`` new positions over the fetched history."""
        # "causal" is lower-right aligned, which is what a prefill on top of a cache needs.
        return "causal" if n > 1 else None

    def trim(self, n: int) -> int:
        """Forget the last ``n`` positions (rejected speculative tokens); returns how many.

        ``n`` is clamped to [0, offset], so callers may pass a difference that is negative."""
        n = max(0, min(self.offset, n))
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(num_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(num_layers)]


class PackedRows:
    """Not a cache: what attention needs for rows that each pack several sequences sharing a
    prefix (``scoring.py``: one context followed by each of its continuations).

    ``offset`` is every token's position ([B, S]; the kernel's RoPE per token), ``allowed`` which
    tokens each token attends to ([B, 1, S, S], boolean).  Nothing is kept between calls, so one
    instance serves every layer."""

    def __init__(self, positions: mx.array, allowed: mx.array) -> None:
        self.offset = positions
        self.allowed = allowed

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values

    def mask(self, n: int) -> mx.array:
        return self.allowed

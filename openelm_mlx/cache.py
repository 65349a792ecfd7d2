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


# The batch buffer's first capacities: the compiled step attends over the whole capacity, and on
# this CPU MLX's attention over 16 rows costs 1.8 ms a layer at 64 positions against 6.5 ms at 256
# (BENCHMARKS.md), so short sequences do not pay for 256 positions.  From 256 on, fixed steps.
SMALL_CAPACITIES = (64, 128)


def capacity_bucket(n: int) -> int:
    """The buffer capacity that holds ``n`` positions: 64, 128, then multiples of ``KVCache.step``."""
    for c in SMALL_CAPACITIES:
        if n <= c:
            return c
    return max(KVCache.step, -(-n // KVCache.step) * KVCache.step)


def slot_bucket(n: int, max_slots: int) -> int:
    """Slots a batch of ``n`` sequences occupies: the next power of two, at most ``max_slots``.

    Few distinct batch shapes means few traces of the compiled step (step.py): 1, 2, 4, 8, 16,
    32 ... and ``max_slots`` itself."""
    b = 1
    while b < n:
        b *= 2
    return max(n, min(b, max_slots))


class BatchKVCache:
    """The engine's KV cache: per layer one buffer ``[slots, kv_heads, capacity, head_dim]`` and a
    per-slot offset.  A sequence takes a slot when it starts prefilling and frees it when it ends;
    a decode step writes every slot's new key and value with one scatter per layer and attends
    over the whole buffer, each row masked by its own offset.

    ``capacity`` grows through ``capacity_bucket`` (64, 128, then steps of ``KVCache.step``
    positions), ``slots`` in powers of two
    (``slot_bucket``), so the buffers, and with them the compiled step's input shapes, take few
    distinct sizes.  Free slots are still computed in a decode step (padding rows; their results
    are dropped), which is why the buffer shrinks when the batch falls to half of it or less."""

    def __init__(self, kv_heads: list[int], head_dim: int, max_slots: int):
        self.kv_heads, self.head_dim, self.max_slots = list(kv_heads), head_dim, max_slots
        self.keys: list[mx.array | None] = [None] * len(kv_heads)
        self.values: list[mx.array | None] = [None] * len(kv_heads)
        self.dtype: mx.Dtype | None = None
        self.offsets: list[int] = []  # per slot
        self.used: list[bool] = []
        self.capacity = 0

    @property
    def slots(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values, strict=True) if k is not None)

    # --- slots -------------------------------------------------------------------------------------

    def take(self, cache: list[KVCache] | None = None) -> int:
        """A free slot for a sequence (the buffer grows to the next slot bucket when none is
        free), holding ``cache``'s positions when given (a conversation or a reused prefix)."""
        if all(self.used):
            self._resize(slot_bucket(self.slots + 1, self.max_slots), list(range(self.slots)))
        slot = self.used.index(False)
        self.used[slot], self.offsets[slot] = True, 0
        if cache is not None and cache[0].offset > 0:
            n = cache[0].offset
            self._allocate(cache[0].keys.dtype)
            self.reserve([slot], n)
            for i, c in enumerate(cache):
                self.keys[i][slot : slot + 1, :, :n, :] = c.keys[..., :n, :]
                self.values[i][slot : slot + 1, :, :n, :] = c.values[..., :n, :]
            self.offsets[slot] = n
        return slot

    def export(self, slot: int, cache: list[KVCache]) -> None:
        """Copy the slot's positions into ``cache`` (its KVCaches are updated in place)."""
        n = self.offsets[slot]
        for i, c in enumerate(cache):
            if n == 0 or self.keys[i] is None:
                c.keys = c.values = None
            else:
                end = -(-n // KVCache.step) * KVCache.step
                # Copies, so that nothing outside keeps the batch buffer alive (which would stop
                # MLX from updating it in place).
                c.keys = self.keys[i][slot : slot + 1, :, :end, :] * 1
                c.values = self.values[i][slot : slot + 1, :, :end, :] * 1
            c.offset = n
        mx.eval([a for c in cache for a in (c.keys, c.values) if a is not None])

    def free(self, slot: int) -> dict[int, int]:
        """Release ``slot``; when half of the slots or more are free the buffer shrinks, and the
        mapping {old slot: new slot} of the sequences still held is returned (else ``{}``)."""
        self.used[slot], self.offsets[slot] = False, 0
        held = [i for i, u in enumerate(self.used) if u]
        if not held:
            self._release()
            return {}
        want = slot_bucket(len(held), self.max_slots)
        # A quarter, not a half: a batch hovering around a bucket's edge would copy every buffer
        # at each join and leave.
        if want > self.slots // 4:
            return {}
        self._resize(want, held)
        return {old: new for new, old in enumerate(held)}

    def _release(self) -> None:
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.offsets, self.used, self.capacity, self.dtype = [], [], 0, None

    def _resize(self, slots: int, keep: list[int]) -> None:
        """New buffers of ``slots`` rows holding the rows ``keep`` (in order) first; the capacity
        is trimmed to what the kept rows need."""
        need = max((self.offsets[i] for i in keep), default=0)
        capacity = min(self.capacity, capacity_bucket(max(need, 1)))
        if self.dtype is not None:
            order = mx.array(keep, dtype=mx.int32)
            for i, heads in enumerate(self.kv_heads):
                pad = mx.zeros((slots - len(keep), heads, capacity, self.head_dim), self.dtype)
                self.keys[i] = mx.concatenate([self.keys[i][order, :, :capacity], pad])
                self.values[i] = mx.concatenate([self.values[i][order, :, :capacity], pad])
            mx.eval(self.keys, self.values)
        self.offsets = [self.offsets[i] for i in keep] + [0] * (slots - len(keep))
        self.used = [True] * len(keep) + [False] * (slots - len(keep))
        self.capacity = capacity if self.dtype is not None else 0

    def _allocate(self, dtype: mx.Dtype) -> None:
        if self.dtype is None:
            self.dtype = dtype
            self.capacity = SMALL_CAPACITIES[0]
            for i, heads in enumerate(self.kv_heads):
                shape = (self.slots, heads, self.capacity, self.head_dim)
                self.keys[i], self.values[i] = mx.zeros(shape, dtype), mx.zeros(shape, dtype)

    def reserve(self, slots: list[int], n: int) -> None:
        """Make room for ``n`` more positions in each of ``slots`` (every slot's buffer grows)."""
        need = max(self.offsets[s] for s in slots) + n
        if need <= self.capacity:
            return
        grow = capacity_bucket(need) - self.capacity
        for i, heads in enumerate(self.kv_heads):
            pad = mx.zeros((self.slots, heads, grow, self.head_dim), self.dtype)
            self.keys[i] = mx.concatenate([self.keys[i], pad], axis=2)
            self.values[i] = mx.concatenate([self.values[i], pad], axis=2)
        self.capacity += grow

    def trim(self, slot: int, n: int) -> None:
        """Forget the slot's last ``n`` positions (rejected drafts); clamped like ``KVCache.trim``."""
        self.offsets[slot] -= max(0, min(self.offsets[slot], n))

    # --- the views a forward pass writes through ---------------------------------------------------

    def view(self, slot: int) -> list[SlotCache]:
        """Per-layer caches over one slot: a sequence's prefill or speculative round, shaped as
        it would be alone (its own positions only, the mask of a lone sequence)."""
        return [SlotCache(self, i, slot) for i in range(len(self.kv_heads))]

    def rows(self, slots: list[int], n: int, dtype: mx.Dtype) -> list[Rows]:
        """Per-layer caches for ``n`` new positions in each of ``slots`` (all slots, in order, for
        a decode step; any subset for a batched prefill), attending over the positions in use."""
        self._allocate(dtype)
        self.reserve(slots, n)
        positions = [self.offsets[s] for s in slots]
        span = max(positions) + n
        every = slots == list(range(self.slots))
        shared = RowsShared(
            self.keys,
            self.values,
            mx.array(positions, dtype=mx.int32),
            n,
            span,
            order=None if every else mx.array(slots, dtype=mx.int32),
            lone=self.slots == 1 or len(slots) == 1,
        )
        return [Rows(shared, i) for i in range(len(self.kv_heads))]

    def advance(self, slots: list[int], n: int) -> None:
        for s in slots:
            self.offsets[s] += n


class SlotCache:
    """One layer of one slot, used like a ``KVCache`` (int offset, "causal" mask)."""

    def __init__(self, batch: BatchKVCache, layer: int, slot: int):
        self.batch, self.layer, self.slot = batch, layer, slot

    @property
    def offset(self) -> int:
        return self.batch.offsets[self.slot]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        b, i, s, n = self.batch, self.layer, self.slot, keys.shape[2]
        b._allocate(keys.dtype)
        prev = b.offsets[s]
        b.reserve([s], n)
        b.keys[i][s : s + 1, :, prev : prev + n, :] = keys
        b.values[i][s : s + 1, :, prev : prev + n, :] = values
        if i == len(b.kv_heads) - 1:  # every layer has written: the positions are in
            b.offsets[s] += n
        return b.keys[i][s : s + 1, :, : prev + n, :], b.values[i][s : s + 1, :, : prev + n, :]

    def mask(self, n: int) -> str | None:
        return KVCache.mask(n)


class RowsShared:
    """What every layer's ``Rows`` of one forward share: the buffers (lists, updated in place),
    positions, write indices and the mask.  ``order``: the slots written (None: every slot, in
    order); ``lone``: one row, whose fetched keys end at its last position, so it needs no mask."""

    def __init__(
        self,
        keys: list[mx.array],
        values: list[mx.array],
        positions: mx.array,
        n: int,
        span: int,
        order: mx.array | None = None,
        lone: bool = False,
    ):
        self.keys, self.values, self.positions, self.n, self.span, self.order = keys, values, positions, n, span, order
        # Row b's token j sits at position positions[b] + j and sees the positions up to it.
        at = positions[:, None] + mx.arange(n, dtype=mx.int32)[None, :]  # [B, n]
        self.index = at[:, None, :, None]  # broadcast over heads and head_dim by put_along_axis
        if lone:
            self.mask = KVCache.mask(n)
        else:
            self.mask = (mx.arange(span, dtype=mx.int32)[None, None, :] <= at[:, :, None])[:, None]


class Rows:
    """One layer's cache for a forward of several rows of a ``BatchKVCache``, each at its own
    position (``offset`` is an array: RoPE per row)."""

    def __init__(self, shared: RowsShared, layer: int):
        self.shared, self.layer = shared, layer

    @property
    def offset(self) -> mx.array:
        return self.shared.positions

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        sh, i = self.shared, self.layer
        index = mx.broadcast_to(sh.index, keys.shape)
        if sh.order is None:
            sh.keys[i] = mx.put_along_axis(sh.keys[i], index, keys, axis=2)
            sh.values[i] = mx.put_along_axis(sh.values[i], index, values, axis=2)
            k, v = sh.keys[i], sh.values[i]
        else:  # a subset of slots (a batched prefill): gather, write, put the rows back
            k = mx.put_along_axis(sh.keys[i][sh.order], index, keys, axis=2)
            v = mx.put_along_axis(sh.values[i][sh.order], index, values, axis=2)
            sh.keys[i][sh.order] = k
            sh.values[i][sh.order] = v
        if sh.span < k.shape[2]:
            k, v = k[:, :, : sh.span, :], v[:, :, : sh.span, :]
        return k, v

    def mask(self, n: int) -> mx.array | str | None:
        return self.shared.mask

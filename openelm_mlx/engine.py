"""The generation engine: the one decode loop under every front end (generate, chat, bench, server, evaluate).

An ``Engine`` runs a set of sequences over one batch KV cache (``cache.BatchKVCache``): per
layer one buffer of ``[slots, kv_heads, capacity, head_dim]``; a sequence takes a slot when it
is admitted and frees it when it ends, and each slot keeps its own offset.  Sequences of any
lengths decode together in one step (``step.DecodeStep``): the matmuls see every slot's row and
read the weights once, one scatter per layer writes every row's new key and value at its own
position, and one attention covers them all, each row masked by its offset; nothing is copied or
stacked per step.  A prompt is prefilled into its slot through a view with the shapes it would
have alone.  That is what keeps batching exact: at temperature 0 a sequence yields the same
tokens whatever joins or leaves around it, and a seeded sequence draws from its own key.
(Left padding was the alternative: every row written at one column, at the price of copying
every cache when a longer sequence joins.)

``step()`` is one scheduling round:

1. cancelled sequences leave; waiting ones are admitted up to ``max_batch``;
2. one decode step for every running sequence (pipelined: the next step is queued on the
   device before the previous tokens go back to Python), or, for a lone sequence with a draft
   model or prompt lookup, one speculative round;
3. prompt prefill, at most ``prefill_chunk`` tokens per round shared among the sequences still
   prefilling, so one long prompt does not freeze the others; a sequence whose prompt is done
   yields its first token in the same round and decodes from the next one.

Per sequence: sampling options and seed, repetition penalty context, presence and frequency
penalties (over its generated tokens), logit bias, log-probabilities (the chosen token's and the
top k, of the model's distribution before any processing), stop strings (matched on the
detokenized text and never emitted in part), max tokens.  Finished sequences can leave their KV
state in a byte-bounded LRU keyed by token prefixes (``prompt_cache_bytes``): a later prompt
that starts with the same tokens prefills only the rest.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx

from . import runtime
from .cache import BatchKVCache, KVCache
from .errors import OpenELMError
from .grammar import Matcher, OutputSpec, compile_spec, fill_masks, parse_response_format
from .model import OpenELM
from .sampling import SamplingOptions, is_greedy, make_sampler
from .step import decoder
from .template import format_prompt
from .tokenizer import Tokenizer

PREFILL_CHUNK = 512  # prompt tokens per round: long enough for the BLAS to run at full speed
MAX_LOGPROBS = 20
# Shortest chunk worth prefilling several sequences together; below it the rows' per-row
# attention and the stacking cost more than the shared matmuls save.
MIN_BATCHED_PREFILL = 8


@dataclass(frozen=True)
class GenParams:
    """What one sequence asks for."""

    max_tokens: int = 256
    sampling: SamplingOptions = SamplingOptions()
    seed: int | None = None
    stop: tuple[str, ...] = ()  # on the detokenized text; the stop string is not part of the output
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    prompt_logprobs: bool = False  # also the log-probability of every prompt token after the first
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    prompt_lookup: int = 0  # prompt-lookup decoding: draft this many tokens copied from the context
    num_draft_tokens: int = 3  # with the engine's draft model: tokens it proposes per round
    # Structured output (grammar/): only tokens the schema allows are sampled; EOS only where it
    # accepts.  Such a sequence never decodes speculatively (drafts are not checked against it).
    constraint: OutputSpec | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise OpenELMError(f"max_tokens {self.max_tokens}: must be at least 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise OpenELMError(f"logprobs {self.logprobs}: must be between 0 and {MAX_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise OpenELMError(f"{name} {getattr(self, name)}: must be a finite number")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise OpenELMError("stop: every stop string must be a non-empty string")
        if self.prompt_lookup < 0:
            raise OpenELMError(f"prompt_lookup {self.prompt_lookup}: must be >= 0")
        if self.num_draft_tokens < 1:
            raise OpenELMError(f"num_draft_tokens {self.num_draft_tokens}: must be at least 1")
        if self.constraint is not None and self.ignore_eos:
            raise OpenELMError("ignore_eos cannot be combined with a response format (the grammar ends with EOS)")


@dataclass
class Output:
    """What one sequence produced in one round."""

    seq_id: int
    text: str  # new text ("" while a stop string or a UTF-8 character is still pending)
    tokens: list[int]  # the token ids behind it
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None  # "stop" (EOS or a stop string), "length", "cancelled" or None
    prompt_tokens: int
    cached_tokens: int  # prompt tokens that were already in the KV cache (prefix reuse)
    generation_tokens: int
    prompt_logprobs: list[float | None] | None = None  # on a sequence's first output only
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    draft_proposed: int = 0
    draft_accepted: int = 0


class StopMatcher:
    """Holds back text that could still become a stop string, so none is ever emitted in part."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.held = stops, ""
        self.keep = max((len(s) for s in stops), default=1) - 1

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        # Emit all but the longest tail that is a prefix of some stop string.
        cut = len(text)
        for n in range(min(self.keep, len(text)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                cut = len(text) - n
                break
        self.held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass
class _Sequence:
    id: int
    params: GenParams
    cache: list[KVCache]  # what the sequence starts from, and where its state goes when it ends
    history: list[int]  # every token of the sequence so far (what the cache holds, plus pending)
    pending: list[int]  # prompt tokens not yet in the cache
    sampler: Callable[[mx.array, mx.array], mx.array]
    prompt_tokens: int
    cached_tokens: int
    kv_reserved: int
    detok: object | None
    stop: StopMatcher
    context: mx.array | None = None  # repetition-penalty context up to the token before ``last``
    counts: mx.array | None = None  # generated-token counts (presence/frequency penalties)
    bias: tuple[mx.array, mx.array] | None = None
    last: mx.array | None = None  # the token to feed next
    fresh: bool = False  # whether ``last`` still has to be emitted
    last_lp: tuple | None = None  # lazy log-probabilities of ``last``
    generated: int = 0
    prompt_lp: tuple | None = None
    proposer: object | None = None
    draft_proposed: int = 0
    draft_accepted: int = 0
    finished: str | None = None
    slot: int | None = None  # its slot in the engine's batch cache, from admission to the end
    export: bool = False  # whether its KV state goes back into ``cache`` (the caller's) at the end
    matcher: Matcher | None = None  # the grammar state (GenParams.constraint)
    matcher_ahead: bool = False  # the matcher already consumed the token ``_emit`` gets next
    # ``last`` is ``fed[fed_slot]``: one entry of a decode step's array of next tokens (one per
    # slot), which the next step takes whole as its input, and which goes to Python in one copy.
    fed: mx.array | None = None
    fed_slot: int = -1


class Engine:
    """Runs many sequences at once; see the module docstring.  Not thread-safe: one thread owns it."""

    def __init__(
        self,
        model: OpenELM,
        tokenizer: Tokenizer | None = None,
        *,
        max_batch: int = 8,
        prefill_chunk: int = PREFILL_CHUNK,
        kv_budget_bytes: int | None = None,
        prompt_cache_bytes: int = 0,
        draft_model: OpenELM | None = None,
    ):
        if max_batch < 1:
            raise OpenELMError(f"max_batch {max_batch}: must be at least 1")
        if prefill_chunk < 1:
            raise OpenELMError(f"prefill_chunk {prefill_chunk}: must be at least 1")
        if draft_model is not None and draft_model.config.vocab_size != model.config.vocab_size:
            raise OpenELMError("--draft-model has a different vocabulary from --model")
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.runtime = runtime.of(model)  # chosen at load; now for a model built without load()
        if draft_model is not None:
            runtime.of(draft_model)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.kv_budget_bytes = kv_budget_bytes
        self.prefix_cache = PrefixCache(prompt_cache_bytes)
        self.decode = decoder(model)
        self.batch = BatchKVCache(model.config.num_kv_heads, model.config.head_dim, max_batch)
        self._ids = itertools.count()
        self.waiting: list[_Sequence] = []
        self.prefilling: list[_Sequence] = []
        self.running: list[_Sequence] = []
        self._cancelled: set[int] = set()
        self._kv_per_token = _kv_bytes_per_token(model)
        self._finite: mx.array | None = None  # whether the last decode step's logits were all finite
        self._sampled: mx.array | None = None  # the last decode step's tokens by slot (``_feed``)

    # --- admission ---------------------------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        params: GenParams | None = None,
        *,
        cache: list[KVCache] | None = None,
        history: list[int] | None = None,
    ) -> int:
        """Queue a sequence; returns its id.  ``cache``/``history``: continue a conversation whose
        tokens ``history`` (a prefix of which is in ``cache``) come before ``prompt``; both are
        updated in place as the sequence runs.  Raises ``OpenELMError`` (and changes nothing)
        if the sequence cannot run: empty prompt, over the context, over the KV budget."""
        params = params or GenParams()
        prompt = list(prompt)
        if not prompt:
            raise OpenELMError("the prompt is empty")
        if (params.prompt_lookup or self.draft_model is not None) and params.prompt_logprobs:
            raise OpenELMError("prompt log-probabilities cannot be combined with speculative decoding")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise OpenELMError(f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        history = history if history is not None else []
        if cache is not None and cache[0].offset > len(history):
            raise OpenELMError("the KV cache holds more tokens than the given history")
        used = len(history) + len(prompt)
        limit = self.model.config.max_context_length
        if used + params.max_tokens > limit:
            raise OpenELMError(
                f"the prompt ({used} tokens) plus --max-tokens {params.max_tokens} exceeds the model's context of "
                f"{limit} tokens; shorten the prompt or lower --max-tokens"
            )
        need = _round_up(used + params.max_tokens) * self._kv_per_token
        if self.kv_budget_bytes is not None and self.kv_reserved() + need > self.kv_budget_bytes:
            raise OpenELMError(
                f"this sequence needs {need / 2**20:.1f} MiB of KV cache and {self.kv_reserved() / 2**20:.1f} MiB "
                f"of the {self.kv_budget_bytes / 2**20:.1f} MiB budget are in use; retry later or ask for fewer tokens"
            )
        export = cache is not None
        if cache is None and not params.prompt_logprobs:  # prompt log-probabilities need every position
            cache, cached = self.prefix_cache.fetch(self.model, history + prompt)
        elif cache is None:
            cache, cached = self.model.make_cache(), 0
        else:
            cached = cache[0].offset
        history.extend(prompt)
        sampling = params.sampling
        seq = _Sequence(
            id=next(self._ids),
            params=params,
            cache=cache,
            history=history,
            pending=history[cache[0].offset :],
            sampler=make_sampler(sampling, params.seed),
            prompt_tokens=len(prompt),
            cached_tokens=min(cached, len(history) - 1),
            kv_reserved=need,
            detok=self.tokenizer.detokenizer() if self.tokenizer is not None else None,
            stop=StopMatcher(params.stop),
            export=export,
        )
        if params.stop and self.tokenizer is None:
            raise OpenELMError("stop strings need a tokenizer")
        if params.logit_bias:
            ids = list(params.logit_bias)
            if any(not 0 <= t < vocab for t in ids):
                raise OpenELMError(f"logit_bias: token ids must be in 0..{vocab - 1}")
            seq.bias = (mx.array(ids), mx.array([float(params.logit_bias[t]) for t in ids]))
        if params.presence_penalty or params.frequency_penalty:
            seq.counts = mx.zeros((vocab,), dtype=mx.float32)
        if params.constraint is not None:
            if self.tokenizer is None:
                raise OpenELMError("a response format needs a tokenizer")
            eos = self.model.config.eos_token_id
            seq.matcher = Matcher(params.constraint, compile_spec(params.constraint, self.tokenizer, vocab, eos), vocab)
        elif self.draft_model is not None:
            seq.proposer = _DraftProposer(self.draft_model)
        elif params.prompt_lookup > 0:
            seq.proposer = _lookup_proposer
        self.waiting.append(seq)
        return seq.id

    def cancel(self, seq_id: int) -> None:
        """The sequence finishes with ``finish_reason`` "cancelled" at the next round."""
        self._cancelled.add(seq_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def kv_reserved(self) -> int:
        return sum(s.kv_reserved for s in self._active())

    def _active(self) -> list[_Sequence]:
        return self.waiting + self.prefilling + self.running

    # --- one round -----------------------------------------------------------------------------

    def step(self) -> list[Output]:
        out: list[Output] = []
        if self._cancelled:
            for s in self._active():
                if s.id in self._cancelled:
                    self._finish(s, "cancelled")
                    out.append(self._output(s, [], "", "cancelled"))
            self._cancelled.clear()
        while self.waiting and len(self.prefilling) + len(self.running) < self.max_batch:
            s = self.waiting.pop(0)
            s.slot = self.batch.take(s.cache)
            self.prefilling.append(s)
        if self.running:
            alone = len(self.running) == 1 and not self.prefilling and not self.waiting
            if alone and self.running[0].proposer is not None:
                out += self._speculative_round(self.running[0])
            else:
                out += self._decode_round()
        out += self._prefill_round()
        return out

    def _decode_round(self) -> list[Output]:
        self._check_finite()  # the previous step's, whose tokens this round emits
        # A row whose pending token is its last one (max tokens) only emits it: nothing to feed.
        last_one = [s for s in self.running if s.fresh and s.generated + 1 >= s.params.max_tokens]
        rows = [s for s in self.running if s not in last_one]
        slots = [s.slot for s in rows]  # as fed: a sequence finishing below may move the others
        nexts = self._feed(rows) if rows else []
        host: dict[int, list[int]] = {}  # one copy to Python per array of sampled tokens

        def token(s: _Sequence) -> int:
            if s.fed is None:
                return s.last.item()
            if id(s.fed) not in host:
                host[id(s.fed)] = s.fed.tolist()
            return host[id(s.fed)][s.fed_slot]

        out = []
        for s in last_one:
            out.append(self._emit(s, token(s), s.last_lp))
        for s, slot, (y, lp) in zip(rows, slots, nexts, strict=True):
            if s.fresh:
                o = self._emit(s, token(s), s.last_lp)
                if o is not None:
                    out.append(o)
            if s.finished is None:
                s.last, s.fresh, s.last_lp = y, True, lp
                s.fed, s.fed_slot = self._sampled, slot
        return out

    def _tokens(self, rows: list[_Sequence]) -> mx.array:
        """The step's input, one token per slot: the previous step's array of sampled tokens as it
        is when every row's token is in it at its slot (no op per row); else gathered per row,
        free slots and prompts still prefilling taking a padding token."""
        fed = rows[0].fed
        if fed is not None and fed.shape[0] == self.batch.slots:
            if all(s.fed is fed and s.fed_slot == s.slot for s in rows):
                return fed[:, None]
        by_slot = {s.slot: s.last.reshape(1, 1).astype(mx.uint32) for s in rows}
        pad = mx.zeros((1, 1), dtype=mx.uint32)
        parts = [by_slot.get(i, pad) for i in range(self.batch.slots)]
        return mx.concatenate(parts) if len(parts) > 1 else parts[0]

    def _feed(self, rows: list[_Sequence]) -> list[tuple]:
        """Queue one decode step over ``rows``; their next tokens (lazy) and log-probabilities.

        Rows decoding greedily with nothing else to apply (no penalties, bias, grammar or
        log-probabilities) share one argmax over every slot; each other row samples on its own
        and its token is written into that array, which becomes the next step's input."""
        logits = self.decode(self._tokens(rows), self.batch, [s.slot for s in rows])[:, -1]
        self._finite = mx.isfinite(logits).all()
        allowed = self._grammar_masks(rows, logits)
        plain = [_plain_greedy(s) for s in rows]
        sampled = mx.argmax(logits, axis=-1).astype(mx.uint32) if any(plain) else None
        nexts: list[tuple] = []
        for i, s in enumerate(rows):
            if plain[i]:
                nexts.append((None, None))
                continue
            if s.context is not None:
                s.context = mx.concatenate([s.context, s.last.reshape(1).astype(mx.uint32)])
            if s.counts is not None and s.generated > 0:  # ``last`` is a generated token (not the prompt's last)
                s.counts = s.counts.at[s.last.reshape(1)].add(1.0)
            y, lp = self._sample(s, logits[s.slot], s.context, s.counts, allowed.get(i))
            if sampled is not None:
                sampled[s.slot] = y.astype(mx.uint32)
            nexts.append((y, lp))
        if sampled is not None:  # slices are views, computed only if a row's token is fetched alone
            nexts = [(sampled[s.slot], None) if plain[i] else nexts[i] for i, s in enumerate(rows)]
        self._sampled = sampled
        lazy = [sampled] if sampled is not None else [y for y, _ in nexts]
        mx.async_eval([self._finite, *lazy] + [a for _, lp in nexts if lp for a in lp if a is not None])
        return nexts

    def _check_finite(self, logits: mx.array | None = None) -> None:
        finite = self._finite if logits is None else mx.isfinite(logits).all()
        if finite is not None and not finite.item():
            dtype = str(self.decode.dtype).removeprefix("mlx.core.")
            raise OpenELMError(
                f"the model's logits are not finite (inf or NaN): its activations overflow in {dtype}; "
                "use bfloat16 or float32 (convert with --dtype bfloat16)"
            )

    def _prefill_round(self) -> list[Output]:
        budget, out = self.prefill_chunk, []
        # Several sequences prefilling: equal-length chunks of them go through the model as one
        # batch (the matmuls read the weights once for all rows; each row attends over its own
        # slot, masked by its offset), then what is left is prefilled one sequence at a time.
        group = [s for s in self.prefilling if s.proposer is None and not s.params.prompt_logprobs]
        n = min((len(s.pending) for s in group), default=0)
        n = min(n, budget // max(len(group), 1))
        if len(group) > 1 and n >= MIN_BATCHED_PREFILL:
            chunks = []
            for s in group:
                chunks.append(s.pending[:n])
                s.pending = s.pending[n:]
            budget -= n * len(group)
            slots = [s.slot for s in group]
            layers = self.batch.rows(slots, n, self.decode.dtype)
            logits = self.model.infer(mx.array(chunks), cache=layers, last_only=True)[:, -1]
            self.batch.advance(slots, n)
            mx.eval(logits)
            for i, s in enumerate(group):
                if not s.pending:
                    self.prefilling.remove(s)
                    out += self._prefilled(s, logits[i])
        while budget > 0 and self.prefilling:
            s = self.prefilling[0]
            n = min(budget, len(s.pending))
            chunk, s.pending = s.pending[:n], s.pending[n:]
            budget -= n
            if s.proposer is not None and not s.pending:
                # Speculative rounds feed the last known token themselves: keep it out of the cache.
                prefill(self.model, chunk[:-1], self.batch.view(s.slot))
                self.prefilling.pop(0)
                self._after_speculation(s)
                self.running.append(s)
                continue
            view = self.batch.view(s.slot)
            logits = self.model.infer(mx.array([chunk]), cache=view, last_only=not s.params.prompt_logprobs)[0]
            if s.params.prompt_logprobs:
                self._prompt_logprobs(s, chunk, logits)
            if s.pending:
                mx.eval(logits)
                continue
            self.prefilling.pop(0)
            runtime.after_prefill(s.prompt_tokens)
            out += self._prefilled(s, logits[-1])
        return out

    def _prefilled(self, s: _Sequence, logits: mx.array) -> list[Output]:
        """The prompt is in the cache: sample and emit the first token; the sequence decodes from the next round."""
        s.context = mx.array(s.history, dtype=mx.uint32) if _tracks_context(s) else None
        self._check_finite(logits)
        allowed = mx.array(s.matcher.mask()) if s.matcher is not None else None
        y, lp = self._sample(s, logits, s.context, s.counts, allowed)
        o = self._emit(s, y.item(), lp)
        if s.finished is None:
            s.last, s.fresh, s.last_lp, s.fed = y, False, None, None
            self.running.append(s)
        return [o] if o is not None else []

    def _prompt_logprobs(self, s: _Sequence, chunk: list[int], logits: mx.array) -> None:
        # Position j's logits score the token after it: the next chunk token, or (at a chunk's
        # end) the first token of the next chunk, scored when that chunk arrives.
        start = len(s.history) - len(s.pending) - len(chunk)
        lps = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), axis=-1, keepdims=True)
        prev = s.prompt_lp
        if prev is None:
            prev = ([None] * (start + 1), [None] * (start + 1), None)  # tokens before the chunk: unscored
        scored, tops, carry = prev
        if carry is not None:  # the previous chunk's last position scores this chunk's first token
            scored.append(carry[chunk[0]].item())
            tops.append(_top(carry, s.params.logprobs or 0))
        targets = mx.array(chunk[1:])
        if len(chunk) > 1:
            picked = mx.take_along_axis(lps[:-1], targets[:, None], axis=-1)[:, 0]
            scored.extend(picked.tolist())
            k = s.params.logprobs or 0
            tops.extend(_top(lps[j], k) for j in range(len(chunk) - 1))
        s.prompt_lp = (scored, tops, lps[-1])

    # --- structured output: the grammar's masks (grammar/) ---------------------------------------

    def _grammar_masks(self, rows: list[_Sequence], logits: mx.array) -> dict[int, mx.array]:
        """The allowed-token masks of the constrained ``rows``, by row index.  Built on the CPU
        while the device runs the step (``logits``, queued first); each matcher first consumes
        its row's pending token, which the previous step sampled and ``_emit`` has not seen yet."""
        live = [(i, s) for i, s in enumerate(rows) if s.matcher is not None]
        if not live:
            return {}
        mx.async_eval(logits)
        for _, s in live:
            if s.fresh:
                tok = s.last.item()
                s.matcher.advance(tok)
                s.matcher_ahead = True
        masks = mx.array(fill_masks([s.matcher for _, s in live], self.model.config.vocab_size))
        return {i: masks[j] for j, (i, _) in enumerate(live)}

    def _sample(
        self,
        s: _Sequence,
        logits: mx.array,
        context: mx.array | None,
        counts: mx.array | None,
        allowed: mx.array | None = None,
    ):
        logits = logits.astype(mx.float32)
        lp = None
        if s.params.logprobs is not None:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if s.bias is not None:
            logits = logits.at[s.bias[0]].add(s.bias[1])
        if counts is not None:
            logits = logits - s.params.frequency_penalty * counts - s.params.presence_penalty * (counts > 0)
        if allowed is not None:  # after bias and penalties, before temperature (inside the sampler)
            logits = mx.where(allowed, logits, -math.inf)
        y = s.sampler(logits, context if context is not None else _EMPTY)
        if s.params.logprobs is not None:
            k = s.params.logprobs
            if k > 0:
                top = mx.argpartition(-logprobs, k - 1)[:k]
                lp = (logprobs[y], top, logprobs[top])
            else:
                lp = (logprobs[y], None, None)
        return y, lp

    def _speculative_round(self, s: _Sequence) -> list[Output]:
        # The cache holds every token but the last known one ``y``; one pass over y and the drafts
        # samples the model at every position, and the agreeing prefix of drafts is kept.  A token
        # is accepted only if it equals what the model itself samples there, so at temperature 0
        # this gives exactly the plain greedy output.
        if s.fresh:
            out = self._emit(s, s.last.item(), s.last_lp)
            s.fresh = False
            if s.finished is not None:
                return [out] if out else []
        y = s.history[-1]
        left = s.params.max_tokens - s.generated
        k = s.params.num_draft_tokens if self.draft_model is not None else s.params.prompt_lookup
        drafts = s.proposer(s.history, min(k, left - 1))
        logits = self.model.infer(mx.array([[y, *drafts]]), cache=self.batch.view(s.slot))[0]
        self._check_finite(logits)
        generated = s.history[len(s.history) - s.generated :]
        picks = []
        for i in range(len(drafts) + 1):
            ctx = mx.array(s.history + drafts[:i], dtype=mx.uint32) if _tracks_context(s) else None
            counts = _counts(generated + drafts[:i], self.model.config.vocab_size) if s.counts is not None else None
            picks.append(self._sample(s, logits[i], ctx, counts))
        mx.eval([p for p, _ in picks] + [a for _, lp in picks if lp for a in lp if a is not None])
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == picks[accepted][0].item():
            accepted += 1
        s.draft_proposed += len(drafts)
        s.draft_accepted += accepted
        self.batch.trim(s.slot, len(drafts) - accepted)
        if isinstance(s.proposer, _DraftProposer):
            s.proposer.rollback(len(s.history) + min(accepted, max(len(drafts) - 1, 0)))
        out = []
        kept = [(drafts[i], picks[i][1]) for i in range(accepted)] + [(picks[accepted][0].item(), picks[accepted][1])]
        for tok, lp in kept:
            o = self._emit(s, tok, lp)
            if o is not None:
                out.append(o)
            if s.finished is not None:
                return out
        self._after_speculation(s)
        return out

    def _after_speculation(self, s: _Sequence) -> None:
        # The cache holds every token but the last; a batched round (when others join) feeds it.
        s.last, s.fresh, s.last_lp, s.fed = mx.array(s.history[-1]), False, None, None
        s.context = mx.array(s.history[:-1], dtype=mx.uint32) if _tracks_context(s) else None
        if s.counts is not None:
            generated = s.history[len(s.history) - s.generated :] if s.generated else []
            s.counts = _counts(generated[:-1], self.model.config.vocab_size)

    # --- emitting and finishing ----------------------------------------------------------------

    def _emit(self, s: _Sequence, tok: int, lp: tuple | None) -> Output | None:
        if s.matcher is not None:
            if s.matcher_ahead:
                s.matcher_ahead = False
            else:
                s.matcher.advance(tok)
        s.generated += 1
        s.history.append(tok)
        eos = tok == self.model.config.eos_token_id and not s.params.ignore_eos
        text, hit = "", False
        if s.detok is not None and not eos:
            text, hit = s.stop.feed(s.detok.add(tok))
        finish = "stop" if eos or hit else ("length" if s.generated >= s.params.max_tokens else None)
        if finish and s.detok is not None and not hit:
            tail, hit2 = s.stop.feed(s.detok.finalize())
            text += tail if hit2 else tail + s.stop.flush()
        logprobs = top = None
        if lp is not None:
            logprobs = [lp[0].item()]
            top = [list(zip(lp[1].tolist(), lp[2].tolist(), strict=True))] if lp[1] is not None else [[]]
            top[0].sort(key=lambda p: -p[1])
        o = self._output(s, [tok], text, finish, logprobs, top)
        if s.prompt_lp is not None:
            o.prompt_logprobs, o.prompt_top_logprobs = s.prompt_lp[0], s.prompt_lp[1]
            s.prompt_lp = None
        if finish:
            self._finish(s, finish)
        return o

    def _output(self, s, tokens, text, finish, logprobs=None, top=None) -> Output:
        return Output(
            seq_id=s.id,
            text=text,
            tokens=tokens,
            logprobs=logprobs,
            top_logprobs=top,
            finish_reason=finish,
            prompt_tokens=s.prompt_tokens,
            cached_tokens=s.cached_tokens,
            generation_tokens=s.generated,
            draft_proposed=s.draft_proposed,
            draft_accepted=s.draft_accepted,
        )

    def _finish(self, s: _Sequence, reason: str) -> None:
        s.finished = reason
        for group in (self.waiting, self.prefilling, self.running):
            if s in group:
                group.remove(s)
        if s.slot is None:  # it never started
            return
        # Keep the cache in step with the history: a pipelined step may have fed one more token,
        # a cancelled prefill may have fed part of the prompt.
        kept = min(len(s.history), self.batch.offsets[s.slot])
        self.batch.trim(s.slot, self.batch.offsets[s.slot] - kept)
        if s.export or self.prefix_cache.max_bytes > 0:
            self.batch.export(s.slot, s.cache)
        moved = self.batch.free(s.slot)
        s.slot = None
        for other in self.prefilling + self.running:
            other.slot = moved.get(other.slot, other.slot)
        if s.cache[0].offset > 0:
            self.prefix_cache.store(s.history[: s.cache[0].offset], s.cache)


_EMPTY = mx.array([], dtype=mx.uint32)


def prefill(model: OpenELM, ids: list[int], cache: list[KVCache]) -> mx.array | None:
    """Run ``ids`` through the model into ``cache`` in chunks; the last position's logits."""
    logits = None
    for start in range(0, len(ids), PREFILL_CHUNK):
        logits = model.infer(mx.array([ids[start : start + PREFILL_CHUNK]]), cache=cache, last_only=True)[0, -1]
        mx.eval(logits)
    return logits


def _plain_greedy(s: _Sequence) -> bool:
    """Whether the row's next token is its logits' argmax with nothing else to compute."""
    p = s.params
    return (
        is_greedy(p.sampling)
        and p.sampling.repetition_penalty == 1.0
        and p.logprobs is None
        and s.bias is None
        and s.counts is None
        and s.matcher is None
    )


def _tracks_context(s: _Sequence) -> bool:
    return s.params.sampling.repetition_penalty != 1.0


def _counts(tokens: list[int], vocab: int) -> mx.array:
    counts = mx.zeros((vocab,), dtype=mx.float32)
    return counts.at[mx.array(tokens)].add(1.0) if tokens else counts


def _top(logprobs: mx.array, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    idx = mx.argpartition(-logprobs, k - 1)[:k]
    pairs = list(zip(idx.tolist(), logprobs[idx].tolist(), strict=True))
    return sorted(pairs, key=lambda p: -p[1])


def _round_up(n: int) -> int:
    return -(-n // KVCache.step) * KVCache.step


def _kv_bytes_per_token(model: OpenELM) -> int:
    itemsize = model.transformer.norm.weight.dtype.size  # the activations' dtype, and so the cache's
    c = model.config
    return sum(2 * kv * c.head_dim * itemsize for kv in c.num_kv_heads)


class PrefixCache:
    """A byte-bounded LRU of finished sequences' KV states, keyed by their tokens.

    A new prompt reuses the longest common prefix with any entry (the KV state of position i
    depends only on tokens 0..i), always leaving at least one token to prefill for its logits."""

    def __init__(self, max_bytes: int = 0):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], list[KVCache]] = OrderedDict()
        self.hits = 0

    @property
    def nbytes(self) -> int:
        return sum(_cache_bytes(c) for c in self.entries.values())

    def store(self, tokens: list[int], cache: list[KVCache]) -> None:
        if self.max_bytes <= 0 or _cache_bytes(cache) > self.max_bytes:
            return
        key = tuple(tokens)
        self.entries.pop(key, None)
        self.entries[key] = [_copy(c, len(tokens)) for c in cache]
        while self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    def fetch(self, model: OpenELM, prompt: list[int]) -> tuple[list[KVCache], int]:
        best, best_key = 0, None
        limit = len(prompt) - 1
        for key in self.entries:
            n = 0
            for a, b in zip(key, prompt[:limit], strict=False):
                if a != b:
                    break
                n += 1
            if n > best:
                best, best_key = n, key
        if best_key is None:
            return model.make_cache(), 0
        self.entries.move_to_end(best_key)
        self.hits += 1
        return [_copy(c, best) for c in self.entries[best_key]], best


def _cache_bytes(cache: list[KVCache]) -> int:
    return sum(c.nbytes for c in cache)


def _copy(c: KVCache, n: int) -> KVCache:
    out = KVCache()
    if c.keys is not None and n > 0:
        out.keys, out.values = c.keys[..., : _round_up(n), :], c.values[..., : _round_up(n), :]
        mx.eval(out.keys, out.values)
        out.offset = n
    return out


class _DraftProposer:
    """Greedy drafts from a smaller OpenELM with its own cache (all eight share a tokenizer)."""

    def __init__(self, draft: OpenELM):
        self.draft, self.cache = draft, draft.make_cache()

    def __call__(self, ids: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        d = mx.argmax(prefill(self.draft, ids[self.cache[0].offset :], self.cache))
        out = [d]
        for _ in range(k - 1):
            d = mx.argmax(self.draft.infer(d.reshape(1, 1), cache=self.cache)[0, -1])
            out.append(d)
        mx.eval(out)
        return [t.item() for t in out]

    def rollback(self, keep: int) -> None:
        for c in self.cache:
            c.trim(c.offset - keep)


def _lookup_proposer(ids: list[int], k: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup decoding: continue the latest earlier occurrence of the last n-gram."""
    if k <= 0:
        return []
    for n in range(min(max_ngram, len(ids) - 1), 0, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == tail:
                return ids[start + n : start + n + k]
    return []


# --- the Python API over the engine ---------------------------------------------------------------


def encode_prompt(model: OpenELM, tokenizer: Tokenizer, prompt: str | list[int], **template) -> list[int]:
    """Token ids for ``prompt``: text goes through the Instruct template for Instruct models."""
    if not isinstance(prompt, str):
        return list(prompt)
    if not prompt.strip():
        raise OpenELMError("the prompt is empty")
    text = format_prompt(
        prompt,
        getattr(model, "is_instruct", False),
        template.get("system_prompt"),
        template.get("chat_template", "auto"),
    )
    return tokenizer.encode(text)


def params_from_options(
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    response_format: dict | None = None,
    **rest,
) -> GenParams:
    """``GenParams`` from the keyword options generate/stream_generate/batch_generate take;
    ``response_format`` as OpenAI spells it, or a JSON Schema itself (grammar/formats.py)."""
    sampling = SamplingOptions(temp, top_p, top_k, min_p, repetition_penalty)
    constraint = parse_response_format(response_format, bare_schema=True)
    return GenParams(max_tokens=max_tokens, sampling=sampling, constraint=constraint, **rest)


_TEMPLATE_KEYS = ("system_prompt", "chat_template")


def stream_batch_generate(
    model: OpenELM,
    tokenizer: Tokenizer,
    prompts: list[str | list[int]],
    *,
    max_batch: int = 8,
    draft_model: OpenELM | None = None,
    **options,
) -> Iterator[tuple[int, Output]]:
    """Yield ``(prompt index, Output)`` as the sequences of ``prompts`` decode together.

    ``response_format`` may be a list: one per prompt (None for free text)."""
    template = {k: options.pop(k) for k in _TEMPLATE_KEYS if k in options}
    formats = options.pop("response_format", None)
    if not isinstance(formats, list):
        formats = [formats] * len(prompts)
    elif len(formats) != len(prompts):
        raise OpenELMError(f"response_format: {len(formats)} formats for {len(prompts)} prompts")
    params = [params_from_options(**options, response_format=f) for f in formats]
    engine = Engine(model, tokenizer, max_batch=max_batch, draft_model=draft_model)
    index = {engine.submit(encode_prompt(model, tokenizer, p, **template), params[i]): i for i, p in enumerate(prompts)}
    try:
        while engine.has_work():
            for o in engine.step():
                yield index[o.seq_id], o
    finally:
        for seq_id in index:  # a consumer that stops early leaves nothing running
            engine.cancel(seq_id)


def batch_generate(model: OpenELM, tokenizer: Tokenizer, prompts: list[str | list[int]], **options) -> list[str]:
    """The generated text for each prompt (without the prompt), decoded together in batches of
    ``max_batch`` (default 8); options as for ``generate.stream_generate`` plus ``stop``, ``seed``."""
    texts = [""] * len(prompts)
    for i, o in stream_batch_generate(model, tokenizer, prompts, **options):
        texts[i] += o.text
    return texts

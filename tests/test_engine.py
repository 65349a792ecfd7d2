"""The batched engine: every sequence in a batch yields exactly what it yields alone, whatever
joins or leaves around it; stop strings, log-probabilities, penalties, budgets and prefix reuse."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import build_model, random_weights, small_config

from openelm_mlx import cpu
from openelm_mlx.engine import Engine, GenParams, StopMatcher, batch_generate, stream_batch_generate
from openelm_mlx.errors import OpenELMError
from openelm_mlx.generate import generate
from openelm_mlx.loading import load
from openelm_mlx.model import OpenELM
from openelm_mlx.sampling import SamplingOptions

BUNDLED = Path(__file__).resolve().parents[1] / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
CONTEXT = 320


@pytest.fixture(params=["numpy", "mlx"])
def routes(request, monkeypatch):
    """Both CPU decoding routes: eager (NumPy gemv for one row) and the compiled MLX step."""
    monkeypatch.setenv(cpu.ENV, request.param)
    cpu.numpy_routes.cache_clear()
    yield request.param
    cpu.numpy_routes.cache_clear()


def small_model(quantized: bool = False, seed: int = 3) -> OpenELM:
    # Untied: random tied embeddings make a model that repeats its last token forever.
    config = small_config("untied")
    config.max_context_length = CONTEXT
    model = build_model(config, random_weights(config, seed=seed))
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    return model


def run_alone(model, prompt, params) -> list[int]:
    engine = Engine(model, max_batch=1)
    engine.submit(prompt, params)
    tokens = []
    while engine.has_work():
        for o in engine.step():
            tokens += o.tokens
    return tokens


def prompts_of_many_lengths(vocab: int, max_tokens: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    lengths = [1, 2, 7, 40, 130, CONTEXT - max_tokens - 1]  # one token to nearly the whole context
    return [[1] + rng.integers(3, vocab, n - 1).tolist() for n in lengths]


def run_staggered(model, prompts, params, cancel_at=None, prefill_chunk=64, max_batch=8):
    """Half the prompts join at the start, the rest one per round later; returns tokens per prompt."""
    engine = Engine(model, max_batch=max_batch, prefill_chunk=prefill_chunk)
    ids, tokens, finish = {}, {}, {}
    queue = list(enumerate(prompts))
    for i, p in queue[: len(queue) // 2]:
        ids[engine.submit(p, params)] = i
    queue = queue[len(queue) // 2 :]
    rounds = 0
    while engine.has_work() or queue:
        if queue:
            i, p = queue.pop(0)
            ids[engine.submit(p, params)] = i
        for o in engine.step():
            i = ids[o.seq_id]
            tokens.setdefault(i, []).extend(o.tokens)
            if o.finish_reason:
                finish[i] = o.finish_reason
        rounds += 1
        if cancel_at is not None and rounds == cancel_at[1]:
            engine.cancel(next(s for s, i in ids.items() if i == cancel_at[0]))
    return tokens, finish


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4-bit"])
def test_greedy_batch_equals_each_sequence_alone(routes, quantized):
    model = small_model(quantized)
    params = GenParams(max_tokens=24, ignore_eos=True)
    prompts = prompts_of_many_lengths(model.config.vocab_size, 24)
    alone = [run_alone(model, p, params) for p in prompts]
    assert len({tuple(a) for a in alone}) == len(alone)  # the test can tell sequences apart
    batched, finish = run_staggered(model, prompts, params)
    assert [batched[i] for i in range(len(prompts))] == alone
    assert set(finish.values()) == {"length"}


def test_more_sequences_than_rows_wait_their_turn_and_match():
    # 10 sequences through 4 rows (joins and leaves every few rounds), 4-bit: with more than 8
    # rows a quantized matmul takes the prompt route, so also run 10 rows at once.
    model = small_model(quantized=True)
    rng = np.random.default_rng(5)
    prompts = [[1] + rng.integers(3, 300, int(n)).tolist() for n in rng.integers(1, 60, 10)]
    params = [GenParams(max_tokens=int(m), ignore_eos=True) for m in rng.integers(1, 20, 10)]
    alone = [run_alone(model, p, q) for p, q in zip(prompts, params, strict=True)]
    for max_batch in (4, 10):
        engine = Engine(model, max_batch=max_batch)
        ids = {engine.submit(p, q): i for i, (p, q) in enumerate(zip(prompts, params, strict=True))}
        got = {i: [] for i in range(10)}
        while engine.has_work():
            assert len(engine.running) + len(engine.prefilling) <= max_batch
            for o in engine.step():
                got[ids[o.seq_id]] += o.tokens
        assert [got[i] for i in range(10)] == alone


def test_early_eos_and_cancellation_leave_the_others_unchanged(routes):
    model = small_model()
    prompts = prompts_of_many_lengths(model.config.vocab_size, 30)
    greedy = GenParams(max_tokens=30, ignore_eos=True)
    alone = [run_alone(model, p, greedy) for p in prompts]
    # Make a token that some sequence j first yields at position k >= 2 the end-of-sequence token.
    j, k = next((j, i) for j, a in enumerate(alone) for i in range(2, 30) if a[i] not in a[:i])
    model.config.eos_token_id = alone[j][k]
    params = GenParams(max_tokens=30)
    expected = [run_alone(model, p, params) for p in prompts]
    assert expected[j] == alone[j][: k + 1]
    victim = 4 if j != 4 else 3
    tokens, finish = run_staggered(model, prompts, params, cancel_at=(victim, 6))
    assert finish[j] == "stop" and finish[victim] == "cancelled"
    for i in range(len(prompts)):
        if i == victim:
            assert tokens[i] == expected[i][: len(tokens[i])] and len(tokens[i]) < 30
        else:
            assert tokens[i] == expected[i], i


def test_seeded_sampling_in_a_batch_equals_the_same_seed_alone():
    model = small_model()
    prompts = prompts_of_many_lengths(model.config.vocab_size, 20)[:4]
    sampling = SamplingOptions(temp=0.9, top_p=0.95, repetition_penalty=1.3)
    params = [GenParams(max_tokens=20, sampling=sampling, seed=s, ignore_eos=True) for s in (1, 2, 3, 1)]
    alone = [run_alone(model, p, q) for p, q in zip(prompts, params, strict=True)]
    engine = Engine(model)
    ids = {engine.submit(p, q): i for i, (p, q) in enumerate(zip(prompts, params, strict=True))}
    got = {i: [] for i in ids.values()}
    while engine.has_work():
        for o in engine.step():
            got[ids[o.seq_id]] += o.tokens
    assert [got[i] for i in range(4)] == alone
    assert alone[0] != alone[3]  # same seed, different prompts: the key is per sequence


def test_a_long_prefill_does_not_freeze_running_sequences():
    model = small_model()
    engine = Engine(model, prefill_chunk=16)
    short = engine.submit([1, 5, 9], GenParams(max_tokens=40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.submit([1] + list(range(3, 203)), GenParams(max_tokens=5, ignore_eos=True))  # 13 rounds of prefill
    rounds_with_short = 0
    for _ in range(12):
        outs = engine.step()
        assert engine.prefilling  # still prefilling the long prompt
        rounds_with_short += any(o.seq_id == short and o.tokens for o in outs)
    assert rounds_with_short == 12


def test_logprobs_match_a_full_forward():
    model = small_model()
    prompt = [1, 17, 33, 99, 4]
    engine = Engine(model, prefill_chunk=3)  # prompt log-probabilities across chunk boundaries
    engine.submit(prompt, GenParams(max_tokens=6, ignore_eos=True, logprobs=4, prompt_logprobs=True))
    outs = []
    while engine.has_work():
        outs += engine.step()
    tokens = [t for o in outs for t in o.tokens]
    full = np.array(model(mx.array([prompt + tokens])), dtype=np.float64)[0]
    logp = (
        full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
    )
    seq = prompt + tokens
    for j, o in enumerate(o for o in outs if o.tokens):
        pos = len(prompt) - 1 + j
        assert abs(o.logprobs[0] - logp[pos, seq[pos + 1]]) < 1e-4
        top = o.top_logprobs[0]
        assert [t for t, _ in top] == list(np.argsort(-logp[pos])[:4])
        assert top[0][0] == seq[pos + 1]  # greedy: the chosen token is the most likely
    first = next(o for o in outs if o.tokens)
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert abs(first.prompt_logprobs[i] - logp[i - 1, prompt[i]]) < 1e-4


def test_penalties_and_logit_bias():
    model = small_model()
    prompt = [1, 8, 9, 10]
    biased = run_alone(model, prompt, GenParams(max_tokens=8, ignore_eos=True, logit_bias={77: 100.0}))
    assert biased == [77] * 8
    # A frequency penalty far above any logit gap: greedy never picks a token twice.
    plain = run_alone(model, prompt, GenParams(max_tokens=40, ignore_eos=True))
    assert len(set(plain)) < 40
    spread = run_alone(model, prompt, GenParams(max_tokens=40, ignore_eos=True, frequency_penalty=1e4))
    assert len(set(spread)) == 40
    presence = run_alone(model, prompt, GenParams(max_tokens=40, ignore_eos=True, presence_penalty=1e4))
    assert presence == spread


def test_kv_budget_refuses_a_sequence_without_disturbing_the_others():
    model = small_model()
    per_seq = Engine(model)._kv_per_token * 256  # one allocation step
    engine = Engine(model, kv_budget_bytes=2 * per_seq)
    params = GenParams(max_tokens=20, ignore_eos=True)
    a = engine.submit([1, 2, 3], params)
    got = [t for o in engine.step() for t in o.tokens]
    engine.submit([1, 4, 5], params)
    with pytest.raises(OpenELMError, match="KV cache"):
        engine.submit([1, 6, 7], params)
    while engine.has_work():
        got += [t for o in engine.step() if o.seq_id == a for t in o.tokens]
    assert got == run_alone(model, [1, 2, 3], params)
    with pytest.raises(OpenELMError, match="context"):
        engine.submit([1] * 300, GenParams(max_tokens=30))


def test_prefix_cache_reuses_a_finished_sequences_state():
    model = small_model()
    engine = Engine(model, prompt_cache_bytes=1 << 30)
    params = GenParams(max_tokens=10, ignore_eos=True)
    first = [1] + list(range(3, 60))
    engine.submit(first, params)
    reply = []
    while engine.has_work():
        reply += [t for o in engine.step() for t in o.tokens]
    follow = first + reply + [11, 12, 13]  # a chat client resending the conversation plus a turn
    engine.submit(follow, params)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert outs[0].cached_tokens == len(first) + len(reply) - 1  # all but the reply's last token
    assert [t for o in outs for t in o.tokens] == run_alone(model, follow, params)


def test_stop_matcher_never_emits_part_of_a_stop_string():
    m = StopMatcher(("END", "xy"))
    emitted = [m.feed(p) for p in ["ab", "cE", "N", "x", "D"]]
    assert emitted[:3] == [("ab", False), ("c", False), ("", False)]  # "EN" could become "END"
    assert emitted[3] == ("EN", False)  # "ENx": not END; "x" could still become "xy"
    assert emitted[4] == ("xD", False)
    m = StopMatcher(("END",))
    assert m.feed("aEN") == ("a", False) and m.feed("Dzz") == ("", True)


@pytest.fixture(scope="module")
def bundled():
    return load(BUNDLED)


def test_bundled_batch_generate_equals_generate_and_stops_on_text(bundled):
    model, tok = bundled
    prompts = ["In the beginning", "And the LORD said unto Moses", "Blessed are", "The"]
    alone = [generate(model, tok, p, max_tokens=40) for p in prompts]
    assert batch_generate(model, tok, prompts, max_tokens=40) == alone
    assert batch_generate(model, tok, prompts, max_tokens=40, max_batch=3) == alone
    text = alone[1]
    stop = text[10:14]
    cut = text[: text.find(stop)]
    pieces = [
        (o.text, o.finish_reason)
        for _, o in stream_batch_generate(model, tok, [prompts[1]], max_tokens=40, stop=[stop])
    ]
    assert "".join(t for t, _ in pieces) == cut and pieces[-1][1] == "stop"
    # A stop string that never completes holds text back only until the end: nothing is lost.
    never = text[20:23] + "\x00"
    assert batch_generate(model, tok, [prompts[1]], max_tokens=40, stop=[never]) == [text]


def test_bad_parameters_are_clear_errors():
    model = small_model()
    engine = Engine(model)
    for kwargs, word in [
        (dict(max_tokens=0), "max_tokens"),
        (dict(logprobs=99), "logprobs"),
        (dict(stop=("",)), "stop"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
    ]:
        with pytest.raises(OpenELMError, match=word):
            GenParams(**kwargs)
    with pytest.raises(OpenELMError, match="empty"):
        engine.submit([])
    with pytest.raises(OpenELMError, match="vocabulary"):
        engine.submit([1, 99999])
    with pytest.raises(OpenELMError, match="logit_bias"):
        engine.submit([1, 2], GenParams(logit_bias={10**6: 1.0}))
    assert not engine.has_work()


@pytest.mark.parametrize("quantized", [False, True])
def test_prompts_prefilled_together_equal_alone(routes, quantized, monkeypatch):
    """Several sequences prefilling share one batched forward per round (equal-length chunks),
    and each still yields exactly what it yields alone."""
    model = small_model(quantized)
    rng = np.random.default_rng(4)
    prompts = [[1] + rng.integers(3, model.config.vocab_size, n - 1).tolist() for n in (12, 30, 30, 75, 140)]
    params = GenParams(max_tokens=12)
    alone = [run_alone(model, p, params) for p in prompts]
    batched_prefills = []
    real = model.infer

    def spy(tokens, cache=None, last_only=False):
        if tokens.shape[0] > 1 and tokens.shape[1] > 1:
            batched_prefills.append(tuple(tokens.shape))
        return real(tokens, cache, last_only)

    monkeypatch.setattr(model, "infer", spy)
    engine = Engine(model, max_batch=8, prefill_chunk=128)
    ids = {engine.submit(p, params): i for i, p in enumerate(prompts)}
    got = {}
    while engine.has_work():
        for o in engine.step():
            got.setdefault(ids[o.seq_id], []).extend(o.tokens)
    assert [got[i] for i in range(len(prompts))] == alone
    assert batched_prefills and batched_prefills[0] == (5, 12)  # 5 rows x the shortest prompt


@pytest.mark.parametrize("lookup", [0, 3], ids=["plain", "prompt-lookup"])
def test_non_finite_logits_end_generation_with_a_clear_error(lookup):
    # float16 activations that overflow (Apple: OpenELM-3B in float16) give inf/NaN logits.
    config = small_config("untied")
    weights = {k: v * (3e3 if k.endswith("proj_1.weight") else 1) for k, v in random_weights(config, seed=3).items()}
    model = build_model(config, weights, dtype=mx.float16)
    engine = Engine(model)
    engine.submit([1, 5, 9, 5, 9], GenParams(max_tokens=8, ignore_eos=True, prompt_lookup=lookup))
    with pytest.raises(OpenELMError) as e:
        while engine.has_work():
            engine.step()
    message = str(e.value)
    assert "\n" not in message and "not finite" in message and "bfloat16 or float32" in message
    assert "float16" in message


def test_non_finite_logits_in_a_decode_step_end_generation(monkeypatch):
    model = small_model()
    engine = Engine(model)
    real, calls = engine.decode, []

    def overflowing(tokens, batch, decoding):
        calls.append(1)
        logits = real(tokens, batch, decoding)
        return logits * mx.inf if len(calls) == 3 else logits

    overflowing.dtype = real.dtype
    engine.decode = overflowing
    engine.submit([1, 5, 9], GenParams(max_tokens=20, ignore_eos=True))
    engine.submit([1, 7], GenParams(max_tokens=20, ignore_eos=True))
    with pytest.raises(OpenELMError, match="not finite"):
        while engine.has_work():
            engine.step()
    assert len(calls) == 3


def test_rows_with_different_parameters_in_one_batch_equal_each_alone(routes):
    # Plain greedy rows share one argmax over the step's logits; rows with penalties, bias,
    # log-probabilities or a sampler draw on their own and their tokens join that array: each
    # still yields what it yields alone, through joins and leaves.
    model = small_model()
    prompts = prompts_of_many_lengths(model.config.vocab_size, 20)
    shunned = run_alone(model, prompts[3], GenParams(max_tokens=1))[0]
    kinds = [
        GenParams(max_tokens=20, ignore_eos=True),
        GenParams(max_tokens=20, ignore_eos=True, logprobs=2),
        GenParams(max_tokens=20, ignore_eos=True, frequency_penalty=1e4),
        GenParams(max_tokens=20, ignore_eos=True, logit_bias={shunned: -50.0}),
        GenParams(max_tokens=20, ignore_eos=True, sampling=SamplingOptions(temp=0.8), seed=5),
        GenParams(max_tokens=20, ignore_eos=True, sampling=SamplingOptions(repetition_penalty=5.0)),
    ]
    alone = [run_alone(model, p, q) for p, q in zip(prompts, kinds, strict=True)]
    for i in (2, 3, 4, 5):  # each of these parameters does change the output of its prompt
        assert alone[i] != run_alone(model, prompts[i], kinds[0]), i
    engine = Engine(model, max_batch=8, prefill_chunk=64)
    ids = {}
    for i in (0, 4, 1):
        ids[engine.submit(prompts[i], kinds[i])] = i
    later = [2, 5, 3]
    got = {i: [] for i in range(len(prompts))}
    while engine.has_work() or later:
        if later:
            i = later.pop(0)
            ids[engine.submit(prompts[i], kinds[i])] = i
        for o in engine.step():
            got[ids[o.seq_id]] += o.tokens
    assert [got[i] for i in range(len(prompts))] == alone


def test_a_greedy_decode_round_has_as_many_ops_at_16_rows_as_at_2(monkeypatch, tmp_path):
    # The step's input is the previous step's array of tokens, sampling one argmax over every
    # slot: the graph of a round (forward and sampling) does not grow with the batch.
    monkeypatch.setenv(cpu.ENV, "mlx")
    cpu.numpy_routes.cache_clear()
    model = small_model()
    counts = {}
    for b in (2, 16):
        engine = Engine(model, max_batch=b)
        for r in range(b):
            engine.submit([1, 5 + r, 9, 4], GenParams(max_tokens=8, ignore_eos=True))
        while len(engine.running) < b:
            engine.step()
        engine.step()
        engine.step()  # now every row's token is in the previous step's array
        with monkeypatch.context() as m:
            m.setattr(mx, "async_eval", lambda *a, **k: None)  # leave the round's graph unevaluated
            engine.step()
            path = tmp_path / f"round{b}.dot"
            mx.export_to_dot(str(path), engine._sampled)
        counts[b] = path.read_text().count("shape=rectangle")
    cpu.numpy_routes.cache_clear()
    assert counts[2] == counts[16], counts

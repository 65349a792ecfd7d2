"""Generation: against the NumPy reference, exactness of speculative/prompt-lookup decoding,
streaming detokenization, sampling filters, the CLI and the chat loop."""

import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from helpers import INTERRUPTIBLE, random_weights, small_config, train_tokenizer, write_hf_folder
from openelm_mlx.convert.pipeline import convert

from openelm_mlx import generate, load, reference, stream_generate
from openelm_mlx.chat import ChatSession
from openelm_mlx.generate import generate_tokens
from openelm_mlx.sampling import SamplingOptions, apply_repetition_penalty, filter_logits, make_sampler
from openelm_mlx.template import format_prompt
from openelm_mlx.tokenizer import Tokenizer

QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A converted float32 random model with a trained SentencePiece tokenizer, its config and weights."""
    root = tmp_path_factory.mktemp("gen")
    config = small_config("tied")
    weights = random_weights(config, seed=21)
    src = write_hf_folder(root / "src", config, weights)
    convert(str(src), root / "model", **QUIET)
    return root / "model", config, weights


@pytest.fixture(scope="module")
def draft(tmp_path_factory, tiny):
    """A different, smaller random model with the same vocabulary."""
    root = tmp_path_factory.mktemp("draft")
    config = small_config("tied")
    config = type(config).scaled(num_transformer_layers=2, model_dim=64, head_dim=16, vocab_size=config.vocab_size)
    src = write_hf_folder(root / "src", config, random_weights(config, seed=5), tokenizer=False)
    convert(str(src), root / "model", tokenizer=str(tiny[0] / "tokenizer.model"), **QUIET)
    return root / "model"


def test_greedy_equals_reference_argmax(tiny):
    path, config, weights = tiny
    model, tok = load(path)
    prompt = tok.encode("Tuat sohe rin")
    got = list(generate_tokens(model, prompt, max_tokens=12))
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(reference.forward(config, weights, np.array([ids]))[0, -1].argmax()))
    expected = ids[len(prompt) :]
    if config.eos_token_id in expected:
        expected = expected[: expected.index(config.eos_token_id) + 1]
    assert got == expected


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_speculative_and_prompt_lookup_equal_plain_greedy(tiny, draft, penalty):
    model, tok = load(tiny[0])
    draft_model, _ = load(draft)
    sampling = SamplingOptions(repetition_penalty=penalty)
    for text in ["Tuat sohe rin tuat sohe", "Ba ba ba ba ba ba", "Oheu"]:
        prompt = tok.encode(text)
        plain = list(generate_tokens(model, prompt, max_tokens=40, sampling=sampling))
        for k in (1, 3, 5):
            spec = list(
                generate_tokens(
                    model, prompt, max_tokens=40, sampling=sampling, draft_model=draft_model, num_draft_tokens=k
                )
            )
            assert spec == plain, (text, k)
        for n in (2, 10):
            lookup = list(generate_tokens(model, prompt, max_tokens=40, sampling=sampling, prompt_lookup=n))
            assert lookup == plain, (text, n)


def test_prompt_lookup_accepts_drafts_on_repetitive_text(tiny):
    model, tok = load(tiny[0])
    responses = list(stream_generate(model, tok, "ab ab ab ab ab ab", max_tokens=30, prompt_lookup=10))
    assert responses[-1].draft_proposed > 0
    assert 0 <= responses[-1].draft_accepted <= responses[-1].draft_proposed


def test_streamed_text_equals_one_shot_decode(tiny):
    model, tok = load(tiny[0])
    responses = list(stream_generate(model, tok, "Tuat", max_tokens=30, temp=1.5, seed=3))
    ids = [t for r in responses for t in r.tokens if t != tok.eos_id]
    assert "".join(r.text for r in responses) == tok.decode(ids)


def test_streaming_detokenizer_on_byte_fallback_and_spaces(tiny):
    tok = Tokenizer(tiny[0] / "tokenizer.model")
    rng = np.random.default_rng(0)
    texts = ["héllo wörld — ✓ 漢字 🙂", "  leading spaces", "a\nb\tc", "🙂🙂🙂"]
    sequences = [tok.encode(t, add_bos=False) for t in texts]
    sequences += [list(rng.integers(3, tok.vocab_size, 40)) for _ in range(20)]  # includes byte pieces
    for ids in sequences:
        detok = tok.detokenizer()
        pieces = [detok.add(t) for t in ids] + [detok.finalize()]
        full = tok.decode(ids)
        assert "".join(pieces) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces)
    assert tok.decode(tok.encode(texts[0], add_bos=False)) == texts[0]


def test_seeded_sampling_reproduces(tiny):
    model, tok = load(tiny[0])
    # a very high temperature: this random model's logits have a standard deviation near 11
    a = generate(model, tok, "Tuat", max_tokens=25, temp=30.0, top_p=0.99, seed=7)
    b = generate(model, tok, "Tuat", max_tokens=25, temp=30.0, top_p=0.99, seed=7)
    c = generate(model, tok, "Tuat", max_tokens=25, temp=30.0, top_p=0.99, seed=8)
    assert a == b and a != c


def test_seeded_sampler_reproduces_on_flat_logits():
    flat = mx.zeros((64,))
    empty = mx.array([], dtype=mx.uint32)

    def draw(seed):
        sampler = make_sampler(SamplingOptions(temp=1.0), seed=seed)
        return [int(sampler(flat, empty)) for _ in range(50)]

    assert draw(1) == draw(1) and draw(1) != draw(2)
    assert len(set(draw(1))) > 20


CRAFTED = mx.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -20.0])


def _support(opts, n=400):
    sampler = make_sampler(opts, seed=0)
    return {int(sampler(CRAFTED, mx.array([], dtype=mx.uint32))) for _ in range(n)}


def test_top_k_top_p_min_p_keep_only_allowed_tokens():
    p = np.exp(np.array(CRAFTED) - np.log(np.exp(np.array(CRAFTED)).sum()))
    assert _support(SamplingOptions(temp=1.0, top_k=3)) == {0, 1, 2}
    # top-p 0.9: the smallest prefix whose mass reaches 0.9
    n = int(np.searchsorted(np.cumsum(p), 0.9) + 1)
    assert _support(SamplingOptions(temp=1.0, top_p=0.9)) == set(range(n))
    # min-p 0.1: tokens with probability >= 0.1 x the top one
    allowed = {i for i in range(8) if p[i] >= 0.1 * p[0]}
    assert _support(SamplingOptions(temp=1.0, min_p=0.1)) == allowed
    masked = np.array(filter_logits(CRAFTED, SamplingOptions(temp=1.0, top_k=2)))
    assert np.isfinite(masked[:2]).all() and np.isneginf(masked[2:]).all()
    assert _support(SamplingOptions(temp=0.0)) == {0}


def test_repetition_penalty_has_hf_semantics():
    logits = mx.array([2.0, -2.0, 1.0, -1.0])
    out = np.array(apply_repetition_penalty(logits, mx.array([0, 1, 1], dtype=mx.uint32), 2.0))
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]


def test_instruct_template_and_eos_tokens(tiny):
    tok = Tokenizer(tiny[0] / "tokenizer.model")
    text = format_prompt("Hi", instruct=True, system_prompt="Be brief")
    assert text == "<|system|>\nBe brief</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2
    assert format_prompt("Hi", instruct=False) == "Hi"


def test_chat_keeps_its_cache_across_turns(tiny):
    model, tok = load(tiny[0])
    session = ChatSession(model, tok, system_prompt="Be brief", max_tokens=8)
    assert isinstance("".join(session.send("Tuat sohe")), str)
    turn1_prompt = session.last_prompt_tokens
    assert turn1_prompt == session.reply_start  # the whole first prompt
    before = len(session.history)
    reply2 = "".join(session.send("Rin oheu"))
    # turn two reads only its own tokens (plus at most the one token the cache had not seen)
    assert session.last_prompt_tokens <= session.reply_start - before + 1
    assert session.last_prompt_tokens < session.reply_start
    # system, user, reply (closed even when cut at --max-tokens), user: each turn ends with EOS
    assert session.history[: session.reply_start].count(tok.eos_id) == 4
    # the cached continuation equals a fresh run over the whole conversation
    fresh = list(generate_tokens(model, session.history[: session.reply_start], max_tokens=8))
    assert tok.decode([t for t in fresh if t != tok.eos_id]) == reply2


def cli(*args, input=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", *args],
        capture_output=True,
        input=input,
        env={**os.environ, **(env or {})},
    )


def test_cli_generate_streams_text_and_reports_figures(tiny):
    model, tok = load(tiny[0])
    expected = generate(model, tok, "Tuat sohe", max_tokens=16)
    out = cli("generate", "--model", str(tiny[0]), "--prompt", "Tuat sohe", "--max-tokens", "16")
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode() == expected + "\n"
    err = out.stderr.decode()
    assert "prompt:" in err and "tokens/s" in err and "peak memory" in err
    peak = re.search(r"peak memory: ([0-9.]+) MB", err)  # a tiny model's peak is MB, not "0.00 GB"
    assert peak and float(peak.group(1)) > 0, err
    out = cli("generate", "--model", str(tiny[0]), "--prompt", "-", "--max-tokens", "16", input=b"Tuat sohe")
    assert out.stdout.decode() == expected + "\n"


def test_cli_generate_errors_are_one_line(tiny, tmp_path):
    def fails(*args, input=None, words=""):
        out = cli("generate", *args, input=input)
        err = out.stderr.decode()
        assert out.returncode == 1 and "Traceback" not in err and words in err, err
        assert len(err.strip().splitlines()) == 1

    model = str(tiny[0])
    fails("--model", model, "--prompt", "   ", words="prompt is empty")
    fails("--model", str(tmp_path / "nope"), "--prompt", "hi", words="no such")
    (tmp_path / "empty").mkdir()
    fails("--model", str(tmp_path / "empty"), "--prompt", "hi", words="")
    fails("--model", model, "--prompt", "hi", "--max-tokens", "5000", words="context of 2048 tokens")
    fails("--model", model, "--prompt", "-", input=b"\xff\xfe bad", words="not valid UTF-8")
    train_tokenizer(tmp_path / "other.model", 400)
    fails(
        "--model",
        model,
        "--prompt",
        "hi",
        "--tokenizer",
        str(tmp_path / "other.model"),
        words="400 pieces but the model's vocabulary is 512",
    )
    fails("--model", model, "--prompt", "hi", "--temp", "-1", words="--temp")


def test_cli_chat_two_turns(tiny):
    out = cli("chat", "--model", str(tiny[0]), "--max-tokens", "6", input=b"Tuat sohe\nRin oheu\n/reset\nBa\n/quit\n")
    assert out.returncode == 0, out.stderr
    err = out.stderr.decode()
    counts = [int(line.split("[")[1].split()[0]) for line in err.splitlines() if "new prompt tokens" in line]
    assert len(counts) == 3 and counts[1] < counts[0] + 6 and "(conversation reset)" in err


def test_ctrl_c_stops_cleanly_and_prints_the_figures(tiny):
    import signal
    import time

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "openelm_mlx.cli",
            "generate",
            "--model",
            str(tiny[0]),
            "--prompt",
            "Tuat",
            "--max-tokens",
            "2000",  # greedy: this model repeats itself for seconds without reaching EOS
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **INTERRUPTIBLE,
    )
    deadline = time.time() + 60
    first = proc.stdout.read(1)  # generation has started
    assert first and time.time() < deadline
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    err = err.decode()
    assert "Traceback" not in err and "interrupted" in err and "generation:" in err and "tokens/s" in err

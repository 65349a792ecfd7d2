"""Structured output (openelm_mlx/grammar/): JSON mode, JSON Schema and tool calls.

Neither model here knows JSON (the bundled one read only the King James Bible, the 270M-shape
one has random weights), so every answer that parses and validates does so because the token
mask allowed nothing else.  Every schema is bounded (string lengths, array sizes, number ranges)
so that even a random model reaches the end well within ``max_tokens``: then the finish reason
must be "stop" and the text must parse and validate, with no exception.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from helpers import build_model, random_weights

from openelm_mlx import OpenELMConfig, OpenELMError, load
from openelm_mlx.engine import Engine, GenParams, stream_batch_generate
from openelm_mlx.generate import generate, stream_generate
from openelm_mlx.grammar import GrammarError, Matcher, compile_spec, parse_response_format, parse_tools
from openelm_mlx.grammar.bridge import SPACE, _Vocabulary, token_bytes
from openelm_mlx.sampling import SamplingOptions
from openelm_mlx.tokenizer import Tokenizer, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
KJV = ROOT / "examples" / "data" / "kjv.txt.xz"
NAME = {"type": "string", "minLength": 1, "maxLength": 10}
SEEDS = range(5)


def obj(properties: dict, required: list | None = None) -> dict:
    required = list(properties) if required is None else required
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


# 24 schemas: nested objects, arrays with min/max items, enums, required and optional fields,
# numbers with bounds, strings with pattern and format, anyOf, $ref, nullable, const, tuples.
SCHEMAS = {
    "flat": obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 150}}),
    "nested": obj(
        {"person": obj({"name": NAME, "city": NAME}), "id": {"type": "integer", "minimum": 1, "maximum": 999}}
    ),
    "deep": obj({"a": obj({"b": obj({"c": obj({"d": {"type": "boolean"}})})})}),
    "array_bounds": obj({"tags": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}}),
    "array_of_objects": obj(
        {
            "items": {
                "type": "array",
                "items": obj({"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}),
                "minItems": 1,
                "maxItems": 3,
            }
        }
    ),
    "enum_strings": obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": ["S", "M", "L", "XL"]}}),
    "enum_mixed": obj({"v": {"enum": [1, "two", None, True, 3.5]}}),
    "optional_fields": obj(
        {"title": NAME, "subtitle": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}}, ["title"]
    ),
    "all_optional": obj({"x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "boolean"}}, []),
    "integer_bounds": obj(
        {
            "n": {"type": "integer", "minimum": -40, "maximum": 40},
            "m": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
        }
    ),
    # Without multipleOf a number may run on in fraction digits (a greedy model loops on "0"s until
    # max_tokens): multipleOf bounds the decimals, and binary fractions keep jsonschema's float check exact.
    "number_bounds": obj(
        {
            "price": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.25},
            "ratio": {"type": "number", "exclusiveMinimum": -1, "maximum": 1, "multipleOf": 0.125},
        }
    ),
    "multiple_of": obj({"k": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}}),
    "pattern": obj(
        {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"},
            "word": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8},
        }
    ),
    "format_date": obj({"day": {"type": "string", "format": "date"}}),
    "format_uuid": obj({"id": {"type": "string", "format": "uuid"}}),
    "string_lengths": obj({"s": {"type": "string", "minLength": 3, "maxLength": 5}}),
    "any_of_scalars": obj(
        {
            "v": {
                "anyOf": [
                    {"type": "integer", "minimum": 0, "maximum": 9},
                    {"type": "string", "maxLength": 4},
                    {"type": "null"},
                ]
            }
        }
    ),
    "any_of_objects": {
        "anyOf": [
            obj({"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 50}}),
            obj(
                {
                    "kind": {"const": "rect"},
                    "w": {"type": "integer", "minimum": 1, "maximum": 50},
                    "h": {"type": "integer", "minimum": 1, "maximum": 50},
                }
            ),
        ]
    },
    "nullable": obj(
        {
            "note": {"type": ["string", "null"], "maxLength": 6},
            "count": {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
        }
    ),
    "const_and_bool": obj({"version": {"const": 2}, "ok": {"type": "boolean"}, "nothing": {"type": "null"}}),
    "refs": {
        "$defs": {
            "pt": obj(
                {
                    "x": {"type": "integer", "minimum": 0, "maximum": 9},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                }
            )
        },
        **obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}),
    },
    "top_level_array": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 5},
    "tuple": obj(
        {
            "pair": {
                "type": "array",
                "prefixItems": [NAME, {"type": "integer", "minimum": 0, "maximum": 9}],
                "items": False,
                "minItems": 2,
            }
        }
    ),
    "matrix": obj(
        {
            "rows": {
                "type": "array",
                "items": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "minItems": 2,
                    "maxItems": 2,
                },
                "minItems": 2,
                "maxItems": 3,
            }
        }
    ),
}
PROMPTS = ["And God said", "The LORD is my shepherd", "In the beginning"]


@pytest.fixture(scope="module")
def bundled():
    return load(BUNDLED)


@pytest.fixture(scope="module")
def model_270m(tmp_path_factory):
    """A random-weight model of OpenELM-270M's shapes and a 32000-piece byte-fallback
    SentencePiece tokenizer (trained on the bundled KJV text in ~3 s): the real vocabulary's size."""
    path = tmp_path_factory.mktemp("tok") / "kjv-32000.model"
    lines = [line for line in lzma.open(KJV, "rt").read().splitlines() if line.strip()]
    train_sentencepiece(lines, 32000, path, hard_vocab_limit=False)
    tok = Tokenizer(path)
    config = OpenELMConfig.from_preset("270M")
    assert tok.vocab_size == config.vocab_size == 32000
    config.max_context_length = 512  # (a smaller KV reservation; prompts and answers are short)
    return build_model(config, random_weights(config, seed=3)), tok


def run_all(model, tok, max_tokens: int, max_batch: int) -> list[tuple[str, str, str, float]]:
    """Every schema at temperature 0 and at temperature 1 with each of SEEDS, batched on one engine."""
    engine = Engine(model, tok, max_batch=max_batch)
    jobs = {}
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        spec = parse_response_format(schema, bare_schema=True)
        prompt = tok.encode(PROMPTS[i % len(PROMPTS)])
        for temp, seed in [(0.0, None)] + [(1.0, s) for s in SEEDS]:
            params = GenParams(max_tokens=max_tokens, sampling=SamplingOptions(temp=temp), seed=seed, constraint=spec)
            jobs[engine.submit(prompt, params)] = [name, "", None, temp]
    while engine.has_work():
        for o in engine.step():
            jobs[o.seq_id][1] += o.text
            jobs[o.seq_id][2] = o.finish_reason or jobs[o.seq_id][2]
    return [tuple(v) for v in jobs.values()]


def check_all(results) -> None:
    assert len(results) == len(SCHEMAS) * (1 + len(SEEDS))
    bad = []
    for name, text, finish, temp in results:
        try:
            assert finish == "stop", f"finish_reason {finish}"
            jsonschema.validate(json.loads(text), SCHEMAS[name], format_checker=jsonschema.FormatChecker())
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            bad.append(f"{name} (temp {temp}): {text!r}: {str(e).splitlines()[0]}")
    assert not bad, "\n".join(bad)  # 100% on every schema


def test_every_schema_parses_and_validates_on_the_bundled_model(bundled):
    check_all(run_all(*bundled, max_tokens=200, max_batch=32))


def test_every_schema_parses_and_validates_on_a_random_270m_model(model_270m):
    # (CPU-bound: 144 answers of ~20 tokens at 270M; 16 rows per step is where batching stops paying here)
    check_all(run_all(*model_270m, max_tokens=160, max_batch=16))


def test_temperature_one_draws_differ_so_the_grammar_is_not_forcing_one_answer(bundled):
    texts = {r[1] for r in run_all(*bundled, max_tokens=200, max_batch=32) if r[0] == "flat" and r[3] == 1.0}
    assert len(texts) >= 3


# --- the tokenizer bridge ------------------------------------------------------------------------


def test_bridge_token_bytes_follow_the_sentencepiece_pieces(bundled):
    _, tok = bundled
    sp = tok.sp
    table = token_bytes(tok, 4100)
    assert table[tok.eos_id].startswith(b"\xff") and table[tok.bos_id].startswith(b"\xff")
    assert table[4096:] == [b"\xff[pad %d]" % i for i in range(4096, 4100)]
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            assert table[i] == bytes([int(piece[3:5], 16)])
        elif not sp.is_control(i) and not sp.is_unknown(i):
            assert table[i] == piece.replace(SPACE, " ").encode()
            # the bytes are what decoding yields inside a text (after a first token)
            a = sp.piece_to_id("a")
            assert sp.decode([a, i]).encode() == b"a" + table[i]


@pytest.mark.parametrize("text", ['{"name":', "a  b", "\n\tx", " hi", "é ü 中", "}", '"1', ""])
def test_bridge_encode_spells_the_text_exactly(bundled, text):
    _, tok = bundled
    vocab = _Vocabulary(tok, 4096, tok.eos_id)
    ids = vocab(text)
    assert b"".join(vocab.tokens[i] for i in ids) == text.encode()


def test_masks_match_a_brute_force_check_of_each_token(bundled):
    """The mask allows exactly the spellings after which the text can still become valid: every
    token is checked against the two complete answers of a small, fully enumerable schema.  (Where
    two ids spell the same bytes, a byte-fallback piece and a normal one, llguidance allows one.)"""
    model, tok = bundled
    spec = parse_response_format(obj({"c": {"enum": ["ab", "b"]}}), bare_schema=True)
    vocab = _Vocabulary(tok, 4096, tok.eos_id)
    complete = [b'{"c":"ab"}', b'{"c":"b"}']
    m = Matcher(spec, compile_spec(spec, tok, 4096, tok.eos_id), 4096)
    text = b""
    while text != complete[0]:
        allowed = set(np.flatnonzero(m.mask()).tolist())
        valid = {i for i, t in enumerate(vocab.tokens) if t and any(c.startswith(text + t) for c in complete)}
        assert allowed <= valid and {vocab.tokens[i] for i in allowed} == {vocab.tokens[i] for i in valid}
        step = max(
            (i for i in allowed if complete[0].startswith(text + vocab.tokens[i])), key=lambda i: len(vocab.tokens[i])
        )
        m.advance(step)
        text += vocab.tokens[step]
    assert set(np.flatnonzero(m.mask()).tolist()) == {tok.eos_id}  # EOS only where the grammar accepts


# --- batches -----------------------------------------------------------------------------------


def test_a_mixed_batch_gives_each_row_exactly_its_solo_tokens(bundled):
    """8 constrained rows with different schemas and 8 unconstrained rows decode together; each
    gives exactly the tokens it gives alone (seeded sampling at temperature 1, and greedy)."""
    model, tok = bundled
    names = list(SCHEMAS)[:8]
    rows = []
    for i in range(16):
        schema = SCHEMAS[names[i // 2]] if i % 2 == 0 else None
        spec = parse_response_format(schema, bare_schema=True)
        temp = 1.0 if i % 4 < 2 else 0.0
        max_tokens = 200 if spec else 60  # long enough for every answer to end
        params = GenParams(max_tokens=max_tokens, sampling=SamplingOptions(temp=temp), seed=100 + i, constraint=spec)
        rows.append((tok.encode(PROMPTS[i % 3] + " " * (i % 2)), params))

    def tokens_of(engine, batch):
        ids = {engine.submit(p, params): j for j, (p, params) in enumerate(batch)}
        out = {j: [] for j in ids.values()}
        while engine.has_work():
            for o in engine.step():
                out[ids[o.seq_id]] += o.tokens
        return [out[j] for j in range(len(batch))]

    together = tokens_of(Engine(model, tok, max_batch=16), rows)
    alone = [tokens_of(Engine(model, tok, max_batch=1), [row])[0] for row in rows]
    assert together == alone
    for i in range(0, 16, 2):  # and the constrained ones are valid
        text = tok.decode(together[i])
        jsonschema.validate(json.loads(text), SCHEMAS[names[i // 2]])


def test_batch_generate_takes_one_format_per_prompt(bundled):
    model, tok = bundled
    formats = [
        {"type": "json_object"},
        None,
        {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMAS["enum_strings"]}},
    ]
    outs = {}
    for i, o in stream_batch_generate(model, tok, PROMPTS, response_format=formats, max_tokens=120):
        outs.setdefault(i, ["", None])
        outs[i][0] += o.text
        outs[i][1] = o.finish_reason or outs[i][1]
    jsonschema.validate(json.loads(outs[2][0]), SCHEMAS["enum_strings"])
    assert outs[1][0] == generate(model, tok, PROMPTS[1], max_tokens=120)  # free text untouched
    if outs[0][1] == "stop":
        assert isinstance(json.loads(outs[0][0]), dict)
    with pytest.raises(OpenELMError, match="2 formats for 3 prompts"):
        list(stream_batch_generate(model, tok, PROMPTS, response_format=formats[:2]))


def test_max_tokens_cut_is_length_and_the_generate_api_takes_a_response_format(bundled):
    model, tok = bundled
    schema = obj({"words": {"type": "array", "items": NAME, "minItems": 5, "maxItems": 5}})
    rs = list(stream_generate(model, tok, "And", max_tokens=6, response_format=schema))
    assert rs[-1].finish_reason == "length" and len(rs) == 6
    with pytest.raises(ValueError):
        json.loads("".join(r.text for r in rs))  # cut short: incomplete JSON (README says so)
    text = generate(
        model,
        tok,
        "And",
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
    )
    jsonschema.validate(json.loads(text), schema)


def test_speculation_is_off_under_a_constraint_and_the_output_is_the_same(bundled):
    model, tok = bundled
    schema = SCHEMAS["flat"]
    spec = parse_response_format(schema, bare_schema=True)
    outs = []
    for lookup in (0, 4):
        eng = Engine(model, tok, max_batch=1)
        sid = eng.submit(tok.encode("And God said"), GenParams(max_tokens=100, prompt_lookup=lookup, constraint=spec))
        text, proposed = "", 0
        while eng.has_work():
            for o in eng.step():
                text, proposed = text + o.text, o.draft_proposed
        outs.append((text, proposed))
        assert sid == 0
    assert outs[0] == outs[1] and outs[1][1] == 0


# --- what cannot be enforced -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "feature"),
    [
        ({"not": {"type": "string"}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
        ({"if": {"type": "string"}, "then": {}}, "if"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ],
)
def test_unsupported_schema_features_raise_naming_the_feature(bundled, schema, feature):
    _, tok = bundled
    spec = parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    with pytest.raises(GrammarError, match=feature) as e:
        compile_spec(spec, tok, 4096, tok.eos_id)
    assert e.value.param == "response_format.json_schema.schema"


def test_bad_formats_and_tools_name_the_field():
    cases = [
        (lambda: parse_response_format({"type": "xml"}), "response_format.type"),
        (lambda: parse_response_format({"type": "json_schema"}), "response_format.json_schema"),
        (
            lambda: parse_response_format({"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format.json_schema.schema",
        ),
        (
            lambda: parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": False}}),
            "response_format.json_schema.schema",
        ),
        (
            lambda: parse_response_format(
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["a" * 70000]}}}
            ),
            "response_format.json_schema.schema",
        ),
        (
            lambda: parse_tools([{"type": "function", "function": {"name": "bad name"}}], "required"),
            "tools[0].function.name",
        ),
        (
            lambda: parse_tools(
                [{"type": "function", "function": {"name": "f"}}], {"type": "function", "function": {"name": "g"}}
            ),
            "tool_choice.function.name",
        ),
        (lambda: parse_tools(None, "required"), "tool_choice"),
    ]
    for call, param in cases:
        with pytest.raises(GrammarError) as e:
            call()
        assert e.value.param == param


def test_ignore_eos_cannot_be_combined_with_a_format():
    spec = parse_response_format({"type": "json_object"})
    with pytest.raises(OpenELMError, match="ignore_eos"):
        GenParams(ignore_eos=True, constraint=spec)


def test_logprobs_stay_the_models_own_under_a_constraint(bundled):
    """Log-probabilities report the model's distribution before any processing, mask included."""
    model, tok = bundled
    spec = parse_response_format(SCHEMAS["enum_strings"], bare_schema=True)
    eng = Engine(model, tok)
    prompt = tok.encode("And God said")
    eng.submit(prompt, GenParams(max_tokens=3, logprobs=0, constraint=spec))
    first = None
    while eng.has_work():
        for o in eng.step():
            first = first or o
    logits = model(mx.array([prompt]))[0, -1].astype(mx.float32)
    want = (logits - mx.logsumexp(logits))[first.tokens[0]].item()
    assert abs(first.logprobs[0] - want) < 1e-4

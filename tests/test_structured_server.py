"""Structured output through ``openelm-mlx serve``: response_format and tools on a real uvicorn
server, with the official ``openai`` client's helpers (Pydantic parsing, function tools)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from helpers import running_server
from pydantic import BaseModel, ConfigDict, Field

from openelm_mlx.grammar import cached, parse_response_format
from openelm_mlx.loading import load
from openelm_mlx.server.app import Settings
from openelm_mlx.server.protocol import Limits, ServedModel

BUNDLED = Path(__file__).resolve().parents[1] / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
MSGS = [{"role": "user", "content": "Who went up to the mount?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["C", "F"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
PARAMS = {"get_weather": WEATHER, "add": ADD}


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    tribe: Literal["Judah", "Levi", "Benjamin"]
    children: list[str] = Field(max_length=3)  # (items' lengths unbounded: a short cap below)


class Verse(BaseModel):
    model_config = ConfigDict(extra="forbid")
    book: Literal["Genesis", "Exodus"]
    chapter: int = Field(ge=1, le=50)


@pytest.fixture(scope="module")
def served():
    model, tok = load(BUNDLED)
    return ServedModel("kjv", model, tok)


@pytest.fixture(scope="module")
def url(served):
    settings = Settings(limits=Limits(default_max_tokens=200, max_tokens_limit=400))
    with running_server({"kjv": served}, settings) as u:
        yield u


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120)


def test_openai_parse_with_a_pydantic_model(url):
    schema = Verse.model_json_schema()
    for seed in range(3):
        r = client(url).chat.completions.parse(
            model="kjv", messages=MSGS, response_format=Verse, temperature=1.0, seed=seed, max_tokens=100
        )
        verse = r.choices[0].message.parsed
        assert isinstance(verse, Verse) and r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object_and_json_schema_on_chat_and_completions(url):
    schema = {
        "type": "object",
        "properties": {"w": {"enum": ["light", "dark"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["w", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    c = client(url)
    r = c.chat.completions.create(model="kjv", messages=MSGS, response_format=fmt, temperature=1.0, seed=3)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = c.completions.create(
        model="kjv", prompt="And God said", max_tokens=100, temperature=0, extra_body={"response_format": fmt}
    )
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    r = c.chat.completions.create(
        model="kjv", messages=MSGS, response_format={"type": "json_object"}, max_tokens=300, temperature=0
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # the bundled model may ramble inside a free object until max_tokens
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_grammars_are_cached_by_schema(url, served):
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"enum": ["cached", "fresh"]}}}
    spec = parse_response_format(fmt)
    assert not cached(spec, served.tokenizer, 4096, 2)
    r = client(url).chat.completions.create(model="kjv", messages=MSGS, response_format=fmt, temperature=0)
    assert json.loads(r.choices[0].message.content) in ("cached", "fresh")
    assert cached(spec, served.tokenizer, 4096, 2)


def test_streamed_json_equals_the_whole_answer(url):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": Verse.model_json_schema()}}
    c = client(url)
    whole = c.chat.completions.create(model="kjv", messages=MSGS, response_format=fmt, temperature=0)
    pieces = c.chat.completions.create(model="kjv", messages=MSGS, response_format=fmt, temperature=0, stream=True)
    chunks = list(pieces)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == whole.choices[0].message.content and chunks[-1].choices[0].finish_reason == "stop"
    Verse.model_validate_json(text)
    stream = c.completions.create(
        model="kjv", prompt="And", max_tokens=100, temperature=0, stream=True, extra_body={"response_format": fmt}
    )
    Verse.model_validate_json("".join(ch.choices[0].text for ch in stream))


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_tool_calls_validate_against_the_parameters(url, choice):
    c = client(url)
    names = set()
    for seed in range(4):
        r = c.chat.completions.create(
            model="kjv", messages=MSGS, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed
        )
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        (call,) = ch.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
        names.add(call.function.name)
    if choice != "required":
        assert names == {"add"}


def test_tool_call_streamed_as_openai_streams_it(url):
    c = client(url)
    args = dict(model="kjv", messages=MSGS, tools=TOOLS, tool_choice="required", temperature=0)
    whole = c.chat.completions.create(**args).choices[0].message.tool_calls[0]
    chunks = list(c.chat.completions.create(**args, stream=True))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == whole.function.name and deltas[0].type == "function"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == whole.function.arguments
    assert len(deltas) > 2 and chunks[-1].choices[0].finish_reason == "tool_calls"
    # the SDK's stream helper assembles the same call
    with c.chat.completions.stream(**args) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == whole.function.arguments


def test_pydantic_function_tool_round_trip(url):
    c = client(url)
    tool = openai.pydantic_function_tool(Verse, name="lookup_verse")
    r = c.chat.completions.parse(model="kjv", messages=MSGS, tools=[tool], tool_choice="required", temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert isinstance(call.function.parsed_arguments, Verse)
    # the conversation goes on with the call and its result
    history = [
        *MSGS,
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "In the beginning"},
    ]
    history[1].pop("parsed", None)
    for tc in history[1]["tool_calls"]:
        tc["function"].pop("parsed_arguments", None)
    r2 = c.chat.completions.create(model="kjv", messages=history, max_tokens=20, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length") and r2.choices[0].message.content


@pytest.mark.parametrize("choice", ["none", "auto"])
def test_tool_choice_none_and_auto_answer_in_plain_text(url, choice):
    c = client(url)
    r = c.chat.completions.create(
        model="kjv", messages=MSGS, tools=TOOLS, tool_choice=choice, max_tokens=20, temperature=0
    )
    plain = c.chat.completions.create(model="kjv", messages=MSGS, max_tokens=20, temperature=0)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_max_tokens_cut_gives_length(url):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}}
    r = client(url).chat.completions.create(model="kjv", messages=MSGS, response_format=fmt, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    r = client(url).chat.completions.create(
        model="kjv", messages=MSGS, tools=TOOLS, tool_choice="required", max_tokens=5
    )
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
            "response_format.json_schema.schema",
            "not",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "format": "ipv5"}},
                }
            },
            "response_format.json_schema.schema",
            "ipv5",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "yaml"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "name and schema"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"not": {}}}}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
            "not",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
            "nope",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "required"),
        ({"tools": "get_weather"}, "tools", "array"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "tool_choice",
        ),
    ],
)
def test_unsupported_or_bad_formats_answer_400_naming_them(url, body, param, words):
    r = post(url, "/v1/chat/completions", {"model": "kjv", "messages": MSGS, **body})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error"
    r = post(
        url,
        "/v1/completions",
        {
            "model": "kjv",
            "prompt": "x",
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
        },
    )
    assert r.status_code == 400 and "not" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200

"""What a request asks the output to be, as one JSON Schema: ``response_format`` and ``tools``.

* ``{"type": "text"}`` (or nothing): free text, no grammar.
* ``{"type": "json_object"}``: any JSON object.
* ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``: that schema (always
  enforced, whatever ``strict`` says: a schema the grammar engine cannot enforce is refused).
* ``tools`` with ``tool_choice`` "required" or a named function: the output is one call,
  ``{"name": <a function's name>, "arguments": <an object valid against its parameters>}``; the
  front ends turn it into OpenAI's ``tool_calls``.  "none" and "auto" mean free text (OpenELM
  has no tool-call format to decide with; README, "Structured output").

Bad shapes raise ``GrammarError`` naming the field (``param``), which the server answers as a 400.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import OpenELMError

# A schema's JSON text above this is refused before compiling: the compile time and the lexer's
# memory grow with it (a 64 KiB schema is far beyond any real tool or extraction schema).
MAX_SCHEMA_BYTES = 64 * 1024
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class GrammarError(OpenELMError):
    """A response format or tool list that cannot be enforced; ``param`` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.detail = param, message


@dataclass(frozen=True)
class OutputSpec:
    """The JSON Schema the output must satisfy, and where it came from."""

    schema_json: str  # the schema as compact JSON, key order kept (properties are generated in it): the cache key
    param: str  # the request field the schema came from, for error messages
    tools: tuple[str, ...] = ()  # tool names when the output is a tool call ({"name", "arguments"})

    @property
    def schema(self) -> dict:
        return json.loads(self.schema_json)


def _schema(value: Any, param: str) -> dict:
    if value is True:
        return {}
    if value is False:
        raise GrammarError(param, "the schema false admits no output")
    if not isinstance(value, dict):
        raise GrammarError(param, f"expected a JSON Schema object, got {type(value).__name__}")
    return value


def _spec(schema: dict, param: str, tools: tuple[str, ...] = ()) -> OutputSpec:
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(param, f"not JSON ({e})") from None
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise GrammarError(param, f"the schema is {len(text.encode())} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
    return OutputSpec(text, param, tools)


def parse_response_format(value: Any, *, bare_schema: bool = False) -> OutputSpec | None:
    """``response_format`` as OpenAI spells it; with ``bare_schema`` (the Python API) a JSON Schema
    itself is accepted too.  None: free text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise GrammarError("response_format", f"expected an object, got {type(value).__name__}")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _spec({"type": "object"}, "response_format")
    if kind == "json_schema":
        js = value.get("json_schema")
        if not isinstance(js, dict):
            raise GrammarError("response_format.json_schema", "expected an object with name and schema")
        name = js.get("name")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name)):
            raise GrammarError("response_format.json_schema.name", "expected 1-64 letters, digits, _ or -")
        if "schema" not in js:
            raise GrammarError("response_format.json_schema.schema", "missing")
        param = "response_format.json_schema.schema"
        return _spec(_schema(js["schema"], param), param)
    if bare_schema:
        return _spec(_schema(value, "response_format"), "response_format")
    raise GrammarError("response_format.type", f"expected text, json_object or json_schema, got {kind!r:.40}")


def parse_tools(tools: Any, tool_choice: Any) -> tuple[OutputSpec | None, dict[str, dict]]:
    """(the tool-call spec, or None for free text; the functions by name)."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise GrammarError("tool_choice", "names a tool but the request has no tools")
        return None, {}
    if not isinstance(tools, list) or not tools:
        raise GrammarError("tools", "expected a non-empty array of tools")
    if len(tools) > MAX_TOOLS:
        raise GrammarError("tools", f"{len(tools)} tools; at most {MAX_TOOLS} are accepted")
    functions: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise GrammarError(f"tools[{i}]", 'expected {"type": "function", "function": {...}}')
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise GrammarError(f"tools[{i}].function.name", "expected 1-64 letters, digits, _ or -")
        if name in functions:
            raise GrammarError(f"tools[{i}].function.name", f"{name!r} is given twice")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        functions[name] = _schema(params, f"tools[{i}].function.parameters")
    if tool_choice in (None, "none", "auto"):
        return None, functions
    if tool_choice == "required":
        chosen = list(functions)
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in functions:
            raise GrammarError("tool_choice.function.name", f"{name!r:.60} is not one of the tools")
        chosen = [name]
    else:
        raise GrammarError("tool_choice", 'expected "none", "auto", "required" or {"type": "function", ...}')
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": n}, "arguments": functions[n]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for n in chosen
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return _spec(schema, "tools", tuple(chosen)), functions

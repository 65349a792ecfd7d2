"""Structured output: JSON mode, JSON Schema and tool calls enforced by a token mask.

The grammar engine is llguidance (BENCHMARKS.md, "Structured output", has the comparison with
xgrammar and outlines-core); this package bridges it to OpenELM's SentencePiece vocabulary
(bridge.py), turns requests into schemas (formats.py) and compiles, caches and runs them
(constraint.py).  The engine applies the masks (engine.py, ``GenParams.constraint``).
"""

from .constraint import Matcher, cached, compile_spec, fill_masks
from .formats import GrammarError, OutputSpec, parse_response_format, parse_tools

__all__ = [
    "GrammarError",
    "Matcher",
    "OutputSpec",
    "cached",
    "compile_spec",
    "fill_masks",
    "parse_response_format",
    "parse_tools",
]

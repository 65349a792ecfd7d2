"""Batch jobs: ``openelm-mlx generate --prompts-file FILE``.

The file holds one prompt per line, or JSON Lines: one object per line with a ``"prompt"`` and
any of the per-prompt options below (the command line's flags are the defaults).  All prompts
decode together on one engine, ``max_batch`` at a time; each result is written as one JSON line
as soon as its sequence finishes, so results come in order of completion and carry the prompt's
``index`` (0-based, in file order) and its ``id`` when the line gave one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .engine import Engine, encode_prompt, params_from_options
from .errors import OpenELMError
from .model import OpenELM
from .tokenizer import Tokenizer

# Per-prompt options of a JSONL line, named as the generate command's flags, and their types.
OPTIONS: dict[str, tuple[type, ...]] = {
    "max_tokens": (int,),
    "temp": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "min_p": (int, float),
    "repetition_penalty": (int, float),
    "seed": (int,),
    "stop": (str, list),
    "system_prompt": (str,),
    "response_format": (dict,),  # as OpenAI spells it, or a JSON Schema itself
}


@dataclass
class Job:
    line: int  # 1-based line number in the prompts file, for error messages
    prompt: str
    options: dict = field(default_factory=dict)
    id: object = None


def read_prompts(path: str | Path) -> list[Job]:
    """The prompts of ``path``: JSONL when its first non-blank line starts with ``{``, else one
    prompt per non-blank line.  Raises ``OpenELMError`` naming the file and line of a bad entry."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise OpenELMError(f"{path}: no such prompts file") from None
    except UnicodeDecodeError as e:
        raise OpenELMError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise OpenELMError(f"{path}: holds no prompts")
    if not lines[0][1].lstrip().startswith("{"):
        return [Job(n, line) for n, line in lines]
    return [_job(path, n, line) for n, line in lines]


def _job(path: Path, n: int, line: str) -> Job:
    where = f"{path}:{n}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise OpenELMError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise OpenELMError(f'{where}: expected a JSON object with a "prompt"')
    prompt = obj.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise OpenELMError(f'{where}: "prompt" must be a non-empty string')
    job = Job(n, prompt, id=obj.pop("id", None))
    for key, value in obj.items():
        types = OPTIONS.get(key)
        if types is None:
            raise OpenELMError(f"{where}: unknown field {key!r} (known: id, prompt, {', '.join(OPTIONS)})")
        # bool is an int to Python; a JSON true is never a number here.
        if isinstance(value, bool) or not isinstance(value, types):
            raise OpenELMError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
        if key == "stop":
            value = [value] if isinstance(value, str) else value
            if not all(isinstance(s, str) for s in value):
                raise OpenELMError(f'{where}: "stop" must be a string or a list of strings')
            value = tuple(value)
        job.options[key] = value
    return job


def run_jobs(
    model: OpenELM,
    tokenizer: Tokenizer,
    jobs: list[Job],
    defaults: dict,
    write: Callable[[dict], None],
    *,
    source: str = "prompts file",
    max_batch: int = 8,
    chat_template: str = "auto",
    draft_model: OpenELM | None = None,
    progress: bool = True,
) -> dict:
    """Run every job on one engine, calling ``write`` with each result; returns the totals.

    Every prompt is checked (encoded, its options validated, its length against the context)
    before the first token is generated, so a bad line fails the run before any work is done."""
    engine = Engine(model, tokenizer, max_batch=max_batch, draft_model=draft_model)
    index: dict[int, int] = {}
    for i, job in enumerate(jobs):
        options = {**defaults, **job.options}
        system_prompt = options.pop("system_prompt", None)
        try:
            ids = encode_prompt(model, tokenizer, job.prompt, system_prompt=system_prompt, chat_template=chat_template)
            index[engine.submit(ids, params_from_options(**options))] = i
        except OpenELMError as e:
            raise OpenELMError(f"{source}:{job.line}: {e}") from None
    texts = [""] * len(jobs)
    totals = {"prompts": len(jobs), "prompt_tokens": 0, "generation_tokens": 0}
    start = time.perf_counter()
    with tqdm(total=len(jobs), unit="prompt", disable=not progress, leave=False) as bar:
        while engine.has_work():
            for o in engine.step():
                i = index[o.seq_id]
                texts[i] += o.text
                if o.finish_reason is None:
                    continue
                result = {"index": i}
                if jobs[i].id is not None:
                    result["id"] = jobs[i].id
                result |= {
                    "text": texts[i],
                    "finish_reason": o.finish_reason,
                    "prompt_tokens": o.prompt_tokens,
                    "generation_tokens": o.generation_tokens,
                }
                write(result)
                totals["prompt_tokens"] += o.prompt_tokens
                totals["generation_tokens"] += o.generation_tokens
                bar.update(1)
    totals["seconds"] = time.perf_counter() - start
    return totals

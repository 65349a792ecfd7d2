"""Batch front ends on the engine: ``generate --prompts-file`` (plain lines and JSONL with
per-prompt options) and ``bench --batch``."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import random_weights, small_config, write_hf_folder
from openelm_mlx.convert.pipeline import convert

from openelm_mlx import cli, generate
from openelm_mlx.loading import load

BUNDLED = Path(cli.__file__).parent / "bundled" / "openelm-tiny-kjv"


@pytest.fixture(scope="module")
def bundled():
    return load(str(BUNDLED))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["generate", "--model", str(BUNDLED), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def results(stdout: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in stdout.splitlines()]
    by_index = {r["index"]: r for r in rows}
    assert len(by_index) == len(rows)  # each prompt once
    return by_index


def test_jsonl_prompts_each_give_what_they_give_alone(bundled, tmp_path, capsys):
    lines = [
        {"prompt": "In the beginning", "id": "genesis"},
        {"prompt": "And the LORD said unto Moses", "max_tokens": 30, "stop": ","},
        {"prompt": "Blessed are the", "temp": 0.9, "seed": 7},
        {"prompt": "And it came to pass", "repetition_penalty": 1.3, "max_tokens": 5},
        {"prompt": "The", "top_k": 3, "temp": 1.0, "seed": 1, "stop": ["LORD", "God"]},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")  # a blank line is skipped
    rc, out, err = run_cli(capsys, "--prompts-file", str(path), "--max-tokens", "12", "--max-batch", "2")
    assert rc == 0, err
    got = results(out)
    assert sorted(got) == list(range(len(lines)))
    model, tokenizer = bundled
    for i, line in enumerate(lines):
        options = {"max_tokens": 12, **{k: v for k, v in line.items() if k not in ("prompt", "id")}}
        if isinstance(options.get("stop"), str):
            options["stop"] = [options["stop"]]
        alone = generate(model, tokenizer, line["prompt"], **options)
        assert got[i]["text"] == alone, (i, line)
        assert got[i]["prompt_tokens"] > 0 and 0 < got[i]["generation_tokens"] <= options["max_tokens"]
    assert got[0]["id"] == "genesis" and "id" not in got[1]
    assert got[3]["finish_reason"] == "length" and got[3]["generation_tokens"] == 5
    assert got[1]["finish_reason"] == "stop" and "," not in got[1]["text"]  # the stop string is not output
    assert "5 prompts" in err and "generated tokens/s" in err


def test_plain_lines_are_prompts(bundled, tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("In the beginning\n\nAnd God said\n")
    rc, out, err = run_cli(capsys, "--prompts-file", str(path), "--max-tokens", "6")
    assert rc == 0, err
    got = results(out)
    model, tokenizer = bundled
    assert [got[i]["text"] for i in (0, 1)] == [
        generate(model, tokenizer, p, max_tokens=6) for p in ("In the beginning", "And God said")
    ]


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"prompt": "a"}\n{"prompt": "b", "tmp": 1}\n', ":2: unknown field 'tmp'"),
        ('{"prompt": "a"}\n{"prompt": "b"\n', ":2: not valid JSON"),
        ('{"prompt": "a"}\n{"max_tokens": 3}\n', ':2: "prompt" must be a non-empty string'),
        ('{"prompt": "a", "max_tokens": "9"}\n', ":1: 'max_tokens' has the wrong type (str)"),
        ('{"prompt": "a", "seed": true}\n', ":1: 'seed' has the wrong type (bool)"),
        ('{"prompt": "a", "stop": [1]}\n', ':1: "stop" must be a string or a list of strings'),
        ('{"prompt": "a"}\n[1, 2]\n', ":2: expected a JSON object"),
        ('{"prompt": "a"}\n{"prompt": "b", "max_tokens": 5000}\n', ":2: the prompt (2 tokens) plus --max-tokens 5000"),
        ('{"prompt": "a", "temp": -1}\n', ":1: --temp -1: must be a finite number >= 0"),
        ("\n\n", "holds no prompts"),
    ],
)
def test_bad_prompts_file_is_one_line_naming_file_and_line(tmp_path, capsys, content, words):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    rc, out, err = run_cli(capsys, "--prompts-file", str(path))
    assert rc == 1 and out == ""  # nothing generated before the whole file is checked
    assert len(err.strip().splitlines()) == 1 and str(path) in err and words in err, err


def test_missing_and_non_utf8_prompts_files(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "--prompts-file", str(tmp_path / "nope.jsonl"))
    assert rc == 1 and "no such prompts file" in err
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    rc, _, err = run_cli(capsys, "--prompts-file", str(tmp_path / "bin.txt"))
    assert rc == 1 and "not valid UTF-8" in err


def test_bench_batch_reports_aggregate_tokens_and_same_greedy_tokens(tmp_path):
    config = small_config("untied")  # tied random weights repeat one token: a weak comparison
    src = write_hf_folder(tmp_path / "src", config, random_weights(config, seed=3), tokenizer=False)
    convert(str(src), tmp_path / "model", log=lambda s: None)
    args = ["bench", "--model", str(tmp_path / "model"), "-p", "12", "-g", "6", "-n", "1", "--batch", "3"]
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", *args, "--json", str(tmp_path / "b.json")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["batch"] == 3 and {r["engine"] for r in report["runs"]} == {"openelm-mlx", "mlx-lm"}
    for run in report["runs"]:
        assert run["prompt_tokens"] == 3 * 12 and run["generation_tokens"] == 3 * 6 and run["generation_tps"] > 0
    assert report["same_tokens"] is True  # the engine and mlx_lm's BatchGenerator agree row by row
    assert "aggregate over 3 sequences" in out.stdout

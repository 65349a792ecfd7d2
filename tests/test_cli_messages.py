"""Issue 11, points 5-7: no tracebacks, messages that point the right way, small things users expect.

Every bad input is one line naming the flag or file, with a non-zero exit (2 from argparse for a
malformed flag value, 1 otherwise)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import INTERRUPTIBLE
from openelm_mlx.convert.pipeline import convert

from openelm_mlx.errors import OpenELMError

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
SCRIPT = Path(sys.executable).parent / "openelm-mlx"  # the console script a user runs


def cli(*args, input=None, env=None, cwd=None):
    out = subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", *args],
        capture_output=True,
        input=input,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    out.err = out.stderr.decode("utf-8", "replace")
    assert "Traceback" not in out.err, out.err
    return out


def one_line_error(out, rc, text):
    assert out.returncode == rc, (out.returncode, out.err)
    assert text in out.err, out.err
    errors = [line for line in out.err.splitlines() if "error" in line]
    assert len(errors) == 1 and "usage:" not in out.err, out.err


# --- 5: tracebacks become one-line errors -----------------------------------------------------------
@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_seed_out_of_range(seed):
    one_line_error(cli("generate", "--prompt", "hi", "--seed", seed), 2, "--seed must be from 0 to 2**64 - 1")


def test_seed_out_of_range_in_python():
    from openelm_mlx import generate, load

    model, tok = load()
    with pytest.raises(OpenELMError, match="--seed -1: must be a whole number from 0 to 2"):
        generate(model, tok, "In the beginning", temp=0.7, seed=-1, max_tokens=2)


def test_non_utf8_prompt_in_argv():
    one_line_error(cli("generate", "--prompt", b"caf\xe9"), 1, "--prompt is not valid UTF-8")


def test_non_utf8_line_in_chat():
    one_line_error(cli("chat", "--max-tokens", "4", input=b"\xff\xfe\n"), 1, "line 1 is not valid UTF-8")


def test_eval_text_directory(tmp_path):
    one_line_error(cli("eval", "--text", str(tmp_path)), 1, f"--text {tmp_path}: cannot read it (Is a directory)")


def test_bench_runs_and_unwritable_json(tmp_path):
    one_line_error(cli("bench", "-n", "0"), 2, "-n must be at least 1")
    t0 = time.perf_counter()
    out = cli("bench", "--json", str(tmp_path / "missing" / "b.json"), "--compare", "none")
    one_line_error(out, 1, "--json")
    assert "no such directory" in out.err and "run 1/" not in out.err  # refused before the run
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("temp", ["nan", "inf", "-1"])
def test_temp_nan_inf_refused_like_negative(temp):
    one_line_error(cli("generate", "--prompt", "hi", "--temp", temp), 1, ": must be a finite number >= 0")
    from openelm_mlx.sampling import SamplingOptions

    with pytest.raises(OpenELMError, match="--temp"):
        SamplingOptions(temp=float(temp))


def test_bogus_matmul_route_refused_before_generating():
    out = cli("generate", "--prompt", "In the beginning", env={"OPENELM_MLX_MATMUL": "bogus"})
    one_line_error(out, 1, "OPENELM_MLX_MATMUL=bogus: expected auto, numpy or mlx")
    assert out.stdout == b""


def test_ctrl_c_during_start_up():
    for delay in (0.1, 0.3, 0.6, 1.0):
        proc = subprocess.Popen(
            [str(SCRIPT), "generate", "--prompt", "In the beginning", "--max-tokens", "400"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **INTERRUPTIBLE,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        err = err.decode()
        assert "Traceback" not in err, (delay, err)
        assert proc.returncode in (130, 0), (delay, proc.returncode, err)  # 0: it had already finished


def test_prepare_kjv_help():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "prepare_kjv.py"), "--help"], capture_output=True)
    assert out.returncode == 0 and b"usage" in out.stdout


def test_eval_tiny_writes_its_results_only_when_asked():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "eval_tiny.py"), "--help"], capture_output=True)
    assert out.returncode == 0 and b"--write" in out.stdout


# --- 6: messages that point the right way -----------------------------------------------------------
def test_chat_max_tokens_larger_than_the_context():
    out = cli("chat", "--max-tokens", "1000", input=b"hello\n")
    one_line_error(out, 1, "--max-tokens 1000 is larger than the model's context (512 tokens)")


def test_bench_flags_are_named():
    one_line_error(cli("bench", "-g", "0"), 2, "-g must be at least 1")
    one_line_error(cli("bench", "-p", "100000"), 1, "-p 100000 + -g 128 tokens exceed the model's context (512)")


def test_mistyped_local_path_is_not_a_hub_repo(tmp_path):
    (tmp_path / "models").mkdir()
    out = cli("generate", "--model", "models/typo", "--prompt", "hi", cwd=tmp_path)
    one_line_error(out, 1, "models/typo: no such file or directory")
    assert "Hub" not in out.err and "converting" not in out.err


def test_mistyped_local_path_in_convert(tmp_path):
    (tmp_path / "models").mkdir()
    out = cli("convert", "--hf-path", "models/typo", "--mlx-path", "out", cwd=tmp_path)
    one_line_error(out, 1, "models/typo: no such file or directory")
    assert "Hub" not in out.err.split("(")[0]


def test_a_file_that_is_no_model():
    out = cli("generate", "--model", str(ROOT / "README.md"), "--prompt", "hi")
    one_line_error(out, 1, "README.md: not a model")
    assert "--preset" not in out.err


def test_wrong_model_dim_in_a_quantized_model_names_the_shapes(tmp_path):
    from openelm_mlx.errors import CheckpointError
    from openelm_mlx.loading import load_model

    convert(str(BUNDLED), tmp_path / "q4", quantize_model=True, log=lambda s: None)
    raw = json.loads((tmp_path / "q4" / "config.json").read_text())
    raw["model_dim"] = 257
    (tmp_path / "q4" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"shape \[256\], the config expects \[257\]; its shapes \(model_dim"):
        load_model(tmp_path / "q4")


@pytest.mark.parametrize("flag", [["--q-bits", "8"], ["--q-group-size", "32"], ["--q-mode", "mxfp4"]])
def test_quantization_flags_without_q(tmp_path, flag):
    out = cli("convert", "--hf-path", str(BUNDLED), "--mlx-path", str(tmp_path / "out"), *flag)
    one_line_error(out, 1, f"{flag[0]} quantizes: add -q")
    assert not (tmp_path / "out").exists()


def test_recipe_and_bits_say_which_wins(tmp_path):
    out = cli(
        "convert", "--hf-path", str(BUNDLED), "--mlx-path", str(tmp_path / "o"), "--quant-recipe", "mixed_3_6",
        "--q-bits", "8",
    )  # fmt: skip
    assert out.returncode == 0 and "--quant-recipe mixed_3_6 sets the bits per module; --q-bits 8 is ignored" in out.err


@pytest.mark.parametrize(
    "args, rc, text",
    [
        (["--num-draft-tokens", "0", "--draft-model", str(BUNDLED)], 2, "--num-draft-tokens must be at least 1"),
        (["--prompt-lookup", "-1"], 2, "--prompt-lookup must be 0 or more"),
        (["--num-draft-tokens", "2"], 1, "--num-draft-tokens needs --draft-model"),
        (["--draft-model", str(BUNDLED), "--prompt-lookup", "3"], 1, "--draft-model and --prompt-lookup are alt"),
    ],
)
def test_decoding_flag_combinations(args, rc, text):
    one_line_error(cli("generate", "--prompt", "hi", *args), rc, text)


def test_chat_base_model_help_and_unknown_commands():
    out = cli("chat", "--max-tokens", "4", input=b"/help\n/bogus\n/quit\n")
    assert out.returncode == 0, out.err
    assert "warning: this is a base model" in out.err
    assert "unknown command /bogus" in out.err and out.err.count("/reset starts over, /help") >= 3
    assert out.stdout == b""  # nothing was sent to the model
    chat = cli("chat", "--max-tokens", "4", "--chat-template", "instruct", input=b"Who begat Enos?\n")
    assert chat.returncode == 0 and "warning: this is a base model" not in chat.err and chat.stdout.strip()


# --- 7: small things ---------------------------------------------------------------------------------
def test_version():
    out = subprocess.run([str(SCRIPT), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "openelm-mlx 0.1.0"


def test_bench_defaults_to_the_bundled_model_and_shows_its_defaults():
    help_text = cli("bench", "--help").stdout.decode()
    assert "(default 128)" in help_text and "(default 5)" in help_text and "bundled" in help_text
    out = cli("bench", "-n", "1", "-p", "8", "-g", "4", "--compare", "none")
    assert out.returncode == 0, out.err
    assert "bundled OpenELM-tiny-KJV" in out.err


def test_model_card_of_a_model_that_is_not_apples(tmp_path):
    from openelm_mlx.convert.pipeline import is_apple_model

    from openelm_mlx import OpenELMConfig

    out = cli("convert", "--hf-path", str(BUNDLED), "--mlx-path", str(tmp_path / "m"))
    assert out.returncode == 0
    assert any(line.startswith("writing ") and line.endswith(" MB of weights ...") for line in out.err.splitlines())
    card = (tmp_path / "m" / "README.md").read_text()
    assert "Apple's licence" not in card and "Llama-2" not in card and "4096 pieces" in card
    assert is_apple_model("apple/OpenELM-270M", OpenELMConfig.from_preset("270M"))
    assert is_apple_model("checkpoint.pt", OpenELMConfig.from_preset("3B"))


def test_load_without_a_path_is_the_bundled_model():
    from openelm_mlx import load

    model, tok = load()
    assert model.config.vocab_size == tok.vocab_size == 4096


def test_tokenizer_from_an_unreachable_hub_fails_fast(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    t0 = time.perf_counter()
    out = cli(
        "convert", "--hf-path", str(BUNDLED), "--mlx-path", str(tmp_path / "o"), "--tokenizer", "someone/tokenizer",
        env=env,
    )  # fmt: skip
    one_line_error(out, 1, "cannot reach the Hugging Face Hub")
    assert time.perf_counter() - t0 < 10  # start-up and one connection attempt, not 23 s of retries

"""``openelm-mlx evaluate`` and the lm-eval backend, offline, through the real harness.

Every task here is written by the test: JSONL files and a task YAML with ``dataset_path: json``.
Log-likelihoods are checked against the float64 NumPy reference (openelm_mlx/reference.py) on
tokens produced by the tokenizer directly (Apple's setting: BOS first, the continuation is what
``context + continuation`` tokenizes to beyond the context); accuracies against a brute-force
recomputation from those reference values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

# Offline before lm-eval imports datasets (which reads these once).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="openelm-mlx-datasets-"))

from helpers import SMALL_CONFIGS, random_weights, require_lm_eval, small_config, write_hf_folder  # noqa: E402

require_lm_eval()

from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from openelm_mlx import OpenELMConfig, reference  # noqa: E402
from openelm_mlx.evaluate import OpenELMLM  # noqa: E402
from openelm_mlx.generate import generate  # noqa: E402
from openelm_mlx.harness import run_tasks, task_manager  # noqa: E402
from openelm_mlx.loading import load  # noqa: E402
from openelm_mlx.perplexity import token_nll  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
VALID = ROOT / "openelm_mlx" / "bundled" / "kjv-valid.txt"
# float32 forward vs float64 reference, summed over a continuation's tokens: logits of size ~10-20
# through 4-8 layers in float32 agree to ~1e-5 relative; 5e-4 nats leaves room for 5-10 tokens.
LOGLIK_TOL = 5e-4


def mc_yaml(name: str, test: Path, train: Path | None = None) -> str:
    files = f"    test: {test}\n" + (f"    train: {train}\n" if train else "")
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
{files}output_type: multiple_choice
test_split: test
{"training_split: train" if train else ""}
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def write_mc_task(root: Path, name: str, docs: list[dict], train: list[dict] | None = None) -> None:
    test = write_jsonl(root / f"{name}.test.jsonl", docs)
    train_file = write_jsonl(root / f"{name}.train.jsonl", train) if train else None
    (root / f"{name}.yaml").write_text(mc_yaml(name, test, train_file))


def kjv_docs(n: int, offset: int = 0, n_choices: int = 4) -> list[dict]:
    """Held-out verses: the first half is the question, its true second half one of the choices."""
    verses = [v for v in VALID.read_text().splitlines() if len(v.split()) >= 10][offset : offset + n * n_choices]
    docs = []
    for i in range(n):
        group = verses[i * n_choices : (i + 1) * n_choices]
        halves = [
            (" ".join(v.split()[: len(v.split()) // 2]), " ".join(v.split()[len(v.split()) // 2 :])) for v in group
        ]
        gold = i % n_choices
        choices = [h[1] for h in halves[1:]]
        choices.insert(gold, halves[0][1])
        docs.append({"question": halves[0][0], "choices": choices, "gold": gold})
    return docs


def pseudo_docs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    letters = list("etaoinshrdlucmfwypvbgkjqxz")

    def words(k):
        return " ".join("".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(k))

    return [
        {
            "question": words(int(rng.integers(3, 12))),
            "choices": [words(int(rng.integers(1, 5))) for _ in range(3)],
            "gold": i % 3,
        }
        for i in range(n)
    ]


class Checked:
    """A loaded model with its float64 weights, for reference log-likelihoods."""

    def __init__(self, path: Path):
        self.path = path
        self.model, self.tok = load(path)
        self.config = self.model.config
        raw = {}
        for f in sorted(path.glob("model*.safetensors")):
            raw.update(mx.load(str(f)))
        self.weights = {k: np.array(v.astype(mx.float32), dtype=np.float64) for k, v in raw.items()}

    def logprobs(self, ids: list[int]) -> np.ndarray:
        logits = reference.forward(self.config, self.weights, np.array(ids))[0]
        m = logits.max(axis=-1, keepdims=True)
        return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))

    def loglik(self, context: str, continuation: str) -> float:
        ctx = self.tok.encode(context)  # BOS first, as Apple's add_bos_token=True
        whole = self.tok.encode(context + continuation)
        assert whole[: len(ctx)] == ctx
        lp = self.logprobs(whole[:-1])
        return float(sum(lp[p, whole[p + 1]] for p in range(len(ctx) - 1, len(whole) - 1)))


@pytest.fixture(scope="module")
def bundled() -> Checked:
    return Checked(BUNDLED)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Checked:
    cfg = small_config("tied")
    return Checked(write_hf_folder(tmp_path_factory.mktemp("random"), cfg, random_weights(cfg, seed=3)))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """The test's tasks, and a TaskManager over only them and the bundled groups (lm-eval's own
    index of thousands of YAMLs takes half a minute to build; the CLI tests below build it)."""
    root = tmp_path_factory.mktemp("tasks")
    write_mc_task(root, "kjv_verses", kjv_docs(12))
    write_mc_task(root, "pseudo_mc", pseudo_docs(10))
    long_text = " ".join(VALID.read_text().splitlines()[200:260])  # over the bundled model's 512 tokens
    short_text = " ".join(VALID.read_text().splitlines()[300:306])
    docs = [{"text": short_text}, {"text": long_text}]
    (root / "kjv_rolling.yaml").write_text(
        f"""task: kjv_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {write_jsonl(root / "rolling.jsonl", docs)}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
    )
    prompts = [{"prompt": " ".join(v.split()[:6]), "answer": ""} for v in VALID.read_text().splitlines()[10:16]]
    (root / "kjv_generate.yaml").write_text(
        f"""task: kjv_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {write_jsonl(root / "generate.jsonl", prompts)}
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [":", ";"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return root, task_manager([str(root)], include_defaults=False), docs, prompts


def run(lm: OpenELMLM, manager, names: list[str], **kw) -> dict:
    return run_tasks(lm, names, manager=manager, log_samples=True, progress=False, bootstrap_iters=0, **kw)


@pytest.mark.parametrize("which,task", [("bundled", "kjv_verses"), ("random_model", "pseudo_mc")])
def test_choice_logliks_match_float64_and_accuracy_matches_brute_force(which, task, tasks, request):
    m: Checked = request.getfixturevalue(which)
    _, manager, _, _ = tasks
    results = run(OpenELMLM(m.model, m.tok, batch_size=8), manager, [task])
    samples = results["samples"][task]
    assert samples, "no documents were scored"
    correct = correct_norm = 0
    for s in samples:
        doc = s["doc"]
        got = [r[0] for r in s["filtered_resps"]]
        want = [m.loglik(doc["question"], " " + c) for c in doc["choices"]]
        np.testing.assert_allclose(got, want, atol=LOGLIK_TOL, rtol=0)
        correct += int(np.argmax(want) == doc["gold"])
        lengths = np.array([len(c) for c in doc["choices"]], dtype=float)
        correct_norm += int(np.argmax(np.array(want) / lengths) == doc["gold"])
    assert results["results"][task]["acc,none"] == pytest.approx(correct / len(samples))
    assert results["results"][task]["acc_norm,none"] == pytest.approx(correct_norm / len(samples))
    if which == "bundled":
        assert correct_norm / len(samples) > 0.25, correct_norm  # above chance: the tiny model read the KJV


def test_batch_sizes_1_and_8_give_the_same_results(bundled, tasks):
    _, manager, _, _ = tasks
    one = run(OpenELMLM(bundled.model, bundled.tok, batch_size=1), manager, ["kjv_verses"])
    eight = run(OpenELMLM(bundled.model, bundled.tok, batch_size=8), manager, ["kjv_verses"])
    a = [[r[0] for r in s["filtered_resps"]] for s in one["samples"]["kjv_verses"]]
    b = [[r[0] for r in s["filtered_resps"]] for s in eight["samples"]["kjv_verses"]]
    # Equal up to float32 rounding: a batched matmul may sum in another order than one row alone.
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-6)
    for key in ("acc,none", "acc_norm,none"):
        assert one["results"]["kjv_verses"][key] == eight["results"]["kjv_verses"][key]


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory) -> Checked:
    cfg = OpenELMConfig.scaled(**{**SMALL_CONFIGS["untied"], "vocab_size": 512})  # room for the test tokenizer
    return Checked(write_hf_folder(tmp_path_factory.mktemp("untied"), cfg, random_weights(cfg, seed=5)))


@pytest.mark.parametrize("which", ["random_model", "untied_model"])
def test_packed_rows_score_each_request_as_alone(which, request):
    """Packing a context with its continuations in one row, rows of unequal lengths in one batch,
    a context with more continuations than a batch holds, a BOS-only context, one-token
    continuations and a context cut to the window: every score equals the float64 reference
    on that request alone, at every batch size."""
    from openelm_mlx.scoring import loglikelihoods

    m: Checked = request.getfixturevalue(which)
    rng = np.random.default_rng(11)
    vocab, window = m.config.vocab_size, m.config.max_context_length

    def toks(n: int) -> list[int]:
        return [int(t) for t in rng.integers(3, vocab, n)]

    shared = [1, *toks(9)]
    reqs = [(shared, toks(int(k))) for k in (1, 4, 2, 6, 3)]  # five choices of one question
    reqs += [([1], toks(5)), ([1], toks(1)), ([1, *toks(3)], toks(7)), ([1, *toks(20)], toks(2))]
    reqs += [([1, *toks(window + 8)], toks(3))]  # longer than the window: cut from the left
    want = []
    for ctx, cont in reqs:
        ctx = ctx[-(window - len(cont) + 1) :]
        lp = m.logprobs((ctx + cont)[:-1])
        want.append(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
    for batch_size in (1, 3, 8):
        got = [s for s, _ in loglikelihoods(m.model, reqs, batch_size=batch_size)]
        np.testing.assert_allclose(got, want, atol=LOGLIK_TOL, rtol=0, err_msg=f"batch_size={batch_size}")


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(bundled):
    from lm_eval.api.instance import Instance

    from openelm_mlx.scoring import loglikelihoods

    context = "And the LORD spake unto Moses, saying"
    ctx = bundled.tok.encode(context)
    ids = list(ctx)
    for _ in range(5):  # the greedy continuation by the float64 reference
        ids.append(int(np.argmax(bundled.logprobs(ids)[-1])))
    greedy = ids[len(ctx) :]
    runner_up = int(np.argsort(bundled.logprobs(ids[:-1])[-1])[-2])
    wrong = greedy[:-1] + [runner_up]
    out = loglikelihoods(bundled.model, [(ctx, greedy), (ctx, wrong), (ctx, greedy[:2])], batch_size=8)
    assert [g for _, g in out] == [True, False, True]
    lp = bundled.logprobs(ids[:-1] + [runner_up])
    assert out[1][0] == pytest.approx(
        sum(lp[p, (ids[:-1] + [runner_up])[p + 1]] for p in range(len(ctx) - 1, len(ids) - 1)), abs=LOGLIK_TOL
    )
    # Through the harness's string interface too, when the greedy text round-trips through the tokenizer.
    text = bundled.tok.decode(greedy)
    if bundled.tok.encode(context + text) == ids:
        lm = OpenELMLM(bundled.model, bundled.tok, progress=False)
        ((_, g),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, text), 0)], disable_tqdm=True)
        assert g


def test_rolling_loglikelihood_equals_perplexity_and_the_reference_windows(bundled, tasks):
    _, manager, docs, _ = tasks
    results = run(OpenELMLM(bundled.model, bundled.tok, batch_size=4), manager, ["kjv_rolling"])
    got = {s["doc"]["text"]: s["filtered_resps"][0] for s in results["samples"]["kjv_rolling"]}
    got = {k: v[0] if isinstance(v, (list, tuple)) else v for k, v in got.items()}
    short, long = docs[0]["text"], docs[1]["text"]
    # One window: the same sum as `openelm-mlx eval`'s perplexity (BOS, then every token scored).
    ids = bundled.tok.encode(short)
    assert len(ids) < bundled.config.max_context_length
    nll, n = token_nll(bundled.model, ids, progress=False)
    assert got[short] == pytest.approx(-nll, abs=1e-3)
    # Longer than the context: lm-eval's own windows, scored by the float64 reference.
    tokens = bundled.tok.encode(long, add_bos=False)
    assert len(tokens) > bundled.config.max_context_length
    want = 0.0
    for ctx, cont in map(
        make_disjoint_window,
        get_rolling_token_windows(tokens, bundled.tok.bos_id, bundled.config.max_context_length, 1),
    ):
        seq = ctx + cont
        lp = bundled.logprobs(seq[:-1])
        want += sum(lp[p, seq[p + 1]] for p in range(len(ctx) - 1, len(seq) - 1))
    assert got[long] == pytest.approx(want, abs=5e-3)  # ~700 tokens at ~1e-5 each


def test_generate_until_matches_greedy_generation_cut_at_the_stop_strings(bundled, tasks):
    _, manager, _, prompts = tasks
    results = run(OpenELMLM(bundled.model, bundled.tok, batch_size=4), manager, ["kjv_generate"])
    got = {s["doc"]["prompt"]: s["resps"][0][0] for s in results["samples"]["kjv_generate"]}
    assert len(got) == len(prompts)
    for p in prompts:
        text = generate(bundled.model, bundled.tok, p["prompt"], max_tokens=24)
        cut = min([i for i in (text.find(":"), text.find(";")) if i >= 0], default=len(text))
        assert got[p["prompt"]] == text[:cut]


def test_chat_template_only_when_asked(random_model, tasks):
    _, manager, _, _ = tasks
    lm = OpenELMLM(random_model.model, random_model.tok)
    plain = run(lm, manager, ["pseudo_mc"], limit=2)
    chat = run(lm, manager, ["pseudo_mc"], limit=2, apply_chat_template=True)
    ctx_plain = plain["samples"]["pseudo_mc"][0]["arguments"][0][0]
    ctx_chat, cont = chat["samples"]["pseudo_mc"][0]["arguments"][0]
    assert "<|user|>" not in ctx_plain
    assert ctx_chat.startswith("<|user|>\n") and ctx_chat.endswith("<|assistant|>\n")
    got = chat["samples"]["pseudo_mc"][0]["filtered_resps"][0][0]
    assert got == pytest.approx(random_model.loglik(ctx_chat, cont), abs=LOGLIK_TOL)


APPLE = {
    "openelm_zero_shot": {
        t: 0 for t in ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")
    },
    "openelm_llm360": {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0, "winogrande": 5},
}


@pytest.mark.parametrize("group", list(APPLE))
def test_apple_groups_expand_to_apples_settings_with_local_copies(group, bundled, tmp_path):
    # Local tasks named like the stock ones replace them inside the bundled groups: the offline route.
    for i, name in enumerate(APPLE[group]):
        write_mc_task(
            tmp_path, name, kjv_docs(2, offset=8 * i, n_choices=2), train=kjv_docs(26, offset=400, n_choices=2)
        )
    manager = task_manager([str(tmp_path)], include_defaults=False)
    results = run(OpenELMLM(bundled.model, bundled.tok), manager, [group], limit=1)
    assert {t: results["n-shot"][t] for t in APPLE[group]} == APPLE[group]
    mean = np.mean([results["results"][t]["acc,none"] for t in APPLE[group]])
    assert results["groups"][group]["acc,none"] == pytest.approx(mean)


# --- the command line: subprocesses, with lm-eval's full task index -----------------------------


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx.cli", "evaluate", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) >= 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[-1].startswith("openelm-mlx evaluate: error: "), out.stderr
    return lines[-1]


def test_cli_prints_the_table_and_writes_json_atomically(tasks, tmp_path):
    root, _, _, _ = tasks
    output = tmp_path / "results.json"
    args = ["--model", str(BUNDLED), "--tasks", "kjv_verses", "--include-path", str(root), "--output", str(output)]
    out = cli(*args, "--batch-size", "4", "--limit", "4")
    assert out.returncode == 0, out.stderr
    assert "|kjv_verses|" in out.stdout.replace(" ", "") and "acc_norm" in out.stdout
    data = json.loads(output.read_text())
    assert data["results"]["kjv_verses"]["acc,none"] >= 0 and data["n-samples"]["kjv_verses"]["effective"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind
    line = one_line_error(cli(*args))  # an existing output is not replaced without --force
    assert "--force" in line and output.read_text() == json.dumps(data, indent=2) + "\n"


def test_cli_errors_are_one_line(tmp_path):
    line = one_line_error(cli("--model", str(tmp_path / "absent"), "--tasks", "arc_easy"))
    assert "--model" in line and "absent" in line
    line = one_line_error(cli("--model", str(BUNDLED), "--tasks", "no_such_task_anywhere"))
    assert "--tasks no_such_task_anywhere" in line


def test_cli_offline_dataset_names_it_and_points_at_include_path():
    line = one_line_error(cli("--model", str(BUNDLED), "--tasks", "arc_easy", "--limit", "1"))
    assert "allenai/ai2_arc" in line and "--include-path" in line

"""``openelm-mlx evaluate``: lm-evaluation-harness tasks on an openelm-mlx model.

Runs ``lm_eval.simple_evaluate`` with the ``OpenELMLM`` backend (evaluate.py), prints the
harness's own table and writes its JSON.  Besides lm-eval's tasks, two groups ship with the
package (openelm_mlx/tasks): ``openelm_zero_shot`` and ``openelm_llm360``, Apple's two settings
from the OpenELM model card.  ``--include-path`` directories come after those, so a local YAML
named like a stock task (say ``arc_easy`` with ``dataset_path: json``) replaces it, also inside
the groups: that is how to run them without the Hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from .errors import OpenELMError

TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_HINT = (
    "without the Hub, pass --include-path DIR with a task YAML of the same name whose dataset_path is json "
    "and whose dataset_kwargs.data_files name local files (README, 'Evaluation')"
)


def task_manager(include_paths: list[str] | None = None, include_defaults: bool = True):
    """lm-eval's tasks, then the bundled groups, then the user's directories (later ones win)."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR]
    for p in include_paths or []:
        if not Path(p).is_dir():
            raise OpenELMError(f"--include-path {p}: no such directory")
        paths.append(Path(p))
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def check_tasks(manager, names: list[str]) -> None:
    for name in names:
        if name not in manager.all_tasks and not Path(name).is_file():
            raise OpenELMError(
                f"--tasks {name}: no such task or group in lm-eval {_lm_eval_version()} or --include-path "
                "(`lm-eval ls tasks` lists them; openelm_zero_shot and openelm_llm360 are Apple's settings)"
            )


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _dataset_failure(e: BaseException) -> OpenELMError | None:
    """A one-line error naming the dataset if ``e`` was raised while a task fetched its data."""
    for frame, _ in traceback.walk_tb(e.__traceback__):
        task = frame.f_locals.get("self")
        path = getattr(task, "DATASET_PATH", None)
        if path is not None:
            name = getattr(task, "DATASET_NAME", None)
            which = f"{path} ({name})" if name else str(path)
            task_name = getattr(getattr(task, "config", None), "task", "?")
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            return OpenELMError(f"task {task_name}: cannot load dataset {which}: {reason}; {OFFLINE_HINT}")
    return None


def write_json_atomic(data: Any, path: str | Path, force: bool = False) -> None:
    """JSON written to a temporary file beside ``path`` and renamed over it: never a half-written file."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    if path.exists() and not force:
        raise OpenELMError(f"--output {path}: the file exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise OpenELMError(f"--output {path}: no such directory {path.parent}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=handle_non_serializable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_tasks(
    model: str | Any,
    tasks: list[str],
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    include_paths: list[str] | None = None,
    seed: int | None = None,
    apply_chat_template: bool = False,
    tokenizer: str | None = None,
    bootstrap_iters: int = 100000,
    progress: bool = True,
    log_samples: bool = False,
    manager: Any = None,
) -> dict:
    """lm-eval's results dict for ``tasks`` on ``model`` (a directory, or an ``OpenELMLM``);
    ``manager``: a ready lm-eval ``TaskManager`` (building lm-eval's index takes seconds)."""
    try:
        import lm_eval
    except ImportError:
        raise OpenELMError("evaluate needs lm-eval: pip install 'openelm-mlx[eval]'") from None
    from .evaluate import OpenELMLM

    manager = manager or task_manager(include_paths)
    check_tasks(manager, tasks)
    if not isinstance(model, OpenELMLM):
        model = OpenELMLM(model, tokenizer, batch_size, seed=seed, progress=progress)
    seeds = {}
    if seed is not None:
        seeds = dict(random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    try:
        results = lm_eval.simple_evaluate(
            model=model,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            **seeds,
        )
    except OpenELMError:
        raise
    except Exception as e:
        failure = _dataset_failure(e)
        if failure is not None:
            raise failure from None
        raise
    if results is None:  # only on non-zero ranks of a distributed run
        raise OpenELMError("lm-eval returned no results")
    return results


def format_tables(results: dict) -> str:
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="lm-evaluation-harness tasks (Apple's: openelm_zero_shot, openelm_llm360); needs the [eval] extra",
    )
    p.add_argument("--model", required=True, help="a converted model directory (or anything convert reads)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples per prompt (tasks' own default if unset)")
    p.add_argument("--limit", type=float, default=None, help="at most N documents per task (below 1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default 8)")
    p.add_argument("--include-path", action="append", default=[], help="a directory of task YAMLs (repeatable)")
    p.add_argument("--output", help="write lm-eval's results JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --output file")
    p.add_argument("--seed", type=int, default=None, help="seed for few-shot sampling and sampled generation")
    p.add_argument("--tokenizer", help="tokenizer.model to use instead of the model directory's")
    p.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="wrap prompts in the OpenELM Instruct template (few-shot examples as turns)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise OpenELMError("--tasks: name at least one task")
    if args.batch_size < 1:
        raise OpenELMError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise OpenELMError(f"--num-fewshot {args.num_fewshot}: must be 0 or more")
    if args.limit is not None and args.limit <= 0:
        raise OpenELMError(f"--limit {args.limit}: must be positive")
    if args.output and Path(args.output).exists() and not args.force:
        raise OpenELMError(f"--output {args.output}: the file exists; pass --force to replace it")
    if not Path(args.model).exists() and not _looks_remote(args.model):
        raise OpenELMError(f"--model {args.model}: no such model directory")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = run_tasks(
        args.model,
        tasks,
        num_fewshot=args.num_fewshot,
        limit=limit,
        batch_size=args.batch_size,
        include_paths=args.include_path,
        seed=args.seed,
        apply_chat_template=args.apply_chat_template,
        tokenizer=args.tokenizer,
    )
    print(format_tables(results))
    if args.output:
        write_json_atomic(results, args.output, force=args.force)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _looks_remote(model: str) -> bool:
    from .convert.hub import looks_like_repo_id

    return looks_like_repo_id(model)

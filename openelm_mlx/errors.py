"""The one exception type users see, and the check that names tensors in it.

Every failure caused by input (a bad flag, file, tensor or config) raises an
``OpenELMError`` whose message names the culprit; the CLI prints it on one line
and exits non-zero instead of showing a traceback.
"""

from collections.abc import Iterable


class OpenELMError(Exception):
    """A user-facing error: the message alone must tell the user what to fix."""


class ConfigError(OpenELMError, ValueError):
    """An invalid model configuration (names the field and the value)."""


class CheckpointError(OpenELMError):
    """A weight file that is malformed, truncated, unsafe or does not fit the config."""


def check_names(expected: Iterable[str], got: Iterable[str], where: object, extra_hint: str) -> None:
    """Name the first missing and the first unexpected tensor (shared by the converter and the loader)."""
    expected, got = list(expected), list(got)  # keep checkpoint order: layers.3 before layers.10
    expected_set, got_set = set(expected), set(got)
    for names, what, hint in (
        ([n for n in expected if n not in got_set], "missing", "; the config does not match the weights"),
        ([n for n in got if n not in expected_set], "unexpected", extra_hint),
    ):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise CheckpointError(f"{where}: {what} tensor {names[0]}{more}{hint}")

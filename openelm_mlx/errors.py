"""The one exception type users see.

Every failure caused by input (a bad flag, file, tensor or config) raises an
``OpenELMError`` whose message names the culprit; the CLI prints it on one line
and exits non-zero instead of showing a traceback.
"""


class OpenELMError(Exception):
    """A user-facing error: the message alone must tell the user what to fix."""


class ConfigError(OpenELMError, ValueError):
    """An invalid model configuration (names the field and the value)."""


class CheckpointError(OpenELMError):
    """A weight file that is malformed, truncated, unsafe or does not fit the config."""

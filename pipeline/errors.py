"""The one exception family of converse-pipeline.

Every error a user can cause or fix is a :class:`PipelineError`. Its message is
one line that names the problem and the fix; the CLI prints it and exits 1
(``cli.main`` is the only place that turns these into exit codes).
Context (stage, run id, path) is carried as attributes so library callers can
act on it without parsing the message.
"""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Base class: a user-facing failure with a one-line message.

    Attributes:
        stage: the pipeline stage it happened in (``"director"``, ``"dialogue"``), or None.
        run_id: the run it happened in, or None.
        path: the file or folder concerned, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        run_id: str | None = None,
        path: Path | str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.run_id = run_id
        self.path = Path(path) if path is not None else None

    def __str__(self) -> str:
        return self.message


class ConfigError(PipelineError):
    """Endpoint configuration is missing or wrong (no key, no local extra, bad flag)."""


class EndpointError(PipelineError):
    """The model endpoint could not be used: unreachable, refused the key, unknown model,
    or answered with an HTTP error after the SDK's retries."""


class StructuredOutputError(PipelineError):
    """A structured answer (JSON) was missing, cut off, refused or failed its schema.

    Attributes:
        errors: the validator's messages, each ``"<json path>: <message>"``.
    """

    def __init__(self, message: str, *, errors: list[str] | None = None, **context) -> None:
        super().__init__(message, **context)
        self.errors = errors or []


class RunError(PipelineError):
    """A run folder is missing, unreadable, or not in the state a command needs."""


class LocalServerError(PipelineError):
    """The embedded model server could not be found, started or reached."""

"""The one exception family of converse-pipeline.

Every error a user can cause or fix is a :class:`PipelineError`: a one-line problem,
and what to do about it as :class:`Fix` records. The library words a fix in its own
terms (settings by their parameter names); only the CLI turns it into command lines and
flags (``pipeline.cli``, which is also the only place that turns errors into exit codes).
Context (stage, run id, path) is carried as attributes so library callers can act on it
without parsing the message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pathlib import Path


class Fix(NamedTuple):
    """One thing the user can do about an error.

    Attributes:
        text: the advice; each ``{}`` in it stands for one of ``options``, in order.
        options: settings by parameter name (``"timeout"``, ``"director_max_tokens"``);
            the CLI shows each as its flag (``--timeout``).
        command: a ``pipeline`` command that does it, as words (``("rerun", RUN_ID,
            "dialogue")``), or empty; the CLI appends it as a command line.
    """

    text: str
    options: tuple[str, ...] = ()
    command: tuple[str, ...] = ()

    def words(self, option: Callable[[str], str], command: Callable[[tuple[str, ...]], str]) -> str:
        """The advice with each option and the command rendered by the functions given."""
        text = self.text.format(*map(option, self.options))
        return f"{text} with: {command(self.command)}" if self.command else text

    def plain(self) -> str:
        """The advice in the library's terms: ``the timeout setting``, ``(rerun RUN dialogue)``."""
        return self.words(
            lambda name: f"the {name.replace('_', ' ')} setting", lambda words: " ".join(words)
        )


def fixes_of(fix: Fix | Sequence[Fix] | None) -> tuple[Fix, ...]:
    if fix is None:
        return ()
    return (fix,) if isinstance(fix, Fix) else tuple(fix)


class PipelineError(Exception):
    """Base class: a user-facing failure with a one-line message.

    Attributes:
        problem: what went wrong, in one line.
        fixes: what the user can do about it, in order.
        message: the problem and the fixes in the library's terms (:meth:`Fix.plain`).
        stage: the pipeline stage it happened in (``"director"``, ``"dialogue"``), or None.
        run_id: the run it happened in, or None.
        path: the file or folder concerned, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        fix: Fix | Sequence[Fix] | None = None,
        stage: str | None = None,
        run_id: str | None = None,
        path: Path | str | None = None,
    ) -> None:
        self.problem = message
        self.fixes = fixes_of(fix)
        self.message = "; ".join([message, *(f.plain() for f in self.fixes)])
        super().__init__(self.message)
        self.stage = stage
        self.run_id = run_id
        from pathlib import Path  # imported here to keep the CLI's start-up light

        self.path = Path(path) if path is not None else None

    def __str__(self) -> str:
        return self.message

    def render(
        self, option: Callable[[str], str], command: Callable[[tuple[str, ...]], str]
    ) -> str:
        """The problem and the fixes, each worded by :meth:`Fix.words`."""
        return "; ".join([self.problem, *(f.words(option, command) for f in self.fixes)])


class ConfigError(PipelineError):
    """Endpoint configuration is missing or wrong (no key, no local extra, bad flag)."""


class EndpointError(PipelineError):
    """The model endpoint could not be used: unreachable, refused the key, unknown model,
    or answered with an HTTP error after the SDK's retries.

    Attributes:
        status: the HTTP status of the last answer, or None when there was none.
        detail: the server's own error message (or the connection error's text).
    """

    def __init__(
        self, message: str, *, status: int | None = None, detail: str = "", **context: Any
    ) -> None:
        super().__init__(message, **context)
        self.status = status
        self.detail = detail

    @property
    def rejects_response_format(self) -> bool:
        """True when the server refused the request's ``response_format`` (a 400, 422 or
        500 whose message names it), so another structured-output dialect may work."""
        return self.status in (400, 422, 500) and "response_format" in self.detail


class StructuredOutputError(PipelineError):
    """A structured answer (JSON) was missing, cut off, refused or failed its schema.

    Attributes:
        errors: the problems, each ``"<json path>: <message>"``.
        kind: ``"invalid_json"``, ``"schema"`` or ``"semantic"`` (a re-ask may repair
            these), ``"length"`` (cut off at the token limit: one shorter re-ask may help),
            or ``"content_filter"``, ``"refusal"``, ``"no_answer"`` (final).
    """

    REPAIRABLE = frozenset({"invalid_json", "schema", "semantic"})

    def __init__(
        self,
        message: str,
        *,
        errors: list[str] | None = None,
        kind: str = "schema",
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.errors = errors or []
        self.kind = kind

    @property
    def repairable(self) -> bool:
        return self.kind in self.REPAIRABLE


class RunError(PipelineError):
    """A run folder is missing, unreadable, or not in the state a command needs."""


class DatasetError(PipelineError):
    """A fine-tuning dataset cannot be built as asked: the speaker to train is in none of
    the conversations, an argument is out of range (context, validation share), or a
    price table cannot be read."""


class MemoryStoreError(PipelineError):
    """The memory store (``runs/memory.db``, :mod:`pipeline.memory`) cannot be used as
    asked: the database cannot be opened or is damaged, a search is not a query FTS5 can
    parse, there is nothing to forget, or the list of forgotten memories cannot be read.
    (Named so as not to shadow the builtin :class:`MemoryError`.)"""


class ReplayError(PipelineError):
    """A replayed run asked for a call its recording does not hold."""


class TelemetryError(PipelineError):
    """A run's traces could not be sent: the OpenTelemetry collector did not take them
    (:mod:`pipeline.telemetry`)."""


class LocalServerError(PipelineError):
    """The embedded model server could not be found, started or reached."""


class ModelFileError(PipelineError):
    """A GGUF model file could not be pulled from the Hugging Face Hub or listed from the
    cache: huggingface_hub is missing, the repository, revision or file does not exist,
    the file is not a GGUF file, or the Hub could not be reached.

    Attributes:
        repo: the Hub repository concerned (``"owner/name"``), or None.
        filename: the file concerned, as named in the repository, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        repo: str | None = None,
        filename: str | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.repo = repo
        self.filename = filename


class ImportFormatError(PipelineError):
    """A chat export could not be read as the format it was given as (:mod:`pipeline.chats`).

    The message is one line: the file, where in it (``line 7``, or a JSON path such as
    ``$.messages[3].text``) and what was expected there.

    Attributes:
        line: the 1-based line of the file concerned, or None.
        where: the JSON path concerned, or None.
    """

    def __init__(
        self, message: str, *, line: int | None = None, where: str | None = None, **context: Any
    ) -> None:
        super().__init__(message, **context)
        self.line = line
        self.where = where


class FinetuneError(PipelineError):
    """A fine-tune job could not be prepared, created, followed, cancelled or cleaned up:
    a dataset file that is missing or not JSON lines, an endpoint with no fine-tuning API
    (the embedded model), a ledger that cannot be read, or a server that refused or failed
    (after the SDK's retries), or a job that ended failed or cancelled.

    Attributes:
        local_id: the job's local id (its ledger, ``runs/finetunes/<local id>.json``), or
            None before a ledger exists.
        job_id: the server's job id, or None when no job was created.
        http_status: the HTTP status of the server's last answer, or None.
        detail: the server's own error message, or "".
    """

    def __init__(
        self,
        message: str,
        *,
        local_id: str | None = None,
        job_id: str | None = None,
        http_status: int | None = None,
        detail: str = "",
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.local_id = local_id
        self.job_id = job_id
        self.http_status = http_status
        self.detail = detail


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with its white space folded to single spaces, cut to ``limit`` characters."""
    folded = " ".join(str(text).split())
    return folded if len(folded) <= limit else folded[: limit - 3] + "..."

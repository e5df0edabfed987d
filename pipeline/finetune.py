"""Fine-tune jobs on a hosted fine-tuning API, through the official ``openai`` SDK, and
their ledgers.

Each job has a ledger, ``<runs folder>/finetunes/<local id>.json``
(:class:`FinetuneLedger`, ``schemas/finetune-ledger.schema.json``), made before anything
is uploaded and written again, atomically, at every change of state: each file uploaded
(its id), the job created, each status the server reports, each file deleted. So an
upload the server then refuses can still be cleaned up, and a job left running (Ctrl-C
while following it) is picked up again from its ledger. The ledger names the endpoint by
its base URL: never a key.

:class:`FinetuneJobs` does the steps: :meth:`~FinetuneJobs.start` (the ledger, no
network), :meth:`~FinetuneJobs.create` (upload the files, then create the job),
:meth:`~FinetuneJobs.status`, :meth:`~FinetuneJobs.follow`, :meth:`~FinetuneJobs.list_jobs`,
:meth:`~FinetuneJobs.cancel` and :meth:`~FinetuneJobs.cleanup` (delete the uploaded
files: chat data is personal). Retries on 408/409/429/5xx and connection errors are the
SDK's own (``max_retries``); what is left becomes a one-line
:class:`~pipeline.errors.FinetuneError`, the ledger as it was.

The endpoint is the ``finetune`` slot of :class:`pipeline.endpoints.Resolver`
(:func:`finetune_endpoint`); it is never the embedded model, which has no files API.

API reference:

- files: https://platform.openai.com/docs/api-reference/files
- fine-tuning jobs and their events:
  https://platform.openai.com/docs/api-reference/fine-tuning
- guide: https://platform.openai.com/docs/guides/fine-tuning
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .endpoints import Endpoint
from .errors import FinetuneError, Fix
from .parameters import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S
from .records import timestamp, utc_now
from .threads import off_main_thread

if TYPE_CHECKING:  # the SDK is imported on first use
    import openai

    from .endpoints import Resolver

T = TypeVar("T")

LEDGERS = "finetunes"
"""The folder of the ledgers, inside the runs folder."""
LEDGER_SCHEMA = "finetune-ledger.schema.json"
LEDGER_VERSION = 1

PENDING = "pending"
UPLOADED = "uploaded"
UPLOAD_FAILED = "upload_failed"
CREATE_FAILED = "create_failed"
SUCCEEDED = "succeeded"
JOB_ENDED = frozenset({SUCCEEDED, "failed", "cancelled"})
"""The server's final statuses of a job."""
ENDED = JOB_ENDED | {UPLOAD_FAILED, CREATE_FAILED}
"""The ledger statuses after which nothing more happens at the server."""
DEFAULT_POLL_INTERVAL_S = 10.0
EVENTS_PER_POLL = 100


# -- the ledger ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetFile:
    """A JSON-lines dataset file as read before the upload.

    Attributes:
        path: the file (absolute).
        bytes: its size in bytes.
        examples: its non-empty lines, each a JSON object (one training example).
        sha256: hex sha256 of its bytes.
    """

    path: Path
    bytes: int
    examples: int
    sha256: str


def inspect_file(path: Path) -> DatasetFile:
    """The size, example count and sha256 of the dataset file ``path``, each of whose
    non-empty lines must be a JSON object (chat ``{"messages": [...]}`` or legacy
    ``{"prompt", "completion"}``; the server checks the rest).

    Raises:
        FinetuneError: the file is missing or unreadable, a line is not a JSON object (the
            message names the line), or it has no example.
    """
    path = Path(os.path.abspath(path))
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise FinetuneError(f"{path}: no such file", path=path) from e
    except OSError as e:
        raise FinetuneError(f"{path}: cannot read it ({e})", path=path) from e
    examples = 0
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except ValueError as e:
            raise FinetuneError(
                f"{path}: line {number}: not JSON ({e}); a fine-tuning dataset has one JSON "
                "object per line",
                path=path,
            ) from e
        if not isinstance(example, dict):
            raise FinetuneError(
                f"{path}: line {number}: a JSON {type(example).__name__}, not an object; a "
                "fine-tuning dataset has one JSON object per line",
                path=path,
            )
        examples += 1
    if not examples:
        raise FinetuneError(f"{path}: no examples (the file has no JSON lines)", path=path)
    return DatasetFile(path, len(data), examples, hashlib.sha256(data).hexdigest())


@dataclass
class LedgerFile:
    """A dataset file in a ledger (``$defs/file`` of the schema).

    Attributes:
        path: its absolute path when the ledger was made.
        sha256, bytes, examples: as :class:`DatasetFile`.
        file_id: the server's id once uploaded, else None.
        deleted: when it was deleted from the server (or found gone), else None.
    """

    path: str
    sha256: str
    bytes: int
    examples: int
    file_id: str | None = None
    deleted: str | None = None

    @classmethod
    def of(cls, dataset: DatasetFile) -> LedgerFile:
        return cls(str(dataset.path), dataset.sha256, dataset.bytes, dataset.examples)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> LedgerFile:
        return cls(
            value["path"],
            value["sha256"],
            value["bytes"],
            value["examples"],
            value["file_id"],
            value["deleted"],
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StatusChange:
    """A status a ledger took, and when (ISO 8601 UTC)."""

    time: str
    status: str

    def to_json(self) -> dict[str, str]:
        return {"time": self.time, "status": self.status}


@dataclass
class FinetuneLedger:
    """One fine-tune job's ledger (``schemas/finetune-ledger.schema.json``).

    Attributes:
        local_id: its own id, made before anything is uploaded
            (``<UTC time>-<slug of the dataset's name>[-N]``); the file's name.
        created: when it was made (ISO 8601 UTC).
        base_url: the API root of the endpoint the files went to (never a key).
        base_model: the model fine-tuned.
        suffix: the suffix asked for in the fine-tuned model's name, or None.
        training, validation: the dataset files (validation: None when not given).
        source_runs: the ids of the runs the dataset was made from.
        job_id: the server's job id, or None.
        status: ``pending``, ``uploaded``, ``upload_failed``, ``create_failed``, or the job's
            status as the server last reported it (``validating_files``, ``queued``,
            ``running``, ``succeeded``, ``failed``, ``cancelled``).
        fine_tuned_model: the model the job made, or None.
        error: why the upload, the job's creation or the job failed, or None.
        history: each status taken, oldest first.
        version: the ledger format's version (1).
    """

    local_id: str
    created: str
    base_url: str
    base_model: str
    suffix: str | None
    training: LedgerFile
    validation: LedgerFile | None
    source_runs: list[str]
    job_id: str | None
    status: str
    fine_tuned_model: str | None
    error: str | None
    history: list[StatusChange]
    version: int = LEDGER_VERSION

    @property
    def files(self) -> list[LedgerFile]:
        """The training file, then the validation file when there is one."""
        return [self.training, *([self.validation] if self.validation else [])]

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> FinetuneLedger:
        """Raises KeyError or TypeError on a document the schema refuses (validate first)."""
        validation = value["validation"]
        return cls(
            local_id=value["local_id"],
            created=value["created"],
            base_url=value["base_url"],
            base_model=value["base_model"],
            suffix=value["suffix"],
            training=LedgerFile.from_json(value["training"]),
            validation=LedgerFile.from_json(validation) if validation is not None else None,
            source_runs=list(value["source_runs"]),
            job_id=value["job_id"],
            status=value["status"],
            fine_tuned_model=value["fine_tuned_model"],
            error=value["error"],
            history=[StatusChange(h["time"], h["status"]) for h in value["history"]],
            version=value["version"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "local_id": self.local_id,
            "created": self.created,
            "base_url": self.base_url,
            "base_model": self.base_model,
            "suffix": self.suffix,
            "training": self.training.to_json(),
            "validation": self.validation.to_json() if self.validation else None,
            "source_runs": list(self.source_runs),
            "job_id": self.job_id,
            "status": self.status,
            "fine_tuned_model": self.fine_tuned_model,
            "error": self.error,
            "history": [h.to_json() for h in self.history],
        }


def ledger_path(runs_dir: Path, local_id: str) -> Path:
    """Where the ledger ``local_id`` lives: ``<runs_dir>/finetunes/<local_id>.json``."""
    return runs_dir / LEDGERS / f"{local_id}.json"


def read_ledger(path: Path) -> FinetuneLedger:
    """The ledger in ``path``.

    Raises:
        FinetuneError: it cannot be read, is not JSON, or breaks the schema.
    """
    from . import schemas

    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FinetuneError(f"{path}: no such ledger", path=path) from e
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{path}: cannot read this ledger ({e})", path=path) from e
    problems = schemas.errors(value, LEDGER_SCHEMA)
    if problems:
        raise FinetuneError(f"{path}: not a fine-tune ledger: {problems[0]}", path=path)
    return FinetuneLedger.from_json(value)


def ledgers(runs_dir: Path) -> list[FinetuneLedger]:
    """Every readable ledger under ``runs_dir``, newest first (unreadable ones are left
    out)."""
    found = []
    for path in sorted((runs_dir / LEDGERS).glob("*.json"), reverse=True):
        try:
            found.append(read_ledger(path))
        except FinetuneError:
            continue
    return found


def find(runs_dir: Path, job: str) -> FinetuneLedger:
    """The ledger whose local id or job id is ``job``.

    Raises:
        FinetuneError: no ledger under ``runs_dir`` has that id, or its ledger is unreadable.
    """
    direct = ledger_path(runs_dir, job)
    if "/" not in job and "\\" not in job and direct.is_file():
        return read_ledger(direct)
    for ledger in ledgers(runs_dir):
        if ledger.job_id == job:
            return ledger
    folder = runs_dir / LEDGERS
    raise FinetuneError(
        f"no fine-tune {job!r} in {folder}: give a local id (a ledger's name) or a job id "
        "that one of its ledgers records",
        path=folder,
        fix=Fix("list them", command=("finetune", "list")),
    )


def job_for_model(runs_dir: Path, model: str) -> FinetuneLedger | None:
    """The ledger of the job that made ``model`` (its ``fine_tuned_model``), or None when
    no ledger under ``runs_dir`` names it; for a run to record which job produced the
    model it was made with."""
    for ledger in ledgers(runs_dir):
        if ledger.fine_tuned_model == model:
            return ledger
    return None


def failure(ledger: FinetuneLedger) -> FinetuneError | None:
    """The error to report for a ledger that ended without a model (a failed or cancelled
    job, an upload or a job's creation refused); None otherwise."""
    cleanup = Fix("delete its uploaded files", command=("finetune", "cleanup", ledger.local_id))
    context: dict[str, Any] = {"local_id": ledger.local_id, "job_id": ledger.job_id}
    if ledger.status == "failed":
        return FinetuneError(
            f"job {ledger.job_id} failed: {ledger.error or 'the server gave no reason'}",
            fix=cleanup,
            **context,
        )
    if ledger.status == "cancelled":
        return FinetuneError(f"job {ledger.job_id} was cancelled", fix=cleanup, **context)
    if ledger.status in (UPLOAD_FAILED, CREATE_FAILED):
        uploaded = any(f.file_id and not f.deleted for f in ledger.files)
        return FinetuneError(
            f"fine-tune {ledger.local_id} has no job: {ledger.error}",
            fix=cleanup if uploaded else None,
            **context,
        )
    return None


def endpoint_name(ledger: FinetuneLedger) -> str:
    """The name of the ``pipeline.toml`` endpoint that uses the ledger's fine-tuned model:
    its suffix, slugified."""
    from .runs import slugify

    return slugify(ledger.suffix or "finetuned")


def endpoint_entry(ledger: FinetuneLedger, endpoint: Endpoint) -> str:
    """A ``pipeline.toml`` endpoint table that uses the ledger's fine-tuned model at
    ``endpoint`` (with its key's variable name, never the key), named after the suffix
    (:func:`endpoint_name`)."""
    lines = [
        f"[endpoints.{endpoint_name(ledger)}]",
        f"base_url = {json.dumps(endpoint.base_url)}",
        f"model = {json.dumps(ledger.fine_tuned_model)}",
    ]
    if endpoint.api_key_env:
        lines.append(f"api_key_env = {json.dumps(endpoint.api_key_env)}")
    return "\n".join(lines)


# -- the endpoint -------------------------------------------------------------------------


def finetune_endpoint(resolver: Resolver) -> Endpoint:
    """The endpoint whose files and fine-tuning API to use: the ``finetune`` slot of
    ``resolver`` (the flags, else ``[assign] finetune`` or ``default`` in the config file,
    else the environment).

    Raises:
        FinetuneError: that is the embedded model, which has no files API.
        ConfigError: the environment names a server badly (see the resolver).
    """
    assigned = resolver.finetune()
    if isinstance(assigned, Endpoint) and not assigned.embedded:
        return assigned
    config = resolver.config
    key = next((k for k in ("finetune", "default") if config and config.assign.get(k)), None)
    if config is not None and key is not None:
        where = (
            f"{config.path}: assign.{key} gives fine-tuning to {config.assign[key]!r}, the "
            "embedded model"
        )
    else:
        where = (
            "no endpoint for fine-tuning is set (flags, [assign] finetune in the config file, "
            "OPENAI_API_KEY or OPENAI_BASE_URL), which leaves the embedded model"
        )
    raise FinetuneError(
        f"{where}; it has no files or fine-tuning API, so it cannot fine-tune",
        fix=Fix(
            "point at a hosted fine-tuning API: pass {} URL and {} NAME (or set "
            "OPENAI_API_KEY for OpenAI's), or name one in pipeline.toml: [assign] finetune = "
            '"NAME"',
            ("base_url", "api_key_env"),
        ),
        path=config.path if config is not None and key is not None else None,
    )


# -- the jobs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class JobEvent:
    """One of a job's events (``fine_tuning.job.event``).

    Attributes:
        time: when it happened (ISO 8601 UTC, from the server's ``created_at``).
        level: ``info``, ``warn`` or ``error``.
        message: what happened.
    """

    time: str
    level: str
    message: str


Update = JobEvent | StatusChange
"""What :meth:`FinetuneJobs.follow` yields: a new event, or a status the job took."""


@dataclass(frozen=True)
class JobRow:
    """A job listed by :meth:`FinetuneJobs.list_jobs`.

    Attributes:
        job_id: the server's id, or None for a ledger whose job was never created.
        status: as the server reports it (or, for a ledger the server did not list, as
            the ledger last recorded it).
        base_model: the model fine-tuned.
        fine_tuned_model: the model made, or None.
        created: when the job (or the ledger) was created, ISO 8601 UTC.
        local_id: the ledger's local id, or None for a job with no ledger here.
    """

    job_id: str | None
    status: str
    base_model: str
    fine_tuned_model: str | None
    created: str
    local_id: str | None = None


@dataclass
class FinetuneJobs:
    """Fine-tune jobs at one endpoint, with their ledgers in ``runs_dir/finetunes``.

    Args:
        runs_dir: the runs folder.
        endpoint: the fine-tuning API (see :func:`finetune_endpoint`); its ``model`` is
            not used.
        timeout: seconds to wait for each HTTP request (the SDK's ``timeout``).
        max_retries: retries the SDK makes on 408/409/429/5xx and connection errors.
    """

    runs_dir: Path
    endpoint: Endpoint
    timeout: float = DEFAULT_TIMEOUT_S
    max_retries: int = DEFAULT_MAX_RETRIES
    _sdk: openai.OpenAI | None = field(default=None, init=False, repr=False)

    @property
    def sdk(self) -> openai.OpenAI:
        """The SDK client, built as :class:`pipeline.client.HTTPTransport` builds it."""
        if self._sdk is None:
            self._sdk = self._transport().sdk
        return self._sdk

    def _transport(self) -> Any:
        from .client import HTTPTransport

        return HTTPTransport(self.endpoint, timeout=self.timeout, max_retries=self.max_retries)

    # -- steps ----------------------------------------------------------------------

    def start(
        self,
        dataset: DatasetFile,
        *,
        base_model: str,
        validation: DatasetFile | None = None,
        suffix: str | None = None,
        source_runs: Sequence[str] = (),
    ) -> FinetuneLedger:
        """Make the ledger of a new job (status ``pending``) and write it; nothing is sent.

        Args:
            dataset, validation: the training and validation files (:func:`inspect_file`).
            base_model: the model to fine-tune, e.g. ``gpt-4o-mini-2024-07-18``.
            suffix: up to 64 characters for the fine-tuned model's name, or None.
            source_runs: the ids of the runs the dataset was made from.
        """
        now = utc_now()
        created = timestamp(now)
        ledger = FinetuneLedger(
            local_id=self._reserve_id(now, dataset.path),
            created=created,
            base_url=self.endpoint.base_url,
            base_model=base_model,
            suffix=suffix,
            training=LedgerFile.of(dataset),
            validation=LedgerFile.of(validation) if validation is not None else None,
            source_runs=list(source_runs),
            job_id=None,
            status=PENDING,
            fine_tuned_model=None,
            error=None,
            history=[StatusChange(created, PENDING)],
        )
        self._save(ledger)
        return ledger

    def create(self, ledger: FinetuneLedger) -> FinetuneLedger:
        """Upload the ledger's files (``files.create(purpose="fine-tune")``), then create
        the job (``fine_tuning.jobs.create``); the ledger is written after each step.

        Returns:
            the ledger, with the file ids, the job id and the job's first status.

        Raises:
            FinetuneError: the ledger is not ``pending`` or belongs to another endpoint, a
                file changed since the ledger was made, or the server refused the upload
                (status ``upload_failed``) or the job (``create_failed``); the error
                names the ledger and, when a file was uploaded, how to delete it.
        """
        self._check_endpoint(ledger)
        if ledger.status != PENDING:
            raise self._error(ledger, f"fine-tune {ledger.local_id} is {ledger.status}, not new")
        for entry in ledger.files:
            if entry.file_id is not None:
                continue
            path = Path(entry.path)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise self._failed(ledger, UPLOAD_FAILED, f"{path}: cannot read it ({e})") from e
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise self._failed(
                    ledger,
                    UPLOAD_FAILED,
                    f"{path} changed since fine-tune {ledger.local_id} was started; start again",
                )
            try:
                uploaded = self._call(
                    f"the upload of {path}",
                    functools.partial(
                        self.sdk.files.create, file=(path.name, data), purpose="fine-tune"
                    ),
                )
            except FinetuneError as e:
                raise self._failed(ledger, UPLOAD_FAILED, e) from e
            entry.file_id = uploaded.id
            self._save(ledger)
        self._set_status(ledger, UPLOADED)
        options: dict[str, Any] = {}
        if ledger.suffix:
            options["suffix"] = ledger.suffix
        if ledger.validation is not None:
            options["validation_file"] = ledger.validation.file_id
        try:
            job = self._call(
                f"creating a job to fine-tune {ledger.base_model}",
                lambda: self.sdk.fine_tuning.jobs.create(
                    training_file=str(ledger.training.file_id),
                    model=ledger.base_model,
                    **options,
                ),
            )
        except FinetuneError as e:
            raise self._failed(ledger, CREATE_FAILED, e) from e
        ledger.job_id = job.id
        self._update(ledger, job)
        self._save(ledger)
        return ledger

    def status(self, ledger: FinetuneLedger) -> FinetuneLedger:
        """Refresh the ledger from the server (``fine_tuning.jobs.retrieve``); a ledger
        with no job is returned as it is.

        Raises:
            FinetuneError: the ledger belongs to another endpoint, or the server could not
                be asked (after the SDK's retries); the ledger is unchanged.
        """
        self._check_endpoint(ledger)
        if ledger.job_id is not None:
            self._update(ledger, self._retrieve(ledger))
        return ledger

    def follow(
        self, ledger: FinetuneLedger, *, poll_interval: float = DEFAULT_POLL_INTERVAL_S
    ) -> Iterator[Update]:
        """Poll the job every ``poll_interval`` seconds until it ends (succeeded, failed,
        cancelled), yielding each new event (:class:`JobEvent`, oldest first) and each
        status it takes (:class:`StatusChange`; its status when following starts too).
        The ledger is written at each status change. Stopping the iteration (Ctrl-C)
        leaves the job running and the ledger as last written.

        Raises:
            FinetuneError: the ledger has no job, belongs to another endpoint, or the
                server could not be asked (a 429 the SDK's retries did not get past, say);
                the job goes on at the server.
        """
        self._check_endpoint(ledger)
        job_id = ledger.job_id
        if job_id is None:
            raise self._error(
                ledger,
                f"fine-tune {ledger.local_id} has no job to follow (it is {ledger.status}"
                + (f": {ledger.error})" if ledger.error else ")"),
            )
        seen: set[str] = set()
        first = True
        while True:
            before = ledger.status
            self._update(ledger, self._retrieve(ledger))
            page = self._call(
                f"reading the events of job {job_id}",
                lambda: self.sdk.fine_tuning.jobs.list_events(job_id, limit=EVENTS_PER_POLL),
                ledger,
            )
            new = [e for e in reversed(page.data) if e.id not in seen]  # the API: newest first
            for event in sorted(new, key=lambda e: e.created_at):
                seen.add(event.id)
                yield JobEvent(_time(event.created_at), event.level, event.message)
            if first or ledger.status != before:
                yield ledger.history[-1]
            first = False
            if ledger.status in JOB_ENDED:
                return
            time.sleep(poll_interval)

    def list_jobs(self, limit: int = 20) -> list[JobRow]:
        """The ``limit`` newest jobs at the server (``fine_tuning.jobs.list``), each with its
        ledger's local id when there is one here (whose status is then refreshed), then
        this endpoint's ledgers the server did not list (a job never created, an older
        one), newest first.

        Raises:
            FinetuneError: the server could not be asked.
        """
        page = self._call(
            "listing the fine-tuning jobs", lambda: self.sdk.fine_tuning.jobs.list(limit=limit)
        )
        mine = [lg for lg in ledgers(self.runs_dir) if lg.base_url == self.endpoint.base_url]
        by_job = {lg.job_id: lg for lg in mine if lg.job_id}
        rows = []
        for job in page.data:
            ledger = by_job.pop(job.id, None)
            if ledger is not None:
                self._update(ledger, job)
            rows.append(
                JobRow(
                    job.id,
                    job.status,
                    job.model,
                    job.fine_tuned_model,
                    _time(job.created_at),
                    ledger.local_id if ledger else None,
                )
            )
        listed = {row.local_id for row in rows}
        for ledger in mine:
            if ledger.local_id not in listed:
                rows.append(
                    JobRow(
                        ledger.job_id,
                        ledger.status,
                        ledger.base_model,
                        ledger.fine_tuned_model,
                        ledger.created,
                        ledger.local_id,
                    )
                )
        return rows

    def cancel(self, ledger: FinetuneLedger) -> FinetuneLedger:
        """Cancel the job (``fine_tuning.jobs.cancel``); the ledger takes the status the
        server answers with.

        Raises:
            FinetuneError: the ledger has no job or belongs to another endpoint, or the
                server refused (a job that already ended, say).
        """
        self._check_endpoint(ledger)
        job_id = ledger.job_id
        if job_id is None:
            raise self._error(
                ledger, f"fine-tune {ledger.local_id} has no job to cancel (it is {ledger.status})"
            )
        job = self._call(
            f"cancelling job {job_id}", lambda: self.sdk.fine_tuning.jobs.cancel(job_id), ledger
        )
        self._update(ledger, job)
        return ledger

    def cleanup(self, ledger: FinetuneLedger) -> list[tuple[LedgerFile, bool]]:
        """Delete the ledger's uploaded files from the server (``files.delete``), each
        recorded in the ledger as it goes; a file the server no longer has (404) is
        recorded as deleted too. A job not known to have ended is asked first: its files
        are not deleted while it runs.

        Returns:
            each file deleted now, with True when the server had it and False when it was
            already gone; empty when nothing was left to delete.

        Raises:
            FinetuneError: the ledger belongs to another endpoint, the job is still running,
                or the server refused a deletion (the files deleted before are recorded).
        """
        self._check_endpoint(ledger)
        if ledger.job_id is not None and ledger.status not in ENDED:
            self.status(ledger)
            if ledger.status not in ENDED:
                raise self._error(
                    ledger,
                    f"job {ledger.job_id} is {ledger.status}: its files are in use",
                    fix=[
                        Fix("cancel it", command=("finetune", "cancel", ledger.local_id)),
                        Fix(
                            "or wait for it to end", command=("finetune", "status", ledger.local_id)
                        ),
                    ],
                )
        import openai

        deleted = []
        for entry in ledger.files:
            file_id = entry.file_id
            if file_id is None or entry.deleted is not None:
                continue
            try:
                self._call(
                    f"deleting file {file_id}",
                    functools.partial(self.sdk.files.delete, file_id),
                    ledger,
                    keep=openai.NotFoundError,
                )
                existed = True
            except openai.NotFoundError:
                existed = False
            entry.deleted = timestamp()
            self._save(ledger)
            deleted.append((entry, existed))
        return deleted

    # -- the ledger's file ------------------------------------------------------------

    def _reserve_id(self, now: datetime, dataset: Path) -> str:
        """A new local id, its ledger file created empty so that no one else takes it."""
        from .runs import slugify

        folder = self.runs_dir / LEDGERS
        folder.mkdir(parents=True, exist_ok=True)
        base = f"{now:%Y%m%dT%H%M%SZ}-{slugify(dataset.stem)}"
        for n in range(1, 1000):
            local_id = base if n == 1 else f"{base}-{n}"
            try:
                os.close(os.open(ledger_path(self.runs_dir, local_id), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            return local_id
        raise FinetuneError(f"{folder}: too many ledgers named {base}", path=folder)

    def _save(self, ledger: FinetuneLedger) -> None:
        from .runs import atomic_write_json

        atomic_write_json(ledger_path(self.runs_dir, ledger.local_id), ledger.to_json())

    def _set_status(self, ledger: FinetuneLedger, status: str) -> None:
        if status != ledger.status:
            ledger.status = status
            ledger.history.append(StatusChange(timestamp(), status))
        self._save(ledger)

    def _update(self, ledger: FinetuneLedger, job: Any) -> None:
        """Take the server's view of the job (a ``FineTuningJob``) into the ledger; write
        it when something changed."""
        error = getattr(job.error, "message", None) or None  # "error": {} on some servers
        changed = (job.fine_tuned_model, error) != (ledger.fine_tuned_model, ledger.error)
        ledger.fine_tuned_model = job.fine_tuned_model
        ledger.error = error
        if changed or job.status != ledger.status:
            self._set_status(ledger, job.status)

    def _failed(
        self, ledger: FinetuneLedger, status: str, cause: FinetuneError | str
    ) -> FinetuneError:
        """Record that the ledger stopped at ``status`` because of ``cause``, and the error
        that says so (with how to delete what was uploaded)."""
        problem = cause.problem if isinstance(cause, FinetuneError) else cause
        ledger.error = problem
        self._set_status(ledger, status)
        fixes = list(cause.fixes) if isinstance(cause, FinetuneError) else []
        if any(f.file_id for f in ledger.files):
            fixes.append(
                Fix(
                    "delete what was uploaded",
                    command=("finetune", "cleanup", ledger.local_id),
                )
            )
        return self._error(
            ledger,
            f"fine-tune {ledger.local_id} stopped: {problem}",
            fix=fixes,
            cause=cause if isinstance(cause, FinetuneError) else None,
        )

    def _error(
        self,
        ledger: FinetuneLedger,
        message: str,
        *,
        fix: Fix | Sequence[Fix] | None = None,
        cause: FinetuneError | None = None,
    ) -> FinetuneError:
        return FinetuneError(
            message,
            fix=fix,
            local_id=ledger.local_id,
            job_id=ledger.job_id,
            http_status=cause.http_status if cause else None,
            detail=cause.detail if cause else "",
            path=ledger_path(self.runs_dir, ledger.local_id),
        )

    def _check_endpoint(self, ledger: FinetuneLedger) -> None:
        if ledger.base_url != self.endpoint.base_url:
            raise self._error(
                ledger,
                f"fine-tune {ledger.local_id} was made at {ledger.base_url}, not at "
                f"{self.endpoint.base_url}",
                fix=Fix(f"point at it with {{}} {ledger.base_url}", ("base_url",)),
            )

    # -- the SDK --------------------------------------------------------------------

    def _retrieve(self, ledger: FinetuneLedger) -> Any:
        job_id = str(ledger.job_id)
        return self._call(
            f"checking job {job_id}", lambda: self.sdk.fine_tuning.jobs.retrieve(job_id), ledger
        )

    def _call(
        self,
        what: str,
        request: Callable[[], T],
        ledger: FinetuneLedger | None = None,
        *,
        keep: type[Exception] | None = None,
    ) -> T:
        """``request()`` (one SDK call, with the SDK's retries) off the main thread, so that
        Ctrl-C cannot wedge the HTTP stack; an SDK error becomes a :class:`FinetuneError`
        saying ``what`` failed (but an error of type ``keep``, re-raised as it is). For the
        ledger of a job not known to have ended, the error says that the job goes on and
        how to see it again.
        """
        import openai

        def produce() -> Iterator[T]:
            yield request()

        try:
            return next(off_main_thread(produce))
        except openai.APIError as e:
            if keep is not None and isinstance(e, keep):
                raise
            error = self._explain(what, e)
            if ledger is None or ledger.job_id is None or ledger.status in ENDED:
                raise error from e
            fix = [
                *error.fixes,
                Fix(
                    "the job goes on at the server; see it again",
                    command=("finetune", "status", ledger.local_id),
                ),
            ]
            raise self._error(ledger, error.problem, fix=fix, cause=error) from e

    def _explain(self, what: str, e: openai.APIError) -> FinetuneError:
        """One line for an SDK error (see :meth:`pipeline.client.HTTPTransport.refused`)."""
        explained = self._transport().refused(what, e, "a fine-tuning API")
        return FinetuneError(
            explained.problem,
            fix=explained.fixes,
            http_status=explained.status,
            detail=explained.detail,
        )


def _time(unix_seconds: int | float | None) -> str:
    """ISO 8601 UTC of a server's ``created_at`` (seconds since the epoch)."""
    if unix_seconds is None:
        return ""
    return timestamp(datetime.fromtimestamp(unix_seconds, timezone.utc))


@dataclass(frozen=True)
class Estimate:
    """What training on a dataset file is expected to cost.

    Attributes:
        tokens: its training tokens (see :func:`pipeline.dataset.file_tokens`).
        epochs: the epochs OpenAI picks for its size (:func:`pipeline.dataset.default_epochs`).
        cost: USD, from the price table; None when the table has no price for the model.
        counter: how the tokens were counted (``tiktoken <encoding>`` or ``estimate``).
    """

    tokens: int
    epochs: int
    cost: float | None
    counter: str


def estimate(dataset_path: Path, base_model: str, prices: Path | None = None) -> Estimate:
    """The estimated cost of fine-tuning ``base_model`` on ``dataset_path``, from the
    shipped price table with ``prices`` laid over it (:func:`pipeline.dataset.load_prices`).

    Raises:
        DatasetError: ``prices`` cannot be read.
        OSError: the dataset cannot be read.
    """
    from . import dataset

    tokens, examples, counter = dataset.file_tokens(dataset_path, base_model)
    epochs = dataset.default_epochs(examples)
    table = dataset.load_prices(prices)
    cost = dataset.estimate_cost(tokens, base_model, epochs, table.training)
    return Estimate(tokens, epochs, cost, counter.name)

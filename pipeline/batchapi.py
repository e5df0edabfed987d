"""A provider's Batch API for the stages of a batch that do not converse.

The director, the judge and the reflection each make one independent structured request
per run (:attr:`pipeline.stages.Stage.answer`). With ``pipeline batch --batch-api`` those
first requests, worked out ahead of time (:func:`pipeline.stages.first_request`), go to
OpenAI's Batch API at its lower price: one JSON line per request (``{custom_id, method,
url, body}``), uploaded with ``files.create(purpose="batch")``, run by
``batches.create(input_file_id, endpoint="/v1/chat/completions",
completion_window="24h")``, followed with ``batches.retrieve`` and read back with
``files.content(output_file_id)``. The stage then runs as usual with a transport
(:class:`BatchedTransport`) that answers that one request from the batch's output: a
repair re-ask, a request the batch did not answer (an error line, an expired batch) and
every dialogue turn go through the ordinary API. Each answer is recorded as any call is,
with the batch that made it (``batch`` in the call record), so a replay needs no batch.

Ledgers: each provider batch is written to ``<runs>/batches/<tasks file
stem>.batch-api/<stage>-<n>.json`` (``schemas/batch-api-ledger.schema.json``) before its
file is uploaded, and again at every change; beside it, the input file as uploaded and
the output and error files as downloaded. Running the same command again waits for the
batches already submitted instead of submitting their requests twice: a request is
covered by the ledger that holds it with the same sha256, unless that batch failed.

API reference: https://platform.openai.com/docs/api-reference/batch
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from . import schemas, stages
from .client import HTTPTransport, ModelClient, canonical
from .errors import EndpointError, Fix, PipelineError, one_line
from .parameters import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S
from .records import CallRecord, JSONObject, timestamp
from .runs import atomic_write_json, atomic_write_text, held_lock
from .threads import off_main_thread

if TYPE_CHECKING:
    from .batch import Batch, BatchTask
    from .client import DeltaSink, Transport
    from .endpoints import Endpoint
    from .records import RolesDocument
    from .runs import Run
    from .stages import ClientSource

URL: Final = "/v1/chat/completions"
COMPLETION_WINDOW: Final = "24h"
MAX_REQUESTS = 50_000  # per input file: the Batch API's limits
MAX_BYTES = 200 * 1024 * 1024
RETRIED = frozenset({408, 409, 429})  # refusals worth another try
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
DEFAULT_POLL_S = 30.0
LEDGER_SCHEMA = "batch-api-ledger.schema.json"
T = TypeVar("T")


class BatchApiError(EndpointError):
    """A provider batch could not be submitted, followed or read, or it failed as a whole
    (its input was refused). The runs it was for are left pending: running the batch
    again, with or without ``--batch-api``, finishes them."""


@dataclass(frozen=True)
class Request:
    """One stage's first request of one run, to be answered by a provider batch.

    Attributes:
        custom_id: ``<run id>:<stage>``, the line's id in the batch's files.
        endpoint: where the stage sends it.
        body: its request body.
    """

    custom_id: str
    endpoint: Endpoint
    body: JSONObject

    @property
    def digest(self) -> str:
        """The sha256 of the canonical request (:func:`pipeline.client.canonical`)."""
        return canonical(self.endpoint, self.body)[1]


@dataclass(frozen=True)
class Answer:
    """A batch's answer to one request.

    Attributes:
        digest: the sha256 of the request it answers.
        response: the chat completion, as the ordinary API would have answered.
        batch: ``{"id": <batch id>, "custom_id": ...}``, kept in the call record.
        started: when the batch was submitted (ISO 8601 UTC).
        time: when it completed (ISO 8601 UTC).
    """

    digest: str
    response: JSONObject
    batch: dict[str, str]
    started: str | None
    time: str | None


@dataclass
class Ledger:
    """One provider batch as submitted and followed (``<stage>-<n>.json``).

    Attributes:
        local_id: ``<stage>-<n>``: its files' names in the ledgers' folder.
        stage: the stage whose requests it holds.
        base_url, model: where they go (never a key).
        requests: each request's sha256, by custom id.
        status: ``pending`` (not submitted yet), then the batch's status as last seen
            (``validating``, ``in_progress``, ``finalizing``, ``completed``, ``failed``,
            ``expired``, ``cancelling``, ``cancelled``).
        input_file_id, batch_id, output_file_id, error_file_id: the provider's ids, once
            known.
        submitted, ended: when the batch was created, and when it was seen ended (ISO 8601
            UTC).
        request_counts: ``{total, completed, failed}`` as the provider last said.
        errors: why the batch failed, the provider's messages (or why the provider
            refused its file or its creation).
        downloaded: its output and error files are saved beside the ledger.
        spent: the custom ids whose answer a stage used and then failed with: a later run
            asks again instead of getting the same answer.
    """

    local_id: str
    stage: str
    base_url: str
    model: str
    requests: dict[str, str]
    status: str = "pending"
    input_file_id: str | None = None
    batch_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    submitted: str | None = None
    ended: str | None = None
    request_counts: dict[str, int] | None = None
    errors: list[str] = field(default_factory=list)
    downloaded: bool = False
    spent: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, **asdict(self)}


class BatchedTransport:
    """A transport (:class:`pipeline.client.Transport`) that answers the one request a
    provider batch answered, once, and sends everything else through ``inner``."""

    def __init__(self, inner: Transport, answer: Answer) -> None:
        self.inner = inner
        self._answer: Answer | None = answer
        self._lock = threading.Lock()

    def send(
        self, request: JSONObject, digest: str, *, stream: bool, on_delta: DeltaSink | None
    ) -> CallRecord:
        with self._lock:
            answer = self._answer
            if answer is not None and not stream and answer.digest == digest:
                self._answer = None
            else:
                answer = None
        if answer is None:
            return self.inner.send(request, digest, stream=stream, on_delta=on_delta)
        return CallRecord.answered(
            request,
            digest,
            answer.response,
            time=answer.time,
            started=answer.started,
            batch=answer.batch,
        )


@dataclass(frozen=True)
class Answered:
    """A :class:`pipeline.stages.ClientSource` whose one-answer stages (director, judge,
    reflection) get the answers a provider batch gave, by stage; every other client, and
    every request those answers do not match, is ``models``'s."""

    models: ClientSource
    answers: Mapping[str, Answer]

    def _client(self, client: ModelClient, stage: str) -> ModelClient:
        answer = self.answers.get(stage)
        if answer is None:
            return client
        return ModelClient(client.endpoint, BatchedTransport(client.transport, answer))

    def director(self) -> ModelClient:
        return self._client(self.models.director(), "director")

    def judge(self) -> ModelClient:
        return self._client(self.models.judge(), "judge")

    def reflector(self) -> ModelClient:
        return self._client(self.models.reflector(), "reflect")

    def moderator(self) -> ModelClient:
        return self.models.moderator()

    def roles(self, roles: RolesDocument) -> list[ModelClient]:
        return self.models.roles(roles)

    def child(self, run_id: str) -> ClientSource:
        return self.models.child(run_id)


class BatchApi:
    """The provider batches of one tasks file, with their ledgers in ``folder``.

    Args:
        folder: the ledgers' folder (``<runs>/batches/<stem>.batch-api``).
        poll_interval: seconds between two looks at a running batch.
        timeout, max_retries: each SDK call's (as for chat requests).
        on_status: receives a line at each step (submitted, its status, its answers).
    """

    def __init__(
        self,
        folder: Path,
        *,
        poll_interval: float = DEFAULT_POLL_S,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self.folder = folder
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.max_retries = max_retries
        self.on_status = on_status or (lambda line: None)
        self._transports: dict[tuple[str, str | None], HTTPTransport] = {}

    # -- the whole step -----------------------------------------------------------------

    def answers(self, stage: str, requests: Sequence[Request]) -> dict[str, Answer]:
        """The answers of the provider batches to ``requests`` (all of one stage), by
        custom id: those already submitted for the same requests are waited for, the
        others are submitted, at most :data:`MAX_REQUESTS` to a batch and one batch per
        endpoint and model. A request without an answer (an error line, an expired or
        cancelled batch) is left out: the stage sends it through the ordinary API.

        Raises:
            BatchApiError: an upload, a batch's creation, a look at it or a download
                failed (after the SDK's retries), or a batch failed as a whole.
        """
        ledgers = self.ledgers(stage)
        covered: dict[str, Ledger] = {}
        for ledger in ledgers:
            if ledger.status == "failed":
                continue
            for request in requests:
                held = ledger.requests.get(request.custom_id) == request.digest
                if held and request.custom_id not in ledger.spent:
                    covered[request.custom_id] = ledger
        new = [r for r in requests if r.custom_id not in covered]
        groups: dict[tuple[str, str | None, str], list[Request]] = {}
        for request in new:
            endpoint = request.endpoint
            groups.setdefault((endpoint.base_url, endpoint.api_key_env, endpoint.model), []).append(
                request
            )
        number = max((_number(ledger.local_id) for ledger in ledgers), default=0)
        for group in groups.values():
            for chunk in _chunks(group):
                number += 1
                ledger = self._submit(f"{stage}-{number}", stage, chunk)
                covered.update((r.custom_id, ledger) for r in chunk)
        used: dict[str, Ledger] = {}
        endpoints: dict[str, Endpoint] = {}
        for request in requests:
            ledger = covered[request.custom_id]
            used[ledger.local_id] = ledger
            endpoints.setdefault(ledger.local_id, request.endpoint)
        self._follow(list(used.values()), endpoints)
        found: dict[str, Answer] = {}
        for ledger in used.values():
            for custom_id, answer in self._read_output(ledger).items():
                if covered.get(custom_id) is ledger:
                    found[custom_id] = answer
        left = len(requests) - len(found)
        self.on_status(
            f"{stage}: {len(found)} of {len(requests)} answered by the Batch API"
            + (f"; {left} go through the ordinary API" if left else "")
        )
        return found

    def spend(self, stage: str, custom_ids: Sequence[str]) -> None:
        """Record that ``stage`` failed with the batch's answers to ``custom_ids``: a later
        run sends those requests again instead of getting the same answers."""
        spent = set(custom_ids)
        for ledger in self.ledgers(stage):
            found = sorted((spent & set(ledger.requests)) - set(ledger.spent))
            if found:
                ledger.spent.extend(found)
                self._save(ledger)

    @contextlib.contextmanager
    def held(self) -> Iterator[BatchApi]:
        """Hold the ledgers' lock (``.lock`` in their folder) for the ``with`` block, so
        that two commands on the same tasks file never submit the same requests twice.

        Raises:
            BatchApiError: another process holds it.
        """
        busy = BatchApiError(
            f"the provider batches in {self.folder} are in use by another pipeline "
            "process; wait for it to finish, or stop it",
            path=self.folder,
        )
        with held_lock(self.folder / ".lock", busy):
            yield self

    # -- ledgers ------------------------------------------------------------------------

    def ledgers(self, stage: str) -> list[Ledger]:
        """The ledgers of ``stage``'s batches, oldest first.

        Raises:
            BatchApiError: one cannot be read or is not a ledger.
        """
        found = []
        for path in sorted(self.folder.glob(f"{stage}-*.json"), key=lambda p: _number(p.stem)):
            try:
                value = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise BatchApiError(
                    f"cannot read the batch ledger {path}: {one_line(e)}",
                    fix=Fix("delete it to submit its requests again"),
                    path=path,
                ) from e
            problems = schemas.errors(value, LEDGER_SCHEMA)
            if problems:
                raise BatchApiError(
                    f"{path} is not a batch ledger: {problems[0]}",
                    fix=Fix("delete it to submit its requests again"),
                    path=path,
                )
            value.pop("version")
            found.append(Ledger(**value))
        return found

    def _save(self, ledger: Ledger) -> None:
        atomic_write_json(self.folder / f"{ledger.local_id}.json", ledger.to_json())

    # -- the provider's API -------------------------------------------------------------

    def _transport(self, endpoint: Endpoint) -> HTTPTransport:
        key = (endpoint.base_url, endpoint.api_key_env)
        if key not in self._transports:
            self._transports[key] = HTTPTransport(
                endpoint, timeout=self.timeout, max_retries=self.max_retries
            )
        return self._transports[key]

    def _call(self, endpoint: Endpoint, what: str, request: Callable[[], T]) -> T:
        """``request()`` (one SDK call, with the SDK's retries) off the main thread, so that
        Ctrl-C cannot wedge the HTTP stack; an SDK error becomes a one-line
        :class:`BatchApiError` saying ``what`` failed."""
        import openai

        def produce() -> Iterator[T]:
            yield request()

        try:
            return next(off_main_thread(produce))
        except openai.APIError as e:
            refused = self._transport(endpoint).refused(what, e, "a Batch API")
            fixes = [
                *refused.fixes,
                Fix("or run the batch without {}, through the ordinary API", ("batch_api",)),
            ]
            raise BatchApiError(
                refused.problem, status=refused.status, detail=refused.detail, fix=fixes
            ) from e

    def _submit(self, local_id: str, stage: str, requests: Sequence[Request]) -> Ledger:
        """Write the input file, then the ledger; upload the file and create the batch."""
        endpoint = requests[0].endpoint
        atomic_write_text(self.folder / f"{local_id}.input.jsonl", _input_file(requests))
        ledger = Ledger(
            local_id,
            stage,
            endpoint.base_url,
            endpoint.model,
            {r.custom_id: r.digest for r in requests},
        )
        self._save(ledger)
        self._send(ledger, endpoint)
        self.on_status(
            f"{stage}: {len(requests)} requests submitted as batch {ledger.batch_id} "
            f"({ledger.local_id}) to {endpoint.base_url}"
        )
        return ledger

    def _send(self, ledger: Ledger, endpoint: Endpoint) -> None:
        """Upload ``ledger``'s input file unless it was, and create its batch unless one
        was made from that file (by a command stopped before it could record it). A
        request the provider refuses (a 4xx other than 408, 409 and 429) marks the ledger
        failed, so that the next run submits its requests again.

        Raises:
            BatchApiError: the upload or the creation failed.
        """
        try:
            if ledger.input_file_id is None:
                data = (self.folder / f"{ledger.local_id}.input.jsonl").read_bytes()
                sdk = self._transport(endpoint).sdk
                uploaded = self._call(
                    endpoint,
                    f"the upload of the {ledger.stage} batch's requests",
                    lambda: sdk.files.create(
                        file=(f"{ledger.local_id}.input.jsonl", data, "application/jsonl"),
                        purpose="batch",
                    ),
                )
                ledger.input_file_id = uploaded.id
                self._save(ledger)
            else:
                made = self._made_from(ledger, endpoint)
                if made is not None:
                    self._record(ledger, made)
                    return
            self._create(ledger, endpoint)
        except BatchApiError as e:
            if e.status is not None and 400 <= e.status < 500 and e.status not in RETRIED:
                ledger.status = "failed"
                ledger.errors = [e.problem]
                self._save(ledger)
            raise

    def _create(self, ledger: Ledger, endpoint: Endpoint) -> None:
        """Create the batch of ``ledger``'s uploaded input file, and record it. Creating is
        not idempotent, so the SDK does not retry it: after a failure, the batch may exist
        all the same (the answer was lost); it is looked for by its input file, and the
        creation tried again only when there is none, up to ``max_retries`` times.

        Raises:
            BatchApiError: the creation failed every time.
        """
        sdk = self._transport(endpoint).sdk.with_options(max_retries=0)
        input_file_id = ledger.input_file_id
        assert input_file_id is not None
        for attempt in range(self.max_retries + 1):
            try:
                created = self._call(
                    endpoint,
                    f"the creation of the {ledger.stage} batch",
                    lambda: sdk.batches.create(
                        input_file_id=input_file_id,
                        endpoint=URL,
                        completion_window=COMPLETION_WINDOW,
                        metadata={"source": "converse-pipeline", "ledger": ledger.local_id},
                    ),
                )
            except BatchApiError as e:
                if not (e.status is None or e.status in RETRIED or e.status >= 500):
                    raise  # refused: nothing was made
                made = self._made_from(ledger, endpoint)
                if made is not None:
                    self._record(ledger, made)
                    return
                if attempt == self.max_retries:
                    raise
                time.sleep(min(0.5 * 2**attempt, 8.0))  # the SDK's backoff, roughly
                continue
            self._record(ledger, created)
            return

    def _made_from(self, ledger: Ledger, endpoint: Endpoint) -> Any:
        """The batch made from ``ledger``'s input file, among the provider's latest 100,
        or None."""
        sdk = self._transport(endpoint).sdk

        def made() -> Any:
            for number, batch in enumerate(sdk.batches.list(limit=100)):
                if batch.input_file_id == ledger.input_file_id:
                    return batch
                if number == 99:
                    break
            return None

        return self._call(endpoint, "the list of batches", made)

    def _record(self, ledger: Ledger, batch: Any) -> None:
        """Record in ``ledger`` that ``batch`` (the SDK's ``Batch``) holds its requests."""
        ledger.batch_id = batch.id
        ledger.submitted = timestamp(datetime.fromtimestamp(batch.created_at, timezone.utc))
        self._note(ledger, batch)

    def _note(self, ledger: Ledger, batch: Any) -> None:
        """Record what ``batch`` (the SDK's ``Batch``) says in ``ledger``, and save it."""
        ledger.status = batch.status
        counts = batch.request_counts
        if counts is not None:
            ledger.request_counts = {
                "total": counts.total,
                "completed": counts.completed,
                "failed": counts.failed,
            }
        ledger.output_file_id = batch.output_file_id
        ledger.error_file_id = batch.error_file_id
        errors = batch.errors.data if batch.errors is not None else None
        ledger.errors = [
            f"{e.message} (line {e.line})" if e.line is not None else str(e.message)
            for e in errors or []
        ]
        if batch.status in ENDED and ledger.ended is None:
            moment = batch.completed_at or batch.failed_at or batch.expired_at
            moment = moment or batch.cancelled_at
            ended = datetime.fromtimestamp(moment, timezone.utc) if moment else None
            ledger.ended = timestamp(ended)
        self._save(ledger)

    def _follow(self, ledgers: list[Ledger], endpoints: Mapping[str, Endpoint]) -> None:
        """Look at each batch every ``poll_interval`` seconds until all have ended, then
        download their files.

        Raises:
            BatchApiError: a batch failed as a whole.
        """
        for ledger in ledgers:
            if ledger.batch_id is None:  # a command stopped before the batch was made
                self._send(ledger, endpoints[ledger.local_id])
        while True:
            running = [ledger for ledger in ledgers if ledger.status not in ENDED]
            for ledger in running:
                endpoint = endpoints[ledger.local_id]
                sdk = self._transport(endpoint).sdk
                batch_id = ledger.batch_id
                assert batch_id is not None
                before = (ledger.status, ledger.request_counts)
                seen = self._call(
                    endpoint,
                    f"a look at batch {batch_id}",
                    functools.partial(sdk.batches.retrieve, batch_id),
                )
                self._note(ledger, seen)
                if (ledger.status, ledger.request_counts) != before:
                    counts = ledger.request_counts or {}
                    self.on_status(
                        f"{ledger.stage}: batch {batch_id} {ledger.status} "
                        f"({counts.get('completed', 0)} of {counts.get('total', '?')} done)"
                    )
            if all(ledger.status in ENDED for ledger in ledgers):
                break
            time.sleep(self.poll_interval)
        for ledger in ledgers:
            if ledger.status == "failed":
                raise BatchApiError(
                    f"batch {ledger.batch_id} of the {ledger.stage} stage failed at "
                    f"{ledger.base_url}: {'; '.join(ledger.errors) or 'no reason given'}",
                    fix=[
                        Fix("run the same command again to submit a new batch"),
                        Fix("or run the batch without {}", ("batch_api",)),
                    ],
                    path=self.folder / f"{ledger.local_id}.json",
                )
            if not ledger.downloaded:
                self._download(ledger, endpoints[ledger.local_id])

    def _download(self, ledger: Ledger, endpoint: Endpoint) -> None:
        """Save ``ledger``'s output and error files beside it."""
        sdk = self._transport(endpoint).sdk
        for kind, file_id in (("output", ledger.output_file_id), ("errors", ledger.error_file_id)):
            if file_id is None:
                continue
            answer = self._call(
                endpoint,
                f"the download of batch {ledger.batch_id}'s {kind}",
                functools.partial(sdk.files.content, file_id),
            )
            content: bytes = answer.content
            atomic_write_text(
                self.folder / f"{ledger.local_id}.{kind}.jsonl", content.decode("utf-8")
            )
        ledger.downloaded = True
        self._save(ledger)

    def _read_output(self, ledger: Ledger) -> dict[str, Answer]:
        """The successful answers in ``ledger``'s output file, by custom id (a line that
        is not one is skipped: its request goes through the ordinary API)."""
        path = self.folder / f"{ledger.local_id}.output.jsonl"
        if not path.is_file():
            return {}
        found = {}
        for raw in path.read_text(encoding="utf-8").split("\n"):  # JSON may hold U+2028
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
                custom_id = line["custom_id"]
                response = line["response"]
                ok = response["status_code"] == 200 and isinstance(response["body"], dict)
            except (ValueError, KeyError, TypeError):
                continue
            digest = ledger.requests.get(custom_id)
            if ok and digest is not None:
                batch = {"id": str(ledger.batch_id), "custom_id": custom_id}
                found[custom_id] = Answer(
                    digest, response["body"], batch, ledger.submitted, ledger.ended
                )
        return found


def _input_file(requests: Sequence[Request]) -> str:
    """The Batch API's input file of ``requests``: a JSON line each."""
    return "".join(_input_line(r) + "\n" for r in requests)


def _input_line(request: Request) -> str:
    line = {"custom_id": request.custom_id, "method": "POST", "url": URL, "body": request.body}
    return json.dumps(line, ensure_ascii=False)


def _chunks(requests: Sequence[Request]) -> Iterator[list[Request]]:
    """``requests`` in runs of at most :data:`MAX_REQUESTS` lines and :data:`MAX_BYTES`
    bytes, in order: one input file each."""
    chunk: list[Request] = []
    size = 0
    for request in requests:
        length = len(_input_line(request).encode()) + 1
        if chunk and (len(chunk) == MAX_REQUESTS or size + length > MAX_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(request)
        size += length
    if chunk:
        yield chunk


def _number(local_id: str) -> int:
    """The ``n`` of a ledger's ``<stage>-<n>``."""
    found = re.search(r"-(\d+)$", local_id)
    return int(found.group(1)) if found else 0


def refused_embedded(stage: str) -> PipelineError:
    """The error for ``--batch-api`` when ``stage`` runs on the embedded model."""
    return PipelineError(
        f"the {stage} stage runs on the embedded model, which has no Batch API",
        fix=[
            Fix("name a hosted endpoint with {}", ("base_url",)),
            Fix("or run the batch without {}", ("batch_api",)),
        ],
    )


# -- what a batch will cost ------------------------------------------------------------------


@dataclass(frozen=True)
class StageCost:
    """What one stage's requests of a batch are expected to cost.

    Attributes:
        stage: the stage.
        model: the model that answers them.
        requests: how many (one per run that has the stage still to run).
        input_tokens: their input tokens: counted for the director (its prompt and schema
            are known), at most for the judge and the reflection (their conversation is
            not known yet: every turn at its token limit).
        counted: ``input_tokens`` is a count, not a bound.
        output_tokens: their output tokens, at most (each request's ``max_tokens``).
        batch_cost, cost: USD at Batch API and at ordinary prices, for those tokens (an
            upper estimate); None when the price table has no price for the model.
    """

    stage: str
    model: str
    requests: int
    input_tokens: int
    counted: bool
    output_tokens: int
    batch_cost: float | None
    cost: float | None


@dataclass(frozen=True)
class Estimate:
    """What a batch will send (``pipeline batch --dry-run``).

    Attributes:
        tasks: its tasks; ``to_run``: those whose run is not complete.
        stages: the one-answer stages' requests and costs, in the order of the graph.
        dialogue_runs, dialogue_turns: the dialogues still to run and their most turns
            (through the ordinary API, not priced).
        counter: how tokens were counted (``tiktoken <encoding>`` or ``estimate``).
        source, date: where the prices come from, and when.
    """

    tasks: int
    to_run: int
    stages: list[StageCost]
    dialogue_runs: int
    dialogue_turns: int
    counter: str
    source: str
    date: str


def _stage_prompt(
    batch: Batch, task: BatchTask, stage: str, run: Run | None
) -> tuple[str, int, bool]:
    """The text whose tokens ``stage``'s request for ``task`` sends (the prompt and the
    schema), the request's ``max_tokens``, and whether the text is the prompt itself:
    the director's, or the judge's and reflection's of ``run`` once its conversation has
    ended. Otherwise it is their template, schema and task, to which the caller adds the
    most the conversation can be."""
    from . import director, judge, reflect, templates
    from .records import canonical_json

    plan = batch.plan(task)
    if stage == "director":
        asked = plan.director
        prompt = director.render_prompt(task.task, asked.roles, asked.done_token, plan.persona)
        schema = canonical_json(director.answer_schema(asked).document)
        return prompt + schema, asked.max_tokens, True
    module = judge if stage == "judge" else reflect
    params = plan.judge if stage == "judge" else plan.reflect
    schema = schemas.schema_path(module.SCHEMA).read_text(encoding="utf-8")
    if run is not None and stages.status(run, stages.conversation_stage(run)) == "done":
        if module is judge:
            prompt = judge.render_prompt(run)
        else:
            prompt = reflect.render_prompt(run, director.load_roles(run))
        return prompt + schema, params.max_tokens, True
    source = templates.template_path(module.TEMPLATE).read_text(encoding="utf-8")
    return task.task + source + schema, params.max_tokens, False


TURN_OVERHEAD = 8  # tokens of a transcript line's speaker and separators, at most


def _pending(batch: Batch, task: BatchTask) -> tuple[list[str], Run | None]:
    """The stages ``task``'s run has still to run (all it includes, before it exists),
    and the run when it exists."""
    from .runs import open_run

    include = batch.include(task)
    run_id = batch.record["tasks"].get(task.key, {}).get("run_id")
    if run_id and (batch.runs_dir / run_id / "run.json").is_file():
        run = open_run(batch.runs_dir, run_id)
        return stages.pending(run, include=include), run
    return [node.name for node in stages.GRAPH if not node.optional or node.name in include], None


def _cost(
    row: StageCost, inputs: Mapping[str, float], outputs: Mapping[str, float]
) -> float | None:
    """USD for ``row``'s tokens at these prices per 1M tokens (None: no price for its model)."""
    from .dataset import model_entry

    price_in, price_out = model_entry(inputs, row.model), model_entry(outputs, row.model)
    if price_in is None or price_out is None:
        return None
    return (row.input_tokens * price_in + row.output_tokens * price_out) / 1_000_000


def estimate(batch: Batch, prices: Path | None = None) -> Estimate:
    """What ``batch`` (a :class:`pipeline.batch.Batch`) would send through a provider
    batch: per one-answer stage, the requests of its runs still to run, their tokens and
    their cost (an upper estimate), from the price table (:func:`pipeline.dataset.load_prices`, with
    ``prices`` laid over it). Nothing is sent and no run is made.

    The judge's and the reflection's input is counted for a run whose conversation has
    ended; for the others it is a bound: the template and schema, the task, the roles at
    the director's token limit, and every turn at the dialogue's (plus
    :data:`TURN_OVERHEAD`).

    Raises:
        DatasetError: ``prices`` cannot be read.
        ConfigError: a task's persona is not in the config.
        RunError: a run's manifest cannot be read.
    """
    from . import dataset
    from .endpoints import EmbeddedModel

    table = dataset.load_prices(prices)
    resolver = batch.models.resolver
    models = {}
    for stage, assigned in (("director", resolver.director()), ("judge", resolver.judge())):
        models[stage] = "embedded" if isinstance(assigned, EmbeddedModel) else assigned.model
    models["reflect"] = models["judge"]
    counters = {stage: dataset.token_counter(model) for stage, model in models.items()}
    totals: dict[str, StageCost] = {}
    to_run = dialogue_runs = dialogue_turns = 0
    for task in batch.tasks:
        if batch.complete(task) is not None:
            continue
        to_run += 1
        plan = batch.plan(task)
        pending, run = _pending(batch, task)
        if "dialogue" in pending:
            dialogue_runs += 1
            dialogue_turns += plan.dialogue.turns
        for stage in (name for name in pending if stages.stage(name).answer):
            text, max_tokens, counted = _stage_prompt(batch, task, stage, run)
            tokens = counters[stage].length(text)
            if not counted:
                turn = plan.dialogue.max_tokens + TURN_OVERHEAD
                tokens += plan.director.max_tokens + plan.dialogue.turns * turn
            was = totals.get(stage) or StageCost(stage, models[stage], 0, 0, True, 0, None, None)
            totals[stage] = replace(
                was,
                requests=was.requests + 1,
                input_tokens=was.input_tokens + tokens,
                counted=was.counted and counted,
                output_tokens=was.output_tokens + max_tokens,
            )
    rows = [
        replace(
            row,
            batch_cost=_cost(row, table.batch_input, table.batch_output),
            cost=_cost(row, table.chat_input, table.chat_output),
        )
        for node in stages.GRAPH
        if (row := totals.get(node.name)) is not None
    ]
    counter = ", ".join(sorted({counters[row.stage].name for row in rows})) or "none"
    return Estimate(
        len(batch.tasks),
        to_run,
        rows,
        dialogue_runs,
        dialogue_turns,
        counter,
        table.source,
        table.date,
    )

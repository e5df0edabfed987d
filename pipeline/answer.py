"""A stage whose product is one structured answer (the director's roles, the judge's verdict).

The stage renders a prompt, asks one model for JSON that fits a schema
(:func:`pipeline.structured.ask`: dialects, repairs, re-asks), and saves the answer.
Artifacts, in the stage's folder: ``prompt.txt``, the answer file, the attempts
(``attempt-N.request.json`` / ``.response.json``) and the calls (``calls/``); in
``run.json``: the dialect plan, every attempt's outcome, the dialect and schema form that
worked, and the tokens used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from . import structured
from .errors import StructuredOutputError

if TYPE_CHECKING:
    from .client import ModelClient
    from .endpoints import Endpoint
    from .records import JSONObject, StageRecord
    from .runs import Run
    from .schemas import Schema
    from .stages import StageContext
    from .structured import Check, StructuredResult


class AnswerParameters(Protocol):
    """What a structured-answer stage's parameters have (a frozen dataclass)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def max_tokens(self) -> int: ...

    @property
    def temperature(self) -> float: ...

    @property
    def repair_attempts(self) -> int: ...

    @property
    def seed(self) -> int | None: ...


class Previewed(Exception):
    """How :func:`answer_stage` ends in a preview (``ctx.preview``): with the first
    request it would send, before anything is written (see
    :func:`pipeline.stages.first_request`).

    Attributes:
        endpoint: where it would go.
        body: its request body.
    """

    def __init__(self, endpoint: Endpoint, body: JSONObject) -> None:
        super().__init__(endpoint.base_url)
        self.endpoint = endpoint
        self.body = body


Unusable = Callable[[StructuredOutputError, "StageRecord"], StructuredOutputError]


def answer_stage(
    ctx: StageContext,
    client: ModelClient,
    *,
    params: AnswerParameters,
    inputs: object,
    prompt: str,
    schema: Schema,
    output: str,
    check: Check | None = None,
    narrow: Callable[[Any, Schema], Schema] | None = None,
    unusable: Unusable | None = None,
    recorded: dict[str, Any] | None = None,
) -> tuple[StageRecord, StructuredResult]:
    """Run ``ctx.stage`` as one structured answer from ``client`` to ``prompt``, saved as
    ``output`` (relative to the run folder); ``check`` and ``narrow`` as in
    :class:`pipeline.structured.Question`; ``recorded`` is what ``run.json`` records as the
    stage's parameters (default: ``params``). The stage is left ``running`` for the caller
    to add its own fields and finish it; returns its record and the answer.

    Raises:
        Previewed: ``ctx.preview`` is set: nothing is sent or written.
        StructuredOutputError: no usable answer (``unusable`` may reword it, knowing the
            stage record).
        EndpointError: the endpoint failed.
    """
    run = ctx.run
    endpoint = client.endpoint
    dialects = list(ctx.dialects.get(ctx.stage) or structured.plan_in_run(endpoint, run.manifest))
    parameters = recorded if recorded is not None else dataclasses.asdict(params)
    question = structured.Question(
        [{"role": "user", "content": prompt}],
        schema,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        dialects=dialects,
        repair_attempts=params.repair_attempts,
        seed=params.seed,
        check=check,
        narrow=narrow,
    )
    if ctx.preview:
        raise Previewed(endpoint, structured.first_body(endpoint, question))
    with ctx.running(endpoint=endpoint, parameters=parameters, inputs=inputs) as entry:
        entry.dialect_plan = dialects
        run.write_text(f"{ctx.stage}/prompt.txt", prompt)
        try:
            result = structured.ask(client, question, ctx.recorder.attempts())
        except StructuredOutputError as e:
            if unusable is None:
                raise
            raise unusable(e, entry) from e
        run.write_json(output, result.value)
    structured.remember_in_run(endpoint, run.manifest, result.dialect)
    entry.structured_output = result.dialect
    if result.dialect == "json_schema":
        entry.schema_form = structured.schema_form(endpoint.server)
    entry.usage = result.usage
    return entry, result


def transcript_inputs(
    ctx: StageContext, client: ModelClient, template: str, schema: str, params: Any
) -> dict[str, Any]:
    """The inputs of a stage that answers about a run's conversation (the judge, the
    reflection): the transcript, its template and schema files, the endpoint and the
    parameters."""
    from dataclasses import asdict

    from . import schemas, templates
    from .resources import file_sha256

    endpoint = client.endpoint
    run = ctx.run
    return {
        "transcript_sha256": file_sha256(run.path(run.transcript)),
        "template_sha256": file_sha256(templates.template_path(template)),
        "schema_sha256": file_sha256(schemas.schema_path(schema)),
        "endpoint": {"base_url": endpoint.base_url, "model": endpoint.model},
        "parameters": asdict(params),
    }


def read_answer(run: Run, relative: str, schema: str, stage: str) -> Any:
    """The JSON a stage saved at ``relative`` in ``run``, checked against ``schema``.

    Raises:
        RunError: it cannot be read, or does not match the schema (the first 3 problems).
    """
    from . import schemas
    from .errors import RunError

    value = run.read_json(relative)
    problems = schemas.errors(value, schema)
    if problems:
        path = run.path(relative)
        raise RunError(
            f"{path} does not match {schema}: {'; '.join(problems[:3])}",
            run_id=run.run_id,
            stage=stage,
            path=path,
        )
    return value


def conversation_done(run: Run, stage: str, doing: str) -> None:
    """Check that ``run``'s conversation has ended, before ``stage`` does ``doing`` with
    it (``judge``, ``reflect on``).

    Raises:
        RunError: the dialogue (or the import) is not done.
    """
    from .errors import Fix, RunError
    from .stages import conversation_stage, status

    needed = conversation_stage(run)
    if (now := status(run, needed)) != "done":
        raise RunError(
            f"the {needed} of run {run.run_id} is {now}, so there is nothing to {doing} yet",
            fix=Fix("finish it", command=("resume", run.run_id)),
            run_id=run.run_id,
            stage=stage,
        )

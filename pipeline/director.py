"""The director stage: the task in, two role prompts and an opening line out.

Inputs: the run's task, ``templates/director.j2``, ``schemas/roles.schema.json``.
Artifacts (in ``director/``): ``prompt.txt`` (the prompt as rendered),
``request.json`` (the request body, no credentials), ``response.json`` (the raw
response) and ``roles.json`` (the parsed, schema-valid answer).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from typing import Any

from . import schemas, templates
from .client import ModelClient, parse_structured
from .errors import PipelineError, RunError, StructuredOutputError
from .resources import file_sha256
from .runs import Run

STAGE = "director"
TEMPLATE = "director.j2"
PROMPT = "director/prompt.txt"
REQUEST = "director/request.json"
RESPONSE = "director/response.json"
ROLES = "director/roles.json"
ARTIFACTS = (PROMPT, REQUEST, RESPONSE, ROLES)


@dataclass(frozen=True)
class DirectorParameters:
    """Sampling parameters of the director call.

    Attributes:
        max_tokens: the most tokens the answer may use.
        temperature: sampling temperature (0 to 2).
    """

    max_tokens: int = 2048
    temperature: float = 0.7


def render_prompt(task: str) -> str:
    """The director's prompt for ``task`` (the task is passed to the template as data)."""
    return templates.render(TEMPLATE, task=task)


def run_director(run: Run, client: ModelClient, params: DirectorParameters) -> dict[str, Any]:
    """Run the director stage of ``run``; return the roles (``schemas/roles.schema.json``).

    The stage is ``running`` in the manifest while it works, then ``done``, or ``failed``
    with the error recorded; every artifact written before a failure stays on disk.

    Raises:
        PipelineError: the endpoint failed, or the answer was not valid roles JSON.
    """
    inputs = {
        "task": run.task,
        "template_sha256": file_sha256(templates.template_path(TEMPLATE)),
        "schema_sha256": file_sha256(schemas.schema_path(schemas.ROLES)),
        "endpoint": {"base_url": client.endpoint.base_url, "model": client.endpoint.model},
        "parameters": asdict(params),
    }
    run.start_stage(
        STAGE, endpoint=client.endpoint.describe(), parameters=asdict(params), inputs=inputs
    )
    try:
        prompt = render_prompt(run.task)
        run.write_text(PROMPT, prompt)
        request = client.structured_request(
            [{"role": "user", "content": prompt}],
            schemas.ROLES,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
        )
        run.write_json(REQUEST, request)
        response = client.complete(request)
        run.write_json(RESPONSE, response)
        try:
            roles = parse_structured(response, schemas.ROLES)
        except StructuredOutputError as e:
            hint = " (raise --director-max-tokens)" if "cut off" in e.message else ""
            raise StructuredOutputError(
                f"the director's answer was unusable: {e.message}{hint}; "
                f"the raw answer is in {run.path(RESPONSE)}",
                errors=e.errors,
            ) from e
        run.write_json(ROLES, roles)
    except PipelineError as e:
        e.stage, e.run_id = STAGE, run.run_id
        run.fail_stage(STAGE, e.message, artifacts=ARTIFACTS)
        raise
    except BaseException as e:  # Ctrl-C, or a bug: never leave the stage "running"
        run.fail_stage(STAGE, _interrupted(e), artifacts=ARTIFACTS)
        raise
    usage = response.get("usage") or {}
    run.finish_stage(
        STAGE,
        artifacts=ARTIFACTS,
        usage={
            "prompt_tokens": int(usage.get("prompt_tokens", 0)),
            "completion_tokens": int(usage.get("completion_tokens", 0)),
        },
    )
    return roles


def _interrupted(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return f"{type(e).__name__}: {e}"


def load_roles(run: Run) -> dict[str, Any]:
    """The roles of a run whose director stage is done, validated against the schema.

    Raises:
        RunError: the director stage is not done or ``roles.json`` is missing.
        StructuredOutputError: ``roles.json`` no longer matches the schema (a bad hand edit).
    """
    status = run.stage(STAGE)["status"]
    if status != "done":
        raise RunError(
            f"the director stage of run {run.run_id} is {status}, not done; "
            "start a new run with pipeline generate TASK",
            run_id=run.run_id,
            stage=STAGE,
        )
    roles = run.read_json(ROLES)
    problems = schemas.errors(roles, schemas.ROLES)
    if problems:
        raise StructuredOutputError(
            f"{run.path(ROLES)} does not match {schemas.ROLES}: {'; '.join(problems[:3])}",
            errors=problems,
            run_id=run.run_id,
            stage=STAGE,
        )
    return roles


def replace_roles(run: Run, roles: dict[str, Any]) -> None:
    """Save hand-edited ``roles`` as the run's ``roles.json``, keeping the previous file as
    ``director/roles.before-edit-N.json`` and counting the edit in the manifest.

    Raises:
        StructuredOutputError: ``roles`` does not match the schema; nothing is changed.
    """
    problems = schemas.errors(roles, schemas.ROLES)
    if problems:
        raise StructuredOutputError(
            f"the edited roles do not match {schemas.ROLES}: {'; '.join(problems[:3])}",
            errors=problems,
            run_id=run.run_id,
            stage=STAGE,
        )
    entry = run.stage(STAGE)
    edits = int(entry.get("edits", 0)) + 1
    previous = f"director/roles.before-edit-{edits}.json"
    shutil.copyfile(run.path(ROLES), run.path(previous))
    run.write_json(ROLES, roles)
    entry["edits"] = edits
    entry["artifacts"] = [*entry["artifacts"], previous]
    run.save()

"""The director stage: the task in, two role prompts and an opening line out.

Inputs: the run's task, ``templates/director.j2``, ``schemas/roles.schema.json``.
Artifacts (in ``director/``): ``prompt.txt`` (the prompt as rendered),
``request.json`` (the request body, no credentials), ``response.json`` (the raw
response) and ``roles.json`` (the parsed, schema-valid answer).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict
from typing import Any

from . import schemas, structured, templates
from .client import ModelClient, calls_to
from .errors import RunError, StructuredOutputError
from .lint import lint_roles, roles_problems, self_address
from .parameters import DirectorParameters
from .resources import file_sha256
from .runs import Run
from .termination import DEFAULT_DONE_TOKEN

STAGE = "director"
TEMPLATE = "director.j2"
PROMPT = "director/prompt.txt"
REQUEST = "director/request.json"
RESPONSE = "director/response.json"
ROLES = "director/roles.json"


def render_prompt(task: str, roles: int = 2, done_token: str = DEFAULT_DONE_TOKEN) -> str:
    """The director's prompt for ``task`` (the task is passed to the template as data)."""
    return templates.render(TEMPLATE, task=task, n_roles=roles, done_token=done_token)


def answer_schema(params: DirectorParameters) -> schemas.Schema:
    """``schemas/roles.schema.json`` narrowed for one request: exactly ``params.roles``
    roles and exactly ``params.done_token`` as the token."""
    document = copy.deepcopy(schemas.load(schemas.ROLES))
    document["properties"]["roles"].update(minItems=params.roles, maxItems=params.roles)
    document["properties"]["termination"]["properties"]["done_token"] = {
        "type": "string",
        "const": params.done_token,
    }
    return schemas.Schema(schemas.ROLES, document)


def narrow_schema(answer: dict[str, Any], schema: schemas.Schema) -> schemas.Schema:
    """``schema`` narrowed after ``answer`` had a problem of
    :func:`pipeline.lint.roles_problems`: each role's name is pinned to the answer's (a
    repeated name gets its position added: ``Student 2``), ``declared_by`` must be one of
    those names, and an opening line addressed to its own speaker is pinned to the same
    line without that address. The next answer then cannot repeat either problem on a server that
    enforces the schema as a grammar; on others, the problems are still checked."""
    names: list[str] = []
    for i, role in enumerate(answer["roles"]):
        name = role["name"].strip() or f"Role {i + 1}"
        names.append(f"{name} {i + 1}" if name.casefold() in map(str.casefold, names) else name)
    document = copy.deepcopy(schema.document)
    roles = document["properties"]["roles"]
    item = roles.pop("items", None) or roles["prefixItems"][0]  # narrowed once already
    roles["prefixItems"] = [
        {**item, "properties": {**item["properties"], "name": {"type": "string", "const": name}}}
        for name in names
    ]
    # minItems = maxItems = the number of names, so no item beyond prefixItems is allowed
    document["properties"]["termination"]["properties"]["declared_by"] = {
        "type": "string",
        "enum": names,
    }
    found = self_address(answer)
    rest = answer["opening_line"][found.end() :].strip() if found else ""
    if rest:  # the same opening line without the address to its own speaker
        document["properties"]["opening_line"] = {"type": "string", "const": rest}
    return schemas.Schema(schema.name, document)


def run_director(
    run: Run,
    client: ModelClient,
    params: DirectorParameters,
    *,
    dialects: list[str] | None = None,
) -> dict[str, Any]:
    """Run the director stage of ``run``; return the roles (``schemas/roles.schema.json``).

    The answer is asked for in the structured-output dialect planned for the endpoint
    (:func:`pipeline.structured.dialect_plan`; a dialect that worked earlier in the run is
    reused; ``dialects`` overrides the plan, as a replay does), validated against the
    schema and :func:`pipeline.lint.roles_problems`, and repaired up to
    ``params.repair_attempts`` times (an answer cut off at the token limit is asked again
    once, shorter). The stage is
    ``running`` in the manifest while it works, then ``done``, or ``failed`` with the error;
    every artifact written before a failure stays on disk.

    Raises:
        StructuredOutputError: no usable answer after the last attempt; the message names
            the run and the command that regenerates the stage.
        EndpointError: the endpoint failed.
    """
    endpoint = client.endpoint
    dialects = dialects or structured.plan_in_run(endpoint, run.manifest)
    inputs = {
        "task": run.task,
        "template_sha256": file_sha256(templates.template_path(TEMPLATE)),
        "schema_sha256": file_sha256(schemas.schema_path(schemas.ROLES)),
        "endpoint": {"base_url": endpoint.base_url, "model": endpoint.model},
        "parameters": asdict(params),
    }
    with run.stage_running(
        STAGE,
        endpoint=endpoint.describe(),
        parameters=asdict(params),
        inputs=inputs,
    ) as entry:
        entry["dialect_plan"] = dialects
        prompt = render_prompt(run.task, params.roles, params.done_token)
        run.write_text(PROMPT, prompt)
        try:
            with calls_to(STAGE, run.record_call):
                result = client.structured(
                    [{"role": "user", "content": prompt}],
                    answer_schema(params),
                    max_tokens=params.max_tokens,
                    temperature=params.temperature,
                    dialects=dialects,
                    repair_attempts=params.repair_attempts,
                    recorder=run.attempts(STAGE),
                    seed=params.seed,
                    check=roles_problems,
                    narrow=narrow_schema,
                )
        except StructuredOutputError as e:
            hint = " (raise --director-max-tokens)" if e.kind == "length" else ""
            raise StructuredOutputError(
                f"run {run.run_id}: the director's answer was unusable after "
                f"{len(entry.get('attempts', []))} attempt(s): {e.message}{hint}; the answers "
                f"are in {run.path(STAGE)}; regenerate with: pipeline rerun {run.run_id} director",
                errors=e.errors,
                kind=e.kind,
            ) from e
        run.write_json(REQUEST, result.request)
        run.write_json(RESPONSE, result.response)
        run.write_json(ROLES, result.value)
    structured.remember_in_run(endpoint, run.manifest, result.dialect)
    entry["structured_output"] = result.dialect
    if result.dialect == "json_schema":
        entry["schema_form"] = structured.schema_form(endpoint.server)
    entry["lint"] = lint_roles(result.value)
    run.finish_stage(STAGE, usage=result.usage)
    roles: dict[str, Any] = result.value
    return roles


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
    ``director/roles.before-edit-N.json``, counting the edit in the manifest, and marking
    a dialogue that already ran ``stale``.

    Raises:
        StructuredOutputError: ``roles`` does not match the schema, or has a problem of
            :func:`pipeline.lint.roles_problems`; nothing is changed.
    """
    problems = schemas.errors(roles, schemas.ROLES)
    what = f"do not match {schemas.ROLES}"
    if not problems:
        problems, what = roles_problems(roles), "are unusable"
    if problems:
        raise StructuredOutputError(
            f"the edited roles {what}: {'; '.join(problems[:3])}",
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
    entry["lint"] = lint_roles(roles)
    entry["artifacts"] = run.stage_files(STAGE)
    run.save()
    run.mark_stale("dialogue")
    run.mark_stale("judge")

"""The director stage: the task in, two role prompts and an opening line out.

Inputs: the run's task, ``templates/director.j2``, ``schemas/roles.schema.json``.
Artifacts (in ``director/``): ``prompt.txt`` (the prompt as rendered),
``request.json`` (the request body, no credentials), ``response.json`` (the raw
response) and ``roles.json`` (the parsed, schema-valid answer).
"""

from __future__ import annotations

import copy
import shutil
from typing import TYPE_CHECKING, Any

from . import schemas, stages, templates
from .answer import answer_stage
from .errors import Fix, RunError, StructuredOutputError
from .lint import lint_roles, roles_problems, self_address
from .parameters import DirectorParameters, Persona
from .records import RolesDocument, StageRecord
from .resources import file_sha256
from .termination import DEFAULT_DONE_TOKEN

if TYPE_CHECKING:
    from .runs import Run
    from .stages import StageContext

STAGE = "director"
TEMPLATE = "director.j2"
PROMPT = "director/prompt.txt"
REQUEST = "director/request.json"
RESPONSE = "director/response.json"
ROLES = "director/roles.json"


def render_prompt(
    task: str,
    roles: int = 2,
    done_token: str = DEFAULT_DONE_TOKEN,
    persona: Persona | None = None,
) -> str:
    """The director's prompt for ``task`` (the task is passed to the template as data),
    asking it to cast ``persona`` as one of the roles when one is given."""
    return templates.render(
        TEMPLATE, task=task, n_roles=roles, done_token=done_token, persona=persona
    )


def persona_problems(roles_doc: dict[str, Any], persona: Persona | None) -> list[str]:
    """The problem of an answer that does not cast ``persona`` (no role of its name), in
    the form of :func:`pipeline.lint.roles_problems`."""
    if persona is None or persona.name in [r["name"] for r in roles_doc["roles"]]:
        return []
    return [
        f"$.roles: no role is named {persona.name!r}; cast the persona {persona.name!r} as "
        "one of the roles, under that exact name"
    ]


def cast_persona(roles_doc: dict[str, Any], persona: Persona) -> dict[str, Any]:
    """``roles_doc`` with the persona's role given the persona's system prompt, word for
    word (the director may have paraphrased it)."""
    roles = [
        {**r, "system_prompt": persona.system_prompt} if r["name"] == persona.name else r
        for r in roles_doc["roles"]
    ]
    return {**roles_doc, "roles": roles}


# A director's roles are checked against version 1 of the roles schema: 2 to 8 roles,
# short names, real prompts. Version 2 also admits the speakers of an imported chat (many,
# long-named, without prompts), which a director must not write. Asking with version 1
# also keeps the director's request what it was, so runs made before version 2 replay.
ROLES_VERSION = 1


def answer_schema(params: DirectorParameters) -> schemas.Schema:
    """The roles schema a director's answer must fit (:data:`ROLES_VERSION`), narrowed for
    one request: exactly ``params.roles`` roles and exactly ``params.done_token``."""
    document = copy.deepcopy(schemas.load(schemas.ROLES, ROLES_VERSION))
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


def inputs(ctx: StageContext) -> object:
    """See :mod:`pipeline.stages`."""
    endpoint = ctx.models.director().endpoint
    return {
        "task": ctx.run.task,
        "template_sha256": file_sha256(templates.template_path(TEMPLATE)),
        "schema_sha256": file_sha256(schemas.schema_path(schemas.ROLES, ROLES_VERSION)),
        "endpoint": {"base_url": endpoint.base_url, "model": endpoint.model},
        "parameters": ctx.plan.director_parameters(),
    }


def run(ctx: StageContext) -> None:
    """Run the director stage: the roles (``schemas/roles.schema.json``) for the run's task.

    The answer is asked for in the structured-output dialect planned for the endpoint
    (:func:`pipeline.structured.dialect_plan`; a dialect that worked earlier in the run is
    reused; a replay uses the recorded plan), validated against the schema and
    :func:`pipeline.lint.roles_problems`, and repaired up to ``repair_attempts`` times (an
    answer cut off at the token limit is asked again once, shorter); see
    :mod:`pipeline.answer`. Besides the answer's files, the final exchange is kept as
    ``request.json`` and ``response.json``.

    Raises:
        StructuredOutputError: no usable answer after the last attempt; the message names
            the run and the command that regenerates the stage.
        EndpointError: the endpoint failed.
    """
    params = ctx.plan.director
    run_ = ctx.run

    def unusable(e: StructuredOutputError, entry: StageRecord) -> StructuredOutputError:
        fixes = [Fix("raise {}", ("director_max_tokens",))] if e.kind == "length" else []
        fixes.append(Fix("regenerate", command=("rerun", run_.run_id, STAGE)))
        return StructuredOutputError(
            f"run {run_.run_id}: the director's answer was unusable after "
            f"{len(entry.attempts or [])} attempt(s): {e.message}; the answers "
            f"are in {run_.path(STAGE)}",
            errors=e.errors,
            kind=e.kind,
            fix=fixes,
        )

    persona = ctx.plan.persona
    entry, result = answer_stage(
        ctx,
        ctx.models.director(),
        params=params,
        inputs=ctx.inputs,
        prompt=render_prompt(run_.task, params.roles, params.done_token, persona),
        schema=answer_schema(params),
        output=ROLES,
        check=lambda doc: roles_problems(doc) + persona_problems(doc, persona),
        # names are not pinned while the persona is missing: that would keep it out
        narrow=lambda doc, schema: (
            schema if persona_problems(doc, persona) else narrow_schema(doc, schema)
        ),
        unusable=unusable,
        recorded=ctx.plan.director_parameters(),
    )
    ctx.recorder.derive(result.record, REQUEST, RESPONSE)
    roles = result.value
    if persona is not None:
        roles = cast_persona(roles, persona)
        run_.write_json(ROLES, roles)
    entry.lint = lint_roles(roles)
    run_.finish_stage(STAGE)


def load_roles(run: Run) -> RolesDocument:
    """The roles of a run whose director stage is done, validated against the schema (an
    imported chat's speakers, see :func:`pipeline.importing.load_speakers`).

    Raises:
        RunError: the director stage is not done or ``roles.json`` is missing.
        StructuredOutputError: ``roles.json`` no longer matches the schema (a bad hand edit).
    """
    if run.imported:
        from .importing import load_speakers

        return load_speakers(run)
    status = run.stage(STAGE).status
    if status != "done":
        raise RunError(
            f"the director stage of run {run.run_id} is {status}, not done",
            fix=Fix("start a new run", command=("generate", "TASK")),
            run_id=run.run_id,
            stage=STAGE,
        )
    return read_roles(run, ROLES, ROLES_VERSION, STAGE)


def read_roles(run: Run, path: str, version: int, stage: str) -> RolesDocument:
    """The roles document at ``path`` in ``run``, checked against version ``version`` of
    the roles schema (made by ``stage``).

    Raises:
        StructuredOutputError: it does not match the schema (a bad hand edit).
    """
    roles = run.read_json(path)
    problems = schemas.errors(roles, schemas.ROLES, version)
    if problems:
        raise StructuredOutputError(
            f"{run.path(path)} does not match {schemas.ROLES}: {'; '.join(problems[:3])}",
            errors=problems,
            run_id=run.run_id,
            stage=stage,
        )
    return RolesDocument.from_json(roles)


def replace_roles(run: Run, roles: dict[str, Any]) -> None:
    """Save hand-edited ``roles`` as the run's ``roles.json``, keeping the previous file as
    ``director/roles.before-edit-N.json``, counting the edit in the manifest, and marking
    a dialogue that already ran ``stale``.

    Raises:
        StructuredOutputError: ``roles`` does not match the schema, or has a problem of
            :func:`pipeline.lint.roles_problems`; nothing is changed.
    """
    problems = schemas.errors(roles, schemas.ROLES, ROLES_VERSION)
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
    edits = (entry.edits or 0) + 1
    previous = f"director/roles.before-edit-{edits}.json"
    shutil.copyfile(run.path(ROLES), run.path(previous))
    run.write_json(ROLES, roles)
    entry.edits = edits
    entry.lint = lint_roles(roles)
    entry.artifacts = run.stage_files(STAGE)
    run.save()
    stages.refresh(run)  # the stages that read the old roles are now stale


def replay_edits(source: Run, run: Run) -> None:
    """Replay ``source``'s hand edits of the roles in ``run``, as one edit."""
    if source.stage(STAGE).edits:
        replace_roles(run, source.read_json(ROLES))

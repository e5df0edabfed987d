"""The reflect stage: after the conversation, a reflection for each role.

For each role a model says whether its output met the goal its system prompt set, what it
should improve, and whether its turns are worth keeping, with a reason
(``schemas/reflection.schema.json``, narrowed to the run's role names, one reflection each,
in order). Memory stores each turn with its role's reflection, and curation can keep only
what was marked ``keep``. The prompt is ``templates/reflect.j2``; the model is the judge's
(``[assign] judge`` in ``pipeline.toml``). Artifacts (in ``reflect/``): ``prompt.txt``,
``reflections.json``, the attempts and the recorded calls.

It runs after the dialogue (or on an imported chat) when asked: ``--reflect`` on
``generate`` and ``batch``, or ``rerun RUN reflect``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from . import director, schemas, templates
from .answer import answer_stage, conversation_done, read_answer, transcript_inputs
from .dialogue import shown

if TYPE_CHECKING:
    from .records import RolesDocument
    from .runs import Run
    from .stages import StageContext

STAGE = "reflect"
TEMPLATE = "reflect.j2"
SCHEMA = "reflection.schema.json"
REFLECTIONS = "reflect/reflections.json"


def answer_schema(roles: RolesDocument) -> schemas.Schema:
    """The reflection schema narrowed to ``roles``: one reflection per role, in order,
    each naming its role."""
    document = copy.deepcopy(schemas.load(SCHEMA))
    listed = document["properties"]["reflections"]
    item = listed.pop("items")
    listed["prefixItems"] = [
        {**item, "properties": {**item["properties"], "role": {"type": "string", "const": r.name}}}
        for r in roles.roles
    ]
    listed.update(minItems=len(roles.roles), maxItems=len(roles.roles))
    return schemas.Schema(SCHEMA, document)


def render_prompt(run: Run, roles: RolesDocument) -> str:
    """The reflection prompt for ``run``: its task, each of ``roles``' goal and the
    transcript."""
    return templates.render(
        TEMPLATE,
        task=run.task,
        cast=[{"name": r.name, "system_prompt": r.system_prompt} for r in roles.roles],
        lines=shown(run.read_transcript(), roles.done_token),
    )


def inputs(ctx: StageContext) -> object:
    """See :mod:`pipeline.stages`."""
    return transcript_inputs(ctx, ctx.models.reflector(), TEMPLATE, SCHEMA, ctx.plan.reflect)


def check(run: Run) -> None:
    """See :mod:`pipeline.stages`.

    Raises:
        RunError: the conversation has not ended.
    """
    conversation_done(run, STAGE, "reflect on")


def run(ctx: StageContext) -> None:
    """Run the reflect stage (see :mod:`pipeline.answer`).

    Raises:
        StructuredOutputError: no usable reflections after the last attempt.
        EndpointError: the endpoint failed.
    """
    run_ = ctx.run
    roles = director.load_roles(run_)
    answer_stage(
        ctx,
        ctx.models.reflector(),
        params=ctx.plan.reflect,
        inputs=ctx.inputs,
        prompt=render_prompt(run_, roles),
        schema=answer_schema(roles),
        output=REFLECTIONS,
    )
    run_.finish_stage(STAGE)


def load_reflections(run: Run) -> list[dict[str, Any]]:
    """The reflections of ``run``, one per role in order (``schemas/reflection.schema.json``);
    empty when it has none.

    Raises:
        RunError: the file does not match the schema.
    """
    if not run.path(REFLECTIONS).is_file():
        return []
    return list(read_answer(run, REFLECTIONS, SCHEMA, STAGE)["reflections"])

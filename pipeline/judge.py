"""The judge stage: did the conversation accomplish its task, and what did it produce?

A model is asked, with ``templates/judge.j2`` (``judge-chat.j2`` for an imported chat
between people), for a verdict that fits
``schemas/verdict.schema.json``: ``{completed, score (1-10), reasons, deliverable}``,
validated and repaired like every structured answer. Artifacts (in ``judge/``):
``prompt.txt``, ``verdict.json``, the attempts and the recorded calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import director, schemas, templates
from .answer import answer_stage, conversation_done, read_answer, transcript_inputs
from .dialogue import shown
from .records import Verdict
from .runs import Run

if TYPE_CHECKING:
    from .stages import StageContext

STAGE = "judge"
TEMPLATE = "judge.j2"
CHAT_TEMPLATE = "judge-chat.j2"
SCHEMA = "verdict.schema.json"
PROMPT = "judge/prompt.txt"
VERDICT = "judge/verdict.json"


def template(run: Run) -> str:
    """The judge's template for ``run``: ``judge.j2`` for a conversation between models,
    ``judge-chat.j2`` for an imported chat between people."""
    return CHAT_TEMPLATE if run.imported else TEMPLATE


def render_prompt(run: Run) -> str:
    """The judge's prompt for ``run``: its task, acceptance criteria and transcript."""
    roles = director.load_roles(run)
    return templates.render(
        template(run),
        task=run.task,
        acceptance_criteria=roles.termination.acceptance_criteria,
        lines=shown(run.read_transcript(), roles.done_token),
    )


def inputs(ctx: StageContext) -> object:
    """See :mod:`pipeline.stages`."""
    return transcript_inputs(ctx, ctx.models.judge(), template(ctx.run), SCHEMA, ctx.plan.judge)


def check(run: Run) -> None:
    """See :mod:`pipeline.stages`.

    Raises:
        RunError: the conversation (a dialogue, or an import) has not ended.
    """
    conversation_done(run, STAGE, "judge")


def run(ctx: StageContext) -> None:
    """Run the judge stage: the verdict, checked against ``schemas/verdict.schema.json``
    (see :mod:`pipeline.answer`).

    Raises:
        StructuredOutputError: no usable verdict after the last attempt.
        EndpointError: the endpoint failed.
    """
    run_ = ctx.run
    answer_stage(
        ctx,
        ctx.models.judge(),
        params=ctx.plan.judge,
        inputs=ctx.inputs,
        prompt=render_prompt(run_),
        schema=schemas.Schema.file(SCHEMA),
        output=VERDICT,
    )
    run_.finish_stage(STAGE)


def load_verdict(run: Run) -> Verdict:
    """The judge's verdict of ``run`` (``schemas/verdict.schema.json``).

    Raises:
        RunError: the run has none, or it is not a verdict.
    """
    return Verdict.from_json(read_answer(run, VERDICT, SCHEMA, STAGE))

"""The judge stage: did the conversation accomplish its task, and what did it produce?

A model is asked, with ``templates/judge.j2``, for a verdict that fits
``schemas/verdict.schema.json``: ``{completed, score (1-10), reasons, deliverable}``,
validated and repaired like every structured answer. Artifacts (in ``judge/``):
``prompt.txt``, ``verdict.json``, the attempts and the recorded calls.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from . import director, schemas, structured, templates
from .client import ModelClient, calls_to
from .errors import RunError
from .parameters import JudgeParameters
from .resources import file_sha256
from .runs import TRANSCRIPT, Run
from .termination import strip_token

STAGE = "judge"
TEMPLATE = "judge.j2"
SCHEMA = "verdict.schema.json"
PROMPT = "judge/prompt.txt"
VERDICT = "judge/verdict.json"


def render_prompt(run: Run) -> str:
    """The judge's prompt for ``run``: its task, acceptance criteria and transcript."""
    roles_doc = director.load_roles(run)
    token = roles_doc["termination"]["done_token"]
    lines = [
        {**line, "content": strip_token(line["content"], token)} for line in run.read_transcript()
    ]
    return templates.render(
        TEMPLATE,
        task=run.task,
        acceptance_criteria=roles_doc["termination"]["acceptance_criteria"],
        lines=lines,
    )


def run_judge(run: Run, client: ModelClient, params: JudgeParameters) -> dict[str, Any]:
    """Run the judge stage of ``run`` (whose dialogue has ended); return the verdict.

    Raises:
        RunError: the dialogue stage is not done.
        StructuredOutputError: no usable verdict after the last attempt.
        EndpointError: the endpoint failed.
    """
    if run.stage("dialogue")["status"] != "done":
        raise RunError(
            f"the dialogue of run {run.run_id} is {run.status('dialogue')}, so there is nothing "
            f"to judge yet; finish it with: pipeline resume {run.run_id}",
            run_id=run.run_id,
            stage=STAGE,
        )
    endpoint = client.endpoint
    inputs = {
        "transcript_sha256": file_sha256(run.path(TRANSCRIPT)),
        "template_sha256": file_sha256(templates.template_path(TEMPLATE)),
        "schema_sha256": file_sha256(schemas.schema_path(SCHEMA)),
        "endpoint": {"base_url": endpoint.base_url, "model": endpoint.model},
        "parameters": asdict(params),
    }
    dialects = structured.plan_in_run(endpoint, run.manifest)
    run.archive_stage(STAGE)
    with (
        run.stage_running(
            STAGE, endpoint=endpoint.describe(), parameters=asdict(params), inputs=inputs
        ) as entry,
        calls_to(STAGE, run.record_call),
    ):
        entry["dialect_plan"] = dialects
        prompt = render_prompt(run)
        run.write_text(PROMPT, prompt)
        result = client.structured(
            [{"role": "user", "content": prompt}],
            schemas.Schema.file(SCHEMA),
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            dialects=dialects,
            repair_attempts=params.repair_attempts,
            recorder=run.attempts(STAGE),
            seed=params.seed,
        )
        run.write_json(VERDICT, result.value)
    structured.remember_in_run(endpoint, run.manifest, result.dialect)
    run.finish_stage(STAGE, usage=result.usage, structured_output=result.dialect)
    verdict: dict[str, Any] = result.value
    return verdict

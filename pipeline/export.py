"""What a run leaves behind, in the forms people use.

``md``
    the layout of the gpt-converse README's examples: the task, each role's system
    prompt, the opening line, then one bold speaker label per turn
    (``templates/transcript.md.j2``).
``txt``
    a plain-text transcript with a header (timestamp, the model of each role, the task),
    then ``Name:`` blocks (``templates/transcript.txt.j2``).
``jsonl``
    one turn per line, as stored, in the current ``transcript-line.schema.json`` (a line
    of a version 1 run gains its ``kind``).
``finetune``
    OpenAI chat fine-tuning lines, ``{"messages": [...]}``, from one role's point of view:
    the system prompt it was given, the others' turns as ``user`` and its own as
    ``assistant`` (https://platform.openai.com/docs/guides/fine-tuning; checked against
    ``schemas/finetune.schema.json``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from . import schemas, stages, templates
from .choices import EXPORT_FORMATS
from .dialogue import messages_for, render_markdown, shown
from .director import ROLES, load_roles
from .errors import PipelineError, RunError
from .judge import VERDICT, load_verdict
from .records import JSONObject, RolesDocument, Turn
from .runs import Run, jsonl

FINETUNE_SCHEMA = "finetune.schema.json"


def export_run(run: Run, fmt: str, *, role: str | None = None) -> str:
    """``run``'s dialogue in format ``fmt`` (one of ``EXPORT_FORMATS``); for ``finetune``,
    from the point of view of ``role`` (a role name), or of every role when None.

    Raises:
        RunError: the run has no roles or no transcript, or ``role`` is not one of its roles.
    """
    lines = run.read_transcript()
    if not lines:
        raise RunError(f"run {run.run_id} has no transcript to export", run_id=run.run_id)
    if fmt == "jsonl":
        return jsonl(line.to_json() for line in lines)
    roles_doc = load_roles(run)
    if fmt == "md":
        return render_markdown(run.task, roles_doc, lines)
    if fmt == "txt":
        return _text(run, roles_doc, lines)
    if fmt == "finetune":
        return jsonl(finetune_examples(run, roles_doc, lines, role))
    raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")


def _text(run: Run, roles_doc: RolesDocument, lines: list[Turn]) -> str:
    created = datetime.fromisoformat(run.manifest.created.replace("Z", "+00:00"))
    return templates.render(
        "transcript.txt.j2",
        timestamp=f"{created:%Y%m%d%H%M}",
        models=_models_by_role(run, roles_doc),
        task=run.task,
        lines=shown(lines, roles_doc.done_token),
    )


def _models_by_role(run: Run, roles_doc: RolesDocument) -> list[tuple[str, str]]:
    endpoints = run.stage("dialogue").role_endpoints or []
    found = []
    for i, name in enumerate(roles_doc.names):
        found.append((name, endpoints[i].model if i < len(endpoints) else "unknown"))
    return found


def finetune_examples(
    run: Run, roles_doc: RolesDocument, lines: list[Turn], role: str | None
) -> list[JSONObject]:
    """One fine-tuning example per role (or for ``role`` alone) that spoke at least one
    generated turn; trailing turns by others are dropped so each ends with the role's own.

    Raises:
        RunError: ``role`` is not one of the run's roles.
        PipelineError: an example does not fit ``schemas/finetune.schema.json`` (a bug).
    """
    names = roles_doc.names
    if role is not None and role not in names:
        raise RunError(
            f"run {run.run_id} has no role {role!r}; its roles are {', '.join(names)}",
            run_id=run.run_id,
        )
    examples = []
    for index, name in enumerate(names):
        if role is not None and name != role:
            continue
        spoken = [i for i, line in enumerate(lines) if line.role_index == index]
        if not any(lines[i].generated for i in spoken):
            continue
        upto = spoken[-1] + 1
        examples.append(checked({"messages": messages_for(index, roles_doc, lines[:upto])}))
    return examples


def checked(example: JSONObject) -> JSONObject:
    """``example``, a chat fine-tuning line, once it fits ``schemas/finetune.schema.json``.

    Raises:
        PipelineError: it does not (a bug of the code that made it).
    """
    problems = schemas.errors(example, FINETUNE_SCHEMA)
    if problems:
        raise PipelineError(f"a fine-tuning example broke its schema: {problems[0]}")
    return example


def qualifies(run: Run, min_score: int | None) -> bool:
    """True when ``run`` has a finished dialogue (or is an imported chat) and, when
    ``min_score`` is set, a judge verdict scoring at least that."""
    if stages.status(run, stages.conversation_stage(run)) != "done":
        return False
    if not run.imported and not run.path(ROLES).exists():
        return False
    if min_score is None:
        return True
    if stages.status(run, "judge") != "done" or not run.path(VERDICT).exists():
        return False
    return load_verdict(run).score >= min_score


def export_many(runs: Iterable[Run], fmt: str, *, role: str | None, min_score: int | None) -> str:
    """The export of every qualifying run (see :func:`qualifies`), concatenated; with a
    ``role``, runs without that role are skipped."""
    parts = []
    for run in runs:
        if not qualifies(run, min_score):
            continue
        if role is not None and role not in load_roles(run).names:
            continue
        parts.append(export_run(run, fmt, role=role))
    return "".join(parts)

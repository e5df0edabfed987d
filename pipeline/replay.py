"""Reproducing a run exactly, without a model: replay, and comparing two runs: diff.

Every model call is recorded in its stage's ``calls/`` folder (:func:`pipeline.client.calls_to`).
:func:`replay_run` executes the pipeline again, for the same task with the same parameters
and endpoints, with clients that answer each request from that recording by the sha256 of
the canonical request. Given the same code, templates and schemas, every request matches
and every artifact comes out byte for byte the same; anything else is a clear error that
names the stage. Only the manifest holds what differs by nature: run id, times, pids.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import click

from . import views
from .client import Recording, ReplayClient
from .dialogue import DialogueListener, DialogueParameters, run_dialogue
from .director import ROLES, DirectorParameters, replace_roles, run_director
from .endpoints import Endpoint
from .errors import RunError
from .judge import JudgeParameters, run_judge
from .runs import STAGES, Run, create_run


def replay_run(
    source: Run,
    runs_dir: Path,
    *,
    into: str | None = None,
    listener: DialogueListener | None = None,
) -> Run:
    """Replay ``source`` into a new run (id ``into``, or a fresh one) from its recording.

    A hand edit of the roles is replayed as one edit: the edited ``roles.json`` replaces
    the director's answer before the dialogue.

    Raises:
        RunError: ``source``'s director stage never finished, or ``into`` is taken.
        ReplayError: a stage asked for a call the recording does not hold (the code, a
            template, a schema or a parameter changed).
    """
    director_entry = source.stage("director")
    if director_entry["status"] not in ("done",) or not director_entry.get("endpoint"):
        raise RunError(
            f"the director stage of run {source.run_id} is {source.status('director')}; "
            "only a run whose director finished can be replayed",
            run_id=source.run_id,
        )
    planned = {name: source.stage(name)["parameters"] for name in STAGES}
    run = create_run(runs_dir, source.task, planned, run_id=into)
    run.manifest["replay_of"] = source.run_id
    run.save()
    with run.locked():
        recording = Recording(source.read_calls("director"), source.run_id)
        client = ReplayClient(Endpoint.from_description(director_entry["endpoint"]), recording)
        run_director(
            run,
            client,
            DirectorParameters(**director_entry["parameters"]),
            dialects=director_entry.get("dialect_plan"),
        )
        if director_entry.get("edits"):
            replace_roles(run, source.read_json(ROLES))
        dialogue = source.stage("dialogue")
        if dialogue["status"] == "pending" or not dialogue.get("role_endpoints"):
            return run
        recording = Recording(source.read_calls("dialogue"), source.run_id)
        clients = [
            ReplayClient(Endpoint.from_description(described), recording)
            for described in dialogue["role_endpoints"]
        ]
        moderator = (
            ReplayClient(Endpoint.from_description(dialogue["moderator_endpoint"]), recording)
            if dialogue.get("moderator_endpoint")
            else None
        )
        run_dialogue(
            run,
            clients,
            DialogueParameters(**dialogue["parameters"]),
            listener,
            moderator=moderator,
        )
        judge = source.stage("judge")
        if judge["status"] == "done" and judge.get("endpoint"):
            recording = Recording(source.read_calls("judge"), source.run_id)
            client = ReplayClient(Endpoint.from_description(judge["endpoint"]), recording)
            run_judge(run, client, JudgeParameters(**judge["parameters"]))
    return run


def diff_runs(a: Run, b: Run) -> str:
    """What differs between two runs: their inputs (task, template and schema hashes,
    endpoints, parameters), then unified diffs of the roles and of the transcripts.
    An empty string when nothing differs."""
    sections = []
    inputs = _input_differences(a, b)
    if inputs:
        sections.append("inputs that differ:\n" + "\n".join(f"  {line}" for line in inputs))
    for title, render in (("roles", _roles_text), ("transcript", _transcript_text)):
        lines = list(
            difflib.unified_diff(
                render(a).splitlines(),
                render(b).splitlines(),
                fromfile=f"{a.run_id}/{title}",
                tofile=f"{b.run_id}/{title}",
                lineterm="",
            )
        )
        if lines:
            sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _input_differences(a: Run, b: Run) -> list[str]:
    found = []
    if a.task != b.task:
        found.append(f"task: {a.task!r} | {b.task!r}")
    files_a, files_b = a.manifest.get("files", {}), b.manifest.get("files", {})
    for path in sorted(set(files_a) | set(files_b)):
        if files_a.get(path) != files_b.get(path):
            found.append(
                f"{path}: sha256 {_short(files_a.get(path))} | {_short(files_b.get(path))}"
            )
    for stage in STAGES:
        ea, eb = a.stage(stage), b.stage(stage)
        for key in ("endpoint", "role_endpoints", "parameters"):
            if ea.get(key) != eb.get(key):
                found.append(f"{stage} {key}: {_compact(ea.get(key))} | {_compact(eb.get(key))}")
        if ea.get("edits", 0) != eb.get("edits", 0):
            found.append(f"{stage} hand edits: {ea.get('edits', 0)} | {eb.get('edits', 0)}")
    return found


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "(none)"


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _roles_text(run: Run) -> str:
    if not run.path(ROLES).exists():
        return ""
    return click.unstyle(views.roles_text(run.read_json(ROLES)))


def _transcript_text(run: Run) -> str:
    return click.unstyle(views.transcript_text(run.read_transcript()))

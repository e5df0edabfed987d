"""Finished runs made on disk directly (no model): a dialogue of Student and Mentor, with a
verdict and reflections when asked, for the memory and curation tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from pipeline.judge import VERDICT
from pipeline.memory import REFLECTIONS
from pipeline.records import Turn
from pipeline.runs import Run, create_run

from .conftest import ROLES

NAMES = ("Student", "Mentor")


def finished_run(
    runs_dir: Path,
    task: str,
    texts: Sequence[str],
    *,
    score: int | None = None,
    keep: Mapping[str, bool] | None = None,
    finished: bool = True,
) -> Run:
    """A run of ``task`` whose dialogue is ``texts``, spoken by Student and Mentor in turn
    (Student first: the opening line), each turn timed; judged ``score`` when given, and
    reflected when ``keep`` gives each role's keep-or-discard (the reflect stage done, its
    ``reflect/reflections.json`` as the reflect stage writes it)."""
    run = create_run(runs_dir, task)
    run.write_json("director/roles.json", ROLES)
    run.finish_stage("director")
    for number, text in enumerate(texts, start=1):
        index = (number - 1) % 2
        kind = "opening" if number == 1 else "generated"
        time = f"2026-01-01T10:{number:02d}:00.000Z"
        run.append_transcript(Turn(number, NAMES[index], index, text, kind, model="m", time=time))
    if not finished:
        return run
    run.finish_stage("dialogue")
    if score is not None:
        judge(run, score)
    if keep is not None:
        reflect(run, keep)
    return run


def judge(run: Run, score: int) -> None:
    """Give ``run`` a verdict of ``score`` (again, when it has one)."""
    verdict = {"completed": True, "score": score, "reasons": "It did.", "deliverable": ""}
    run.write_json(VERDICT, verdict)
    run.finish_stage("judge")


def reflect(run: Run, keep: Mapping[str, bool]) -> None:
    """Give ``run`` a done reflect stage with one reflection per role of ``keep``."""
    reflections = [
        {
            "role": role,
            "meets_goal": kept,
            "assessment": f"{role} did {'well' if kept else 'badly'}.",
            "improvements": f"{role} should be shorter.",
            "keep": kept,
            "reason": f"{role} {'helped' if kept else 'repeated itself'}.",
        }
        for role, kept in keep.items()
    ]
    run.write_json(REFLECTIONS, {"reflections": reflections})
    run.stage("reflect")
    run.finish_stage("reflect")

"""The stage graph: one declaration per stage; staleness worked out from input hashes;
every model call recorded once, by the recorder a stage is handed."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.client import ModelClient
from pipeline.endpoints import Endpoint
from pipeline.errors import EndpointError, RunError
from pipeline.parameters import DialogueParameters
from pipeline.records import CallRecord
from pipeline.runs import Run, create_run, open_run

from .conftest import ROLES, only_run, read_jsonl
from .fakeserver import Status


def test_every_stage_is_declared_once_with_a_module_that_runs_it():
    assert stages.STAGE_NAMES == ("director", "dialogue", "judge", "reflect")
    for node in stages.GRAPH:
        module = importlib.import_module(node.module)
        assert callable(module.run) and callable(module.inputs), node.name
        assert all(need in stages.STAGE_NAMES for need in node.needs)
        # a stage comes after every stage it needs
        assert all(
            stages.STAGE_NAMES.index(n) < stages.STAGE_NAMES.index(node.name) for n in node.needs
        )


def finished(run: Run, name: str, status: str = "done", *, pid: int | None = None) -> None:
    """Record stage ``name`` as having run on the outputs as they are now."""
    entry = run.stage(name)
    entry.status, entry.pid = status, pid
    entry.upstream = stages.upstream(run, name)
    entry.error = "it failed" if status == "failed" else None
    entry.ended = None if status == "running" else "2026-11-26T08:00:00.000Z"
    run.save()


@pytest.fixture
def run(tmp_path: Path) -> Run:
    run = create_run(tmp_path, "task")
    run.write_json("director/roles.json", ROLES)
    finished(run, "director")
    run.write_text("dialogue/transcript.jsonl", '{"turn": 1}\n')
    finished(run, "dialogue")
    run.write_json("judge/verdict.json", {"score": 1})
    finished(run, "judge")
    run.write_json("reflect/reflections.json", {"reflections": []})
    finished(run, "reflect")
    return run


DEAD_PID = 2**22 + 12345  # beyond the kernel's pid range: no such process


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (None, {"director": "done", "dialogue": "done", "judge": "done", "reflect": "done"}),
        (  # transitive
            "roles",
            {"director": "done", "dialogue": "stale", "judge": "stale", "reflect": "stale"},
        ),
        (
            "transcript",
            {"director": "done", "dialogue": "done", "judge": "stale", "reflect": "stale"},
        ),
        (  # nothing reads it
            "verdict",
            {"director": "done", "dialogue": "done", "judge": "done", "reflect": "done"},
        ),
        (
            "roles and back",
            {"director": "done", "dialogue": "done", "judge": "done", "reflect": "done"},
        ),
    ],
)
def test_a_stage_is_stale_when_an_output_it_read_has_changed(run, change, expected):
    if change in ("roles", "roles and back"):
        run.write_json("director/roles.json", {**ROLES, "opening_line": "Another?"})
    if change == "roles and back":
        run.write_json("director/roles.json", ROLES)
    if change == "transcript":
        run.write_text("dialogue/transcript.jsonl", '{"turn": 1}\n{"turn": 2}\n')
    if change == "verdict":
        run.write_json("judge/verdict.json", {"score": 9})
    assert {name: stages.status(run, name) for name in stages.STAGE_NAMES} == expected
    stages.refresh(run)  # run.json keeps a copy of it, never a second truth
    stored = json.loads(run.path("run.json").read_text())["stages"]
    assert {name: stored[name]["status"] for name in stages.STAGE_NAMES} == expected


@pytest.mark.parametrize(
    ("recorded", "pid", "changed", "expected"),
    [
        ("failed", None, False, "failed"),
        ("failed", None, True, "stale"),
        ("running", DEAD_PID, False, "interrupted"),
        ("running", DEAD_PID, True, "stale"),
        ("running", os.getpid(), True, "running"),  # never stale under a live process
        ("stale", None, False, "done"),  # a stored copy, taken back when the hashes agree
        ("pending", None, True, "pending"),
    ],
)
def test_the_status_a_user_sees(run, recorded, pid, changed, expected):
    finished(run, "dialogue", recorded, pid=pid)
    if recorded == "stale":
        run.stage("dialogue").error = None
    if changed:
        run.write_json("director/roles.json", {**ROLES, "opening_line": "Another?"})
    assert stages.status(run, "dialogue") == expected


def test_a_run_made_before_upstream_hashes_goes_stale_from_when_it_is_opened(run):
    for name in ("dialogue", "judge"):
        run.stage(name).upstream = None
    run.stage("judge").status = "stale"  # as older code stored it
    run.save()
    opened = open_run(run.folder.parent, run.run_id)
    assert stages.status(opened, "dialogue") == "done"
    assert stages.status(opened, "judge") == "stale"  # stored: nothing to compare with
    opened.write_json("director/roles.json", {**ROLES, "opening_line": "Another?"})
    assert stages.status(opened, "dialogue") == "stale"  # what it read when opened changed


def test_an_interrupted_dialogue_is_never_taken_for_done(run):
    entry = run.stage("dialogue")
    entry.status, entry.pid, entry.ended, entry.error = "running", DEAD_PID, None, None
    run.save()
    run.write_json("director/roles.json", {**ROLES, "opening_line": "Another?"})
    assert stages.status(run, "dialogue") == "stale"  # start over, not go on
    stages.refresh(run)
    assert run.stage("dialogue").status == "running"  # the record of the crash is kept
    run.write_json("director/roles.json", ROLES)  # the same roles again
    assert stages.status(run, "dialogue") == "interrupted"
    entry.status = "stale"  # as older code stored it over an interrupted stage
    assert stages.status(run, "dialogue") == "interrupted"


def test_advance_runs_what_is_not_done_in_order_and_resumes_what_stopped(run, monkeypatch):
    ran: list[tuple[str, bool]] = []

    def fake_execute(ctx, name, *, resume=False):
        ran.append((name, resume))

    monkeypatch.setattr(stages, "execute", fake_execute)
    ctx = stages.StageContext(run, stages.OneClient(None), stages.Plan.of())  # type: ignore[arg-type]
    finished(run, "dialogue", "failed")
    run.write_text("dialogue/transcript.jsonl", '{"turn": 1}\n{"turn": 2}\n')
    stages.advance(ctx)  # the judge is optional: not asked for
    assert ran == [("dialogue", True)]
    ran.clear()
    stages.advance(ctx, include=("judge",))
    assert ran == [("dialogue", True), ("judge", False)]  # the judge read another transcript
    assert stages.pending(run, include=("judge",)) == ["dialogue", "judge"]


# -- one recorder ---------------------------------------------------------------------


def test_each_exchange_is_stored_once_and_the_readable_files_derive_from_it(fake, invoke, runs_dir):
    result = invoke("generate", "--base-url", fake.base_url, "--model", "m", "--yes", "x")
    assert result.exit_code == 0, result.output
    folder = only_run(runs_dir)
    calls = sorted((folder / "director" / "calls").glob("*.json"))
    dialogue_calls = sorted((folder / "dialogue" / "calls").glob("*.json"))
    assert len(calls) + len(dialogue_calls) == len(fake.chat_requests())
    (record,) = [CallRecord.from_json(json.loads(p.read_text())) for p in calls]
    assert record.stage == "director"
    for derived in ("attempt-1.request.json", "request.json"):
        assert json.loads((folder / "director" / derived).read_text()) == record.body
    for derived in ("attempt-1.response.json", "response.json"):
        assert json.loads((folder / "director" / derived).read_text()) == record.response
    assert record.body == fake.chat_requests()[0]  # what was sent, no credentials
    turns = read_jsonl(folder / "dialogue" / "transcript.jsonl")[1:]
    times = [json.loads(p.read_text())["time"] for p in dialogue_calls]
    assert [t["time"] for t in turns] == times  # a turn's time is its call's


def test_a_client_records_every_call_to_the_recorder_it_is_handed(fake):
    endpoint = Endpoint(fake.base_url, "m", None)
    seen: list[CallRecord] = []
    client = ModelClient(endpoint, max_retries=0)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    client.complete(body, seen.append)
    fake.add(Status(400))
    with pytest.raises(EndpointError, match="answered HTTP 400"):
        client.complete(body, seen.append)
    assert [r.error is None for r in seen] == [True, False]
    assert seen[1].error is not None and seen[1].error.status == 400
    assert seen[0].request == {"base_url": fake.base_url, **body}
    assert seen[0].request_sha256 == seen[1].request_sha256


def test_a_plan_is_read_back_from_the_parameters_a_run_recorded(tmp_path):
    plan = stages.Plan.of(dialogue=DialogueParameters(turns=3, seed=5))
    run = create_run(tmp_path, "task", plan.planned())
    assert stages.Plan.recorded(run) == plan
    assert plan.judge.seed == 5  # the judge samples with the dialogue's seed


def test_a_stage_the_run_is_not_ready_for_touches_nothing(run):
    run.write_json("director/roles.json", {**ROLES, "opening_line": "Another?"})  # new roles
    ctx = stages.StageContext(run, stages.OneClient(None), stages.Plan.of())  # type: ignore[arg-type]
    with pytest.raises(RunError, match="is stale, so there is nothing to judge yet"):
        stages.execute(ctx, "judge")
    assert run.path("judge/verdict.json").is_file()  # not moved to previous-1/
    assert not run.path("judge/previous-1").exists()

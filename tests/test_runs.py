"""Run folders: ids, atomic writes, the manifest state machine, archives."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pipeline import runs, schemas, stages
from pipeline.errors import RunError
from pipeline.records import Turn, sha256_of
from pipeline.runs import (
    RUN_ID_RE,
    atomic_write_json,
    create_run,
    open_run,
    slugify,
)


def turn(number: int, content: str = "hi") -> Turn:
    return Turn(number, "A", 0, content, kind="opening")


@pytest.mark.parametrize(
    ("text", "slug"),
    [
        ("Write a short paper on the ethics of AI", "write-a-short-paper-on-the-ethics-of-ai"),
        ("  Résumé: naïve café!  ", "resume-naive-cafe"),
        ("{{ 7*7 }}", "7-7"),
        ("日本語", "run"),
        ("", "run"),
        ("a" * 60, "a" * 40),
        (
            "one two three four five six seven eight nine ten",
            "one-two-three-four-five-six-seven-eight",
        ),
    ],
)
def test_slugify(text, slug):
    assert slugify(text) == slug


def test_create_run_writes_a_valid_manifest(tmp_path):
    run = create_run(tmp_path / "runs", "Write a paper")
    assert RUN_ID_RE.match(run.run_id)
    assert run.folder == tmp_path / "runs" / run.run_id
    manifest = json.loads((run.folder / "run.json").read_text())
    assert manifest == run.manifest.to_json()
    assert manifest["manifest_version"] == 2
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []
    assert manifest["task"] == "Write a paper"
    assert set(manifest["stages"]) == {"director", "dialogue", "judge", "reflect"}
    assert all(s["status"] == "pending" for s in manifest["stages"].values())
    assert "templates/director.j2" in manifest["files"]
    assert "schemas/roles.schema.json" in manifest["files"]
    assert manifest["versions"]["openai"]


def test_runs_in_the_same_second_get_distinct_ids(tmp_path, monkeypatch):
    moment = datetime(2026, 11, 25, 12, 0, 0, tzinfo=timezone.utc)
    monkeypatch.setattr(runs, "utc_now", lambda: moment)
    ids = [create_run(tmp_path, "same task").run_id for _ in range(3)]
    assert ids == [
        "20261125T120000Z-same-task",
        "20261125T120000Z-same-task-2",
        "20261125T120000Z-same-task-3",
    ]
    assert all(RUN_ID_RE.match(i) for i in ids)


def test_stage_state_machine_records_times_and_errors(tmp_path):
    run = create_run(tmp_path, "task")
    with (
        pytest.raises(RuntimeError),
        run.stage_running("director", endpoint=None, parameters={"a": 1}, inputs={"x": 1}),
    ):
        entry = json.loads((run.folder / "run.json").read_text())["stages"]["director"]
        assert entry["status"] == "running"
        assert entry["pid"] is not None
        assert entry["input_hash"] == sha256_of({"x": 1})
        run.write_text("director/prompt.txt", "hello")
        raise RuntimeError("boom")
    entry = json.loads((run.folder / "run.json").read_text())["stages"]["director"]
    assert entry["status"] == "failed"
    assert entry["error"] == "RuntimeError: boom"
    assert entry["pid"] is None
    assert entry["artifacts"] == ["director/prompt.txt"]  # what the stage folder holds
    assert entry["duration_s"] >= 0
    assert schemas.errors(run.manifest.to_json(), schemas.RUN_MANIFEST) == []


@pytest.mark.parametrize(
    ("raised", "error"),
    [(KeyboardInterrupt(), "interrupted"), (RunError("no good"), "no good")],
)
def test_a_stage_body_that_raises_fails_the_stage(tmp_path, raised, error):
    run = create_run(tmp_path, "task")
    with (
        pytest.raises(type(raised)),
        run.stage_running("dialogue", endpoint=None, parameters={}, inputs={}),
    ):
        raise raised
    assert (run.stage("dialogue").status, run.stage("dialogue").error) == ("failed", error)
    if isinstance(raised, RunError):
        assert (raised.stage, raised.run_id) == ("dialogue", run.run_id)


def test_a_finished_stage_lists_its_files_and_goes_stale_when_what_it_read_changes(tmp_path):
    run = create_run(tmp_path, "task")
    run.write_json("director/roles.json", {"v": 1})
    with run.stage_running(
        "dialogue",
        endpoint=None,
        parameters={},
        inputs={},
        upstream=stages.upstream(run, "dialogue"),
    ):
        run.append_transcript(turn(1))
    run.finish_stage("dialogue")
    assert run.stage("dialogue").artifacts == ["dialogue/transcript.jsonl"]
    assert stages.status(run, "dialogue") == "done"
    assert stages.status(run, "director") == "pending"  # pending stays pending
    run.write_json("director/roles.json", {"v": 2})  # what the dialogue read has changed
    assert stages.status(run, "dialogue") == "stale"
    stages.refresh(run)  # the stored copy follows
    saved = json.loads((run.folder / "run.json").read_text())
    assert saved["stages"]["dialogue"]["status"] == "stale"
    run.write_json("director/roles.json", {"v": 1})  # and back: current again
    assert stages.status(run, "dialogue") == "done"
    stages.refresh(run)
    saved = json.loads((run.folder / "run.json").read_text())
    assert saved["stages"]["dialogue"]["status"] == "done"


def test_sha256_of_is_independent_of_key_order():
    assert sha256_of({"a": 1, "b": [1, 2]}) == sha256_of({"b": [1, 2], "a": 1})
    assert sha256_of({"a": 1}) != sha256_of({"a": 2})


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"k": "v"})
    atomic_write_json(target, {"k": "w"})
    assert json.loads(target.read_text()) == {"k": "w"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_write_keeps_the_old_file_when_serialising_fails(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"k": "v"})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"k": object()})
    assert json.loads(target.read_text()) == {"k": "v"}


def test_transcript_is_appended_line_by_line(tmp_path):
    run = create_run(tmp_path, "task")
    assert run.read_transcript() == []
    run.append_transcript(turn(1, "a\nb"))
    run.append_transcript(turn(2, "c"))
    text = run.path("dialogue/transcript.jsonl").read_text()
    assert text.count("\n") == 2
    assert run.read_transcript() == [turn(1, "a\nb"), turn(2, "c")]


def test_archive_stage_moves_files_to_numbered_folders(tmp_path):
    run = create_run(tmp_path, "task")
    assert run.archive_stage("dialogue") is None
    run.append_transcript(turn(1))
    first = run.archive_stage("dialogue")
    run.append_transcript(turn(1))
    second = run.archive_stage("dialogue")
    assert (first.name, second.name) == ("previous-1", "previous-2")
    assert (first / "transcript.jsonl").exists()
    assert not run.path("dialogue/transcript.jsonl").exists()


def test_open_run_round_trips(tmp_path):
    run = create_run(tmp_path, "task")
    again = open_run(tmp_path, run.run_id)
    assert again.manifest == run.manifest


@pytest.mark.parametrize("run_id", ["", "..", "../x", "/etc", "a/b", "20261125T120000Z-x/../y"])
def test_open_run_refuses_anything_but_a_run_id(tmp_path, run_id):
    with pytest.raises(RunError, match="is not a run id"):
        open_run(tmp_path, run_id)


def test_open_run_reports_a_corrupt_manifest(tmp_path):
    run = create_run(tmp_path, "task")
    (run.folder / "run.json").write_text("{ half")
    with pytest.raises(RunError, match=r"manifest of run .* is unreadable"):
        open_run(tmp_path, run.run_id)


def test_create_run_in_an_unwritable_place(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("")
    with pytest.raises(RunError, match="cannot create a run folder"):
        create_run(blocker / "runs", "task")


def test_read_json_names_a_missing_artifact(tmp_path):
    run = create_run(tmp_path, "task")
    with pytest.raises(RunError, match=f"run {run.run_id} has no director/roles.json"):
        run.read_json("director/roles.json")


def test_manifest_has_no_unexpected_path(tmp_path: Path):
    run = create_run(tmp_path, "task")
    assert sorted(p.name for p in run.folder.iterdir()) == ["run.json"]

"""The typed records and the published schemas held together; old runs still load."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline import records, schemas
from pipeline.records import (
    CallRecord,
    Floor,
    Manifest,
    ParentLink,
    Role,
    RolesDocument,
    StageRecord,
    Termination,
    ToolCall,
    Turn,
    Usage,
    Verdict,
)
from pipeline.runs import open_run

from .conftest import read_jsonl

FIXTURE = next((Path(__file__).parent / "fixtures" / "runs-v1").iterdir())


@pytest.fixture
def v1_run(runs_dir: Path) -> Path:
    """A copy of the checked-in run made before the records (manifest version 1)."""
    folder = runs_dir / FIXTURE.name
    shutil.copytree(FIXTURE, folder)
    return folder


def names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)} - {"extra"}


def properties(name: str, *path: str) -> set[str]:
    node = schemas.load(name)
    for key in path:
        node = node[key]
    return set(node["properties"])


# -- the types and the schemas name the same fields --------------------------------------


@pytest.mark.parametrize(
    ("record", "schema", "path", "computed"),
    [
        (RolesDocument, schemas.ROLES, (), set()),
        (Role, schemas.ROLES, ("properties", "roles", "items"), set()),
        (Termination, schemas.ROLES, ("properties", "termination"), set()),
        (Turn, schemas.TRANSCRIPT_LINE, (), {"generated"}),
        (Floor, schemas.TRANSCRIPT_LINE, ("properties", "floor"), set()),
        (ToolCall, schemas.TRANSCRIPT_LINE, ("properties", "tool_calls", "items"), set()),
        (StageRecord, schemas.RUN_MANIFEST, ("$defs", "stage"), set()),
        (Manifest, schemas.RUN_MANIFEST, (), set()),
        (Verdict, "verdict.schema.json", (), set()),
        (Usage, schemas.TRANSCRIPT_LINE, ("properties", "usage"), set()),
        (ParentLink, schemas.RUN_MANIFEST, ("properties", "parent"), set()),
    ],
)
def test_each_record_has_exactly_the_fields_of_its_schema(record, schema, path, computed):
    assert names(record) | computed == properties(schema, *path)


# -- what the records write is what the schemas admit ------------------------------------

USAGE = Usage(11, 7)
TURNS = [
    Turn(1, "Student", 0, "Hello", kind="opening", floor=Floor("opening")),
    Turn(
        2,
        "Mentor",
        1,
        "Hi",
        finish_reason="stop",
        model="m",
        base_url="http://127.0.0.1:1/v1",
        usage=USAGE,
        chunks=3,
        floor=Floor("moderator", reason="it is the mentor's turn"),
        time="2026-11-26T08:20:49.123Z",
        tool_calls=(ToolCall("call_1", "delegate", '{"task": "x"}', result="done"),),
    ),
    Turn(3, "Ana", 0, "a message from a chat", kind="imported", time="2026-11-26T08:21:00Z"),
    Turn(4, "Me", 1, "typed by a person", kind="human"),
    Turn(5, "Mentor", 1, "the tool's answer", kind="tool", tool_call_id="call_1"),
]


@pytest.mark.parametrize("turn", TURNS, ids=[t.kind for t in TURNS])
def test_every_kind_of_turn_is_written_as_the_schema_says_and_read_back(turn):
    written = turn.to_json()
    assert schemas.errors(written, schemas.TRANSCRIPT_LINE) == []
    assert Turn.from_json(json.loads(json.dumps(written))) == turn


def test_an_imported_turn_has_no_model_fields_at_all():
    assert {"model", "base_url", "usage", "finish_reason"}.isdisjoint(TURNS[2].to_json())


def test_a_child_run_s_manifest_names_its_parent_and_reads_back(tmp_path):
    from pipeline.runs import create_run, open_run

    run = create_run(tmp_path, "a sub-task")
    run.manifest.parent = ParentLink("20261126T080000Z-parent", 3, "call_1")
    run.save()
    written = json.loads(run.path("run.json").read_text())
    assert written["parent"] == {
        "run_id": "20261126T080000Z-parent",
        "turn": 3,
        "tool_call_id": "call_1",
    }
    assert schemas.errors(written, schemas.RUN_MANIFEST) == []
    assert open_run(tmp_path, run.run_id).manifest.parent == run.manifest.parent


def test_a_new_run_writes_a_version_2_manifest_the_schema_admits(tmp_path):
    from pipeline.runs import create_run

    run = create_run(tmp_path, "task")
    written = json.loads(run.path("run.json").read_text())
    assert written["manifest_version"] == records.MANIFEST_VERSION == schemas.CURRENT_VERSION
    assert schemas.errors(written, schemas.RUN_MANIFEST) == []
    assert Manifest.from_json(written).to_json() == written


# -- old runs load -----------------------------------------------------------------------


def test_a_version_1_manifest_reads_and_writes_back_unchanged():
    written = json.loads((FIXTURE / "run.json").read_text())
    assert written["manifest_version"] == 1
    assert Manifest.from_json(written).to_json() == written


def test_version_1_transcript_lines_read_with_their_kind_worked_out():
    lines = read_jsonl(FIXTURE / "dialogue" / "transcript.jsonl")
    turns = [Turn.from_json(line) for line in lines]
    assert [t.kind for t in turns] == ["opening"] + ["generated"] * (len(lines) - 1)
    for line, turn in zip(lines, turns, strict=True):
        again = turn.to_json()
        assert again.pop("kind") == turn.kind
        assert again == line  # nothing else added, lost or changed
        assert schemas.errors(turn.to_json(), schemas.TRANSCRIPT_LINE) == []


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(FIXTURE).as_posix() for p in FIXTURE.rglob("calls/*.json"))
)
def test_version_1_call_records_read_and_write_back_unchanged(path):
    written = json.loads((FIXTURE / path).read_text())
    assert CallRecord.from_json(written).to_json() == written


def test_version_1_roles_and_verdict_read_and_write_back_unchanged():
    roles = json.loads((FIXTURE / "director" / "roles.json").read_text())
    assert RolesDocument.from_json(roles).to_json() == roles
    verdict = json.loads((FIXTURE / "judge" / "verdict.json").read_text())
    assert Verdict.from_json(verdict).to_json() == verdict


def test_a_version_1_run_is_listed_shown_and_exported(v1_run, invoke):
    run = open_run(v1_run.parent, v1_run.name)
    assert run.manifest.stages["dialogue"].termination_reason == "done_token"
    listed = invoke("runs", "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert row["stages"] == {
        "director": "done",
        "dialogue": "done",
        "judge": "done",
        "reflect": "pending",
    }
    assert row["turns"] == 6
    shown = invoke("show", v1_run.name)
    assert shown.exit_code == 0, shown.output
    assert "Verdict: completed, score 8/10" in shown.stdout
    exported = invoke("export", v1_run.name, "--format", "jsonl")
    stored = read_jsonl(v1_run / "dialogue" / "transcript.jsonl")
    # exported in the current version: each line as stored, with its kind
    kinds = ["opening"] + ["generated"] * (len(stored) - 1)
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert lines == [{**line, "kind": kind} for line, kind in zip(stored, kinds, strict=True)]
    assert invoke("resume", v1_run.name).stdout == (
        f"run {v1_run.name} is complete; nothing to resume\n"
    )


def test_a_version_1_run_replays_into_a_version_2_run(v1_run, invoke, runs_dir):
    result = invoke("replay", v1_run.name, "--into", "20261126T090000Z-replayed")
    assert result.exit_code == 0, result.output
    replayed = runs_dir / "20261126T090000Z-replayed"
    manifest: dict[str, Any] = json.loads((replayed / "run.json").read_text())
    assert manifest["manifest_version"] == 2
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []
    files = sorted(
        p.relative_to(v1_run).as_posix()
        for p in v1_run.rglob("*")
        if p.is_file() and p.name not in ("run.json", ".lock")
    )
    assert files == sorted(
        p.relative_to(replayed).as_posix()
        for p in replayed.rglob("*")
        if p.is_file() and p.name not in ("run.json", ".lock")
    )
    for path in files:  # the same calls answered the same requests: the same files...
        if path != "dialogue/transcript.jsonl":
            assert (replayed / path).read_bytes() == (v1_run / path).read_bytes(), path
    new = read_jsonl(replayed / "dialogue" / "transcript.jsonl")
    old = read_jsonl(v1_run / "dialogue" / "transcript.jsonl")
    assert [{k: v for k, v in line.items() if k != "kind"} for line in new] == old  # ...+kind


def test_new_roles_make_a_version_1_run_s_dialogue_and_verdict_stale(v1_run, invoke):
    from pipeline import stages

    run = open_run(v1_run.parent, v1_run.name)
    roles = json.loads((v1_run / "director" / "roles.json").read_text())
    from pipeline.director import replace_roles

    with run.locked():
        replace_roles(run, {**roles, "opening_line": "Where do we start?"})
    assert {name: stages.status(run, name) for name in stages.STAGE_NAMES} == {
        "director": "done",
        "dialogue": "stale",
        "judge": "stale",
        "reflect": "pending",
    }
    stored = json.loads((v1_run / "run.json").read_text())
    assert stored["manifest_version"] == 1  # an old run stays in its own version
    assert schemas.errors(stored, schemas.RUN_MANIFEST, 1) == []


def test_a_version_1_run_resumed_goes_on_in_version_1(v1_run, invoke):
    from .conftest import ROLES
    from .fakeserver import FakeServer, Reply

    verdict = {"completed": True, "score": 6, "reasons": "ok", "deliverable": ""}

    def model(body: dict[str, Any]) -> Reply:
        schema = (body.get("response_format") or {}).get("json_schema", {}).get("name")
        if schema == "verdict":
            return Reply(json.dumps(verdict))
        return Reply(json.dumps(ROLES) if schema else f"reply {len(body['messages'])}")

    manifest = json.loads((v1_run / "run.json").read_text())
    manifest["stages"]["dialogue"]["status"] = "failed"  # cut short after turn 3
    (v1_run / "run.json").write_text(json.dumps(manifest))
    transcript = v1_run / "dialogue" / "transcript.jsonl"
    transcript.write_text("".join(transcript.read_text().splitlines(keepends=True)[:3]))
    with FakeServer(model) as fake:
        result = invoke("resume", v1_run.name, "--base-url", fake.base_url, "--model", "m")
    assert result.exit_code == 0, result.output
    lines = read_jsonl(transcript)
    assert len(lines) > 3
    assert all(schemas.errors(line, schemas.TRANSCRIPT_LINE, 1) == [] for line in lines)
    # the run had a verdict, on the old transcript: resumed to its end, it is judged again
    assert json.loads((v1_run / "judge" / "verdict.json").read_text()) == verdict

"""The run-folder schemas are versioned: version 1 (``schemas/v1/``) keeps the format of
the runs written before version 2, and version 2 (the top of ``schemas/``) adds what
imported chats, people at the keyboard, tool calls and runs started from other runs need."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline import schemas
from pipeline.errors import PipelineError
from pipeline.resources import data_dir, file_sha256

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "runs-v1"
(V1_RUN,) = sorted(FIXTURES.iterdir())  # made by generate --judge against the fake server
UNVERSIONED = [
    "config.schema.json",
    "verdict.schema.json",
    "next-speaker.schema.json",
    "finetune.schema.json",
]
SHA = "0123456789abcdef" * 4


def read_run(folder: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The manifest, the roles and the transcript lines of the run folder ``folder``."""
    manifest = json.loads((folder / "run.json").read_text(encoding="utf-8"))
    roles = json.loads((folder / "director" / "roles.json").read_text(encoding="utf-8"))
    transcript = (folder / "dialogue" / "transcript.jsonl").read_text(encoding="utf-8")
    return manifest, roles, [json.loads(line) for line in transcript.splitlines()]


def paths(problems: list[str]) -> list[str]:
    """The JSON paths of ``schemas.errors`` messages."""
    return [problem.split(": ", 1)[0] for problem in problems]


def with_kind(line: dict[str, Any]) -> dict[str, Any]:
    """A version 1 transcript line as version 2 writes it."""
    return {**line, "kind": "generated" if line["generated"] else "opening"}


# The API ----------------------------------------------------------------------------


def test_the_current_version_is_2_and_the_newest():
    assert schemas.CURRENT_VERSION == 2
    assert schemas.VERSIONS == (1, 2)
    assert set(schemas.VERSIONED) == {
        "roles.schema.json",
        "run.schema.json",
        "transcript-line.schema.json",
    }


@pytest.mark.parametrize("name", schemas.VERSIONED)
def test_a_versioned_schema_has_a_file_per_version(name):
    base = data_dir("schemas")
    assert schemas.schema_path(name, 1) == base / "v1" / name
    assert schemas.schema_path(name, 2) == base / name
    assert schemas.schema_path(name) == base / name  # the default is the current version
    assert schemas.load(name, 1)["$id"] == f"https://converse-pipeline.dev/schemas/{name}"
    assert schemas.load(name)["$id"] == f"https://converse-pipeline.dev/schemas/v2/{name}"
    assert schemas.load(name, 2) is schemas.load(name)
    assert schemas.Schema.file(name, 1).document is schemas.load(name, 1)
    assert schemas.Schema.file(name).document is schemas.load(name, 2)


@pytest.mark.parametrize("name", UNVERSIONED)
def test_an_unversioned_schema_is_the_same_file_in_every_version(name):
    assert schemas.schema_path(name, 1) == data_dir("schemas") / name
    assert schemas.schema_path(name, 1) == schemas.schema_path(name, 2)
    assert schemas.load(name, 1) is schemas.load(name)


def test_the_v1_folder_holds_only_the_versioned_schemas():
    found = sorted(p.name for p in (data_dir("schemas") / "v1").iterdir())
    assert found == sorted(schemas.VERSIONED)


@pytest.mark.parametrize("name", schemas.VERSIONED)
def test_the_v1_files_are_the_bytes_a_v1_run_was_written_with(name):
    """The fixture run recorded the sha256 of every schema file it used."""
    manifest, _, _ = read_run(V1_RUN)
    assert file_sha256(schemas.schema_path(name, 1)) == manifest["files"][f"schemas/{name}"]
    assert file_sha256(schemas.schema_path(name, 2)) != manifest["files"][f"schemas/{name}"]


@pytest.mark.parametrize("version", [0, 3, "2"])
@pytest.mark.parametrize(
    "call",
    [
        lambda v: schemas.schema_path(schemas.ROLES, v),
        lambda v: schemas.load(schemas.RUN_MANIFEST, v),
        lambda v: schemas.errors({}, schemas.TRANSCRIPT_LINE, v),
        lambda v: schemas.is_valid({}, schemas.TRANSCRIPT_LINE, v),
        lambda v: schemas.Schema.file(schemas.ROLES, v),
        lambda v: schemas.load("config.schema.json", v),  # even an unversioned one
    ],
    ids=["schema_path", "load", "errors", "is_valid", "Schema.file", "unversioned"],
)
def test_an_unknown_version_is_refused(call, version):
    with pytest.raises(PipelineError, match=f"schema version {version!r} is unknown"):
        call(version)


def test_errors_and_is_valid_take_the_version():
    _, _, lines = read_run(V1_RUN)
    line = lines[1]
    assert schemas.errors(line, schemas.TRANSCRIPT_LINE, 1) == []
    assert schemas.is_valid(line, schemas.TRANSCRIPT_LINE, 1) is True
    assert schemas.errors(line, schemas.TRANSCRIPT_LINE) == ["$: 'kind' is a required property"]
    assert schemas.is_valid(line, schemas.TRANSCRIPT_LINE) is False
    assert schemas.is_valid(with_kind(line), schemas.TRANSCRIPT_LINE, 2) is True
    assert schemas.is_valid(with_kind(line), schemas.TRANSCRIPT_LINE, 1) is False


PROPERTY_TABLES = [
    (schemas.TRANSCRIPT_LINE, ("properties",)),
    (schemas.ROLES, ("properties",)),
    (schemas.ROLES, ("properties", "roles", "items", "properties")),
    (schemas.RUN_MANIFEST, ("properties",)),
    (schemas.RUN_MANIFEST, ("$defs",)),
    (schemas.RUN_MANIFEST, ("$defs", "stage", "properties")),
    (schemas.RUN_MANIFEST, ("$defs", "endpoint", "properties")),
]


@pytest.mark.parametrize(
    ("name", "where"),
    PROPERTY_TABLES,
    ids=[f"{name}:{'/'.join(where)}" for name, where in PROPERTY_TABLES],
)
def test_version_2_keeps_every_property_of_version_1(name, where):
    v1, v2 = schemas.load(name, 1), schemas.load(name, 2)
    for key in where:
        v1, v2 = v1[key], v2[key]
    assert set(v1) <= set(v2)


def test_version_2_keeps_every_termination_reason_and_adds_human_quit():
    def reasons(version):
        stage = schemas.load(schemas.RUN_MANIFEST, version)["$defs"]["stage"]
        return stage["properties"]["termination_reason"]["enum"]

    assert reasons(2) == [*reasons(1), "human_quit"]


# The checked-in version 1 run ---------------------------------------------------------


def test_the_v1_run_is_valid_under_version_1():
    manifest, roles, lines = read_run(V1_RUN)
    assert manifest["manifest_version"] == 1
    assert schemas.errors(manifest, schemas.RUN_MANIFEST, 1) == []
    assert schemas.errors(roles, schemas.ROLES, 1) == []
    assert len(lines) == 6
    for line in lines:
        assert schemas.errors(line, schemas.TRANSCRIPT_LINE, 1) == []


def test_the_v1_manifest_and_roles_are_valid_under_version_2():
    manifest, roles, _ = read_run(V1_RUN)
    assert schemas.errors(manifest, schemas.RUN_MANIFEST, 2) == []
    assert schemas.errors(roles, schemas.ROLES, 2) == []


def test_the_v1_transcript_lines_need_a_kind_under_version_2():
    _, _, lines = read_run(V1_RUN)
    assert [with_kind(line)["kind"] for line in lines] == ["opening"] + ["generated"] * 5
    for line in lines:
        assert schemas.errors(line, schemas.TRANSCRIPT_LINE, 2) == [
            "$: 'kind' is a required property"
        ]
        assert schemas.errors(with_kind(line), schemas.TRANSCRIPT_LINE, 2) == []


def test_a_v1_run_folder_rewritten_as_version_2_is_valid(tmp_path):
    folder = tmp_path / V1_RUN.name
    shutil.copytree(V1_RUN, folder)
    manifest, _, lines = read_run(folder)
    manifest["manifest_version"] = 2
    (folder / "run.json").write_text(json.dumps(manifest), encoding="utf-8")
    (folder / "dialogue" / "transcript.jsonl").write_text(
        "".join(json.dumps(with_kind(line)) + "\n" for line in lines), encoding="utf-8"
    )
    manifest, roles, lines = read_run(folder)
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []
    assert schemas.errors(roles, schemas.ROLES) == []
    assert [schemas.errors(line, schemas.TRANSCRIPT_LINE) for line in lines] == [[]] * 6
    # version 1 knows neither manifest_version 2 nor kind
    assert paths(schemas.errors(manifest, schemas.RUN_MANIFEST, 1)) == ["$.manifest_version"]
    assert not schemas.is_valid(lines[0], schemas.TRANSCRIPT_LINE, 1)


# Transcript lines, version 2 ----------------------------------------------------------

OPENING = {
    "turn": 1,
    "kind": "opening",
    "role": "Student",
    "role_index": 0,
    "content": "Could you suggest some topics for a paper on AI ethics?",
    "generated": False,
    "finish_reason": None,
    "model": None,
    "base_url": None,
    "usage": None,
    "floor": {"by": "opening"},
}
GENERATED = {
    "turn": 2,
    "kind": "generated",
    "role": "Mentor",
    "role_index": 1,
    "content": "Here are three topics.",
    "generated": True,
    "finish_reason": "stop",
    "model": "m",
    "base_url": "http://127.0.0.1:8080/v1",
    "usage": {"prompt_tokens": 11, "completion_tokens": 7},
    "chunks": 2,
    "floor": {"by": "round-robin"},
    "time": "2026-11-26T08:20:49.123Z",
}
IMPORTED = {
    "turn": 3,
    "kind": "imported",
    "role": "Dr. Ada Lovelace, Countess of Lovelace (moderator)",
    "role_index": 2,
    "content": "Shall we begin?",
    "generated": False,
}
HUMAN = {
    "turn": 4,
    "kind": "human",
    "role": "Student",
    "role_index": 0,
    "content": "Let me add one.",
    "generated": False,
    "time": "2026-11-26T08:21:00Z",
}
CALLS = [
    {"id": "call_1", "name": "search", "arguments": '{"q": "AI ethics"}', "result": "3 hits"},
    {"id": "call_2", "name": "search", "arguments": '{"q": "AI law"}'},  # not answered yet
    {"id": "call_3", "name": "fetch", "arguments": "{", "result": None, "error": "bad JSON"},
]
TOOL = {
    "turn": 6,
    "kind": "tool",
    "role": "Mentor",
    "role_index": 1,
    "content": "3 hits",
    "generated": False,
    "tool_call_id": "call_1",
}


NOT = "should not be valid"  # an imported line's call fields must be absent, even null


def edited(base: dict[str, Any], drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` without the keys ``drop``, with ``changes``."""
    found = {k: v for k, v in copy.deepcopy(base).items() if k not in drop}
    return {**found, **changes}


@pytest.mark.parametrize(
    "sample",
    [
        pytest.param(OPENING, id="opening"),
        pytest.param(GENERATED, id="generated"),
        pytest.param(IMPORTED, id="imported without model, base_url or usage"),
        pytest.param(HUMAN, id="human without model, base_url or usage"),
        pytest.param(edited(HUMAN, model=None, usage=None), id="human with a null model"),
        pytest.param(edited(GENERATED, tool_calls=CALLS), id="tool calls with and without result"),
        pytest.param(edited(GENERATED, tool_calls=[]), id="no tool calls"),
        pytest.param(TOOL, id="tool line with tool_call_id"),
        pytest.param(edited(TOOL, model="m", usage=None), id="tool line with call fields"),
        pytest.param(edited(IMPORTED, role="R" * 150), id="role name of 150 characters"),
        pytest.param(edited(IMPORTED, role="R" * 200), id="role name of 200 characters"),
        pytest.param(edited(GENERATED, time="2026-11-26T08:20:49Z"), id="time without fraction"),
    ],
)
def test_valid_v2_transcript_lines(sample):
    assert schemas.errors(sample, schemas.TRANSCRIPT_LINE) == []


@pytest.mark.parametrize(
    ("sample", "path", "says"),
    [
        pytest.param(edited(IMPORTED, model="m"), "$.model", NOT, id="imported + model"),
        pytest.param(
            edited(IMPORTED, base_url="http://x/v1"), "$.base_url", NOT, id="imported + url"
        ),
        pytest.param(edited(IMPORTED, usage=None), "$.usage", NOT, id="imported + usage"),
        pytest.param(
            edited(IMPORTED, finish_reason=None), "$.finish_reason", NOT, id="imported + finish"
        ),
        pytest.param(edited(GENERATED, ("usage",)), "$", "'usage' is a required", id="no usage"),
        pytest.param(edited(GENERATED, ("model",)), "$", "'model' is a required", id="no model"),
        pytest.param(
            edited(OPENING, ("finish_reason",)), "$", "'finish_reason' is a required", id="opening"
        ),
        pytest.param(edited(GENERATED, ("kind",)), "$", "'kind' is a required", id="no kind"),
        pytest.param(edited(GENERATED, kind="system"), "$.kind", "is not one of", id="bad kind"),
        pytest.param(
            edited(GENERATED, generated=False), "$.generated", "True", id="generated false"
        ),
        pytest.param(edited(TOOL, generated=True), "$.generated", "False", id="tool generated"),
        pytest.param(edited(IMPORTED, role="R" * 201), "$.role", "too long", id="role of 201"),
        pytest.param(edited(IMPORTED, role=""), "$.role", "''", id="empty role"),
        pytest.param(
            edited(GENERATED, tool_calls=[{"id": "c", "name": "f"}]),
            "$.tool_calls[0]",
            "'arguments' is a required",
            id="tool call without arguments",
        ),
        pytest.param(
            edited(GENERATED, tool_calls=[{"id": "c", "name": "f", "arguments": {"q": 1}}]),
            "$.tool_calls[0].arguments",
            "is not of type 'string'",
            id="tool call arguments not JSON text",
        ),
        pytest.param(
            edited(GENERATED, tool_calls=[{**CALLS[0], "status": "ok"}]),
            "$.tool_calls[0]",
            "'status' was unexpected",
            id="tool call is closed",
        ),
        pytest.param(
            edited(GENERATED, tool_calls=[{**CALLS[0], "error": None}]),
            "$.tool_calls[0].error",
            "is not of type 'string'",
            id="tool call error null",
        ),
        pytest.param(edited(TOOL, tool_call_id=1), "$.tool_call_id", "not of type", id="call id 1"),
        pytest.param(
            edited(GENERATED, time="2026-11-26T09:20:49+01:00"), "$.time", "does not match", id="tz"
        ),
        pytest.param(edited(GENERATED, time="yesterday"), "$.time", "does not match", id="time"),
        pytest.param(edited(GENERATED, speaker="x"), "$", "'speaker' was unexpected", id="closed"),
    ],
)
def test_invalid_v2_transcript_lines(sample, path, says):
    problems = schemas.errors(sample, schemas.TRANSCRIPT_LINE)
    assert paths(problems) == [path]
    assert says in problems[0]


# Roles, version 2 ---------------------------------------------------------------------


def roles_of(names: list[str], prompt: str = "") -> dict[str, Any]:
    return {
        "roles": [{"name": name, "system_prompt": prompt} for name in names],
        "termination": {
            "done_token": "<TASK_DONE>",
            "declared_by": names[0],
            "acceptance_criteria": "The chat ended.",
        },
        "opening_line": "Hello, everyone.",
    }


TWELVE = [f"Speaker {i}" for i in range(1, 13)]


def test_twelve_speakers_without_prompts_are_valid_under_v2_only():
    roles = roles_of(TWELVE)
    assert schemas.errors(roles, schemas.ROLES, 2) == []
    problems = paths(schemas.errors(roles, schemas.ROLES, 1))
    assert sorted(problems) == sorted(
        ["$.roles", *(f"$.roles[{i}].system_prompt" for i in range(12))]
    )


@pytest.mark.parametrize(
    ("roles", "v1_paths", "v2_paths"),
    [
        pytest.param(roles_of(["Only"], "Say hello."), ["$.roles"], [], id="1 role"),
        pytest.param(
            roles_of(["R" * 150, "B"], "Say hello."),
            ["$.roles[0].name", "$.termination.declared_by"],
            [],
            id="150",
        ),
        pytest.param(
            roles_of(["R" * 201, "B"], "Say hello."),
            ["$.roles[0].name", "$.termination.declared_by"],
            ["$.roles[0].name", "$.termination.declared_by"],
            id="201",
        ),
        pytest.param(
            roles_of([f"S{i}" for i in range(1000)]),
            ["$.roles", *(f"$.roles[{i}].system_prompt" for i in range(1000))],
            [],
            id="1000 roles",
        ),
        pytest.param(
            roles_of([f"S{i}" for i in range(1001)]),
            ["$.roles", *(f"$.roles[{i}].system_prompt" for i in range(1001))],
            ["$.roles"],
            id="1001 roles",
        ),
        pytest.param(
            {**roles_of(["A", "B"], "Say hello."), "roles": []},
            ["$.roles"],
            ["$.roles"],
            id="no roles",
        ),
        pytest.param(
            roles_of(["A", "B"], "x" * 12001),
            ["$.roles[0].system_prompt", "$.roles[1].system_prompt"],
            ["$.roles[0].system_prompt", "$.roles[1].system_prompt"],
            id="prompt too long",
        ),
    ],
)
def test_roles_bounds_by_version(roles, v1_paths, v2_paths):
    assert sorted(paths(schemas.errors(roles, schemas.ROLES, 1))) == sorted(v1_paths)
    assert sorted(paths(schemas.errors(roles, schemas.ROLES, 2))) == sorted(v2_paths)


# Run manifests, version 2 -------------------------------------------------------------


def v1_manifest() -> dict[str, Any]:
    manifest, _, _ = read_run(V1_RUN)
    return manifest


def stage_of(manifest: dict[str, Any], name: str = "director") -> dict[str, Any]:
    return copy.deepcopy(manifest["stages"][name])


def imported_manifest() -> dict[str, Any]:
    manifest = v1_manifest()
    manifest["manifest_version"] = 2
    manifest["stages"] = {"import": {**stage_of(manifest), "endpoint": None}}
    return manifest


def branched_manifest() -> dict[str, Any]:
    manifest = v1_manifest()
    manifest["manifest_version"] = 2
    manifest["parent"] = {
        "run_id": "20261125T120000Z-write-a-paper",
        "turn": 4,
        "tool_call_id": "call_1",
    }
    manifest["children"] = ["20261126T090000Z-write-a-paper-on-ai-ethics"]
    return manifest


def with_upstream(upstream: dict[str, Any]) -> dict[str, Any]:
    manifest = v1_manifest()
    manifest["manifest_version"] = 2
    manifest["stages"]["dialogue"]["upstream"] = upstream
    return manifest


def changed(manifest: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**manifest, **changes}


def v1_reason(reason: str) -> dict[str, Any]:
    manifest = v1_manifest()
    manifest["stages"]["dialogue"]["termination_reason"] = reason
    return manifest


@pytest.mark.parametrize(
    ("manifest", "v1_valid"),
    [
        pytest.param(v1_manifest(), True, id="v1 run"),
        pytest.param(changed(v1_manifest(), manifest_version=2), False, id="manifest_version 2"),
        pytest.param(imported_manifest(), False, id="only an import stage"),
        pytest.param(changed(v1_manifest(), stages={}), False, id="no stages yet"),
        pytest.param(branched_manifest(), False, id="parent and children"),
        pytest.param(
            changed(branched_manifest(), parent={"run_id": V1_RUN.name, "turn": 1}),
            False,
            id="parent without tool call",
        ),
        pytest.param(changed(branched_manifest(), children=[]), False, id="no children"),
        pytest.param(with_upstream({"director": SHA}), False, id="upstream"),
        pytest.param(with_upstream({}), False, id="upstream of nothing"),
        pytest.param(v1_reason("human_quit"), False, id="human_quit"),
    ],
)
def test_valid_v2_manifests(manifest, v1_valid):
    assert schemas.errors(manifest, schemas.RUN_MANIFEST, 2) == []
    assert schemas.is_valid(manifest, schemas.RUN_MANIFEST, 1) is v1_valid


@pytest.mark.parametrize(
    ("manifest", "path", "says"),
    [
        pytest.param(
            changed(v1_manifest(), stages={"Bad Stage": stage_of(v1_manifest())}),
            "$.stages",
            "'Bad Stage' does not match",
            id="bad stage name",
        ),
        pytest.param(
            changed(
                v1_manifest(), stages={"import": edited(stage_of(v1_manifest()), ("started",))}
            ),
            "$.stages.import",
            "'started' is a required",
            id="a stage keeps its shape",
        ),
        pytest.param(
            changed(v1_manifest(), manifest_version=3), "$.manifest_version", "3", id="version 3"
        ),
        pytest.param(
            changed(branched_manifest(), parent={"run_id": V1_RUN.name}),
            "$.parent",
            "'turn' is a required",
            id="parent without turn",
        ),
        pytest.param(
            changed(branched_manifest(), parent={"run_id": V1_RUN.name, "turn": 0}),
            "$.parent.turn",
            "0",
            id="parent turn 0",
        ),
        pytest.param(
            changed(branched_manifest(), parent={"run_id": "my run", "turn": 1}),
            "$.parent.run_id",
            "does not match",
            id="parent run id",
        ),
        pytest.param(
            changed(branched_manifest(), parent={"run_id": V1_RUN.name, "turn": 1, "at": 1}),
            "$.parent",
            "'at' was unexpected",
            id="parent is closed",
        ),
        pytest.param(
            changed(branched_manifest(), children=["../elsewhere"]),
            "$.children[0]",
            "does not match",
            id="child run id",
        ),
        pytest.param(
            with_upstream({"director": "abc"}),
            "$.stages.dialogue.upstream.director",
            "does not match",
            id="upstream not a sha256",
        ),
        pytest.param(
            with_upstream({"The Director": SHA}),
            "$.stages.dialogue.upstream",
            "'The Director' does not match",
            id="upstream stage name",
        ),
        pytest.param(
            v1_reason("tool_error"),
            "$.stages.dialogue.termination_reason",
            "is not one of",
            id="tool_error is no reason",
        ),
    ],
)
def test_invalid_v2_manifests(manifest, path, says):
    problems = schemas.errors(manifest, schemas.RUN_MANIFEST, 2)
    assert paths(problems) == [path]
    assert says in problems[0]

"""Reproducible runs: every call recorded, replay byte for byte without a model, diff."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline import schemas
from pipeline.resources import data_dir

from .conftest import ROLES, only_run
from .fakeserver import LLAMA_CPP_PYTHON, FakeServer, Reply

PER_EXECUTION = {"run_id", "created", "started", "ended", "duration_s", "pid", "replay_of"}
REPLAYED = "20261125T000000Z-replayed"


def artifacts(run: Path) -> dict[str, bytes]:
    """Every file of a run but its manifest and lock, by relative path."""
    return {
        p.relative_to(run).as_posix(): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in ("run.json", ".lock")
    }


def without_per_execution(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_per_execution(v) for k, v in value.items() if k not in PER_EXECUTION}
    if isinstance(value, list):
        return [without_per_execution(v) for v in value]
    return value


def assert_replayed_exactly(original: Path, replayed: Path) -> None:
    assert artifacts(replayed) == artifacts(original)
    a = json.loads((original / "run.json").read_text())
    b = json.loads((replayed / "run.json").read_text())
    assert b["replay_of"] == original.name
    assert schemas.errors(b, schemas.RUN_MANIFEST) == []
    assert without_per_execution(a) == without_per_execution(b)


def test_every_call_is_recorded_with_its_hash_and_no_credentials(fake, invoke, runs_dir):
    secret = "sk-test-do-not-write-me-anywhere"
    result = invoke(
        "generate",
        "--base-url",
        fake.base_url,
        "--model",
        "m",
        "--yes",
        "--turns",
        "3",
        "--seed",
        "42",
        "x",
        env={"OPENAI_API_KEY": secret},
    )
    assert result.exit_code == 0, result.output
    run = only_run(runs_dir)
    director = sorted((run / "director" / "calls").iterdir())
    dialogue = sorted((run / "dialogue" / "calls").iterdir())
    assert [p.name for p in director] == ["0001.json"]
    assert [p.name for p in dialogue] == ["0001.json", "0002.json"]  # turn 1 is not a call
    record = json.loads(director[0].read_text())
    assert record["stage"] == "director"
    assert record["request"]["base_url"] == fake.base_url
    assert record["request"]["seed"] == 42
    assert {k: v for k, v in record["request"].items() if k != "base_url"} == fake.chat_requests()[
        0
    ]
    assert record["response"]["choices"][0]["message"]["content"] == json.dumps(ROLES)
    assert record["system_fingerprint"] == "fp-fake"
    turn = json.loads(dialogue[1].read_text())
    assert "".join(turn["stream"]["pieces"]) == "reply 3"
    assert turn["usage"] == {"prompt_tokens": 11, "completion_tokens": 7}
    assert turn["system_fingerprint"] == "fp-fake"
    assert all(r["seed"] == 42 for r in fake.chat_requests())
    for path in run.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text()


def test_replay_reproduces_every_artifact_byte_for_byte(fake, invoke, runs_dir):
    assert (
        invoke(
            "generate", "--base-url", fake.base_url, "--model", "m", "--yes", "--turns", "5", "x"
        ).exit_code
        == 0
    )
    original = only_run(runs_dir)
    sent = len(fake.chat_requests())
    fake.stop()  # no server: the replay must not need one
    result = invoke("replay", original.name, "--into", REPLAYED)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(
        f"\nreplayed run {original.name} as {REPLAYED}: {runs_dir / REPLAYED}\n"
    )
    assert "\n[5] Student\nreply 5\n" in result.stdout
    assert len(fake.chat_requests()) == sent
    assert_replayed_exactly(original, runs_dir / REPLAYED)
    assert invoke("diff", original.name, REPLAYED).stdout == "no differences\n"


def test_replay_reproduces_fallbacks_repairs_edits_and_a_moderator(
    invoke, runs_dir, tmp_path, monkeypatch
):
    roles = {
        **ROLES,
        "roles": [
            *ROLES["roles"],
            {"name": "Critic", "system_prompt": "I want you to act as the critic."},
        ],
    }

    def respond(body: dict[str, Any]) -> Reply:
        response_format = body.get("response_format") or {}
        if response_format.get("json_schema", {}).get("name") == "next-speaker" or (
            "next_speaker" in json.dumps(response_format)
        ):
            return Reply(json.dumps({"next_speaker": "Critic", "reason": "a critique"}))
        if response_format:
            return Reply(json.dumps(roles))
        return Reply(f"turn {len(body['messages'])} text")

    editor = tmp_path / "edit.py"
    editor.write_text(
        "import json,sys\np=sys.argv[1]\nr=json.load(open(p))\n"
        "r['opening_line']='Edited opening?'\njson.dump(r,open(p,'w'))\n"
    )
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    with FakeServer(respond, rejects=LLAMA_CPP_PYTHON) as fake:
        fake.add(Reply("not json"))  # one repair, after the json_schema rejection
        args = ["--base-url", fake.base_url, "--model", "m", "--max-retries", "0"]
        assert invoke("generate", *args, "--roles", "3", "x").exit_code == 0
        run = only_run(runs_dir)
        assert invoke("edit", run.name).exit_code == 0
        result = invoke("converse", run.name, *args, "--floor", "moderator", "--turns", "4")
        assert result.exit_code == 0, result.output
    original = run
    stage = json.loads((original / "run.json").read_text())["stages"]["director"]
    assert [a["outcome"] for a in stage["attempts"]] == ["rejected", "invalid_json", "ok"]

    result = invoke("replay", original.name, "--into", REPLAYED)
    assert result.exit_code == 0, result.output
    assert_replayed_exactly(original, runs_dir / REPLAYED)


def test_a_changed_template_cannot_be_replayed_and_the_error_names_the_stage(
    fake, invoke, runs_dir, tmp_path
):
    assert (
        invoke(
            "generate", "--base-url", fake.base_url, "--model", "m", "--yes", "--turns", "2", "x"
        ).exit_code
        == 0
    )
    original = only_run(runs_dir)
    changed = tmp_path / "templates"
    shutil.copytree(data_dir("templates"), changed)
    director = changed / "director.j2"
    director.write_text(director.read_text().replace("You are an expert", "You are an expert!", 1))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "replay",
            original.name,
            "--into",
            REPLAYED,
            "--runs-dir",
            str(runs_dir),
        ],
        env={**env, "PIPELINE_TEMPLATES_DIR": str(changed)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    error = proc.stderr.splitlines()[-1]
    assert error.startswith(
        f"Error: the director stage asked for a call that run {original.name} never made "
        "(request sha256 "
    )
    assert error.endswith(
        "the code, a template, a schema or a parameter changed since, so the "
        "run cannot be replayed as it was"
    )
    manifest = json.loads((runs_dir / REPLAYED / "run.json").read_text())
    assert manifest["stages"]["director"]["status"] == "failed"
    # the manifest shows which file changed
    assert (
        manifest["files"]["templates/director.j2"]
        != json.loads((original / "run.json").read_text())["files"]["templates/director.j2"]
    )


def test_a_changed_dialogue_call_names_the_dialogue_stage(fake, invoke, runs_dir):
    invoke("generate", "--base-url", fake.base_url, "--model", "m", "--yes", "--turns", "3", "x")
    original = only_run(runs_dir)
    call = original / "dialogue" / "calls" / "0002.json"
    record = json.loads(call.read_text())
    record["request_sha256"] = "0" * 64
    call.write_text(json.dumps(record))
    result = invoke("replay", original.name)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(
        f"Error: the dialogue stage asked for a call that run {original.name} never made"
    )


def test_replay_refuses_a_run_without_a_finished_director(fake, invoke, runs_dir):
    fake.add(Reply("nope"))
    invoke("generate", "--base-url", fake.base_url, "--model", "m", "--repair-attempts", "0", "x")
    run = only_run(runs_dir)
    result = invoke("replay", run.name)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: the director stage of run {run.name} is failed; only a run whose director "
        "finished can be replayed"
    )


def test_replay_into_a_taken_id(fake, invoke, runs_dir):
    invoke("generate", "--base-url", fake.base_url, "--model", "m", "--yes", "--turns", "2", "x")
    run = only_run(runs_dir)
    result = invoke("replay", run.name, "--into", run.name)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: run {run.name} already exists in {runs_dir}; choose another id"
    )


def test_diff_shows_inputs_and_the_edited_role_prompt(
    fake, invoke, runs_dir, tmp_path, monkeypatch
):
    invoke("generate", "--base-url", fake.base_url, "--model", "m", "--yes", "--turns", "3", "x")
    original = only_run(runs_dir)
    assert invoke("replay", original.name, "--into", REPLAYED).exit_code == 0
    editor = tmp_path / "edit.py"
    editor.write_text(
        "import json,sys\np=sys.argv[1]\nr=json.load(open(p))\n"
        "r['roles'][1]['system_prompt']='I want you to act as a strict reviewer.'\n"
        "json.dump(r,open(p,'w'))\n"
    )
    monkeypatch.setenv("EDITOR", f"{sys.executable} {editor}")
    assert invoke("edit", REPLAYED).exit_code == 0
    assert (
        invoke(
            "rerun",
            REPLAYED,
            "dialogue",
            "--base-url",
            fake.base_url,
            "--model",
            "m",
            "--turns",
            "2",
        ).exit_code
        == 0
    )

    result = invoke("diff", original.name, REPLAYED)
    assert result.exit_code == 0
    out = result.stdout
    assert out.startswith("inputs that differ:\n")
    assert '  dialogue parameters: {"closing_turns": 1' in out and '"turns": 3' in out
    assert "  director hand edits: 0 | 1" in out
    assert f"--- {original.name}/roles\n+++ {REPLAYED}/roles\n" in out
    assert f"-{ROLES['roles'][1]['system_prompt']}\n" in out
    assert "+I want you to act as a strict reviewer.\n" in out
    assert f"--- {original.name}/transcript\n+++ {REPLAYED}/transcript\n" in out
    assert "-reply 3\n" in out

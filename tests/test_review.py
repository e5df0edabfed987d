"""The interactive review, driven through a real pseudo-terminal (pexpect) with EDITOR set to
a script, against the fake server."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pexpect
import pytest

from pipeline import schemas

from .conftest import ROLES, only_run, read_jsonl

QUESTION = "Run the dialogue? [y/N/e]: "

EDITOR_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    path = sys.argv[1]
    mode = os.environ["EDIT_MODE"]
    if mode == "rename":
        roles = json.load(open(path))
        roles["roles"][1]["name"] = "Professor"
        text = json.dumps(roles)
    elif mode == "schema":
        roles = json.load(open(path))
        roles["roles"] = []
        text = json.dumps(roles)
    else:
        text = "{ this is not json"
    open(path, "w").write(text)
    """
)


@pytest.fixture
def spawn(fake, runs_dir: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    script = tmp_path / "editor.py"
    script.write_text(EDITOR_SCRIPT)

    def start(edit_mode: str, *extra: str) -> pexpect.spawn:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
        env.update(EDITOR=f"{sys.executable} {script}", EDIT_MODE=edit_mode, NO_COLOR="1")
        child = pexpect.spawn(
            sys.executable,
            [
                "-m",
                "pipeline",
                "generate",
                "--base-url",
                fake.base_url,
                "--model",
                "m",
                "--runs-dir",
                str(runs_dir),
                *extra,
                "write a paper",
            ],
            env=env,
            encoding="utf-8",
            timeout=60,
        )
        return child

    return start


def test_edit_then_run(spawn, runs_dir):
    child = spawn("rename", "--turns", "3")
    child.expect_exact("Role 2: Mentor")
    child.expect_exact(QUESTION)
    child.sendline("e")
    child.expect_exact("Role 2: Professor")
    child.expect_exact(QUESTION)
    child.sendline("y")
    child.expect_exact("[3] Student")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    run = only_run(runs_dir)
    roles = json.loads((run / "director" / "roles.json").read_text())
    assert roles["roles"][1]["name"] == "Professor"
    assert json.loads((run / "director" / "roles.before-edit-1.json").read_text()) == ROLES
    assert [line["role"] for line in read_jsonl(run / "dialogue" / "transcript.jsonl")] == [
        "Student",
        "Professor",
        "Student",
    ]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["director"]["edits"] == 1
    assert manifest["stages"]["dialogue"]["status"] == "done"
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (
            "schema",
            "not saved: the edited roles do not match roles.schema.json: $.roles: [] is too short",
        ),
        ("garbage", "not saved: the edit is not valid JSON"),
    ],
)
def test_an_invalid_edit_is_refused_and_the_old_roles_kept(spawn, runs_dir, mode, message):
    child = spawn(mode)
    child.expect_exact(QUESTION)
    child.sendline("e")
    child.expect_exact(message)
    child.expect_exact(QUESTION)
    child.sendline("")  # Enter: the default, N
    child.expect_exact("not run; to run the dialogue later: pipeline converse ")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    run = only_run(runs_dir)
    assert json.loads((run / "director" / "roles.json").read_text()) == ROLES
    assert not (run / "director" / "roles.before-edit-1.json").exists()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["dialogue"]["status"] == "pending"


def test_an_unknown_answer_is_asked_again(spawn, fake):
    child = spawn("rename", "--turns", "2")
    child.expect_exact(QUESTION)
    child.sendline("maybe")
    child.expect_exact("Error: 'maybe' is not one of 'y', 'n', 'e'.")
    child.expect_exact(QUESTION)
    child.sendline("Y")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert len(fake.chat_requests()) == 2

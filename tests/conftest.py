"""Shared fixtures: an isolated environment, the fake server, a CLI runner."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import cli

from .fakeserver import Action, FakeServer, Reply

ROLES = {
    "roles": [
        {
            "name": "Student",
            "system_prompt": "I want you to act as a student writing a paper on AI ethics. "
            "I am your mentor. When the paper is done, end your message with <TASK_DONE>.",
        },
        {
            "name": "Mentor",
            "system_prompt": "I want you to act as my mentor, an expert in AI ethics. "
            "I am your student.",
        },
    ],
    "termination": {
        "done_token": "<TASK_DONE>",
        "declared_by": "Student",
        "acceptance_criteria": "A complete draft that the mentor has approved.",
    },
    "opening_line": "Could you suggest some topics for a paper on AI ethics?",
}


def conversation(body: dict[str, Any]) -> Action:
    """Default fake behaviour: roles for a structured request; "reply N" for turn N."""
    if body.get("response_format"):
        return Reply(json.dumps(ROLES))
    return Reply(f"reply {len(body['messages'])}")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's endpoint settings or keys."""
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "PIPELINE_MODEL",
        "PIPELINE_RUNS_DIR",
        "PIPELINE_DEBUG",
        "EDITOR",
        "VISUAL",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer(conversation) as server:
        yield server


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def invoke(runs_dir: Path):  # type: ignore[no-untyped-def]
    """Run the CLI in-process with --runs-dir pointing into tmp_path."""

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(cli, [*args, "--runs-dir", str(runs_dir)], input=input, env=env)

    return run


def only_run(runs_dir: Path) -> Path:
    """The single run folder under runs_dir."""
    folders = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def unusable_director_error(run: Path, attempts: int, problem: str) -> str:
    """The one-line error for a director stage with no usable answer."""
    return (
        f"Error: run {run.name}: the director's answer was unusable after {attempts} attempt(s): "
        f"{problem}; the answers are in {run / 'director'}; "
        f"regenerate with: pipeline rerun {run.name} director"
    )

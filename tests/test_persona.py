"""Personas: a role that stays the same across runs, cast by the director under its name
with its system prompt kept, checked after the director answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .conftest import ROLES, only_run, read_jsonl
from .fakeserver import FakeServer, Reply

PROMPT = "I want you to act as Ana, a careful editor. I am the writer."


def config(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(
        f'[endpoints.fake]\nbase_url = "{base_url}"\nmodel = "m"\n[assign]\ndefault = "fake"\n'
        f'[personas.Ana]\nsystem_prompt = "{PROMPT}"\ndescription = "the editor"\n',
        encoding="utf-8",
    )
    return path


def director_forgets_ana_once(body: dict[str, Any]) -> Reply:
    """A director that leaves the persona out, then casts it (in its own words)."""
    if not body.get("response_format"):
        return Reply(f"reply {len(body['messages'])}")
    if "no role is named 'Ana'" not in json.dumps(body["messages"]):
        return Reply(json.dumps(ROLES))
    mentor = {"name": "Ana", "system_prompt": "You edit. (paraphrased by the director)"}
    return Reply(json.dumps({**ROLES, "roles": [ROLES["roles"][0], mentor]}))


def test_the_director_casts_the_persona_under_its_name_with_its_prompt(tmp_path, runs_dir, invoke):
    with FakeServer(director_forgets_ana_once) as fake:
        path = config(tmp_path, fake.base_url)
        result = invoke("generate", "edit my essay", "--config", str(path), "--persona", "Ana",
                        "--yes", "--turns", "2")  # fmt: skip
        first = fake.chat_requests()[0]["messages"][-1]["content"]
    assert result.exit_code == 0, result.output
    assert 'it must be named exactly "Ana"' in first and PROMPT in first
    run = only_run(runs_dir)
    roles = json.loads((run / "director/roles.json").read_text())
    assert [r["name"] for r in roles["roles"]] == ["Student", "Ana"]
    assert roles["roles"][1]["system_prompt"] == PROMPT  # kept word for word
    manifest = json.loads((run / "run.json").read_text())
    director = manifest["stages"]["director"]
    assert director["parameters"]["persona"] == {"name": "Ana", "system_prompt": PROMPT}
    assert [a["outcome"] for a in director["attempts"]] == ["semantic", "ok"]
    assert read_jsonl(run / "dialogue/transcript.jsonl")[1]["role"] == "Ana"


def test_an_unknown_persona_is_a_clear_error_before_any_call(tmp_path, invoke, runs_dir):
    path = config(tmp_path, "http://127.0.0.1:9/v1")
    result = invoke("generate", "x", "--config", str(path), "--persona", "Bob", "--yes")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {path}: no persona named 'Bob' (defined: Ana); define it under "
        "[personas.NAME] with a system_prompt\n"
    )
    assert not runs_dir.exists()


def test_an_imported_speaker_can_be_a_persona(tmp_path, runs_dir, invoke):
    chat = tmp_path / "chat.txt"
    chat.write_text("01/02/24, 10:00 - Bo: hi\n01/02/24, 10:01 - Ann B: hello\n", encoding="utf-8")
    result = invoke("import", "whatsapp", str(chat), "--timezone", "UTC", "--me", "Ann B",
                    "--persona", "Ann B=Ana")  # fmt: skip
    assert result.exit_code == 0, result.output
    run = runs_dir / result.stdout.strip()
    assert [x["role"] for x in read_jsonl(run / "import/transcript.jsonl")] == ["Bo", "Ana"]
    assert json.loads((run / "run.json").read_text())["stages"]["import"]["parameters"]["me"] == (
        "Ana"
    )

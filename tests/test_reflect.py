"""The reflect stage: a reflection per role after the conversation, checked against its
schema narrowed to the run's roles; on generate, batch, rerun, show and replay."""

from __future__ import annotations

import json
from typing import Any

from pipeline import schemas, stages
from pipeline.runs import open_run

from .conftest import ROLES, conversation, only_run, run_files
from .fakeserver import FakeServer, Reply

REFLECTIONS = {
    "reflections": [
        {
            "role": "Student",
            "meets_goal": True,
            "assessment": "Drafted the paper as asked.",
            "improvements": "Cite sources.",
            "keep": True,
            "reason": "Accurate and on task.",
        },
        {
            "role": "Mentor",
            "meets_goal": False,
            "assessment": "Only said reply N.",
            "improvements": "",
            "keep": False,
            "reason": "Empty turns.",
        },
    ]
}


def reflecting(body: dict[str, Any]) -> Reply:
    """Roles for the director, reflections for the reflect stage, turns otherwise."""
    form = (body.get("response_format") or {}).get("json_schema", {}).get("schema", {})
    if "reflections" in form.get("properties", {}):
        return Reply(json.dumps(REFLECTIONS))
    return conversation(body)  # type: ignore[return-value]


def test_generate_reflect_writes_a_reflection_per_role_that_show_and_replay_keep(runs_dir, invoke):
    with FakeServer(reflecting) as fake:
        result = invoke("generate", "write a paper", "--base-url", fake.base_url, "--model", "m",
                        "--yes", "--turns", "3", "--reflect")  # fmt: skip
        (asked,) = [r for r in fake.chat_requests() if "reflections" in json.dumps(r)]
    assert result.exit_code == 0, result.output
    run = only_run(runs_dir)
    saved = json.loads((run / "reflect/reflections.json").read_text())
    assert saved == REFLECTIONS and schemas.errors(saved, "reflection.schema.json") == []
    # the request names each role's goal and pins the answer to the run's roles (the wire
    # form of the schema turns the narrowed prefixItems into a choice of items)
    prompt = asked["messages"][-1]["content"]
    assert ROLES["roles"][1]["system_prompt"] in prompt and "[2] Mentor: reply 2" in prompt
    items = asked["response_format"]["json_schema"]["schema"]["properties"]["reflections"]
    assert [i["properties"]["role"]["const"] for i in items["items"]["anyOf"]] == [
        "Student",
        "Mentor",
    ]
    assert "Reflection on Mentor: goal not met; discard (Empty turns.)" in result.stdout
    assert stages.statuses(open_run(runs_dir, run.name))["reflect"] == "done"
    shown = invoke("show", run.name, "--stage", "reflect", "--json")
    assert json.loads(shown.stdout) == REFLECTIONS
    again = invoke("replay", run.name, "--into", "20261126T130000Z-again")
    assert again.exit_code == 0, again.output
    assert run_files(runs_dir / "20261126T130000Z-again") == run_files(run)


def test_a_run_is_reflected_on_later_and_a_new_transcript_makes_it_stale(runs_dir, invoke):
    with FakeServer(reflecting) as fake:
        args = ("--base-url", fake.base_url, "--model", "m")
        made = invoke("generate", "write a paper", *args, "--yes", "--turns", "2")
        run = only_run(runs_dir)
        assert stages.statuses(open_run(runs_dir, run.name))["reflect"] == "pending"
        later = invoke("rerun", run.name, "reflect", *args)
    assert made.exit_code == 0 and later.exit_code == 0, later.output
    assert (run / "reflect/reflections.json").is_file()
    with (run / "dialogue/transcript.jsonl").open("a") as f:
        f.write(
            json.dumps(
                {
                    **json.loads((run / "dialogue/transcript.jsonl").read_text().splitlines()[-1]),
                    "turn": 3,
                }
            )
            + "\n"
        )
    assert stages.statuses(open_run(runs_dir, run.name))["reflect"] == "stale"


def test_an_imported_chat_can_be_reflected_on(runs_dir, invoke, tmp_path):
    chat = tmp_path / "chat.txt"
    chat.write_text(
        "01/02/24, 10:00 - Student: hi\n01/02/24, 10:01 - Mentor: hello\n", encoding="utf-8"
    )
    imported = invoke("import", "whatsapp", str(chat), "--timezone", "UTC")
    run_id = imported.stdout.strip()
    with FakeServer(reflecting) as fake:
        result = invoke("rerun", run_id, "reflect", "--base-url", fake.base_url, "--model", "m")
    assert result.exit_code == 0, result.output
    assert json.loads((runs_dir / run_id / "reflect/reflections.json").read_text()) == REFLECTIONS

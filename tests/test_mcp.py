"""Tools from MCP servers: started from the config, offered by allow-list, called with a
time-out, recorded, and answered from the recording on replay (a real stdio MCP server,
tests/mcpserver.py, on the official SDK)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROLES, conversation, only_run, read_jsonl, run_files, task_of
from .fakeserver import FakeServer, Reply

pytest.importorskip("mcp")

SERVER = Path(__file__).with_name("mcpserver.py")
MENTOR = "act as my mentor"
CALLS = [  # what the mentor asks for in its first turn, all in one round
    ("c1", "add", {"a": 2, "b": 3}),
    ("c2", "define", {"term": "fairness"}),
    ("c3", "define", {"term": "luck"}),
    ("c4", "slow", {"seconds": 5}),
    ("c5", "secret", {}),
]


def model(body: dict[str, Any]) -> Reply:
    """The director's answer, the student's plain turns, and a mentor that calls every
    tool of CALLS once, then says what came back."""
    messages = body["messages"]
    if body.get("response_format") or MENTOR not in messages[0]["content"]:
        return conversation(body)
    results = [m["content"] for m in messages if m["role"] == "tool"]
    if results:
        return Reply("I found: " + " | ".join(results))
    if not body.get("tools"):
        return Reply("no tools here")
    calls = [(i, name, json.dumps(arguments)) for i, name, arguments in CALLS]
    return Reply("", finish_reason="tool_calls", tool_calls=calls)


def write_config(tmp_path: Path, base_url: str, *, roles: str, server: str = "") -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(
        f"""
[endpoints.fake]
base_url = "{base_url}"
model = "m"

[assign]
default = "fake"

[mcp.servers.calc]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(SERVER))}]
pass_env = ["MCP_CALL_LOG"]
timeout = 0.5
{server}
[mcp.roles]
{roles}
""",
        encoding="utf-8",
    )
    return path


ALLOWED = '"*" = ["calc.add"]\nMentor = ["calc.define", "calc.slow"]\n'


@pytest.fixture
def call_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "mcp-calls.jsonl"
    monkeypatch.setenv("MCP_CALL_LOG", str(log))
    return log


def test_roles_call_the_tools_they_are_allowed_and_replay_never_calls_them_again(
    tmp_path, runs_dir, invoke, call_log
):
    with FakeServer(model) as fake:
        config = write_config(tmp_path, fake.base_url, roles=ALLOWED)
        result = invoke(
            "generate", "a paper", "--config", str(config), "--yes", "--turns", "3",
            "--tool-calls", "tools",
        )  # fmt: skip
        requests = fake.chat_requests()
    assert result.exit_code == 0, result.output
    run = only_run(runs_dir)
    # each role is offered exactly what the allow-list names, as the server describes it
    offered = {
        ("mentor" if MENTOR in r["messages"][0]["content"] else "student"): [
            t["function"]["name"] for t in r["tools"]
        ]
        for r in requests
        if r.get("tools")
    }
    assert offered == {"student": ["add"], "mentor": ["add", "define", "slow"]}
    add = next(t for r in requests for t in r.get("tools", []) if t["function"]["name"] == "add")
    assert add["function"]["description"] == "Add two integers."
    assert add["function"]["parameters"]["required"] == ["a", "b"]
    # every call got a result or an error that says what went wrong; the run went on
    turn = read_jsonl(run / "dialogue/transcript.jsonl")[1]
    outcomes = [(c["name"], c.get("result"), c.get("error")) for c in turn["tool_calls"]]
    assert outcomes[:3] == [
        ("add", "5", None),
        ("define", "treating like cases alike", None),
        ("define", None, "Error executing tool define: no entry for 'luck'"),
    ]
    assert outcomes[3][0] == "slow" and "MCP server calc" in outcomes[3][2]
    assert "Timed out" in outcomes[3][2] or "timed out" in outcomes[3][2]
    assert outcomes[4] == (
        "secret",
        None,
        "there is no tool named 'secret' (tools: add, define, slow)",
    )
    assert turn["content"].startswith("I found: 5 | treating like cases alike | error:")
    assert json.loads((run / "run.json").read_text())["stages"]["dialogue"]["status"] == "done"
    # the server really ran the allowed calls, and never the one not allowed
    ran = [line["tool"] for line in read_jsonl(call_log)]
    assert ran == ["add", "define", "define", "slow"]
    saved = json.loads((run / "dialogue/tools.json").read_text())
    assert [[t["source"] for t in r["tools"]] for r in saved["roles"]] == [
        ["mcp:calc"],
        ["mcp:calc"] * 3,
    ]

    # replay: the same files, every result from the recording, the server never started
    replayed = invoke("replay", run.name, "--into", "20261126T120000Z-again")
    assert replayed.exit_code == 0, replayed.output
    again = runs_dir / "20261126T120000Z-again"
    assert run_files(again) == run_files(run)
    assert [line["tool"] for line in read_jsonl(call_log)] == ran


@pytest.mark.parametrize(
    ("roles", "server", "message"),
    [
        (
            '"*" = ["search.web"]\n',
            "",
            "mcp.roles.*: 'search.web' names no server (defined: calc)",
        ),
        (
            '"*" = ["calc.multiply"]\n',
            "",
            "mcp.roles: the MCP server 'calc' has no tool 'multiply' "
            "(it has: add, define, slow, secret)",
        ),
    ],
)
def test_an_allow_list_that_names_what_does_not_exist_is_a_clear_error(
    tmp_path, runs_dir, invoke, call_log, roles, server, message
):
    with FakeServer(model) as fake:
        config = write_config(tmp_path, fake.base_url, roles=roles, server=server)
        result = invoke("generate", "a paper", "--config", str(config), "--yes", "--turns", "2")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()[-1:]
    assert message in line, result.stderr


def test_a_server_that_does_not_start_is_a_clear_error_and_the_run_is_kept(
    tmp_path, runs_dir, invoke
):
    failing = '"-c", "import sys; sys.exit(3)"'
    with FakeServer(model) as fake:
        config = write_config(tmp_path, fake.base_url, roles=ALLOWED)
        text = config.read_text().replace(json.dumps(str(SERVER)), failing)
        config.write_text(text)
        result = invoke("generate", "a paper", "--config", str(config), "--yes", "--turns", "2")
    assert result.exit_code == 1
    run = only_run(runs_dir)
    assert result.stderr.splitlines()[-1] == (
        f"Error: the MCP server 'calc' ({sys.executable}) did not start: MCPError: Connection "
        f"closed; check mcp.servers.calc in the config; then go on with: pipeline resume "
        f"{run.name} --runs-dir {runs_dir}"
    )
    assert (run / "director/roles.json").is_file()  # what was done is kept
    assert json.loads((run / "run.json").read_text())["stages"]["dialogue"]["status"] == "pending"
    # with the server fixed, resume goes on from there, on the same config
    config.write_text(text.replace(failing, json.dumps(str(SERVER))))
    with FakeServer(model) as fake:
        config.write_text(re.sub(r"http://[^\"]+", fake.base_url, config.read_text()))
        resumed = invoke("resume", run.name, "--config", str(config))
    assert resumed.exit_code == 0, resumed.output
    turn = read_jsonl(run / "dialogue/transcript.jsonl")[1]
    assert [c["name"] for c in turn["tool_calls"]] == [name for _, name, _ in CALLS]
    assert turn["tool_calls"][0]["result"] == "5"


def delegating(body: dict[str, Any]) -> Reply:
    """A root whose mentor delegates one sub-task, and a child whose mentor adds."""
    messages = body["messages"]
    first = messages[0]["content"]
    kind = (body.get("response_format") or {}).get("json_schema", {}).get("name")
    if kind == "roles":  # the mentor's prompt carries the run's task
        mentor = {**ROLES["roles"][1], "system_prompt": f"You mentor. TASK: {task_of(first)}."}
        return Reply(json.dumps({**ROLES, "roles": [ROLES["roles"][0], mentor]}))
    if kind == "verdict":
        verdict = {"completed": True, "score": 7, "reasons": "ok", "deliverable": "sum found"}
        return Reply(json.dumps(verdict))
    results = [m["content"] for m in messages if m["role"] == "tool"]
    if "TASK:" not in first or results or len(messages) > 2:
        return Reply("done: " + " | ".join(results) if results else "fine")
    if "TASK: root." in first:
        call = ("d1", "delegate", json.dumps({"task": "child"}))
    else:
        call = ("a1", "add", json.dumps({"a": 20, "b": 22}))
    return Reply("", finish_reason="tool_calls", tool_calls=[call])


def test_runs_a_role_delegated_to_use_the_mcp_tools_and_the_tree_replays_from_the_recording(
    tmp_path, runs_dir, invoke, call_log
):
    with FakeServer(delegating) as fake:
        config = write_config(tmp_path, fake.base_url, roles='"*" = ["calc.add"]\n')
        result = invoke(
            "generate", "root", "--config", str(config), "--yes", "--turns", "3",
            "--tool-calls", "tools", "--delegate", "--judge",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    root = next(p for p in runs_dir.iterdir() if p.name.endswith("-root"))
    child = runs_dir / f"{root.name}-t2-1"
    (delegated,) = read_jsonl(root / "dialogue/transcript.jsonl")[1]["tool_calls"]
    assert delegated["result"] == "sum found"
    (added,) = read_jsonl(child / "dialogue/transcript.jsonl")[1]["tool_calls"]
    assert (added["name"], added["result"]) == ("add", "42")
    tools = json.loads((child / "dialogue/tools.json").read_text())["roles"][1]["tools"]
    assert [(t["source"], t["function"]["name"]) for t in tools] == [
        ("delegate", "delegate"),
        ("mcp:calc", "add"),
    ]
    ran = read_jsonl(call_log)
    assert ran == [{"tool": "add", "arguments": {"a": 20, "b": 22}}]

    replayed = invoke("replay", root.name, "--into", "20261126T120000Z-again")
    assert replayed.exit_code == 0, replayed.output
    assert run_files(runs_dir / "20261126T120000Z-again-t2-1") == run_files(child)
    assert run_files(runs_dir / "20261126T120000Z-again") == run_files(root)
    assert read_jsonl(call_log) == ran  # answered from the recording, not run again


def test_dry_run_counts_the_tool_rounds_of_roles_with_mcp_tools(tmp_path, invoke):
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", roles=ALLOWED)
    result = invoke("generate", "a task", "--dry-run", "--turns", "3", "--config", str(config))
    assert result.exit_code == 0, result.output
    # each generated turn: 4 rounds of calls, the answer, one fall-back from `tools`
    assert "model calls per run: at most 18 (6 director, 12 dialogue over 2 generated turns)\n" in (
        result.stdout
    )

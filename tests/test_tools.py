"""Tools and the two tool-call dialects: calls carried out, errors as results, streamed
calls assembled and recorded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.client import ModelClient, chat_body
from pipeline.endpoints import Endpoint
from pipeline.records import CallRecord, Streamed, ToolCall
from pipeline.tools import (
    Tool,
    Toolbox,
    ToolError,
    ToolUse,
    parse_prompt_calls,
    result_messages,
)

from .fakeserver import FakeServer, Reply


def add(arguments: dict[str, Any], use: ToolUse | None = None) -> str:
    return str(arguments["a"] + arguments["b"])


def broken(arguments: dict[str, Any], use: ToolUse) -> str:
    raise ToolError("the service is down")


def buggy(arguments: dict[str, Any], use: ToolUse) -> str:
    return str(1 / 0)


NUMBERS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
BOX = Toolbox(
    [
        Tool("add", "Adds two integers.", NUMBERS, add),
        Tool("broken", "Always fails.", {"type": "object"}, broken),
        Tool("buggy", "Has a bug.", {"type": "object"}, buggy),
    ]
)


@pytest.mark.parametrize(
    ("name", "arguments", "result", "error"),
    [
        ("add", '{"a": 2, "b": 3}', "5", None),
        ("nope", "{}", None, "there is no tool named 'nope' (tools: add, broken, buggy)"),
        ("add", '{"a": 2,', None, "the arguments are not JSON (Expecting property name enclosed "
         "in double quotes)"),
        ("add", "[1, 2]", None, "the arguments are not a JSON object"),
        ("add", '{"a": 2}', None, "the arguments do not fit: $: 'b' is a required property"),
        ("broken", "{}", None, "the service is down"),
        ("buggy", "{}", None, "buggy failed: division by zero"),
    ],
)  # fmt: skip
def test_a_call_gets_its_result_or_an_error_never_an_exception(name, arguments, result, error):
    done = BOX.call(ToolCall("call-1", name, arguments))
    assert (done.result, done.error) == (result, error)
    assert (done.id, done.name, done.arguments) == ("call-1", name, arguments)


def test_the_tools_dialect_offers_function_specs():
    (spec, *_) = BOX.specs()
    assert spec == {
        "type": "function",
        "function": {"name": "add", "description": "Adds two integers.", "parameters": NUMBERS},
    }
    body = chat_body(
        Endpoint("http://h/v1", "m"), [], max_tokens=5, temperature=0, tools=BOX.specs()
    )
    assert body["tools"] == BOX.specs()
    assert "tools" not in chat_body(Endpoint("http://h/v1", "m"), [], max_tokens=5, temperature=0)


@pytest.mark.parametrize(
    ("content", "text", "calls"),
    [
        ("No tool needed.", "No tool needed.", ()),
        (
            'Let me add.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
            "Let me add.",
            (ToolCall("t3-1", "add", '{"a": 1, "b": 2}'),),
        ),
        (
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
            '<tool_call> {"name": "broken"} </tool_call> and more',
            "",
            (ToolCall("t3-1", "add", '{"a": 1, "b": 2}'), ToolCall("t3-2", "broken", "{}")),
        ),
        (
            "<tool_call>{not json}</tool_call>",
            "",
            (ToolCall("t3-1", "?", "{not json}", error="not JSON (Expecting property name "
                      "enclosed in double quotes)"),),
        ),
        (
            '<tool_call>{"tool": "add"}</tool_call>',
            "",
            (ToolCall("t3-1", "?", '{"tool": "add"}',
                      error='a tool call is {"name": "...", "arguments": {...}}'),),
        ),
    ],
)  # fmt: skip
def test_the_prompt_dialect_reads_tool_calls_from_the_text(content, text, calls):
    assert parse_prompt_calls(content, "t3") == (text, calls)


def test_results_go_back_as_the_dialect_says():
    calls = [
        ToolCall("c1", "add", '{"a": 1, "b": 2}', result="3"),
        ToolCall("c2", "broken", "{}", error="broken failed: down"),
    ]
    assistant, first, second = result_messages("tools", "", calls)
    assert assistant["content"] is None
    assert [c["id"] for c in assistant["tool_calls"]] == ["c1", "c2"]
    assert first == {"role": "tool", "tool_call_id": "c1", "content": "3"}
    assert second == {"role": "tool", "tool_call_id": "c2", "content": "error: broken failed: down"}
    said, results = result_messages("prompt", "Adding.", calls)
    assert said["content"].startswith('Adding.\n<tool_call>{"name": "add"')
    assert results["role"] == "user"
    assert '<tool_result name="broken" id="c2">\nerror: broken failed: down' in results["content"]


def test_the_prompt_dialect_describes_every_tool():
    text = BOX.prompt_instructions()
    assert "<tool_call>" in text
    assert '- add: Adds two integers. Arguments (JSON Schema): {"type": "object"' in text


def test_streamed_tool_calls_are_assembled_and_recorded():
    calls = [("call_a", "add", '{"a": 2, "b": 3}'), ("call_b", "broken", "{}")]
    with FakeServer(lambda body: Reply("", finish_reason="tool_calls", tool_calls=calls)) as fake:
        client = ModelClient(Endpoint(fake.base_url, "m", None), max_retries=0)
        body = chat_body(
            client.endpoint,
            [{"role": "user", "content": "2+3?"}],
            max_tokens=50,
            temperature=0,
            stream=True,
            tools=BOX.specs(),
        )
        recorded: list[CallRecord] = []
        result = client.stream(body, recorded.append)
        assert fake.chat_requests()[0]["tools"] == BOX.specs()
    assert result.finish_reason == "tool_calls"
    assert result.tool_calls == tuple(ToolCall(*c) for c in calls)
    (record,) = recorded
    written = json.loads(json.dumps(record.to_json()))
    assert written["stream"]["tool_calls"] == [
        {"id": i, "name": n, "arguments": a} for i, n, a in calls
    ]
    assert CallRecord.from_json(written) == record  # and read back for a replay


def test_a_stream_without_tool_calls_is_recorded_as_before():
    streamed = Streamed(["a", "b"], "stop", "m", None, None)
    assert list(streamed.to_json()) == [
        "pieces", "finish_reason", "model", "usage", "system_fingerprint",
    ]  # fmt: skip


# -- tools in the dialogue ------------------------------------------------------------------

import signal  # noqa: E402

from pipeline import stages  # noqa: E402
from pipeline.parameters import DialogueParameters, ToolParameters  # noqa: E402
from pipeline.runs import create_run  # noqa: E402

from .conftest import ROLES, read_jsonl  # noqa: E402
from .fakeserver import Status  # noqa: E402


class SameTools:
    """Every role gets the same toolbox."""

    def __init__(self, box: Toolbox) -> None:
        self.box = box

    def toolbox(self, ctx: stages.StageContext, speaker: int, role: str) -> Toolbox:
        return self.box


def tool_turns(body: dict[str, Any], *, dialect: str = "tools") -> Any:
    """Roles for the director; turn 2 calls add(2, 3) once, then answers; other turns talk."""
    if body.get("response_format"):
        return Reply(json.dumps(ROLES))
    last = body["messages"][-1]
    if len(body["messages"]) == 2:  # turn 2: the mentor's first turn
        if dialect == "tools":
            return Reply(
                "", finish_reason="tool_calls", tool_calls=[("c1", "add", '{"a":2,"b":3}')]
            )
        return Reply(
            'Adding. <tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        )
    if last["role"] == "tool" or "<tool_result" in str(last.get("content")):
        return Reply("The sum is 5.")
    return Reply(f"reply {len(body['messages'])}")


def run_dialogue_with_tools(
    tmp_path, fake: FakeServer, tools: ToolParameters, box: Toolbox = BOX, turns: int = 3
):
    client = ModelClient(Endpoint(fake.base_url, "m", None), max_retries=0)
    plan = stages.Plan.of(dialogue=DialogueParameters(turns=turns), tools=tools)
    run = create_run(tmp_path, "add numbers", plan.planned())
    ctx = stages.StageContext(run, stages.OneClient(client), plan, tools=SameTools(box))
    stages.execute(ctx, "director")
    stages.execute(ctx, "dialogue")
    return run


@pytest.mark.parametrize("dialect", ["tools", "prompt"])
def test_a_role_calls_a_tool_and_goes_on_with_its_result(tmp_path, dialect):
    with FakeServer(lambda body: tool_turns(body, dialect=dialect)) as fake:
        run = run_dialogue_with_tools(tmp_path, fake, ToolParameters(tool_calls=dialect))
        requests = fake.chat_requests()
    line = read_jsonl(run.path("dialogue/transcript.jsonl"))[1]
    call_id = "c1" if dialect == "tools" else "call-2-1-1"
    assert line["tool_calls"] == [
        {"id": call_id, "name": "add", "arguments": '{"a":2,"b":3}' if dialect == "tools"
         else '{"a": 2, "b": 3}', "result": "5"}
    ]  # fmt: skip
    assert line["content"] == "The sum is 5."
    assert ("tools" in requests[1]) == (dialect == "tools")
    follow_up = requests[2]
    if dialect == "tools":
        assert follow_up["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": "5"}
    else:
        assert '<tool_result name="add" id="call-2-1-1">\n5' in follow_up["messages"][-1]["content"]
        assert "<tool_call>" in follow_up["messages"][0]["content"]  # the tools described
    assert run.manifest.tool_dialects == {fake.base_url: dialect}
    assert run.stage("dialogue").tools == {
        "tool_calls": dialect, "max_rounds": 4, "delegate": False, "max_depth": 2,
        "max_children": 4,
    }  # fmt: skip
    assert not run.path("dialogue/pending-turn.json").exists()
    assert len(requests) == 4  # the director; turn 2's call round, then its answer; turn 3
    assert len(list(run.path("dialogue/calls").glob("*.json"))) == len(requests) - 1


def test_auto_falls_back_to_the_prompt_when_the_server_refuses_tools(tmp_path):
    def refuses_tools(body):
        if body.get("tools"):
            return Status(400, "this server does not support tools")
        return tool_turns(body, dialect="prompt")

    with FakeServer(refuses_tools) as fake:
        run = run_dialogue_with_tools(tmp_path, fake, ToolParameters(tool_calls="auto"))
    line = read_jsonl(run.path("dialogue/transcript.jsonl"))[1]
    assert line["tool_calls"][0]["result"] == "5"
    assert run.manifest.tool_dialects == {fake.base_url: "prompt"}


def test_a_call_to_an_unknown_tool_is_answered_and_the_dialogue_goes_on(tmp_path):
    def unknown(body):
        if not body.get("response_format") and len(body["messages"]) == 2:
            return Reply("", finish_reason="tool_calls", tool_calls=[("c1", "search", "{}")])
        return tool_turns(body)

    with FakeServer(unknown) as fake:
        run = run_dialogue_with_tools(tmp_path, fake, ToolParameters(tool_calls="tools"))
    lines = read_jsonl(run.path("dialogue/transcript.jsonl"))
    assert lines[1]["tool_calls"][0]["error"].startswith("there is no tool named 'search'")
    assert run.stage("dialogue").status == "done" and len(lines) == 3


def test_a_dialogue_resumed_runs_only_the_pending_calls_and_never_re_asks_for_them(
    tmp_path, sigint_raises
):
    state = {"interrupt": True}

    def flaky_add(arguments: dict[str, Any], use: ToolUse) -> str:
        if state.pop("interrupt", False):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the tool runs
        return add(arguments)

    box = Toolbox([Tool("add", "Adds two integers.", NUMBERS, flaky_add)])
    with FakeServer(tool_turns) as fake:
        with pytest.raises(KeyboardInterrupt):
            run_dialogue_with_tools(tmp_path, fake, ToolParameters(tool_calls="tools"), box)
        (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
        pending = json.loads((folder / "dialogue" / "pending-turn.json").read_text())
        assert pending["rounds"][0]["calls"] == [
            {"id": "c1", "name": "add", "arguments": '{"a":2,"b":3}'}
        ]
        asked = len(fake.chat_requests())
        from pipeline.runs import open_run

        run = open_run(tmp_path, folder.name)
        client = ModelClient(Endpoint(fake.base_url, "m", None), max_retries=0)
        ctx = stages.StageContext(
            run, stages.OneClient(client), stages.Plan.recorded(run), tools=SameTools(box)
        )
        assert stages.status(run, "dialogue") == "failed"
        stages.advance(ctx)
        after = fake.chat_requests()[asked:]
    assert after[0]["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": "5"}
    lines = read_jsonl(run.path("dialogue/transcript.jsonl"))
    assert [line["turn"] for line in lines] == [1, 2, 3]  # no turn doubled or lost
    assert lines[1]["tool_calls"][0]["result"] == "5"

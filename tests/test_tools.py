"""Tools and the two tool-call dialects: calls carried out, errors as results, streamed
calls assembled and recorded."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.client import ModelClient, chat_body
from pipeline.endpoints import Endpoint
from pipeline.records import CallRecord, Streamed, ToolCall
from pipeline.tools import Tool, Toolbox, ToolError, parse_prompt_calls, result_messages

from .fakeserver import FakeServer, Reply


def add(arguments: dict[str, Any]) -> str:
    return str(arguments["a"] + arguments["b"])


def broken(arguments: dict[str, Any]) -> str:
    raise ToolError("the service is down")


def buggy(arguments: dict[str, Any]) -> str:
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
        ("broken", "{}", None, "broken failed: the service is down"),
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

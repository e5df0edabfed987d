"""The ``prompt`` tool-call dialect on the real embedded model: llama.cpp's server (xllamacpp)
with SmolLM2-135M-Instruct, the real openai client, the dialogue stage as the CLI runs it.

SmolLM2-135M does not write ``<tool_call>`` blocks by itself, so the role's endpoint
(configured in ``pipeline.toml``, as a user would) sends llama.cpp's own ``grammar`` request
field in its ``params``: the model can then only write a tool call of the grammar's shape,
choosing the parts the grammar leaves open (the digits). Nothing is patched or faked: what
is checked is what the pipeline made of the model's real answer, and what it sent next.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import stages
from pipeline.config import load_config
from pipeline.hub import DEFAULT_MODEL_NAME as MODEL_NAME
from pipeline.local import LocalServer, resolve_model
from pipeline.models import Models
from pipeline.parameters import DialogueParameters, ToolParameters
from pipeline.recorder import read_calls
from pipeline.runs import Run
from pipeline.tools import Tool, Toolbox, ToolUse

from .conftest import read_jsonl

pytestmark = pytest.mark.embedded

ROLES = {
    "roles": [
        {"name": "Student", "system_prompt": "You are a student learning to add numbers."},
        {
            "name": "Tutor",
            "system_prompt": "You are a maths tutor. Use the add tool to add numbers.",
        },
    ],
    "termination": {
        "done_token": "<TASK_DONE>",
        "declared_by": "Student",
        "acceptance_criteria": "The student knows the sum.",
    },
    "opening_line": "What is 2 plus 3?",
}
TUTOR = 1  # the role offered the tool; it speaks turn 2
NUMBERS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
ADD_DESCRIPTION = "Adds two integers and returns their sum."


def forced(body: str) -> str:
    """A GBNF grammar whose every sentence is ``<tool_call>BODY</tool_call>``: BODY is GBNF
    (literals and character classes)."""
    return f'root ::= "<tool_call>" {body} "</tool_call>"'


# the model picks the two digits; the tool is told what it picked
ADD_CALL = forced(r'"{\"name\": \"add\", \"arguments\": {\"a\": " [0-9] ", \"b\": " [0-9] "}}"')


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer(resolve_model()) as running:
        yield running


class Adder:
    """The tool source: the Tutor may call ``add``, the Student nothing. Every call that
    reaches the Python function is kept."""

    def __init__(self) -> None:
        self.ran: list[tuple[dict[str, Any], ToolUse]] = []

    def add(self, arguments: dict[str, Any], use: ToolUse) -> str:
        self.ran.append((arguments, use))
        return str(arguments["a"] + arguments["b"])

    def toolbox(self, ctx: stages.StageContext, speaker: int, role: str) -> Toolbox:
        tools = [Tool("add", ADD_DESCRIPTION, NUMBERS, self.add)] if speaker == TUTOR else []
        return Toolbox(tools)


def converse(tmp_path: Path, server: LocalServer, grammar: str, turns: int) -> tuple[Run, Adder]:
    """A dialogue of ``turns`` turns on ``server`` (the director's roles written by hand):
    the Tutor on an endpoint that sends ``grammar``, the Student on one that sends none and
    answers in a few tokens. The dialect is ``auto``; one round of tool calls per turn."""
    config_file = tmp_path / "pipeline.toml"
    config_file.write_text(
        f"""
[endpoints.forced]
base_url = "{server.base_url}"
model = "{MODEL_NAME}"
params = {{ grammar = {json.dumps(grammar)} }}

[endpoints.free]
base_url = "{server.base_url}"
model = "{MODEL_NAME}"
params = {{ max_tokens = 16 }}

[assign]
default = "free"
roles = {{ Tutor = "forced" }}
"""
    )
    plan = stages.Plan.of(
        dialogue=DialogueParameters(
            turns=turns, max_tokens=96, temperature=0.0, seed=7, detect_loops=False
        ),
        tools=ToolParameters(tool_calls="auto", max_rounds=1),
    )
    run = plan.new_run(tmp_path / "runs", "add two numbers")
    with run.stage_running("director", endpoint=None, parameters={}, inputs=ROLES, upstream={}):
        run.write_json("director/roles.json", ROLES)
        run.finish_stage("director")
    adder = Adder()
    with Models(config=load_config(config_file)) as models:
        ctx = stages.StageContext(run, models, plan, tools=adder)
        stages.execute(ctx, "dialogue")
    return run, adder


def tool_results(name: str, call_id: str, shown: str) -> str:
    """The user message that carries one call's result back (templates/tool-results.j2)."""
    return (
        f'<tool_result name="{name}" id="{call_id}">\n{shown}\n</tool_result>\n'
        "Go on with your turn."
    )


def test_a_tool_call_from_the_model_is_parsed_run_and_answered(tmp_path, server):
    run, adder = converse(tmp_path, server, ADD_CALL, turns=2)

    assert run.stage("dialogue").status == "done"
    first, second = read_calls(run, "dialogue")  # turn 2: the call round, then the answer
    written = first.stream.content if first.stream else ""
    assert first.body["grammar"] == ADD_CALL  # the endpoint's params reached the server...
    assert written.startswith('<tool_call>{"name": "add", "arguments": {"a": ')  # ...and held
    picked = json.loads(written.removeprefix("<tool_call>").removesuffix("</tool_call>"))
    a, b = picked["arguments"]["a"], picked["arguments"]["b"]

    # auto chose the prompt dialect for a llama.cpp server found at a configured URL: no
    # tools field; the tool described in the system prompt
    endpoint = run.stage("dialogue").role_endpoints[TUTOR]
    assert (endpoint.embedded, endpoint.server) == (False, "llama.cpp")
    assert run.manifest.tool_dialects == {server.base_url: "prompt"}
    assert "tools" not in first.body
    system = first.body["messages"][0]["content"]
    assert system.startswith("You are a maths tutor.")
    assert "<tool_call>" in system
    assert f"- add: {ADD_DESCRIPTION} Arguments (JSON Schema): {json.dumps(NUMBERS)}" in system
    assert first.body["messages"][1:] == [{"role": "user", "content": ROLES["opening_line"]}]

    # the call was parsed and the Python tool ran once, on what the model wrote
    ((arguments, use),) = adder.ran
    assert arguments == {"a": a, "b": b}
    assert (use.turn, use.index, use.call.id) == (2, 1, "call-2-1-1")
    line = read_jsonl(run.path("dialogue/transcript.jsonl"))[1]
    assert line["tool_calls"] == [
        {
            "id": "call-2-1-1",
            "name": "add",
            "arguments": json.dumps({"a": a, "b": b}),
            "result": str(a + b),
        }
    ]

    # the next request carries the call and its result back, in the prompt dialect
    assert second.body["messages"][0] == first.body["messages"][0]  # the tools still described
    assert second.body["messages"][1:] == [
        {"role": "user", "content": ROLES["opening_line"]},
        {"role": "assistant", "content": written},
        {"role": "user", "content": tool_results("add", "call-2-1-1", str(a + b))},
    ]
    assert "tools" not in second.body
    # the server read them and answered: what it said is the turn (the grammar still holds
    # it to a tool call, left as text: the one round allowed is spent)
    assert second.usage and first.usage
    assert second.usage["prompt_tokens"] > first.usage["prompt_tokens"] + 10
    answer = second.stream.content if second.stream else ""
    assert answer.startswith("<tool_call>")
    assert line["content"] == answer
    assert line["model"] == MODEL_NAME
    assert not run.path("dialogue/pending-turn.json").exists()


MALFORMED = {
    "unknown tool": (
        forced(r'"{\"name\": \"multiply\", \"arguments\": {\"a\": " [0-9] ", \"b\": 3}}"'),
        "multiply",
        "there is no tool named 'multiply' (tools: add)",
    ),
    "arguments off the schema": (
        forced(r'"{\"name\": \"add\", \"arguments\": {\"a\": \"two\", \"b\": " [0-9] "}}"'),
        "add",
        "the arguments do not fit: $.a: 'two' is not of type 'integer'",
    ),
    "not JSON": (
        forced(r'"add(" [0-9] ", " [0-9] ")"'),
        "?",
        "not JSON (Expecting value)",
    ),
}


@pytest.mark.parametrize(("grammar", "name", "error"), MALFORMED.values(), ids=list(MALFORMED))
def test_a_malformed_call_is_answered_with_its_error_and_the_dialogue_goes_on(
    tmp_path, server, grammar, name, error
):
    run, adder = converse(tmp_path, server, grammar, turns=3)

    assert adder.ran == []  # the tool never ran
    lines = read_jsonl(run.path("dialogue/transcript.jsonl"))
    (call,) = lines[1]["tool_calls"]
    assert (call["id"], call["name"], call["error"]) == ("call-2-1-1", name, error)
    assert "result" not in call
    first, second, third = read_calls(run, "dialogue")  # turn 2's two requests, turn 3
    written = first.stream.content if first.stream else ""
    assert written.startswith("<tool_call>")
    assert second.body["messages"][-2:] == [
        {"role": "assistant", "content": written},
        {"role": "user", "content": tool_results(name, "call-2-1-1", f"error: {error}")},
    ]
    assert lines[1]["content"] == (second.stream.content if second.stream else None)

    # the dialogue went on: the Student (no tools, another endpoint) spoke turn 3
    assert [line["turn"] for line in lines] == [1, 2, 3]
    assert "grammar" not in third.body and third.body["max_tokens"] == 16
    assert "<tool_call>" not in third.body["messages"][0]["content"]
    entry = run.stage("dialogue")
    assert entry.status == "done"
    assert entry.termination_reason in ("max_turns", "done_token", "empty_turn")

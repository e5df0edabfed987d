"""Structured output: dialects, the strict schema form, validation, repair, and HTTP faults,
against fake servers that behave as the real ones do."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from pipeline import schemas
from pipeline.director import answer_schema
from pipeline.errors import StructuredOutputError
from pipeline.parameters import DirectorParameters
from pipeline.schemas import Schema
from pipeline.structured import dialect_plan, grammar_safe, parse, strict_schema

from .conftest import ROLES, conversation, only_run, unusable_director_error
from .fakeserver import (
    LLAMA_CPP_PROPS,
    LLAMA_CPP_PYTHON,
    LM_STUDIO,
    FakeServer,
    Reply,
    Reset,
    Stall,
    Status,
)

# The keywords OpenAI's strict structured outputs accept (its "supported schemas" list).
OPENAI_STRICT_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "enum", "const",
    "anyOf", "$ref", "$defs", "description", "title", "pattern", "format", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
}  # fmt: skip
STRUCTURED_SCHEMAS = [schemas.ROLES]  # every schema the project asks a model to fill


def strict_violations(node: Any, path: str = "$") -> list[str]:
    """Every way ``node`` breaks OpenAI's strict-mode rules."""
    found: list[str] = []
    if isinstance(node, list):
        for i, item in enumerate(node):
            found += strict_violations(item, f"{path}[{i}]")
        return found
    if not isinstance(node, dict):
        return found
    found += [f"{path}: keyword {k}" for k in node if k not in OPENAI_STRICT_KEYWORDS]
    if node.get("type") == "object" or "properties" in node:
        if node.get("additionalProperties") is not False:
            found.append(f"{path}: additionalProperties is not false")
        if set(node.get("required", [])) != set(node.get("properties", {})):
            found.append(f"{path}: not every property is required")
    for key in ("properties", "$defs"):
        for name, sub in node.get(key, {}).items():
            found += strict_violations(sub, f"{path}.{name}")
    for key in ("items", "anyOf"):
        if key in node:
            found += strict_violations(node[key], f"{path}.{key}")
    return found


@pytest.mark.parametrize("name", STRUCTURED_SCHEMAS)
def test_the_strict_form_passes_the_strict_rules(name):
    original = schemas.load(name)
    assert strict_violations(original)  # the file itself is not strict-compatible...
    assert strict_violations(strict_schema(original)) == []  # ...its derived form is


@pytest.mark.parametrize("name", STRUCTURED_SCHEMAS)
def test_the_strict_form_keeps_string_bounds_as_patterns(name):
    strict = Draft202012Validator(strict_schema(schemas.load(name)))
    assert strict.is_valid(ROLES)
    too_long = json.loads(json.dumps(ROLES))
    too_long["roles"][0]["system_prompt"] = "x" * 12001
    assert not strict.is_valid(too_long)
    empty_name = json.loads(json.dumps(ROLES))
    empty_name["roles"][1]["name"] = ""
    assert not strict.is_valid(empty_name)


def test_the_strict_form_makes_optional_properties_nullable_and_leaves_its_input_alone():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 5}, "b": {"type": "integer"}},
        "required": ["a"],
        "oneOf": [{"required": ["a"]}],
    }
    before = json.dumps(schema, sort_keys=True)
    strict = strict_schema(schema)
    assert json.dumps(schema, sort_keys=True) == before
    assert strict["required"] == ["a", "b"]
    assert strict["properties"]["b"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert strict["properties"]["a"] == {"type": "string", "pattern": "^[\\s\\S]{0,5}$"}
    assert strict["additionalProperties"] is False


@pytest.mark.parametrize(
    ("requested", "base_url", "embedded", "remembered", "plan"),
    [
        ("auto", "http://127.0.0.1:5/v1", True, None, ["json_schema"]),
        ("auto", "https://api.openai.com/v1", False, None, ["json_schema"]),
        ("auto", "https://api.anthropic.com/v1/", False, None, ["prompt"]),
        (
            "auto",
            "http://localhost:11434/v1",
            False,
            None,
            ["json_schema", "json_object", "prompt"],
        ),
        ("auto", "http://localhost:11434/v1", False, "json_object", ["json_object"]),
        ("prompt", "https://api.openai.com/v1", False, "json_schema", ["prompt"]),
        ("json_object", "http://x/v1", False, None, ["json_object"]),
    ],
)
def test_dialect_plan(requested, base_url, embedded, remembered, plan):
    assert (
        dialect_plan(requested, base_url=base_url, embedded=embedded, remembered=remembered) == plan
    )


def completion(content: str, finish_reason: str = "stop", **message: Any) -> dict[str, Any]:
    return {
        "choices": [{"message": {"content": content, **message}, "finish_reason": finish_reason}]
    }


@pytest.mark.parametrize(
    ("response", "dialect", "kind"),
    [
        (completion("", refusal="I can't help with that"), "json_schema", "refusal"),
        (completion("{}", "content_filter"), "json_schema", "content_filter"),
        (completion('{"roles"', "length"), "json_schema", "length"),
        (completion("```json\n{}\n```"), "json_schema", "invalid_json"),
        (completion('{"roles": []}'), "json_object", "schema"),
        ({"choices": []}, "json_schema", "no_answer"),
    ],
)
def test_parse_names_each_failure(response, dialect, kind):
    with pytest.raises(StructuredOutputError) as caught:
        parse(response, Schema.file(schemas.ROLES), dialect=dialect)
    assert caught.value.kind == kind
    assert caught.value.repairable is (kind in ("invalid_json", "schema"))


def test_parse_strips_a_code_fence_in_the_prompt_dialect():
    fenced = completion(f"```json\n{json.dumps(ROLES)}\n```")
    assert parse(fenced, Schema.file(schemas.ROLES), dialect="prompt") == ROLES


# -- against fake servers -------------------------------------------------------------


def server(**kwargs: Any) -> Iterator[FakeServer]:
    with FakeServer(conversation, **kwargs) as fake:
        yield fake


@pytest.fixture
def llama_cpp_python() -> Iterator[FakeServer]:
    yield from server(rejects=LLAMA_CPP_PYTHON)


@pytest.fixture
def lm_studio() -> Iterator[FakeServer]:
    yield from server(rejects=LM_STUDIO)


def args(fake: FakeServer, *extra: str) -> list[str]:
    return ["--base-url", fake.base_url, "--model", "m", "--max-retries", "0", *extra, "x"]


def manifest_of(runs_dir) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return json.loads((only_run(runs_dir) / "run.json").read_text())


def test_json_schema_dialect_sends_the_strict_form(fake, invoke, runs_dir):
    result = invoke("generate", *args(fake, "--structured-output", "json_schema"))
    assert result.exit_code == 0, result.output
    (request,) = fake.chat_requests()
    assert request["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "roles",
            "schema": strict_schema(answer_schema(DirectorParameters()).document),
            "strict": True,
        },
    }
    assert manifest_of(runs_dir)["stages"]["director"]["structured_output"] == "json_schema"


def test_a_llama_cpp_server_is_recognised_and_gets_the_grammar_form(invoke, runs_dir):
    with FakeServer(conversation, props=LLAMA_CPP_PROPS) as llama_cpp:
        result = invoke("generate", *args(llama_cpp))
        assert result.exit_code == 0, result.output
        (request,) = llama_cpp.chat_requests()
    sent = request["response_format"]["json_schema"]["schema"]
    assert "pattern" not in json.dumps(sent)  # the strict form's length patterns
    prompt = sent["properties"]["roles"]["items"]["properties"]["system_prompt"]
    assert prompt["minLength"] == 10
    # capped to a share of the 2048-token budget, below the schema file's bound
    assert (
        prompt["maxLength"]
        < schemas.load(schemas.ROLES)["properties"]["roles"]["items"]["properties"][
            "system_prompt"
        ]["maxLength"]
    )
    director = manifest_of(runs_dir)["stages"]["director"]
    assert director["endpoint"]["server"] == "llama.cpp"
    assert director["schema_form"] == "grammar"


def test_an_unknown_server_gets_the_strict_form_and_that_is_recorded(fake, invoke, runs_dir):
    result = invoke("generate", *args(fake))
    assert result.exit_code == 0, result.output
    director = manifest_of(runs_dir)["stages"]["director"]
    assert "server" not in director["endpoint"]
    assert director["schema_form"] == "strict"


def test_json_with_raw_control_characters_in_strings_is_accepted():
    escaped = json.dumps(ROLES).replace("Could you suggest", "Could you\\nsuggest")
    raw = escaped.replace("\\n", "\n")  # a real line break inside the JSON string
    assert "\n" in raw
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)  # what the strict parser said before
    value = parse(completion(raw), Schema.file(schemas.ROLES), dialect="json_schema")
    assert value["opening_line"] == "Could you\nsuggest some topics for a paper on AI ethics?"


def test_json_object_dialect_sends_the_schema_as_llama_cpp_python_wants(
    llama_cpp_python, invoke, runs_dir
):
    result = invoke("generate", *args(llama_cpp_python, "--structured-output", "json_object"))
    assert result.exit_code == 0, result.output
    (request,) = llama_cpp_python.chat_requests()
    assert request["response_format"] == {
        "type": "json_object",
        "schema": grammar_safe(answer_schema(DirectorParameters()).document),
    }


def test_prompt_dialect_puts_the_schema_in_the_prompt(invoke, runs_dir):
    def ignores_response_format(body: dict[str, Any]) -> Reply:
        # like Anthropic's compatibility layer: response_format is ignored, the prompt is not
        prompt = body["messages"][-1]["content"]
        asked = "must satisfy this JSON Schema" in prompt and '"opening_line"' in prompt
        return Reply(f"```json\n{json.dumps(ROLES)}\n```" if asked else "Sure! Here are roles...")

    with FakeServer(ignores_response_format) as fake:
        result = invoke("generate", *args(fake, "--structured-output", "prompt"))
    assert result.exit_code == 0, result.output
    (request,) = fake.chat_requests()
    assert "response_format" not in request
    assert request["messages"][0]["content"].startswith("You are an expert at getting two")
    assert json.loads((only_run(runs_dir) / "director" / "roles.json").read_text()) == ROLES


def test_auto_falls_back_when_llama_cpp_python_rejects_json_schema_and_remembers_it(
    llama_cpp_python, invoke, runs_dir
):
    result = invoke("generate", *args(llama_cpp_python))
    assert result.exit_code == 0, result.output
    kinds = [r["response_format"]["type"] for r in llama_cpp_python.chat_requests()]
    assert kinds == ["json_schema", "json_object"]
    manifest = manifest_of(runs_dir)
    director = manifest["stages"]["director"]
    assert manifest["dialects"] == {llama_cpp_python.base_url: "json_object"}
    assert director["structured_output"] == "json_object"
    assert [(a["dialect"], a["outcome"]) for a in director["attempts"]] == [
        ("json_schema", "rejected"),
        ("json_object", "ok"),
    ]
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []

    run = only_run(runs_dir)
    again = invoke(
        "rerun", run.name, "director", "--base-url", llama_cpp_python.base_url, "--model", "m"
    )
    assert again.exit_code == 0, again.output
    kinds = [r["response_format"]["type"] for r in llama_cpp_python.chat_requests()]
    assert kinds == ["json_schema", "json_object", "json_object"]  # no second probe
    assert (run / "director" / "previous-1" / "roles.json").exists()
    # each attempt's calls are numbered from 1, the earlier ones kept with their attempt
    assert sorted(p.name for p in (run / "director" / "calls").iterdir()) == ["0001.json"]
    assert sorted(p.name for p in (run / "director" / "previous-1" / "calls").iterdir()) == [
        "0001.json",
        "0002.json",
    ]


def test_auto_uses_json_schema_on_lm_studio(lm_studio, invoke):
    result = invoke("generate", *args(lm_studio))
    assert result.exit_code == 0, result.output
    assert [r["response_format"]["type"] for r in lm_studio.chat_requests()] == ["json_schema"]


def test_an_explicit_dialect_the_server_rejects_is_a_clear_error(lm_studio, invoke, runs_dir):
    result = invoke("generate", *args(lm_studio, "--structured-output", "json_object"))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: {lm_studio.base_url} rejected the json_object response format (HTTP 400: "
        "'response_format.type' must be 'json_schema' or 'text'); "
        "use --structured-output auto or another dialect"
    )
    assert manifest_of(runs_dir)["stages"]["director"]["status"] == "failed"


# -- repair ----------------------------------------------------------------------------


def test_repair_succeeds_on_the_third_attempt_and_keeps_all_three(fake, invoke, runs_dir):
    bad_schema = {"roles": [ROLES["roles"][0]], "opening_line": "hi"}
    fake.add(Reply("{not json"), Reply(json.dumps(bad_schema)), Reply(json.dumps(ROLES)))
    result = invoke("generate", *args(fake))
    assert result.exit_code == 0, result.output

    director = only_run(runs_dir) / "director"
    requests = [json.loads((director / f"attempt-{n}.request.json").read_text()) for n in (1, 2, 3)]
    responses = [
        json.loads((director / f"attempt-{n}.response.json").read_text()) for n in (1, 2, 3)
    ]
    assert requests == fake.chat_requests()
    assert [r["choices"][0]["message"]["content"] for r in responses[:2]] == [
        "{not json",
        json.dumps(bad_schema),
    ]
    second = requests[1]["messages"]
    assert second[-2] == {"role": "assistant", "content": "{not json"}
    assert (
        "- $: not valid JSON: Expecting property name enclosed in double quotes"
        in (second[-1]["content"])
    )
    third = requests[2]["messages"]
    assert "- $.roles: [" in third[-1]["content"] and "is too short" in third[-1]["content"]
    assert len(third) == 5  # the prompt, then two answer-and-problems rounds
    assert json.loads((director / "request.json").read_text()) == requests[2]
    assert json.loads((director / "roles.json").read_text()) == ROLES

    stage = manifest_of(runs_dir)["stages"]["director"]
    assert stage["status"] == "done"
    assert [a["outcome"] for a in stage["attempts"]] == ["invalid_json", "schema", "ok"]
    assert stage["usage"] == {"prompt_tokens": 33, "completion_tokens": 21}  # all three counted


def test_repair_that_never_succeeds_fails_the_stage_and_keeps_everything(fake, invoke, runs_dir):
    fake.add(Reply("nope 1"), Reply("nope 2"), Reply(json.dumps({**ROLES, "roles": 3})))
    result = invoke("generate", *args(fake, "--yes"))
    assert result.exit_code == 1
    run = only_run(runs_dir)
    assert result.stderr.splitlines()[-1] == unusable_director_error(
        run, 3, "the answer does not match roles.schema.json: $.roles: 3 is not of type 'array'"
    )
    assert "Traceback" not in result.output
    assert len(fake.chat_requests()) == 3
    stage = manifest_of(runs_dir)["stages"]["director"]
    assert stage["status"] == "failed"
    assert stage["errors"] == ["$.roles: 3 is not of type 'array'"]
    assert [a["outcome"] for a in stage["attempts"]] == ["invalid_json", "invalid_json", "schema"]
    expected = ["director/prompt.txt"] + [
        f"director/attempt-{n}.{kind}.json" for n in (1, 2, 3) for kind in ("request", "response")
    ]
    assert sorted(stage["artifacts"]) == sorted(expected)
    assert all((run / a).exists() for a in expected)


def test_a_cut_off_answer_is_asked_again_once_with_its_budget(fake, invoke):
    fake.add(*[Reply('{"roles": [', finish_reason="length")] * 2)
    result = invoke("generate", *args(fake), "--director-max-tokens", "300")
    assert result.exit_code == 1
    first, second = fake.chat_requests()
    assert "cut off at the limit of 300 tokens" not in first["messages"][-1]["content"]
    assert second["messages"][:-1] == first["messages"][:-1]
    assert second["messages"][-1]["content"].startswith(first["messages"][-1]["content"])
    assert "cut off at the limit of 300 tokens" in second["messages"][-1]["content"]
    assert "cut off at the token limit" in result.stderr
    assert "; raise --director-max-tokens; regenerate with: pipeline rerun" in result.stderr


def test_a_cut_off_answer_then_a_whole_one_succeeds(fake, invoke, runs_dir):
    fake.add(Reply('{"roles": [', finish_reason="length"), Reply(json.dumps(ROLES)))
    result = invoke("generate", *args(fake))
    assert result.exit_code == 0, result.output
    attempts = json.loads((only_run(runs_dir) / "run.json").read_text())["stages"]["director"][
        "attempts"
    ]
    assert [a["outcome"] for a in attempts] == ["length", "ok"]


def test_a_refusal_is_named_and_not_re_asked(fake, invoke, runs_dir):
    fake.add(Reply("", refusal="I can't help with that."))
    result = invoke("generate", *args(fake))
    assert result.exit_code == 1
    assert len(fake.chat_requests()) == 1
    run = only_run(runs_dir)
    assert result.stderr.splitlines()[-1] == unusable_director_error(
        run, 1, "the model refused: I can't help with that."
    )


# -- HTTP faults: the SDK's retries, then one-line errors ---------------------------------


def fault_run(invoke, fake, *extra: str):  # type: ignore[no-untyped-def]
    return invoke(
        "generate",
        "--base-url",
        fake.base_url,
        "--model",
        "m",
        "--yes",
        "--turns",
        "2",
        *extra,
        "x",
    )


def test_429_with_retry_after_is_waited_out(fake, invoke, runs_dir):
    fake.add(Status(429, "slow down", headers={"retry-after": "1"}))
    started = time.monotonic()
    result = fault_run(invoke, fake, "--max-retries", "1")
    elapsed = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert len(fake.chat_requests()) == 3  # the 429, the director, one turn
    assert elapsed >= 1.0  # the SDK honoured retry-after
    assert manifest_of(runs_dir)["stages"]["director"]["status"] == "done"


def test_429_that_persists_is_named(fake, invoke, runs_dir):
    fake.add(*[Status(429, "slow down", headers={"retry-after": "0"})] * 2)
    result = fault_run(invoke, fake, "--max-retries", "1")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: {fake.base_url} kept answering 429 (rate limited) after 2 attempt(s): "
        "slow down; wait and try again, or raise --max-retries"
    )
    assert manifest_of(runs_dir)["stages"]["director"]["status"] == "failed"


@pytest.mark.parametrize(("retries", "code"), [("2", 0), ("1", 1)])
def test_500_twice_then_200(fake, invoke, runs_dir, retries, code):
    fake.add(Status(500, "boom"), Status(500, "boom"))
    result = fault_run(invoke, fake, "--max-retries", retries)
    assert result.exit_code == code, result.output
    status = manifest_of(runs_dir)["stages"]["director"]["status"]
    if code == 0:
        assert status == "done"
        assert len(fake.chat_requests()) == 4
    else:
        assert status == "failed"
        assert result.stderr.splitlines()[-1] == (
            f"Error: {fake.base_url} answered HTTP 500 after 2 attempt(s): boom"
        )


@pytest.mark.parametrize(("resets", "code"), [(1, 0), (2, 1)])
def test_a_connection_reset(fake, invoke, runs_dir, resets, code):
    fake.add(*[Reset()] * resets)
    result = fault_run(invoke, fake, "--max-retries", "1")
    assert result.exit_code == code, result.output
    stage = manifest_of(runs_dir)["stages"]["director"]
    assert stage["status"] == ("done" if code == 0 else "failed")
    if code:
        assert result.stderr.splitlines()[-1].startswith(
            f"Error: the connection to {fake.base_url} broke ("
        )
        assert result.stderr.splitlines()[-1].endswith(
            "after 2 attempt(s); check the server and try again"
        )


def test_a_stall_ends_at_the_timeout(fake, invoke, runs_dir):
    fake.add(Stall(60), Stall(60))
    result = fault_run(invoke, fake, "--timeout", "2", "--max-retries", "1")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: {fake.base_url} did not answer within 2 s after 2 attempt(s); "
        "raise --timeout or check the server"
    )
    stage = manifest_of(runs_dir)["stages"]["director"]
    assert stage["status"] == "failed"
    assert stage["attempts"] == [
        {"number": 1, "dialect": "json_schema", "outcome": "error", "errors": [stage["error"]]}
    ]


def test_a_fault_during_the_dialogue_fails_that_stage_only(fake, invoke, runs_dir):
    fake.add(Reply(json.dumps(ROLES)), Status(503, "overloaded"))
    result = fault_run(invoke, fake, "--max-retries", "0")
    assert result.exit_code == 1
    stages = manifest_of(runs_dir)["stages"]
    assert (stages["director"]["status"], stages["dialogue"]["status"]) == ("done", "failed")
    assert stages["dialogue"]["error"] == (
        f"{fake.base_url} answered HTTP 503 after 1 attempt(s): overloaded"
    )

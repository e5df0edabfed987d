"""A model per role: the config file, its errors, and runs whose roles use different
endpoints (two fake servers)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pipeline import schemas
from pipeline.config import EmbeddedModel, Endpoint, load_config
from pipeline.errors import ConfigError

from .conftest import ROLES, conversation, only_run, read_jsonl
from .fakeserver import FakeServer, Reply


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_an_embedded_endpoint_may_name_its_gguf_relative_to_the_config_file(tmp_path):
    path = write(
        tmp_path,
        """
        [endpoints.big]
        embedded = true
        gguf = "models/qwen.gguf"

        [endpoints.small]
        embedded = true
        """,
    )
    config = load_config(path)
    assert config is not None
    assert config.endpoints["big"] == EmbeddedModel(tmp_path / "models" / "qwen.gguf")
    assert config.endpoints["small"] == EmbeddedModel(None)


def test_gguf_on_a_server_endpoint_is_an_error(tmp_path):
    path = write(
        tmp_path, '[endpoints.a]\nbase_url = "http://x/v1"\nmodel = "m"\ngguf = "a.gguf"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.message == (
        f"{path}: endpoints.a.gguf: only an embedded endpoint serves a GGUF file "
        "(add embedded = true, or remove gguf)"
    )


def test_a_config_file_defines_and_assigns_endpoints(tmp_path):
    path = write(
        tmp_path,
        """
        [endpoints.fast]
        base_url = "http://127.0.0.1:9001/v1/"
        model = "small"
        params = { top_p = 0.9 }

        [endpoints.smart]
        base_url = "https://api.openai.com/v1"
        model = "gpt-x"
        api_key_env = "OPENAI_API_KEY"
        structured_output = "json_schema"

        [endpoints.offline]
        embedded = true

        [assign]
        director = "smart"
        default = "fast"
        roles = { Mentor = "smart", 3 = "offline" }
    """,
    )
    config = load_config(None, cwd=tmp_path)
    assert config is not None and config.path == path
    assert config.endpoints["fast"] == Endpoint(
        "http://127.0.0.1:9001/v1", "small", None, params={"top_p": 0.9}
    )
    assert config.endpoints["smart"] == Endpoint(
        "https://api.openai.com/v1", "gpt-x", "OPENAI_API_KEY", structured_output="json_schema"
    )
    assert config.endpoints["offline"] == EmbeddedModel(None)
    assert config.name_for("director") == "smart"
    assert config.name_for("moderator") == "fast"  # the default
    assert [config.name_for_role(i, n) for i, n in enumerate(["Student", "Mentor", "Critic"])] == [
        "fast",
        "smart",
        "offline",
    ]
    assert config.unknown_roles(["Student", "Mentor", "Critic"]) == []
    assert config.unknown_roles(["Student", "Teacher"]) == ["Mentor", "3"]


def test_no_file_means_no_config(tmp_path):
    assert load_config(None, cwd=tmp_path) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[endpoints.a]\nbase_url = "http://x/v1"\nmodle = "m"\n',
            "endpoints.a.modle: unknown key (known here: api_key_env, base_url, embedded, gguf, "
            "model, params, structured_output)",
        ),
        (
            '[endpoints.a]\nbase_url = "http://x/v1"\n',
            "endpoints.a: needs model (or embedded = true)",
        ),
        (
            '[endpoints.a]\nembedded = true\n[assign]\ndirector = "b"\n',
            "assign.director: no endpoint named 'b' (defined: a)",
        ),
        (
            '[endpoints.a]\nembedded = true\n[assign]\nroles = ["a", "c"]\n',
            "assign.roles[1]: no endpoint named 'c' (defined: a)",
        ),
        (
            '[endpoints.a]\nembedded = true\n[assign]\nmentor = "a"\n',
            "assign.mentor: unknown key (known here: default, director, finetune, judge, "
            "moderator, roles)",
        ),
        (
            '[endpoints.a]\nbase_url = "localhost:1"\nmodel = "m"\n',
            "endpoints.a.base_url: 'localhost:1' does not match '^https?://'",
        ),
        ("[endpoints\n", "not valid TOML"),
        (
            "[endpoint.a]\nembedded = true\n",
            "endpoint: unknown key (known here: assign, endpoints, mcp, personas)",
        ),
    ],
)
def test_config_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.message.startswith(f"{path}: {message}")


def test_a_missing_config_file_given_explicitly(invoke, tmp_path):
    missing = tmp_path / "nope.toml"
    result = invoke("generate", "--config", str(missing), "x")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {missing}: no such config file\n"


def test_each_role_on_its_own_endpoint(invoke, runs_dir, tmp_path, monkeypatch):
    with (
        FakeServer(conversation, model="model-a") as a,
        FakeServer(conversation, model="model-b") as b,
    ):
        write(
            tmp_path,
            f"""
            [endpoints.a]
            base_url = "{a.base_url}"
            model = "model-a"
            params = {{ top_p = 0.5, seed = 7 }}

            [endpoints.b]
            base_url = "{b.base_url}"
            model = "model-b"
            structured_output = "json_object"

            [assign]
            director = "b"
            roles = ["a", "b"]
        """,
        )
        monkeypatch.chdir(tmp_path)
        result = invoke("generate", "--yes", "--turns", "5", "x")
        assert result.exit_code == 0, result.output
        a_requests, b_requests = a.chat_requests(), b.chat_requests()

    assert b_requests[0]["response_format"]["type"] == "json_object"  # the director, on b
    assert len(a_requests) == 2 and len(b_requests) == 3  # turns 3, 5 on a; 2, 4 on b
    assert all(r["top_p"] == 0.5 and r["seed"] == 7 for r in a_requests)
    assert all("top_p" not in r for r in b_requests)
    lines = read_jsonl(only_run(runs_dir) / "dialogue" / "transcript.jsonl")
    assert [(line["base_url"], line["model"]) for line in lines] == [
        (None, None),
        (b.base_url, "model-b"),
        (a.base_url, "model-a"),
        (b.base_url, "model-b"),
        (a.base_url, "model-a"),
    ]
    manifest = json.loads((only_run(runs_dir) / "run.json").read_text())
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []
    endpoints = manifest["stages"]["dialogue"]["role_endpoints"]
    assert endpoints[0]["model"] == "model-a"  # the Student
    assert endpoints[0]["params"] == {"top_p": 0.5, "seed": 7}
    assert endpoints[1]["model"] == "model-b"
    assert manifest["stages"]["director"]["endpoint"]["base_url"] == b.base_url


def test_params_the_sdk_does_not_name_reach_the_server(invoke, tmp_path, monkeypatch, fake):
    """A server's own request fields (llama.cpp's top_k, grammar), which the openai SDK
    takes only in extra_body, are sent in the JSON body like the others (a regression: the
    SDK refused them as unknown keyword arguments)."""
    write(
        tmp_path,
        f"""
        [endpoints.a]
        base_url = "{fake.base_url}"
        model = "m"
        params = {{ top_k = 1, grammar = 'root ::= "hi"', top_p = 0.5 }}

        [assign]
        default = "a"
    """,
    )
    monkeypatch.chdir(tmp_path)
    result = invoke("generate", "--yes", "--turns", "2", "x")
    assert result.exit_code == 0, result.output
    requests = fake.chat_requests()
    assert len(requests) == 2  # the director and turn 2
    assert all(
        (r["top_k"], r["grammar"], r["top_p"]) == (1, 'root ::= "hi"', 0.5) for r in requests
    )
    assert all("extra_body" not in r for r in requests)


def test_flags_override_the_config_file(invoke, runs_dir, tmp_path, monkeypatch, fake):
    write(
        tmp_path,
        '[endpoints.a]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n[assign]\ndefault = "a"\n',
    )
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "generate", "--base-url", fake.base_url, "--model", "f", "--yes", "--turns", "2", "x"
    )
    assert result.exit_code == 0, result.output
    assert len(fake.chat_requests()) == 2


def test_an_assignment_to_an_unknown_role_is_a_warning(
    invoke, runs_dir, tmp_path, monkeypatch, fake
):
    write(
        tmp_path,
        f'[endpoints.a]\nbase_url = "{fake.base_url}"\nmodel = "m"\n'
        '[assign]\ndefault = "a"\nroles = { Teacher = "a" }\n',
    )
    monkeypatch.chdir(tmp_path)
    result = invoke("generate", "--yes", "--turns", "2", "x")
    assert result.exit_code == 0, result.output
    assert (
        f"warning: {tmp_path / 'pipeline.toml'}: assign.roles.Teacher: no role is called Teacher"
    ) in result.stderr


def test_the_usage_ledger_counts_each_role_and_stage(invoke, runs_dir, fake):
    fake.add(Reply(json.dumps(ROLES), usage={"prompt_tokens": 100, "completion_tokens": 50}))
    result = invoke(
        "generate", "--base-url", fake.base_url, "--model", "m", "--yes", "--turns", "4", "x"
    )
    assert result.exit_code == 0, result.output
    stages = json.loads((only_run(runs_dir) / "run.json").read_text())["stages"]
    assert stages["director"]["usage"] == {"prompt_tokens": 100, "completion_tokens": 50}
    assert stages["dialogue"]["usage"] == {"prompt_tokens": 33, "completion_tokens": 21}
    assert stages["dialogue"]["usage_by_role"] == {
        "Mentor": {"prompt_tokens": 22, "completion_tokens": 14},
        "Student": {"prompt_tokens": 11, "completion_tokens": 7},
    }
    shown = invoke("show", only_run(runs_dir).name).stdout
    assert "Director: done; m at " in shown and "100 prompt + 50 completion tokens" in shown
    assert "33 prompt + 21 completion tokens" in shown


def test_endpoints_on_one_server_and_model_keep_their_own_params_and_key(
    invoke, runs_dir, tmp_path, monkeypatch, fake
):
    """Clients are kept per whole endpoint, not per server and model: two endpoints that
    differ only in their params and key each send their own (a regression)."""
    monkeypatch.setenv("KEY_ONE", "key-one")
    monkeypatch.setenv("KEY_TWO", "key-two")
    write(
        tmp_path,
        f"""
        [endpoints.one]
        base_url = "{fake.base_url}"
        model = "m"
        api_key_env = "KEY_ONE"
        params = {{ temperature = 0.2, top_p = 0.5 }}

        [endpoints.two]
        base_url = "{fake.base_url}"
        model = "m"
        api_key_env = "KEY_TWO"
        params = {{ top_p = 0.9 }}

        [assign]
        director = "one"
        roles = ["one", "two"]
    """,
    )
    monkeypatch.chdir(tmp_path)
    result = invoke("generate", "--yes", "--turns", "4", "x")
    assert result.exit_code == 0, result.output
    sent = [
        (r.headers["authorization"], r.body["temperature"], r.body["top_p"])
        for r in fake.received
        if r.path.endswith("/chat/completions")
    ]
    assert sent == [
        ("Bearer key-one", 0.2, 0.5),  # the director, on one
        ("Bearer key-two", 0.7, 0.9),  # turn 2: the Mentor, role 2, on two
        ("Bearer key-one", 0.2, 0.5),  # turn 3: the Student, role 1, on one
        ("Bearer key-two", 0.7, 0.9),  # turn 4: the Mentor
    ]
    manifest = json.loads((only_run(runs_dir) / "run.json").read_text())
    described = manifest["stages"]["dialogue"]["role_endpoints"]
    assert [(d["api_key_env"], d["params"]) for d in described] == [
        ("KEY_ONE", {"temperature": 0.2, "top_p": 0.5}),
        ("KEY_TWO", {"top_p": 0.9}),
    ]

"""The CLI end to end against the fake OpenAI-compatible server (real HTTP, real openai client)."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from pipeline import __version__, schemas
from pipeline.cli import cli
from pipeline.dialogue import role_prompt
from pipeline.director import answer_schema
from pipeline.local import free_port
from pipeline.parameters import DirectorParameters
from pipeline.records import RolesDocument
from pipeline.structured import strict_schema

from .conftest import ROLES, only_run, read_jsonl, unusable_director_error
from .fakeserver import FakeServer, Reply, Status


def endpoint_args(fake: FakeServer) -> list[str]:
    return ["--base-url", fake.base_url, "--model", "fake-model", "--max-retries", "0"]


def test_generate_yes_prints_roles_then_streams_every_turn(fake, invoke, runs_dir):
    result = invoke("generate", *endpoint_args(fake), "--yes", "--turns", "4", "write a paper")

    assert result.exit_code == 0, result.output
    run_dir = only_run(runs_dir)
    run_id = run_dir.name
    assert result.stdout == (
        "Role 1: Student (speaks first)\n"
        f"{ROLES['roles'][0]['system_prompt']}\n\n"
        "Role 2: Mentor\n"
        f"{ROLES['roles'][1]['system_prompt']}\n\n"
        "Opening line (Student)\n"
        f"{ROLES['opening_line']}\n"
        "\n[1] Student\n"
        f"{ROLES['opening_line']}\n"
        "\n[2] Mentor\nreply 2\n"
        "\n[3] Student\nreply 3\n"
        "\n[4] Mentor\nreply 4\n"
        f"\nrun {run_id} done (ended by max_turns at turn 4): {run_dir}\n"
    )
    assert result.stderr == f"run {run_id}: asking the director (fake-model)...\n"


def test_generate_persists_every_stage(fake, invoke, runs_dir):
    result = invoke("generate", *endpoint_args(fake), "--yes", "--turns", "5", "write a paper")
    assert result.exit_code == 0, result.output
    run = only_run(runs_dir)
    assert re.fullmatch(r"\d{8}T\d{6}Z-write-a-paper", run.name)

    manifest = json.loads((run / "run.json").read_text())
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []
    assert {k: v["status"] for k, v in manifest["stages"].items()} == {
        "director": "done",
        "dialogue": "done",
        "judge": "pending",
        "reflect": "pending",
    }
    assert manifest["stages"]["director"]["endpoint"]["base_url"] == fake.base_url
    assert manifest["stages"]["dialogue"]["parameters"]["turns"] == 5
    assert manifest["stages"]["dialogue"]["usage"] == {"prompt_tokens": 44, "completion_tokens": 28}

    director = run / "director"
    roles = json.loads((director / "roles.json").read_text())
    assert roles == ROLES
    assert "write a paper" in (director / "prompt.txt").read_text()
    request = json.loads((director / "request.json").read_text())
    assert request == fake.chat_requests()[0]  # exactly what was sent
    response = json.loads((director / "response.json").read_text())
    assert json.loads(response["choices"][0]["message"]["content"]) == ROLES

    lines = read_jsonl(run / "dialogue" / "transcript.jsonl")
    assert [line["turn"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["role_index"] for line in lines] == [0, 1, 0, 1, 0]
    assert [line["role"] for line in lines] == ["Student", "Mentor", "Student", "Mentor", "Student"]
    assert lines[0]["content"] == ROLES["opening_line"]
    assert lines[0]["generated"] is False
    assert [line["content"] for line in lines[1:]] == ["reply 2", "reply 3", "reply 4", "reply 5"]
    for line in lines:
        assert schemas.errors(line, schemas.TRANSCRIPT_LINE) == []
    md = (run / "dialogue" / "transcript.md").read_text()
    assert md.startswith("# write a paper\n")
    assert "**Mentor**: reply 4" in md


def test_each_role_sees_its_own_turns_as_assistant(fake, invoke):
    result = invoke("generate", *endpoint_args(fake), "--yes", "--turns", "4", "write a paper")
    assert result.exit_code == 0, result.output
    turn_requests = fake.chat_requests()[1:]
    assert all(r["stream"] is True for r in turn_requests)
    # turn 4 is the Mentor's second turn
    assert turn_requests[2]["messages"] == [
        {"role": "system", "content": role_prompt(RolesDocument.from_json(ROLES), 1)},
        {"role": "user", "content": ROLES["opening_line"]},
        {"role": "assistant", "content": "reply 2"},
        {"role": "user", "content": "reply 3"},
    ]
    # turn 3 is the Student's: the opening line was its own
    assert [m["role"] for m in turn_requests[1]["messages"]] == ["system", "assistant", "user"]


def test_director_request_uses_json_schema_for_a_remote_server(fake, invoke):
    invoke("generate", *endpoint_args(fake), "--yes", "--turns", "1", "write a paper")
    response_format = fake.chat_requests()[0]["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True
    narrowed = answer_schema(DirectorParameters()).document
    assert response_format["json_schema"]["schema"] == strict_schema(narrowed)


def test_without_a_terminal_it_stops_after_the_director_and_prints_the_next_command(
    fake, invoke, runs_dir
):
    result = invoke("generate", *endpoint_args(fake), "write a paper")
    assert result.exit_code == 0, result.output
    run = only_run(runs_dir)
    assert result.stdout.splitlines()[-1] == f"pipeline converse {run.name} --runs-dir {runs_dir}"
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["director"]["status"] == "done"
    assert manifest["stages"]["dialogue"]["status"] == "pending"
    assert len(fake.chat_requests()) == 1

    cont = invoke("converse", run.name, *endpoint_args(fake), "--turns", "3")
    assert cont.exit_code == 0, cont.output
    lines = read_jsonl(run / "dialogue" / "transcript.jsonl")
    assert [line["content"] for line in lines] == [ROLES["opening_line"], "reply 2", "reply 3"]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["dialogue"]["status"] == "done"


def test_converse_reuses_the_directors_endpoint_when_none_is_given(fake, invoke, runs_dir):
    invoke("generate", *endpoint_args(fake), "write a paper")
    run = only_run(runs_dir)
    result = invoke("converse", run.name, "--turns", "2")
    assert result.exit_code == 0, result.output
    assert len(fake.chat_requests()) == 2


def test_converse_again_keeps_the_previous_transcript(fake, invoke, runs_dir):
    invoke("generate", *endpoint_args(fake), "--yes", "--turns", "2", "write a paper")
    run = only_run(runs_dir)
    result = invoke("converse", run.name, *endpoint_args(fake), "--turns", "3")
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(run / "dialogue" / "previous-1" / "transcript.jsonl")) == 2
    assert len(read_jsonl(run / "dialogue" / "transcript.jsonl")) == 3


@pytest.mark.parametrize("task", ["", "   ", "\n\t "])
def test_empty_task_is_a_usage_error(invoke, runs_dir, task):
    result = invoke("generate", task)
    assert result.exit_code == 2
    assert "the task is empty" in result.stderr
    assert not runs_dir.exists()


@pytest.mark.parametrize(
    ("run_id", "message"),
    [
        (
            "20261125T120000Z-nothing-here",
            "Error: no run 20261125T120000Z-nothing-here in {runs}; "
            "check the id, or pass --runs-dir where it lives\n",
        ),
        (
            "../etc",
            "Error: '../etc' is not a run id (they look like 20261125T120000Z-my-task); "
            "list the runs in {runs}\n",
        ),
        (
            "/tmp",
            "Error: '/tmp' is not a run id (they look like 20261125T120000Z-my-task); "
            "list the runs in {runs}\n",
        ),
        (
            "",
            "Error: '' is not a run id (they look like 20261125T120000Z-my-task); "
            "list the runs in {runs}\n",
        ),
    ],
)
def test_unknown_or_invalid_run_id_is_one_line_error(invoke, runs_dir, run_id, message):
    result = invoke("converse", run_id)
    assert result.exit_code == 1
    assert result.stderr == message.format(runs=runs_dir)


def test_unreachable_base_url_fails_in_one_line_and_keeps_the_run(invoke, runs_dir):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = invoke(
        "generate",
        "--base-url",
        url,
        "--model",
        "m",
        "--max-retries",
        "0",
        "--yes",
        "write a paper",
    )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 2  # the run line, then the error line
    error = result.stderr.splitlines()[-1]
    assert error.startswith(f"Error: cannot connect to {url}")
    assert "Traceback" not in result.output
    run = only_run(runs_dir)
    assert (run / "director" / "prompt.txt").read_text().strip()
    manifest = json.loads((run / "run.json").read_text())
    director = manifest["stages"]["director"]
    assert director["status"] == "failed"
    assert director["error"].startswith(f"cannot connect to {url}")
    assert "director/prompt.txt" in director["artifacts"]
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []


def test_debug_raises_instead_of_printing_one_line(runs_dir):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = CliRunner().invoke(
        cli,
        [
            "--debug",
            "generate",
            "--base-url",
            url,
            "--model",
            "m",
            "--max-retries",
            "0",
            "--runs-dir",
            str(runs_dir),
            "x",
        ],
    )
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "EndpointError"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (
            401,
            "needs an API key (HTTP 401); set OPENAI_API_KEY, or name the variable holding it "
            "with --api-key-env",
        ),
        (
            404,
            "answered 404 for model 'fake-model'; pass --model with a model that server "
            "serves, and check that --base-url is its API root (often /v1)",
        ),
        (400, "answered HTTP 400 after 1 attempt(s): scripted error"),
    ],
)
def test_http_errors_become_one_line_messages(fake, invoke, runs_dir, status, expected):
    fake.add(Status(status))
    result = invoke("generate", *endpoint_args(fake), "--yes", "write a paper")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == f"Error: {fake.base_url} {expected}"
    manifest = json.loads((only_run(runs_dir) / "run.json").read_text())
    assert manifest["stages"]["director"]["status"] == "failed"


def test_server_errors_are_retried_by_the_sdk(fake, invoke):
    fake.add(Status(500), Status(503))
    result = invoke(
        "generate",
        "--base-url",
        fake.base_url,
        "--model",
        "m",
        "--max-retries",
        "2",
        "--yes",
        "--turns",
        "2",
        "write a paper",
    )
    assert result.exit_code == 0, result.output
    assert len(fake.chat_requests()) == 4  # two failures, the director, one turn


def test_an_unusable_director_answer_fails_the_stage_and_keeps_it(fake, invoke, runs_dir):
    fake.add(Reply(json.dumps({**ROLES, "roles": []})))
    result = invoke("generate", *endpoint_args(fake), "--repair-attempts", "0", "--yes", "x")
    assert result.exit_code == 1
    run = only_run(runs_dir)
    assert result.stderr.splitlines()[-1] == unusable_director_error(
        run, 1, "the answer does not match roles.schema.json: $.roles: [] is too short"
    )
    assert (run / "director" / "attempt-1.response.json").exists()
    assert not (run / "director" / "roles.json").exists()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["director"]["status"] == "failed"
    assert manifest["stages"]["dialogue"]["status"] == "pending"


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (Reply('{"roles": [', finish_reason="length"), "cut off at the token limit"),
        (Reply("not json at all"), "is not valid JSON"),
        (Reply("{}", finish_reason="content_filter"), "content filter"),
    ],
)
def test_structured_failures_are_named(fake, invoke, reply, fragment):
    fake.add(reply, reply)  # a cut-off answer is asked again once
    result = invoke("generate", *endpoint_args(fake), "--repair-attempts", "0", "--yes", "x")
    assert result.exit_code == 1
    assert fragment in result.stderr.splitlines()[-1]


def test_length_cut_off_suggests_a_larger_limit(fake, invoke):
    fake.add(*[Reply('{"roles": [', finish_reason="length")] * 2)
    result = invoke("generate", *endpoint_args(fake), "--yes", "write a paper")
    assert "; raise --director-max-tokens; regenerate with: pipeline rerun" in result.stderr


def test_a_failing_turn_fails_the_dialogue_and_keeps_earlier_turns(fake, invoke, runs_dir):
    fake.add(Reply(json.dumps(ROLES)), Reply("reply 2"), Status(400, "context too long"))
    result = invoke("generate", *endpoint_args(fake), "--yes", "--turns", "5", "write a paper")
    assert result.exit_code == 1
    run = only_run(runs_dir)
    lines = read_jsonl(run / "dialogue" / "transcript.jsonl")
    assert [line["turn"] for line in lines] == [1, 2]
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["dialogue"]["status"] == "failed"
    assert "context too long" in manifest["stages"]["dialogue"]["error"]


def test_the_api_key_is_sent_but_never_written(fake, invoke, runs_dir):
    secret = "sk-test-0123456789abcdefghijklmnop"
    result = invoke(
        "generate",
        "--base-url",
        fake.base_url,
        "--model",
        "m",
        "--yes",
        "--turns",
        "3",
        "write a paper",
        env={"OPENAI_API_KEY": secret},
    )
    assert result.exit_code == 0, result.output
    assert fake.received[0].headers["authorization"] == f"Bearer {secret}"
    run = only_run(runs_dir)
    for path in run.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(), path
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["director"]["endpoint"]["api_key_env"] == "OPENAI_API_KEY"


def test_a_refused_key_names_its_variable(fake, invoke):
    fake.add(Status(401))
    result = invoke("generate", *endpoint_args(fake), "x", env={"OPENAI_API_KEY": "bad"})
    assert result.stderr.splitlines()[-1] == (
        f"Error: {fake.base_url} refused the API key in OPENAI_API_KEY (HTTP 401): "
        "check that it is valid for this server"
    )


def test_other_key_variable(fake, invoke, runs_dir):
    result = invoke(
        "generate",
        "--base-url",
        fake.base_url,
        "--model",
        "m",
        "--api-key-env",
        "MY_KEY",
        "--yes",
        "--turns",
        "1",
        "x",
        env={"MY_KEY": "k-1"},
    )
    assert result.exit_code == 0, result.output
    assert fake.received[0].headers["authorization"] == "Bearer k-1"


def test_task_is_passed_as_data_not_template(fake, invoke, runs_dir):
    task = "explain {{ 7*7 }} and {% raw %}"
    result = invoke("generate", *endpoint_args(fake), task)
    assert result.exit_code == 0, result.output
    prompt = (only_run(runs_dir) / "director" / "prompt.txt").read_text()
    assert task in prompt
    assert "49" not in prompt
    assert task in fake.chat_requests()[0]["messages"][0]["content"]


def test_runs_dir_from_environment(fake, tmp_path):
    root = tmp_path / "elsewhere"
    result = CliRunner().invoke(
        cli, ["generate", *endpoint_args(fake), "x"], env={"PIPELINE_RUNS_DIR": str(root)}
    )
    assert result.exit_code == 0, result.output
    assert only_run(root).name.endswith("-x")


def test_runs_dir_that_cannot_be_created(fake, invoke, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(
        cli, ["generate", *endpoint_args(fake), "--runs-dir", str(blocker / "runs"), "x"]
    )
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot create a run folder in {blocker / 'runs'}")


def test_generate_without_model_for_a_server_is_a_config_error(invoke):
    result = invoke("generate", "--base-url", "http://127.0.0.1:9/v1", "x")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: no model given for http://127.0.0.1:9/v1; "
        "pass --model NAME (or set PIPELINE_MODEL)\n"
    )


def test_converse_refuses_a_run_whose_director_failed(fake, invoke, runs_dir):
    fake.add(Reply("nope"))
    invoke("generate", *endpoint_args(fake), "--repair-attempts", "0", "x")
    run = only_run(runs_dir)
    result = invoke("converse", run.name, *endpoint_args(fake))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: the director stage of run {run.name} is failed, not done; "
        f"start a new run with: pipeline generate TASK --runs-dir {runs_dir}\n"
    )


def test_converse_refuses_roles_that_no_longer_match_the_schema(fake, invoke, runs_dir):
    invoke("generate", *endpoint_args(fake), "x")
    run = only_run(runs_dir)
    (run / "director" / "roles.json").write_text(json.dumps({**ROLES, "roles": []}))
    result = invoke("converse", run.name, *endpoint_args(fake))
    assert result.exit_code == 1
    assert "roles.json does not match roles.schema.json: $.roles: [] is too short" in (
        result.stderr
    )


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.stdout == f"converse-pipeline, version {__version__}\n"


def test_without_the_local_extra_and_no_endpoint_the_error_says_what_to_do(
    invoke, runs_dir, monkeypatch
):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "xllamacpp" else real_find_spec(name, *a),
    )
    result = invoke("generate", "--yes", "write a paper")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: no model endpoint is configured and the embedded engine is not installed; "
        "install it with pip install 'converse-pipeline[local]'; or point at a server with "
        "--base-url URL --model NAME (or OPENAI_BASE_URL)\n"
    )
    assert not runs_dir.exists()

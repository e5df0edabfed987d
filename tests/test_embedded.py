"""The real embedded model: llama.cpp's server (xllamacpp) with SmolLM2-135M-Instruct, over real
HTTP with the real openai client. Few turns and small token limits keep these quick."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import schemas, stages
from pipeline.client import ModelClient
from pipeline.director import answer_schema, load_roles
from pipeline.hub import DEFAULT_MODEL_NAME as MODEL_NAME
from pipeline.local import LocalServer, resolve_model
from pipeline.parameters import DirectorParameters
from pipeline.runs import create_run
from pipeline.structured import grammar_schema

from .conftest import only_run, read_jsonl

pytestmark = pytest.mark.embedded

TASK = "write a short paper on the ethics of AI"
DIRECTOR_MAX_TOKENS = 768  # keeps a rambling small model's director answers short
SERVER_LINE = re.compile(
    r"embedded model server started at (http://127\.0\.0\.1:\d+/v1) \(pid (\d+)\)"
)


@pytest.fixture(scope="session")
def embedded() -> Iterator[LocalServer]:
    with LocalServer(resolve_model()) as server:
        yield server


def offline_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "PIPELINE_")) or k == "PIPELINE_CACHE_DIR"
    }


def offline_pipeline(
    runs_dir: Path, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `pipeline ARGS --runs-dir RUNS_DIR` with no endpoint configured: the embedded model
    (with a short director answer for generate and batch)."""
    if args[0] in ("generate", "batch"):
        args = (*args, "--director-max-tokens", str(DIRECTOR_MAX_TOKENS))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--runs-dir", str(runs_dir)],
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def wait_until(condition, timeout: float = 60.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_models_endpoint_names_the_embedded_model(embedded):
    import openai

    client = openai.OpenAI(base_url=embedded.base_url, api_key="none")
    assert [m.id for m in client.models.list()] == [MODEL_NAME]


def test_director_on_the_embedded_model_returns_schema_valid_roles(embedded, tmp_path):
    run = create_run(tmp_path, TASK)
    params = DirectorParameters(max_tokens=DIRECTOR_MAX_TOKENS)
    client = ModelClient(embedded.endpoint())
    stages.run_stage(run, "director", stages.OneClient(client), stages.Plan.of(params))
    roles = load_roles(run).to_json()
    assert schemas.errors(roles, schemas.ROLES) == []
    request = json.loads(run.path("director/request.json").read_text())
    assert request["response_format"]["type"] == "json_schema"
    sent = request["response_format"]["json_schema"]["schema"]
    # the grammar form, unless a repair narrowed it further
    if len(run.stage("director").attempts or []) == 1:
        assert sent == grammar_schema(answer_schema(params).document, DIRECTOR_MAX_TOKENS)
    assert roles["termination"]["done_token"] == "<TASK_DONE>"  # the const held
    assert len({r["name"] for r in roles["roles"]}) == 2  # no duplicate names
    entry = run.stage("director")
    assert entry.schema_form == "grammar"
    assert entry.status == "done"
    assert entry.usage is not None and entry.usage.completion_tokens > 0


def test_generate_runs_offline_end_to_end(tmp_path):
    runs_dir = tmp_path / "runs"
    proc = offline_pipeline(
        runs_dir, "generate", "--yes", "--turns", "3", "--max-tokens", "32", TASK
    )
    assert proc.returncode == 0, proc.stderr
    run = only_run(runs_dir)
    assert proc.stdout.endswith(f": {run}\n")
    assert f"\nrun {run.name} done (ended by " in proc.stdout

    roles = json.loads((run / "director" / "roles.json").read_text())
    assert schemas.errors(roles, schemas.ROLES) == []
    lines = read_jsonl(run / "dialogue" / "transcript.jsonl")
    assert [line["turn"] for line in lines] == [1, 2, 3]
    assert [line["role_index"] for line in lines] == [0, 1, 0]
    assert lines[0]["content"] == roles["opening_line"]
    assert all(line["model"] == MODEL_NAME for line in lines[1:])
    manifest = json.loads((run / "run.json").read_text())
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []
    assert [manifest["stages"][s]["status"] for s in ("director", "dialogue")] == ["done", "done"]
    director = manifest["stages"]["director"]["endpoint"]
    assert director["embedded"] is True
    assert director["server"] == "llama.cpp"
    model = resolve_model()
    assert (director["gguf"], director["gguf_sha256"]) == (model.path, model.sha256)

    # one server, a slot per conversation: the director and both roles share it
    servers = dict(SERVER_LINE.findall(proc.stderr))
    role_urls = [e["base_url"] for e in manifest["stages"]["dialogue"]["role_endpoints"]]
    assert set(role_urls) == set(servers) == {director["base_url"]}
    assert not any(alive(int(pid)) for pid in servers.values())  # stopped on a normal exit


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_no_orphan_server_when_pipeline_is_stopped(tmp_path, signum):
    runs_dir = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "generate", "--yes", "--runs-dir", str(runs_dir), TASK],
        env={**offline_env(), "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        match = SERVER_LINE.search(proc.stderr.readline())
        assert match, "the server line comes first on stderr"
        server_pid = int(match.group(2))
        assert alive(server_pid)

        def director_running() -> bool:
            try:
                manifest = json.loads((only_run(runs_dir) / "run.json").read_text())
            except (AssertionError, FileNotFoundError, json.JSONDecodeError):
                return False
            return bool(manifest["stages"]["director"]["status"] == "running")

        assert wait_until(director_running)
        proc.send_signal(signum)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is
            pytest.fail(f"pipeline did not stop; its stacks:\n{proc.stderr.read()[-8000:]}")
        rest = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert wait_until(lambda: not alive(server_pid), timeout=15), "the server outlived pipeline"
    manifest = json.loads((only_run(runs_dir) / "run.json").read_text())
    director = manifest["stages"]["director"]
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert director["status"] == "running"  # nothing could record it; the pid is gone
    else:
        assert proc.returncode == 1
        assert (director["status"], director["error"]) == ("failed", "interrupted")
        run = only_run(runs_dir)
        assert f"interrupted; run {run.name} is kept in {run}\n" in rest
        assert (only_run(runs_dir) / "director" / "prompt.txt").exists()


@pytest.mark.parametrize(("interrupted", "how"), [(False, 0), (True, -signal.SIGKILL)])
def test_the_server_stops_politely_unless_interrupted(interrupted, how):
    """After Ctrl-C a request may be in flight; the server is killed rather than left to
    finish it."""

    class Interrupted(KeyboardInterrupt):
        pass

    server = LocalServer(resolve_model())
    with contextlib.suppress(Interrupted), server:
        if interrupted:
            raise Interrupted
    assert server.process is not None
    assert server.process.returncode == how


@pytest.mark.parametrize("sessions", [1, 2])
def test_one_embedded_server_serves_every_slot(sessions, monkeypatch):
    from pipeline import local
    from pipeline.endpoints import EmbeddedModel
    from pipeline.models import Models
    from pipeline.records import Role, RolesDocument, Termination

    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PIPELINE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    commands: list[list[str]] = []
    real_command = local.server_command

    def server_command(*args: Any, **kwargs: Any) -> list[str]:
        commands.append(real_command(*args, **kwargs))
        return commands[-1]

    monkeypatch.setattr(local, "server_command", server_command)
    roles_doc = RolesDocument(
        tuple(Role(name, "a prompt") for name in "ABC"), Termination("<T_D>", "A", "done"), "Hi"
    )
    with Models(sessions=sessions) as models:
        assert models.prepare(roles_doc) == [EmbeddedModel()] * 3  # launched, not waited for
        assert len(commands) == 1
        urls = {c.endpoint.base_url for c in models.roles(roles_doc)}
        urls |= {models.director().endpoint.base_url, models.moderator().endpoint.base_url}
        assert len(urls) == 1
        with urllib.request.urlopen(f"{urls.pop()}/models", timeout=10) as response:
            assert json.load(response)["data"][0]["id"] == MODEL_NAME
    (command,) = commands
    option = lambda name: int(command[command.index(name) + 1])  # noqa: E731
    assert option("--parallel") == local.SLOTS * sessions
    assert option("--ctx") == 8192 * sessions  # SmolLM2's training context, per dialogue


def test_serve_answers_in_the_foreground_and_stops_on_ctrl_c():
    from pipeline.local import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--port", str(port)],
        env=offline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline() == (
            f"serving {MODEL_NAME} at http://127.0.0.1:{port}/v1 (Ctrl-C to stop)\n"
        )
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")

        def answers() -> bool:
            try:
                return [m.id for m in client.models.list()] == [MODEL_NAME]
            except openai.APIConnectionError:
                return False

        assert wait_until(answers)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert not alive(int(children[0]))


def test_a_llama_cpp_server_at_any_url_is_recognised_by_what_it_says(embedded, tmp_path):
    from pipeline.client import identify_server
    from pipeline.config import Endpoint

    unknown = Endpoint(embedded.base_url, MODEL_NAME, None)  # not flagged as embedded
    assert identify_server(unknown) == "llama.cpp"
    assert identify_server(Endpoint("http://127.0.0.1:9/v1", "m", None)) is None  # closed port


def test_a_three_role_meeting_on_the_embedded_model(tmp_path):
    runs_dir = tmp_path / "runs"
    proc = offline_pipeline(
        runs_dir,
        "generate",
        "--yes",
        "--roles",
        "3",
        "--turns",
        "4",
        "--max-tokens",
        "24",
        "--no-loop-detection",
        "plan a school trip to a science museum",
    )
    assert proc.returncode == 0, proc.stderr
    run = only_run(runs_dir)
    roles = json.loads((run / "director" / "roles.json").read_text())
    assert len(roles["roles"]) == 3
    lines = read_jsonl(run / "dialogue" / "transcript.jsonl")
    manifest = json.loads((run / "run.json").read_text())
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []
    reason = manifest["stages"]["dialogue"]["termination_reason"]
    assert reason in ("max_turns", "done_token", "empty_turn")
    if reason == "max_turns":
        assert [line["role_index"] for line in lines] == [0, 1, 2, 0]
    assert all(line["role_index"] == i % 3 for i, line in enumerate(lines))


def test_a_run_on_the_embedded_model_replays_byte_for_byte_with_no_server(tmp_path):
    from .test_replay import REPLAYED, assert_replayed_exactly

    runs_dir = tmp_path / "runs"
    generate = offline_pipeline(
        runs_dir, "generate", "--yes", "--turns", "3", "--max-tokens", "24", TASK
    )
    assert generate.returncode == 0, generate.stderr
    original = only_run(runs_dir)
    replay = offline_pipeline(runs_dir, "replay", original.name, "--into", REPLAYED)
    assert replay.returncode == 0, replay.stderr
    assert "embedded model server started" not in replay.stderr  # no model was needed
    assert_replayed_exactly(original, runs_dir / REPLAYED)


def test_the_judge_stage_on_the_embedded_model(tmp_path):
    runs_dir = tmp_path / "runs"
    proc = offline_pipeline(
        runs_dir, "generate", "--yes", "--judge", "--turns", "2", "--max-tokens", "24", TASK
    )
    assert proc.returncode == 0, proc.stderr
    run = only_run(runs_dir)
    verdict = json.loads((run / "judge" / "verdict.json").read_text())
    assert schemas.errors(verdict, "verdict.schema.json") == []
    assert f"Verdict: {'completed' if verdict['completed'] else 'not completed'}, score " in (
        proc.stdout
    )
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["judge"]["status"] == "done"
    assert manifest["stages"]["judge"]["structured_output"] == "json_schema"


def test_model_file_serves_a_gguf_given_as_a_path_and_a_run_keeps_its_model(tmp_path):
    model = resolve_model()
    copy = tmp_path / "my-model.gguf"
    copy.symlink_to(model.path)
    runs_dir = tmp_path / "runs"
    proc = offline_pipeline(
        runs_dir, "generate", "--yes", "--model-file", str(copy), "--turns", "2",
        "--max-tokens", "16", TASK,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run = only_run(runs_dir)
    manifest = json.loads((run / "run.json").read_text())
    director = manifest["stages"]["director"]["endpoint"]
    assert (director["gguf"], director["gguf_sha256"]) == (model.path, model.sha256)

    # the run records the file by sha256: another file is refused, before any server starts
    other = tmp_path / "other.gguf"
    other.write_bytes(Path(model.path).read_bytes()[:-1] + b"x")  # same size, other bytes
    rerun = offline_pipeline(runs_dir, "rerun", run.name, "dialogue", "--model-file", str(other))
    assert rerun.returncode == 1
    assert rerun.stderr.startswith(
        f"Error: this run was made with the embedded model {model.path}, not {other}"
    )
    assert "embedded model server started" not in rerun.stderr
    assert json.loads((run / "run.json").read_text())["stages"]["dialogue"]["status"] == "done"


def test_a_batch_with_two_jobs_on_the_embedded_model(tmp_path):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("write a haiku about rain\nlist three uses of a paperclip\n")
    runs_dir = tmp_path / "runs"
    proc = offline_pipeline(
        runs_dir, "batch", str(tasks), "-j", "2", "--turns", "2", "--max-tokens", "16"
    )
    assert proc.returncode == 0, proc.stderr
    runs = sorted(p for p in runs_dir.iterdir() if p.is_dir() and (p / "run.json").exists())
    assert len(runs) == 2
    for run in runs:
        manifest = json.loads((run / "run.json").read_text())
        assert manifest["stages"]["dialogue"]["status"] == "done"
        assert len(read_jsonl(run / "dialogue" / "transcript.jsonl")) == 2
    assert len(SERVER_LINE.findall(proc.stderr)) == 1  # one server, continuous batching

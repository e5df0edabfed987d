"""Stages as crash-safe units: resume after a kill, one writer per run, edit and rerun,
listing and showing runs. Real subprocesses against the fake server where it matters."""

from __future__ import annotations

import _thread
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import schemas

from .conftest import ROLES, only_run, read_jsonl, run_folders
from .fakeserver import Action, FakeServer, Reply

TURNS = 6


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}


def pipeline(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def slow_conversation(body: dict[str, Any]) -> Action:
    """Roles for the director; for turn N, "reply N" and some words streamed slowly."""
    if body.get("response_format"):
        return Reply(json.dumps(ROLES))
    n = len(body["messages"])
    return Reply(
        f"reply {n} on section {n}, point {n * 7}, note {n * 13}, draft {n * 31}", pause=0.01
    )


@pytest.fixture
def slow_fake():  # type: ignore[no-untyped-def]
    with FakeServer(slow_conversation) as server:
        yield server


def endpoint(fake: FakeServer) -> list[str]:
    return ["--base-url", fake.base_url, "--model", "m"]


def assert_complete(run: Path, turns: int = TURNS) -> None:
    """The run is whole: both stages done, exactly ``turns`` well-formed alternating turns."""
    manifest = json.loads((run / "run.json").read_text())
    assert schemas.errors(manifest, schemas.RUN_MANIFEST) == []
    assert {s: manifest["stages"][s]["status"] for s in ("director", "dialogue")} == {
        "director": "done",
        "dialogue": "done",
    }
    lines = read_jsonl(run / "dialogue" / "transcript.jsonl")
    assert [line["turn"] for line in lines] == list(range(1, turns + 1))
    assert [line["role_index"] for line in lines] == [(t - 1) % 2 for t in range(1, turns + 1)]
    assert lines[0]["content"] == ROLES["opening_line"]
    for line in lines:
        assert schemas.errors(line, schemas.TRANSCRIPT_LINE) == []
        if line["turn"] > 1:
            assert line["content"].split()[:2] == ["reply", str(line["turn"])]


def _generate(runs_dir: Path, fake: FakeServer) -> subprocess.Popen[str]:
    return pipeline(
        "generate",
        "--yes",
        "--turns",
        str(TURNS),
        "--runs-dir",
        str(runs_dir),
        *endpoint(fake),
        "x",
    )


def _manifest_appears(runs_dir: Path, proc: subprocess.Popen[str]) -> float:
    """Wait until the run's manifest exists (or the process ends); return when it did."""
    deadline = time.monotonic() + 60
    while not list(runs_dir.glob("*/run.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no run was created"
        time.sleep(0.005)
    return time.monotonic()


def test_resume_completes_runs_killed_at_random_moments(slow_fake, tmp_path):
    """SIGKILL `pipeline generate` at random moments of its run; `pipeline resume` must
    finish every run. KILL_TEST_SEED changes the moments."""
    seed = int(os.environ.get("KILL_TEST_SEED", "20261125"))
    rng = random.Random(seed)
    # how long a whole run lasts once its folder exists, to spread the kills over it
    whole = _generate(tmp_path / "whole", slow_fake)
    created = _manifest_appears(tmp_path / "whole", whole)
    assert whole.wait(timeout=60) == 0
    span = time.monotonic() - created

    outcomes = []
    for trial in range(24):
        runs_dir = tmp_path / f"trial-{trial}"
        proc = _generate(runs_dir, slow_fake)
        _manifest_appears(runs_dir, proc)
        moment = rng.uniform(0, span)
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        (manifest,) = runs_dir.glob("*/run.json")
        run = manifest.parent
        before = json.loads(manifest.read_text())["stages"]
        outcomes.append((before["director"]["status"], before["dialogue"]["status"]))
        resume = pipeline("resume", run.name, "--runs-dir", str(runs_dir), *endpoint(slow_fake))
        _out, err = resume.communicate(timeout=60)
        assert resume.returncode == 0, (seed, trial, moment, err)
        assert_complete(run)
    # the kills landed in different places: during the director and during the dialogue
    assert any(director != "done" for director, _ in outcomes), outcomes
    assert any(dialogue == "running" for _, dialogue in outcomes), outcomes


def test_resume_drops_a_half_written_last_turn(fake, invoke, runs_dir):
    result = invoke("generate", *endpoint(fake), "--yes", "--turns", "3", "x")
    assert result.exit_code == 0, result.output
    run = only_run(runs_dir)
    transcript = run / "dialogue" / "transcript.jsonl"
    complete = transcript.read_text()
    # a crash during turn 4 of 5: the stage is left running by a process that is gone
    with transcript.open("a") as f:
        f.write('{"turn": 4, "role": "Mentor", "content": "half a')
    manifest = json.loads((run / "run.json").read_text())
    manifest["stages"]["dialogue"].update(status="running", pid=2**22 + 12345)
    manifest["stages"]["dialogue"]["parameters"]["turns"] = 5
    (run / "run.json").write_text(json.dumps(manifest))

    listing = invoke("runs")
    assert "interrupted" in listing.stdout

    result = invoke("resume", run.name, *endpoint(fake))
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"run {run.name}: resuming the dialogue at turn 4 of 5\n")
    lines = read_jsonl(transcript)
    assert [line["turn"] for line in lines] == [1, 2, 3, 4, 5]
    assert transcript.read_text().startswith(complete)  # the complete turns were kept as they were
    assert "half a" not in transcript.read_text()
    # only turns 4 and 5 were asked for
    assert [len(r["messages"]) for r in fake.chat_requests()[-2:]] == [4, 5]
    stage = json.loads((run / "run.json").read_text())["stages"]["dialogue"]
    assert (stage["status"], stage["resumed_at_turn"], stage["turns"]) == ("done", 4, 5)
    assert stage["termination_reason"] == "max_turns"


def test_resume_of_a_complete_run_does_nothing(fake, invoke, runs_dir):
    invoke("generate", *endpoint(fake), "--yes", "--turns", "2", "x")
    run = only_run(runs_dir)
    sent = len(fake.chat_requests())
    result = invoke("resume", run.name, *endpoint(fake))
    assert result.exit_code == 0
    assert result.stdout == f"run {run.name} is complete; nothing to resume\n"
    assert len(fake.chat_requests()) == sent


def test_resume_refuses_a_transcript_that_does_not_follow_from_the_roles(fake, invoke, runs_dir):
    invoke("generate", *endpoint(fake), "--yes", "--turns", "3", "x")
    run = only_run(runs_dir)
    transcript = run / "dialogue" / "transcript.jsonl"
    lines = read_jsonl(transcript)
    lines[1]["turn"] = 7
    transcript.write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = json.loads((run / "run.json").read_text())
    manifest["stages"]["dialogue"]["status"] = "failed"
    (run / "run.json").write_text(json.dumps(manifest))
    result = invoke("resume", run.name, *endpoint(fake))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] + "\n" == (
        f"Error: turn 2 of the transcript of run {run.name} does not follow from its roles; "
        f"start the dialogue again with: pipeline rerun {run.name} dialogue --runs-dir {runs_dir}\n"
    )


def test_resume_redoes_a_director_stage_that_failed(fake, invoke, runs_dir):
    fake.add(Reply("not json"))
    invoke("generate", *endpoint(fake), "--repair-attempts", "0", "--yes", "--turns", "2", "x")
    run = only_run(runs_dir)
    result = invoke("resume", run.name, *endpoint(fake))
    assert result.exit_code == 0, result.output
    assert (run / "director" / "previous-1" / "attempt-1.response.json").exists()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["director"]["parameters"]["repair_attempts"] == 0  # as asked first
    assert_complete(run, turns=2)  # the dialogue had never run: the turns generate planned


def test_only_one_process_writes_a_run(invoke, runs_dir, tmp_path):
    gate = threading.Event()

    def gated(body: dict[str, Any]) -> Action:
        if body.get("response_format"):
            return Reply(json.dumps(ROLES))
        return Reply(f"reply {len(body['messages'])}", gate=gate)

    with FakeServer(gated) as fake:
        assert invoke("generate", *endpoint(fake), "x").exit_code == 0
        run = only_run(runs_dir)
        args = ("converse", run.name, "--runs-dir", str(runs_dir), "--turns", "3", *endpoint(fake))
        first = pipeline(*args)
        try:
            manifest = run / "run.json"
            deadline = time.monotonic() + 30
            while json.loads(manifest.read_text())["stages"]["dialogue"]["status"] != "running":
                assert time.monotonic() < deadline, "the first converse never started"
                time.sleep(0.02)
            second = pipeline(*args)
            _out, err = second.communicate(timeout=30)
            assert second.returncode == 1
            assert err == (
                f"Error: run {run.name} is in use by another pipeline process; "
                "wait for it to finish, or stop it\n"
            )
        finally:
            gate.set()
        _out, err = first.communicate(timeout=30)
        assert first.returncode == 0, err
    assert len(read_jsonl(run / "dialogue" / "transcript.jsonl")) == 3


def test_converse_does_not_redo_a_dialogue_done_with_the_same_inputs(fake, invoke, runs_dir):
    invoke("generate", *endpoint(fake), "--yes", "--turns", "3", "x")
    run = only_run(runs_dir)
    sent = len(fake.chat_requests())
    same = invoke("converse", run.name, *endpoint(fake), "--turns", "3")
    assert same.exit_code == 0
    assert same.stdout == (
        f"the dialogue of run {run.name} is already done with these inputs; "
        f"to redo it: pipeline rerun {run.name} dialogue --runs-dir {runs_dir}\n"
    )
    assert len(fake.chat_requests()) == sent
    other = invoke("converse", run.name, *endpoint(fake), "--turns", "4")
    assert other.exit_code == 0
    assert len(read_jsonl(run / "dialogue" / "transcript.jsonl")) == 4
    assert len(read_jsonl(run / "dialogue" / "previous-1" / "transcript.jsonl")) == 3


def test_the_embedded_model_is_one_input_whatever_port_it_was_served_on():
    from pipeline.client import ModelClient
    from pipeline.config import Endpoint
    from pipeline.dialogue import dialogue_inputs
    from pipeline.parameters import DialogueParameters
    from pipeline.records import RolesDocument

    def inputs(*urls: str, embedded: bool) -> object:
        clients = [ModelClient(Endpoint(url, "m", None, embedded=embedded)) for url in urls]
        return dialogue_inputs(RolesDocument.from_json(ROLES), clients, DialogueParameters())

    first = inputs("http://127.0.0.1:40001/v1", "http://127.0.0.1:40002/v1", embedded=True)
    again = inputs("http://127.0.0.1:50001/v1", "http://127.0.0.1:50002/v1", embedded=True)
    assert first == again
    served = inputs("http://127.0.0.1:40001/v1", "http://127.0.0.1:40002/v1", embedded=False)
    moved = inputs("http://127.0.0.1:50001/v1", "http://127.0.0.1:50002/v1", embedded=False)
    assert served != moved  # another server is another input


EDITOR = textwrap.dedent(
    """
    import json, os, sys
    path = sys.argv[1]
    roles = json.load(open(path))
    if os.environ["EDIT_MODE"] == "rename":
        roles["roles"][1]["name"] = "Professor"
    else:
        roles["opening_line"] = ""
    json.dump(roles, open(path, "w"))
    """
)


@pytest.fixture
def editor(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    script = tmp_path / "editor.py"
    script.write_text(EDITOR)
    monkeypatch.setenv("EDITOR", f"{sys.executable} {script}")

    def mode(name: str) -> None:
        monkeypatch.setenv("EDIT_MODE", name)

    return mode


def test_edit_then_rerun(fake, invoke, runs_dir, editor):
    invoke("generate", *endpoint(fake), "--yes", "--turns", "3", "x")
    run = only_run(runs_dir)
    roles_file = run / "director" / "roles.json"

    editor("empty-opening-line")
    refused = invoke("edit", run.name)
    assert refused.exit_code == 1
    assert refused.stderr == (
        "Error: not saved: the edited roles do not match roles.schema.json: "
        "$.opening_line: '' should be non-empty\n"
    )
    assert json.loads(roles_file.read_text()) == ROLES
    assert json.loads((run / "run.json").read_text())["stages"]["dialogue"]["status"] == "done"

    editor("rename")
    edited = invoke("edit", run.name)
    assert edited.exit_code == 0, edited.output
    assert edited.stdout == (
        f"saved {roles_file}\n"
        "the dialogue ran on the old roles and is now stale; rerun it with: "
        f"pipeline rerun {run.name} dialogue --runs-dir {runs_dir}\n"
    )
    assert json.loads(roles_file.read_text())["roles"][1]["name"] == "Professor"
    assert json.loads((run / "director" / "roles.before-edit-1.json").read_text()) == ROLES
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["director"]["edits"] == 1
    assert manifest["stages"]["dialogue"]["status"] == "stale"
    assert "stale" in invoke("runs").stdout

    rerun = invoke("rerun", run.name, "dialogue", *endpoint(fake), "--turns", "3")
    assert rerun.exit_code == 0, rerun.output
    roles_said = [line["role"] for line in read_jsonl(run / "dialogue" / "transcript.jsonl")]
    assert roles_said == ["Student", "Professor", "Student"]
    old = read_jsonl(run / "dialogue" / "previous-1" / "transcript.jsonl")
    assert [line["role"] for line in old] == ["Student", "Mentor", "Student"]
    assert json.loads((run / "run.json").read_text())["stages"]["dialogue"]["status"] == "done"


def test_rerun_director_makes_the_dialogue_stale(fake, invoke, runs_dir):
    invoke("generate", *endpoint(fake), "--yes", "--turns", "2", "x")
    run = only_run(runs_dir)
    contract = {**ROLES["termination"], "acceptance_criteria": "A draft with sources."}
    fake.add(Reply(json.dumps({**ROLES, "termination": contract})))  # new roles
    result = invoke("rerun", run.name, "director", *endpoint(fake))
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(
        "\nthe dialogue ran on the old roles and is now stale; rerun it with: "
        f"pipeline rerun {run.name} dialogue --runs-dir {runs_dir}\n"
    )
    assert (run / "director" / "previous-1" / "roles.json").exists()
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["dialogue"]["status"] == "stale"
    resumed = invoke("resume", run.name, *endpoint(fake))  # a stale dialogue starts over
    assert resumed.exit_code == 0, resumed.output
    assert_complete(run, turns=2)


def test_new_roles_identical_to_the_old_leave_the_dialogue_current(fake, invoke, runs_dir):
    # staleness is worked out from the hashes of what a stage read, not from what ran
    invoke("generate", *endpoint(fake), "--yes", "--turns", "2", "x")
    run = only_run(runs_dir)
    result = invoke("rerun", run.name, "director", *endpoint(fake))
    assert result.exit_code == 0, result.output
    assert "stale" not in result.stdout
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["stages"]["dialogue"]["status"] == "done"
    assert invoke("resume", run.name).stdout == f"run {run.name} is complete; nothing to resume\n"


def test_runs_lists_every_run_and_reports_a_corrupt_one(fake, invoke, runs_dir):
    for task in ("first task", "second task"):
        invoke("generate", *endpoint(fake), "--yes", "--turns", "2", task)
    invoke("generate", *endpoint(fake), "third task")
    first, second, third = run_folders(runs_dir)
    (second / "run.json").write_text("{ not json")

    result = invoke("runs")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "RUN",
        "CREATED",
        "DIRECTOR",
        "DIALOGUE",
        "TURNS",
        "ENDED",
        "BY",
        "PARENT",
        "TASK",
    ]
    assert lines[1].split()[0] == first.name
    assert lines[1].split()[3:] == ["done", "done", "2", "max_turns", "-", "first", "task"]
    assert lines[2].startswith(
        f"{second.name}  unreadable: the manifest of run {second.name} is unreadable"
    )
    assert lines[3].split()[3:] == ["done", "pending", "0", "-", "-", "third", "task"]

    as_json = json.loads(invoke("runs", "--json").stdout)
    assert [row["run_id"] for row in as_json] == [first.name, second.name, third.name]
    assert as_json[0]["stages"] == {
        "director": "done",
        "dialogue": "done",
        "judge": "pending",
        "reflect": "pending",
    }
    assert as_json[0]["termination_reason"] == "max_turns"
    assert "error" in as_json[1]


def test_runs_on_an_empty_root(invoke, runs_dir):
    result = invoke("runs")
    assert (result.exit_code, result.stdout, result.stderr) == (0, "", f"no runs in {runs_dir}\n")


def test_show_prints_the_roles_and_the_transcript(fake, invoke, runs_dir):
    invoke("generate", *endpoint(fake), "--yes", "--turns", "3", "x")
    run = only_run(runs_dir)
    full = invoke("show", run.name)
    assert full.exit_code == 0
    assert full.stdout.startswith(f"Run {run.name}\nTask: x\nCreated: ")
    assert "Director: done; m at " in full.stdout
    assert "Dialogue: done; m at " in full.stdout and "3 turns; ended by max_turns" in full.stdout
    assert f"Role 2: Mentor\n{ROLES['roles'][1]['system_prompt']}" in full.stdout
    assert full.stdout.endswith("\n[2] Mentor\nreply 2\n\n[3] Student\nreply 3\n")

    dialogue = invoke("show", run.name, "--stage", "dialogue")
    assert dialogue.stdout == (
        f"[1] Student\n{ROLES['opening_line']}\n\n[2] Mentor\nreply 2\n\n[3] Student\nreply 3\n"
    )
    roles = invoke("show", run.name, "--stage", "director", "--json")
    assert json.loads(roles.stdout) == ROLES
    lines = invoke("show", run.name, "--stage", "dialogue", "--json").stdout.splitlines()
    assert [json.loads(line)["turn"] for line in lines] == [1, 2, 3]
    manifest = json.loads(invoke("show", run.name, "--json").stdout)
    assert manifest["run_id"] == run.name


@pytest.mark.parametrize("command", ["show", "edit", "resume", "runs"])
def test_commands_that_read_runs_take_runs_dir(invoke, runs_dir, command):
    args = [command] if command == "runs" else [command, "20261125T120000Z-none"]
    result = invoke(*args)
    assert result.exit_code == (0 if command == "runs" else 1)
    assert str(runs_dir) in result.stderr  # the root it looked in, from --runs-dir


def test_ctrl_c_during_a_request_lands_in_the_caller_not_in_the_http_stack(sigint_raises):
    """A request holding a lock (as the HTTP stack does) runs to its end when Ctrl-C comes;
    the KeyboardInterrupt is raised where the main thread waits for it."""
    from pipeline.client import off_main_thread

    lock = threading.Lock()
    inside, gate = threading.Event(), threading.Event()
    finished: list[str] = []

    def request() -> Iterator[str]:
        with lock:
            inside.set()
            gate.wait(30)
            finished.append(threading.current_thread().name)
        yield "answer"

    def ctrl_c() -> None:
        inside.wait(30)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    sender = threading.Thread(target=ctrl_c)
    sender.start()
    with pytest.raises(KeyboardInterrupt):
        list(off_main_thread(request))
    sender.join(30)
    assert lock.locked() and finished == []  # the request is still running, untouched
    gate.set()
    assert lock.acquire(timeout=30)
    assert finished == ["pipeline-request"]


def test_ctrl_c_just_before_the_wait_for_a_request_still_lands_while_it_runs(sigint_raises):
    """A SIGINT whose handler ran just before the main thread blocked waiting for the
    request cannot interrupt that wait: nothing was blocked yet when it came (issue 18).
    interrupt_main() trips SIGINT as the handler does but interrupts nothing; sent while
    the main thread is blocked, it is that case, every time."""
    from pipeline.client import off_main_thread

    inside, gate = threading.Event(), threading.Event()
    finished: list[bool] = []

    def request() -> Iterator[str]:
        inside.set()
        gate.wait(30)
        finished.append(True)
        yield "answer"

    def ctrl_c() -> None:
        inside.wait(30)
        main = threading.main_thread().ident or 0
        # This thread holds the GIL, so a main thread whose innermost frame is
        # off_main_thread's is in a call from it that let go of the GIL: the wait.
        deadline = time.monotonic() + 30
        while sys._current_frames()[main].f_code is not off_main_thread.__code__:
            assert time.monotonic() < deadline
            time.sleep(0.001)  # polls for the main thread to be waiting
        _thread.interrupt_main()

    sender = threading.Thread(target=ctrl_c)
    sender.start()
    with pytest.raises(KeyboardInterrupt):
        list(off_main_thread(request))
    sender.join(30)
    assert finished == []  # raised while the request still runs, not when it ended
    gate.set()


@pytest.mark.parametrize("on_main_thread", [True, False])
def test_requests_give_back_their_items_and_errors_on_any_thread(on_main_thread):
    from pipeline.client import off_main_thread
    from pipeline.errors import EndpointError

    failure = EndpointError("the server said no")
    seen: dict[str, Any] = {}

    def request() -> Iterator[str]:
        seen["thread"] = threading.current_thread()
        yield from ("a", "b")
        raise failure

    def call() -> None:
        items: list[str] = []
        try:
            items.extend(off_main_thread(request))
        except EndpointError as e:
            seen["error"] = e
        seen["items"] = items
        seen["caller"] = threading.current_thread()

    if on_main_thread:
        call()
    else:
        worker = threading.Thread(target=call)
        worker.start()
        worker.join(30)
    assert seen["items"] == ["a", "b"]
    assert seen["error"] is failure
    assert (seen["thread"] is seen["caller"]) is not on_main_thread

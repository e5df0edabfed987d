"""What a run leaves behind: exports (golden files), the judge stage, batches."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pipeline import runs, schemas
from pipeline.config import Endpoint
from pipeline.dialogue import role_prompt
from pipeline.records import RolesDocument, Turn

from .conftest import ROLES, conversation, only_run, read_jsonl, run_folders
from .fakeserver import Action, FakeServer, Reply

GOLDEN = Path(__file__).parent / "golden"
TRANSCRIPT = [
    ("Student", 0, ROLES["opening_line"], False),
    ("Mentor", 1, "Three topics: bias, privacy, accountability.", True),
    ("Student", 0, "Let us take privacy. The draft is ready. <TASK_DONE>", True),
    ("Mentor", 1, "Good work.", True),
]


@pytest.fixture
def fixed_run(runs_dir, monkeypatch):  # type: ignore[no-untyped-def]
    """A finished run built by hand from a fixed transcript."""
    monkeypatch.setattr(runs, "utc_now", lambda: datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc))
    run = runs.create_run(runs_dir, "write a short paper on AI ethics")
    run.write_json("director/roles.json", ROLES)
    for turn, (role, index, content, generated) in enumerate(TRANSCRIPT, start=1):
        run.append_transcript(
            Turn(
                turn,
                role,
                index,
                content,
                kind="generated" if generated else "opening",
                finish_reason="stop" if generated else None,
                model=("model-a" if index == 0 else "model-b") if generated else None,
                base_url="http://127.0.0.1:1/v1" if generated else None,
            )
        )
    run.stage("director").status = "done"
    dialogue = run.stage("dialogue")
    dialogue.status = "done"
    dialogue.role_endpoints = [Endpoint("http://127.0.0.1:1/v1", m) for m in ("model-a", "model-b")]
    run.save()
    return run


@pytest.mark.parametrize("fmt", ["md", "txt"])
def test_exports_match_their_golden_files(fixed_run, invoke, fmt):
    result = invoke("export", fixed_run.run_id, "--format", fmt)
    assert result.exit_code == 0, result.output
    assert result.stdout == (GOLDEN / f"transcript.{fmt}").read_text()


def test_jsonl_export_is_the_transcript_as_stored(fixed_run, invoke):
    result = invoke("export", fixed_run.run_id, "--format", "jsonl")
    assert result.stdout == fixed_run.path("dialogue/transcript.jsonl").read_text()


def test_finetune_export_takes_each_role_s_point_of_view(fixed_run, invoke, tmp_path):
    out = tmp_path / "data.jsonl"
    result = invoke("export", fixed_run.run_id, "--format", "finetune", "-o", str(out))
    assert (result.exit_code, result.stderr) == (0, f"wrote {out}\n")
    examples = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(examples) == 2
    for example in examples:
        assert schemas.errors(example, "finetune.schema.json") == []
        assert example["messages"][-1]["role"] == "assistant"
    student, mentor = examples
    prompt = role_prompt(RolesDocument.from_json(ROLES), 0)
    assert student["messages"][0] == {"role": "system", "content": prompt}
    assert [m["role"] for m in student["messages"][1:]] == ["assistant", "user", "assistant"]
    assert [m["role"] for m in mentor["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert mentor["messages"][-1]["content"] == "Good work."
    only = invoke("export", fixed_run.run_id, "--format", "finetune", "--role", "Mentor").stdout
    assert [json.loads(line) for line in only.splitlines()] == [mentor]
    wrong = invoke("export", fixed_run.run_id, "--format", "finetune", "--role", "Critic")
    assert wrong.exit_code == 1
    assert wrong.stderr == (
        f"Error: run {fixed_run.run_id} has no role 'Critic'; its roles are Student, Mentor\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give either a RUN_ID or --all"),
        (("20261125T120000Z-x", "--all"), "give either a RUN_ID or --all"),
        (("20261125T120000Z-x", "--min-score", "5"), "--min-score goes with --all"),
    ],
)
def test_export_usage_errors(invoke, args, message):
    result = invoke("export", *args)
    assert result.exit_code == 2
    assert message in result.stderr


def verdict(score: int) -> dict[str, Any]:
    return {
        "completed": score >= 5,
        "score": score,
        "reasons": "Because.",
        "deliverable": "A draft.",
    }


def judged(score_replies: list[str]):  # type: ignore[no-untyped-def]
    """The fake: roles for the director, the scripted judge replies, "reply N" for turns."""
    replies = list(score_replies)

    def respond(body: dict[str, Any]) -> Action:
        schema_name = (body.get("response_format") or {}).get("json_schema", {}).get("name")
        if schema_name == "verdict":
            return Reply(replies.pop(0))
        return conversation(body)

    return respond


def test_the_judge_stage_repairs_a_bad_verdict_and_export_all_keeps_good_runs(invoke, runs_dir):
    replies = [
        json.dumps({**verdict(9), "score": 11}),
        json.dumps(verdict(9)),
        json.dumps(verdict(4)),
    ]
    with FakeServer(judged(replies)) as fake:
        args = ["--base-url", fake.base_url, "--model", "m", "--yes", "--turns", "3"]
        first = invoke("generate", *args, "--judge", "first task")
        assert first.exit_code == 0, first.output
        assert "Verdict: completed, score 9/10\nBecause.\nDeliverable\nA draft.\n" in first.stdout
        second = invoke("generate", *args, "--judge", "second task")
        assert second.exit_code == 0, second.output
        third = invoke("generate", *args, "third task")  # never judged
        assert third.exit_code == 0
    good, poor, unjudged = run_folders(runs_dir)
    stage = json.loads((good / "run.json").read_text())["stages"]["judge"]
    assert stage["status"] == "done"
    assert [a["outcome"] for a in stage["attempts"]] == ["schema", "ok"]
    assert json.loads((good / "judge" / "verdict.json").read_text()) == verdict(9)
    assert json.loads((poor / "judge" / "verdict.json").read_text()) == verdict(4)
    assert json.loads((unjudged / "run.json").read_text())["stages"]["judge"]["status"] == "pending"
    shown = invoke("show", good.name, "--stage", "judge", "--json").stdout
    assert json.loads(shown) == verdict(9)

    dataset = invoke("export", "--all", "--format", "finetune", "--min-score", "7").stdout
    lines = dataset.splitlines()
    assert len(lines) == 2  # the 9-scored run, one example per role
    assert all(json.loads(line)["messages"] for line in lines)
    everything = invoke("export", "--all", "--format", "jsonl").stdout
    assert len(everything.splitlines()) == 9  # three runs of three turns


def test_rerun_judge_needs_a_finished_dialogue(fake, invoke, runs_dir):
    invoke("generate", "--base-url", fake.base_url, "--model", "m", "x")  # no dialogue yet
    run = only_run(runs_dir)
    result = invoke("rerun", run.name, "judge", "--base-url", fake.base_url, "--model", "m")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: the dialogue of run {run.name} is pending, so there is nothing to judge yet; "
        f"finish it with: pipeline resume {run.name} --runs-dir {runs_dir}"
    )


# -- batches -------------------------------------------------------------------------------


def tasks_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "tasks.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_batch_runs_every_task_with_its_own_options(fake, invoke, runs_dir, tmp_path):
    path = tasks_file(
        tmp_path,
        "# papers to write",
        "first paper",
        "",
        "second paper",
        '{"task": "third paper", "turns": 2}',
    )
    result = invoke(
        "batch", str(path), "-j", "3", "--base-url", fake.base_url, "--model", "m", "--turns", "4"
    )
    assert result.exit_code == 0, result.output
    record = json.loads((runs_dir / "batches" / "tasks.json").read_text())
    assert sorted((t["line"], t["task"]) for t in record["tasks"].values()) == [
        (2, "first paper"),
        (4, "second paper"),
        (5, "third paper"),
    ]
    by_task = {t["task"]: t for t in record["tasks"].values()}
    assert all(t["status"] == "done" for t in by_task.values())
    turns = {
        task: len(read_jsonl(runs_dir / t["run_id"] / "dialogue" / "transcript.jsonl"))
        for task, t in by_task.items()
    }
    assert turns == {"first paper": 4, "second paper": 4, "third paper": 2}
    table = result.stdout.splitlines()
    assert table[0].split() == ["STATUS", "TURNS", "ENDED", "BY", "RUN", "TASK"]
    assert sorted(line.split()[0] for line in table[1:]) == ["done", "done", "done"]

    again = invoke("batch", str(path), "--base-url", fake.base_url, "--model", "m", "--turns", "4")
    assert again.exit_code == 0
    assert [line.split()[0] for line in again.stdout.splitlines()[1:]] == ["skipped"] * 3
    assert len(run_folders(runs_dir)) == 3


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (("{not json",), "{path}:1: not valid JSON"),
        (('{"task": "x", "turn": 3}',), "{path}:1: unknown option 'turn'"),
        (('{"turns": 3}',), '{path}:1: no "task"'),
        (("# nothing",), "{path} holds no task; write one task per line"),
    ],
)
def test_bad_tasks_files_are_named(invoke, tmp_path, lines, message):
    path = tasks_file(tmp_path, *lines)
    result = invoke("batch", str(path), "--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: " + message.format(path=path))


def test_a_failed_task_fails_the_batch_and_is_retried_next_time(invoke, runs_dir, tmp_path):
    from .fakeserver import Status

    path = tasks_file(tmp_path, "one", "two")
    with FakeServer(conversation) as fake:
        fake.add(Status(400, "bad request"))
        args = ["--base-url", fake.base_url, "--model", "m", "--turns", "2", "-j", "1"]
        result = invoke("batch", str(path), *args)
        assert result.exit_code == 1
        assert result.stderr.splitlines()[-1] == (
            "Error: 1 of 2 tasks failed; run the same command again to retry them"
        )
        assert "failed" in result.stdout
        retry = invoke("batch", str(path), *args)
        assert retry.exit_code == 0, retry.output
    assert sorted(line.split()[0] for line in retry.stdout.splitlines()[1:]) == ["done", "skipped"]


def test_a_failed_task_s_fix_is_worded_as_on_the_command_line(invoke, runs_dir, tmp_path):
    from .fakeserver import Status

    path = tasks_file(tmp_path, "one")
    with FakeServer(conversation) as fake:
        fake.add(Status(404, "no such model"))
        result = invoke("batch", str(path), "--base-url", fake.base_url, "--model", "m")
    assert result.exit_code == 1
    (row,) = result.stdout.splitlines()[1:]
    assert row.endswith(
        "answered 404 for model 'm'; pass --model with a model that server serves, and "
        "check that --base-url is its API root (often /v1))"
    )
    record = json.loads((runs_dir / "batches" / "tasks.json").read_text())
    (entry,) = record["tasks"].values()  # the library's own words in the batch manifest
    assert entry["error"].endswith(
        "; pass the model setting with a model that server serves, "
        "and check that the base url setting is its API root (often /v1)"
    )


def test_killing_a_batch_and_running_it_again_finishes_only_what_is_missing(tmp_path):
    runs_dir = tmp_path / "runs"
    path = tasks_file(tmp_path, *[f"task number {i}" for i in range(6)])

    def slow(body: dict[str, Any]) -> Action:
        if body.get("response_format"):
            return Reply(json.dumps(ROLES))
        n = len(body["messages"])
        return Reply(f"reply {n} on part {n * 3} of the plan", pause=0.05)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
    with FakeServer(slow) as fake:
        command = [
            sys.executable,
            "-m",
            "pipeline",
            "batch",
            str(path),
            "-j",
            "2",
            "--turns",
            "4",
            "--runs-dir",
            str(runs_dir),
            "--base-url",
            fake.base_url,
            "--model",
            "m",
        ]
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        record_path = runs_dir / "batches" / "tasks.json"

        def finished() -> list[str]:
            try:
                record = json.loads(record_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return []
            return [t["run_id"] for t in record["tasks"].values() if t.get("status") == "done"]

        deadline = time.monotonic() + 60
        while len(finished()) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "no task finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_before = finished()
        assert len(done_before) < 6, "the batch ended before it could be killed"
        stamps = {
            r: (runs_dir / r / "dialogue" / "transcript.jsonl").stat().st_mtime_ns
            for r in done_before
        }
        sent_before = len(fake.chat_requests())

        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
    record = json.loads(record_path.read_text())
    assert all(t["status"] == "done" for t in record["tasks"].values())
    assert len(record["tasks"]) == 6
    assert len(run_folders(runs_dir)) == 6
    for run_id, stamp in stamps.items():  # finished runs were not redone
        assert (runs_dir / run_id / "dialogue" / "transcript.jsonl").stat().st_mtime_ns == stamp
    summary = again.stdout.splitlines()[1:]
    assert sum(line.startswith("skipped") for line in summary) == len(done_before)
    assert len(fake.chat_requests()) > sent_before
    for run_id in record["tasks"].values():
        lines = read_jsonl(runs_dir / run_id["run_id"] / "dialogue" / "transcript.jsonl")
        assert [line["turn"] for line in lines] == [1, 2, 3, 4]


def test_rate_limits_slow_a_batch_down_instead_of_failing_it(invoke, runs_dir, tmp_path):
    from .fakeserver import Status

    path = tasks_file(tmp_path, "one", "two", "three")
    with FakeServer(conversation) as fake:
        # five 429s in a row: more than the default 2 retries, fewer than a batch's 8
        fake.add(*[Status(429, "slow down", headers={"retry-after-ms": "10"})] * 5)
        result = invoke(
            "batch",
            str(path),
            "-j",
            "1",
            "--base-url",
            fake.base_url,
            "--model",
            "m",
            "--turns",
            "2",
        )
        assert result.exit_code == 0, result.output
        assert len(fake.chat_requests()) == 5 + 3 * 2
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["done"] * 3


def test_a_run_id_is_recorded_before_its_run_is_made(fake, invoke, runs_dir, tmp_path):
    """A batch killed between choosing a task's run id and creating the run (the folder
    made, no manifest yet) makes that same run next time, not a second one."""
    from pipeline.batch import BatchTask

    path = tasks_file(tmp_path, "only task")
    key = BatchTask(1, "only task").key
    run_id = "20261125T120000Z-only-task"
    (runs_dir / "batches").mkdir(parents=True)
    (runs_dir / run_id).mkdir()  # cut short inside create_run
    (runs_dir / "batches" / "tasks.json").write_text(
        json.dumps(
            {
                "tasks_file": str(path),
                "tasks": {key: {"line": 1, "task": "only task", "run_id": run_id}},
            }
        )
    )
    result = invoke("batch", str(path), "--base-url", fake.base_url, "--model", "m", "--turns", "2")
    assert result.exit_code == 0, result.output
    kept = sorted(p.name for p in runs_dir.iterdir() if not p.name.startswith("memory"))
    assert kept == [run_id, "batches"]
    assert len(read_jsonl(runs_dir / run_id / "dialogue" / "transcript.jsonl")) == 2

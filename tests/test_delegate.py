"""delegate: a role hands a sub-task to a child run; the tree is linked both ways, limited
in depth, resumed and replayed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline import stages
from pipeline.cli import cli
from pipeline.client import ModelClient
from pipeline.delegate import Delegation, depth
from pipeline.endpoints import Endpoint
from pipeline.parameters import DialogueParameters, ToolParameters
from pipeline.runs import create_run, open_run

from .conftest import ROLES, read_jsonl, run_files, task_of
from .fakeserver import FakeServer, Reply

# What each run's mentor hands down, by the run's task: the root delegates twice (one
# call each in two rounds), the first child once, the grandchild tries and is refused.
DELEGATES = {
    "root": ["child one", "child two"],
    "child one": ["grandchild"],
    "child two": [],
    "grandchild": ["too deep"],
}


RUN_STAGES = ("director", "dialogue", "judge")  # what each run of the tree goes through


def tree(body: dict[str, Any]) -> Reply:
    """The model of every run of the tree."""
    messages = body["messages"]
    first = messages[0]["content"]
    kind = (body.get("response_format") or {}).get("json_schema", {}).get("name")
    if kind == "roles":  # each run's roles carry its task, for its turns to see
        task = task_of(first)
        mentor = {**ROLES["roles"][1], "system_prompt": f"You mentor. TASK: {task}."}
        return Reply(json.dumps({**ROLES, "roles": [ROLES["roles"][0], mentor]}))
    if kind == "verdict":
        verdict = {"completed": True, "score": 7, "reasons": "ok"}
        return Reply(json.dumps({**verdict, "deliverable": f"the work on {task_of(first)}"}))
    mentor = re.search(r"TASK: (.*?)\.", first)
    if mentor is None or len(messages) < 2 or messages[1]["role"] != "user":
        return Reply(f"reply {len(messages)}")
    if len([m for m in messages if m["role"] == "user"]) > 1:
        return Reply(f"reply {len(messages)}")  # a later turn: just talk
    todo = DELEGATES[mentor.group(1)]
    done = sum(1 for m in messages if m["role"] == "tool")
    if done < len(todo):  # one call a round, until every sub-task is handed down
        call = (f"call_{done + 1}", "delegate", json.dumps({"task": todo[done]}))
        return Reply("", finish_reason="tool_calls", tool_calls=[call])
    return Reply(f"With that: {messages[-1]['content']}" if done else "reply 2")


@pytest.fixture
def fake_tree():  # type: ignore[no-untyped-def]
    with FakeServer(tree) as server:
        yield server


def run_tree(
    runs_dir: Path, fake: FakeServer, max_depth: int = 2, max_tokens_total: int | None = None
):
    client = ModelClient(Endpoint(fake.base_url, "m", None), max_retries=0)
    tools = ToolParameters(tool_calls="tools", delegate=True, max_depth=max_depth)
    dialogue = DialogueParameters(turns=3, max_tokens_total=max_tokens_total)
    plan = stages.Plan.of(dialogue=dialogue, tools=tools)
    root = create_run(runs_dir, "root", plan.planned())
    ctx = stages.StageContext(root, stages.OneClient(client), plan, tools=Delegation())
    with root.locked():
        stages.advance(ctx, include=("judge",))
    return open_run(runs_dir, root.run_id)


def test_a_tree_of_runs_is_made_linked_and_limited(runs_dir):
    with FakeServer(tree) as fake:
        root = run_tree(runs_dir, fake)
    one, two = root.manifest.children or []
    assert (one, two) == (f"{root.run_id}-t2-1", f"{root.run_id}-t2-2")
    child = open_run(runs_dir, one)
    (grand,) = child.manifest.children or []
    grandchild = open_run(runs_dir, grand)
    for run, parent in ((child, root), (open_run(runs_dir, two), root), (grandchild, child)):
        assert run.manifest.parent is not None and run.manifest.parent.run_id == parent.run_id
        assert run.manifest.parent.turn == 2
        assert {s: stages.status(run, s) for s in RUN_STAGES} == dict.fromkeys(RUN_STAGES, "done")
    assert [depth(r) for r in (root, child, grandchild)] == [0, 1, 2]
    # the grandchild's delegation was refused with a result that names the limit
    (refused,) = read_jsonl(grandchild.path("dialogue/transcript.jsonl"))[1]["tool_calls"]
    assert refused["error"].startswith("the depth limit is reached (max_depth 2)")
    # each child's deliverable came back as the result of the call that made it
    calls = read_jsonl(root.path("dialogue/transcript.jsonl"))[1]["tool_calls"]
    assert [c["result"] for c in calls] == ["the work on child one", "the work on child two"]
    assert read_jsonl(root.path("dialogue/transcript.jsonl"))[1]["content"] == (
        "With that: the work on child two"
    )


def test_replay_reproduces_every_run_of_the_tree(runs_dir, invoke):
    with FakeServer(tree) as fake:
        root = run_tree(runs_dir, fake)
    result = invoke("replay", root.run_id, "--into", "20261126T100000Z-again")
    assert result.exit_code == 0, result.output
    again = open_run(runs_dir, "20261126T100000Z-again")
    originals = sorted(p.name for p in runs_dir.iterdir() if p.name.startswith(root.run_id))
    assert len(originals) == 4  # the root, two children, a grandchild
    for name in originals:
        replayed = name.replace(root.run_id, again.run_id)
        assert run_files(runs_dir / replayed) == run_files(runs_dir / name), name
        manifest = json.loads((runs_dir / replayed / "run.json").read_text())
        if name != root.run_id:
            assert manifest["parent"]["run_id"] == replayed.rsplit("-t", 1)[0]


def test_a_tree_interrupted_in_a_grandchild_is_finished_by_resuming_the_root(
    runs_dir, sigint_raises
):
    import signal

    calls = {"n": 0}

    def interrupted(body: dict[str, Any]) -> Reply:
        reply = tree(body)
        if "TASK: grandchild." in body["messages"][0]["content"] and not body.get(
            "response_format"
        ):
            calls["n"] += 1
            if calls["n"] == 1:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C in the grandchild's dialogue
        return reply

    with FakeServer(interrupted) as fake:
        with pytest.raises(KeyboardInterrupt):
            run_tree(runs_dir, fake)
        (root_id,) = [p.name for p in runs_dir.iterdir() if p.name.endswith("-root")]
        root = open_run(runs_dir, root_id)
        assert stages.status(root, "dialogue") == "failed"
        asked_before = len(fake.chat_requests())
        client = ModelClient(Endpoint(fake.base_url, "m", None), max_retries=0)
        ctx = stages.StageContext(
            root, stages.OneClient(client), stages.Plan.recorded(root), tools=Delegation()
        )
        with root.locked():
            stages.advance(ctx, include=("judge",))
        again = fake.chat_requests()[asked_before:]
    names = sorted(p.name for p in runs_dir.iterdir() if p.name.startswith(root_id))
    assert len(names) == 4  # no child made twice
    for name in names:
        run = open_run(runs_dir, name)
        turns = [line["turn"] for line in read_jsonl(run.path("dialogue/transcript.jsonl"))]
        assert turns == [1, 2, 3], name  # every turn once
        assert stages.status(run, "judge") == "done", name
    # only the child not yet made was directed: the others were gone on with, not redone
    directed = [
        task_of(r["messages"][0]["content"])
        for r in again
        if (r.get("response_format") or {}).get("json_schema", {}).get("name") == "roles"
    ]
    assert directed == ["child two"]


def test_the_command_line_makes_a_tree_that_runs_show_export_and_diff_see(fake_tree, invoke):
    result = invoke(
        "generate", "root", "--base-url", fake_tree.base_url, "--model", "m", "--yes",
        "--judge", "--turns", "3", "--delegate", "--tool-calls", "tools",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    listed = {row["run_id"]: row for row in json.loads(invoke("runs", "--json").stdout)}
    (root,) = [name for name, row in listed.items() if row["parent"] is None]
    child, grandchild = f"{root}-t2-1", f"{root}-t2-1-t2-1"
    # the children's conversations are printed as they happen, indented under the turn
    assert f"\n> delegated to run {child}: child one\n\n    [1] Student\n" in result.stdout
    assert "\n        [2] Mentor\n" in result.stdout  # the grandchild's, deeper
    assert f"\n< back from run {child}\n" in result.stdout
    assert listed[grandchild]["parent"] == child and listed[child]["parent"] == root
    table = invoke("runs").stdout.splitlines()
    assert table[0].split()[-2:] == ["PARENT", "TASK"]
    shown = invoke("show", child)
    assert shown.exit_code == 0, shown.output
    tree = shown.stdout.split("Tree:\n", 1)[1].splitlines()[:4]
    assert [line.split()[:2] for line in tree] == [
        [root, "done"],
        ["├─", child],
        ["│", "└─"],
        ["└─", f"{root}-t2-2"],
    ]
    assert f"{child} *" in shown.stdout  # the run shown is marked
    exported = invoke("export", grandchild, "--format", "jsonl")
    assert exported.exit_code == 0 and len(exported.stdout.splitlines()) == 3
    assert invoke("diff", child, f"{root}-t2-2").exit_code == 0


def test_the_tokens_of_delegated_runs_count_toward_the_parent_s_budget(runs_dir):
    # each call reports 18 tokens: the root's own three calls of turn 2 stay under 100,
    # the runs it delegated to do not
    with FakeServer(tree) as fake:
        root = run_tree(runs_dir, fake, max_tokens_total=100)
    entry = root.stage("dialogue")
    assert (entry.termination_reason, entry.termination_turn) == ("token_budget", 2)
    assert entry.usage is not None and entry.usage.total == 3 * 18  # its own calls only


def count_requests(runs_dir: Path) -> int:
    with FakeServer(tree) as fake:
        run_tree(runs_dir, fake)
        return len(fake.chat_requests())


class KillAt:
    """The tree's model, holding request ``point`` until the test has killed the process."""

    def __init__(self, point: int) -> None:
        self.point, self.seen = point, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, body: dict[str, Any]) -> Reply:
        self.seen += 1
        if self.seen == self.point:
            self.reached.set()
            self.release.wait(30)
        return tree(body)


def test_a_tree_killed_at_any_moment_is_completed_by_resume(tmp_path):
    total = count_requests(tmp_path / "count")
    points = sorted({1 + (total - 1) * i // 11 for i in range(12)})  # 12 kill points
    assert len(points) >= 10
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
    for point in points:
        runs_dir = tmp_path / f"kill-{point}"
        killing = KillAt(point)
        with FakeServer(killing) as fake:
            command = [
                sys.executable, "-m", "pipeline", "generate", "root", "--yes", "--judge",
                "--turns", "3", "--delegate", "--tool-calls", "tools", "--runs-dir",
                str(runs_dir), "--base-url", fake.base_url, "--model", "m",
            ]  # fmt: skip
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                assert killing.reached.wait(60), f"request {point} never came"
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
            finally:
                killing.release.set()
            (root,) = [p.name for p in runs_dir.iterdir() if p.name.endswith("-root")]
            result = CliRunner().invoke(cli, ["resume", root, "--runs-dir", str(runs_dir)])
            assert result.exit_code == 0, (point, result.output)
        names = sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
        assert names == sorted([root, f"{root}-t2-1", f"{root}-t2-1-t2-1", f"{root}-t2-2"]), point
        for name in names:
            run = open_run(runs_dir, name)
            turns = [line["turn"] for line in read_jsonl(run.path("dialogue/transcript.jsonl"))]
            assert turns == [1, 2, 3], (point, name)  # every turn once
            assert {s: stages.status(run, s) for s in RUN_STAGES} == dict.fromkeys(
                RUN_STAGES, "done"
            ), (point, name)
            parent = run.manifest.parent
            if parent is not None:
                assert name in (open_run(runs_dir, parent.run_id).manifest.children or [])


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            ("--turns", "4"),
            "runs: 1 (no delegation)\n"
            "model calls per run: at most 9 (6 director, 3 dialogue over 3 generated turns)\n"
            "model calls in all: at most 9\n",
        ),
        (
            ("--delegate", "--judge", "--turns", "4", "--max-children", "2"),
            "runs: at most 7 (the root and its delegated runs: depth 2, 2 children per run)\n"
            "model calls per run: at most 30 (6 director, 18 dialogue over 3 generated turns, "
            "6 judge)\n"
            "model calls in all: at most 210\n",
        ),
        (
            ("--delegate", "--max-depth", "1", "--max-tool-rounds", "1", "--turns", "2",
             "--max-tokens-total", "5000"),
            "runs: at most 5 (the root and its delegated runs: depth 1, 4 children per run)\n"
            "model calls per run: at most 9 (6 director, 3 dialogue over 1 generated turns)\n"
            "model calls in all: at most 45\n"
            "tokens: the dialogue of each run stops at 5000\n",
        ),
    ],
)  # fmt: skip
def test_dry_run_prints_the_limits_and_the_most_model_calls_and_calls_nothing(
    invoke, runs_dir, flags, expected
):
    result = invoke("generate", "a task", "--dry-run", "--base-url", "http://127.0.0.1:9/v1",
                    "--model", "m", *flags)  # fmt: skip
    assert (result.exit_code, result.stdout) == (0, "dry run: nothing was called\n" + expected)
    assert not runs_dir.exists()


def test_rm_keeps_a_run_that_others_need_unless_forced_or_deleted_with_them(runs_dir, invoke):
    with FakeServer(tree) as fake:
        root = run_tree(runs_dir, fake)
    child, two = root.manifest.children or []
    grand = f"{child}-t2-1"
    refused = invoke("rm", child)
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"Error: run {child} is needed by run {grand} (delegated to by it), run {root.run_id} "
        f"(it was delegated to by it); nothing was deleted; delete it anyway with --force\n"
    )
    assert (runs_dir / child).is_dir()
    # a ledger whose dataset came from a run keeps it too
    (runs_dir / "finetunes").mkdir()
    (runs_dir / "finetunes" / "ft-1.json").write_text(json.dumps({"source_runs": [two]}))
    assert invoke("rm", two).stderr.startswith(
        f"Error: run {two} is needed by run {root.run_id} (it was delegated to by it), "
        "fine-tuning ledger ft-1; nothing was deleted"
    )
    # a whole branch goes at once; forced, the parent no longer lists it
    done = invoke("rm", grand, child, "--force")
    assert (done.exit_code, done.stdout) == (0, f"deleted run {grand}\ndeleted run {child}\n")
    assert not (runs_dir / child).exists() and not (runs_dir / grand).exists()
    assert open_run(runs_dir, root.run_id).manifest.children == [two]
    assert invoke("show", root.run_id).exit_code == 0
    missing = invoke("rm", "20261126T000000Z-nothing")
    assert missing.exit_code == 1 and "no run 20261126T000000Z-nothing" in missing.stderr

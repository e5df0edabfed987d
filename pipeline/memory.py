"""The memory store: every turn of every finished run, searchable, in ``<runs>/memory.db``.

A **memory** is one transcript line of a finished run (its conversation stage, ``dialogue``
or ``import``, is ``done``; imported chats included) with what is known of it: the run's
task, the speaker (role), the model, when it was said (the turn's ``time``, else the run's
``created``), the turn number and kind, the judge's score (when the judge stage is done)
and the speaker's reflection (when a ``reflect`` stage is done: ``keep`` and its
``reason``, and the ``improvements`` asked for, from ``reflect/reflections.json``).

The runs folder is the source of truth: the database is derived from it and
:func:`rebuild` makes it again. What is forgotten (:func:`forget`) is recorded in the runs
folder too, in ``memory-forgotten.jsonl`` (:data:`FORGOTTEN`), one rule per line, so a
rebuild keeps it out. The database, its schema and how concurrent writers share it are
:mod:`pipeline.memorydb`'s.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import stages
from .errors import Fix, MemoryStoreError, PipelineError, RunError, one_line
from .memorydb import (
    DATABASE,
    FORGOTTEN,
    Rule,
    connect,
    database,
    drop,
    ensure_schema,
    read_rules,
    record,
    stored,
    transaction,
)
from .records import canonical_json, timestamp
from .reflect import REFLECTIONS
from .resources import file_sha256
from .runs import MANIFEST, Run, list_runs, open_run

__all__ = [
    "DATABASE",
    "FORGOTTEN",
    "REFLECTIONS",
    "Memory",
    "SyncReport",
    "database",
    "forget",
    "memories",
    "rebuild",
    "remember",
    "search",
    "sync",
]


@dataclass(frozen=True)
class Memory:
    """One turn of a finished run.

    Attributes:
        run_id, turn: where it was said (``turn`` is 1-based).
        role, kind, model: who said it, how (``opening``, ``generated``, ``imported``...;
            see :data:`pipeline.records.TURN_KINDS`) and with which model (None: none).
        time: when (ISO 8601 UTC): the turn's own time, else the run's creation.
        task: the run's task.
        content: what was said.
        score: the judge's score (1-10), None when the run is not judged.
        keep, reason, improvements: the speaker's reflection (keep or discard, why, what
            to improve); None when the run has no reflection for that role.
        snippet, rank: of a search only: the content around the words found (marked
            ``[...]``) and FTS5's bm25 rank (lower is better).
    """

    run_id: str
    turn: int
    role: str
    kind: str
    model: str | None
    time: str
    task: str
    content: str
    score: float | None
    keep: bool | None
    reason: str | None
    improvements: str | None
    snippet: str | None = None
    rank: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SyncReport:
    """What :func:`sync` did.

    Attributes:
        added, updated, removed: the runs indexed for the first time, indexed again (their
            transcript, verdict, reflections or forgotten memories changed), and taken out
            (deleted from the runs folder, or no longer finished).
        unchanged: how many indexed runs were left as they were.
        skipped: runs that could not be read, with why (their memories stay as they were).
        memories: the memories held afterwards.
    """

    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: int = 0
    skipped: tuple[tuple[str, str], ...] = ()
    memories: int = 0


# -- indexing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """What a finished run's memories are made from, and the sha256 of each (None: not
    used): the transcript, the verdict (a done judge), the reflections (a done reflect)."""

    run: Run
    hashes: tuple[str | None, str | None, str | None]

    @property
    def judged(self) -> bool:
        return self.hashes[1] is not None

    @property
    def reflected(self) -> bool:
        return self.hashes[2] is not None

    def fingerprint(self, rules: Sequence[Rule]) -> tuple[str | None, ...]:
        """The hashes and that of the forgotten-memory rules that cover the run (None:
        none): what the ``runs`` table records to tell a changed run."""
        mine = [asdict(r) for r in _covering(self.run, rules)]
        forgotten = hashlib.sha256(canonical_json(mine).encode()).hexdigest() if mine else None
        return (*self.hashes, forgotten)


def _covering(run: Run, rules: Sequence[Rule]) -> list[Rule]:
    return [r for r in rules if r.covers(run.run_id, run.manifest.created)]


def _inputs(run: Run) -> _Inputs | None:
    """The inputs of ``run``'s memories, or None when its conversation is not finished."""
    from .judge import VERDICT

    now = stages.statuses(run)
    if now[stages.conversation_stage(run)] != "done":
        return None
    reflected = now["reflect"] == "done" and run.path(REFLECTIONS).is_file()
    hashes = (
        file_sha256(run.path(run.transcript)),
        file_sha256(run.path(VERDICT)) if now["judge"] == "done" else None,
        file_sha256(run.path(REFLECTIONS)) if reflected else None,
    )
    return _Inputs(run, hashes)


def _reflections(run: Run) -> dict[str, Mapping[str, Any]]:
    """Each role's reflection (:func:`pipeline.reflect.load_reflections`), by role name;
    what is missing or malformed counts as no reflection."""
    from .reflect import load_reflections

    try:
        return {r["role"]: r for r in load_reflections(run)}
    except RunError:
        return {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _rows(inputs: _Inputs) -> list[tuple[Any, ...]]:
    """A row of ``memories`` per turn (the last line of a turn number written twice)."""
    run = inputs.run
    reflections = _reflections(run) if inputs.reflected else {}
    rows: dict[int, tuple[Any, ...]] = {}
    for turn in run.read_transcript():
        reflection = reflections.get(turn.role, {})
        keep = reflection.get("keep")
        rows[turn.turn] = (
            run.run_id,
            turn.turn,
            turn.role,
            turn.kind,
            turn.model,
            turn.time or run.manifest.created,
            turn.content,
            keep if isinstance(keep, bool) else None,
            _text(reflection.get("reason")),
            _text(reflection.get("improvements")),
        )
    return list(rows.values())


def _index(db: sqlite3.Connection, inputs: _Inputs, rules: Sequence[Rule]) -> str:
    """Store the memories of ``inputs``'s run, in one transaction, unless they are stored
    from the same inputs already: ``"added"``, ``"updated"`` or ``"unchanged"``.

    The forgotten-memory rules are read again inside the transaction: a :func:`forget`
    that ran since ``rules`` were read is obeyed (it records its rule before it deletes)."""
    from .judge import load_verdict

    run = inputs.run
    if stored(db, run.run_id) == inputs.fingerprint(rules):
        return "unchanged"
    score = load_verdict(run).score if inputs.judged else None
    rows = _rows(inputs)
    with transaction(db):
        rules = read_rules(run.folder.parent)
        fingerprint = inputs.fingerprint(rules)
        before = stored(db, run.run_id)  # as it is now that this process writes alone
        if before == fingerprint:
            return "unchanged"
        forgotten = {r.role for r in _covering(run, rules)}  # None: every role
        rows = [] if None in forgotten else [r for r in rows if r[2] not in forgotten]
        db.execute("DELETE FROM memories WHERE run_id = ?", (run.run_id,))
        db.executemany(
            "INSERT OR REPLACE INTO memories (run_id, turn, role, kind, model, time, content,"
            " keep, reason, improvements) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.execute(
            "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.run_id,
                run.task,
                run.manifest.created,
                int(run.imported),
                score,
                *fingerprint,
                timestamp(),
            ),
        )
    return "added" if before is None else "updated"


def _gone(runs_dir: Path, run_id: str) -> bool:
    """True when ``run_id`` is no longer a finished run of ``runs_dir``, read now (a
    concurrent process may have made it since this sync listed the runs)."""
    if not (runs_dir / run_id / MANIFEST).is_file():
        return True
    try:
        return _inputs(open_run(runs_dir, run_id)) is None
    except (PipelineError, OSError):
        return False  # unreadable now: its memories stay


def _count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM memories").fetchone()[0])


def sync(runs_dir: Path) -> SyncReport:
    """Bring ``<runs_dir>/memory.db`` in step with the runs folder: index the finished runs
    it does not hold, index again those whose transcript, verdict, reflections or
    forgotten memories changed, and take out the runs deleted or no longer finished (a
    run whose manifest cannot be read is skipped, its memories kept). Each run is one
    transaction, so concurrent syncs neither corrupt nor duplicate rows.

    Raises:
        MemoryStoreError: the database cannot be opened or written, or
            :data:`FORGOTTEN` cannot be read.
    """
    rules = read_rules(runs_dir)
    done: dict[str, list[str]] = {"added": [], "updated": [], "unchanged": []}
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()  # finished, or unreadable: their memories stay
    with connect(runs_dir) as db:
        for found in list_runs(runs_dir):
            if isinstance(found, PipelineError):
                skipped.append((found.run_id or "?", found.problem))
                seen.add(found.run_id or "")
                continue
            try:
                inputs = _inputs(found)
                if inputs is None:
                    continue
                seen.add(found.run_id)
                done[_index(db, inputs, rules)].append(found.run_id)
            except (PipelineError, OSError) as e:
                seen.add(found.run_id)
                skipped.append((found.run_id, one_line(e)))
        held = [r[0] for r in db.execute("SELECT run_id FROM runs ORDER BY run_id")]
        removed = [r for r in held if r not in seen and _gone(runs_dir, r)]
        for run_id in removed:
            drop(db, run_id)
        return SyncReport(
            tuple(done["added"]),
            tuple(done["updated"]),
            tuple(removed),
            len(done["unchanged"]),
            tuple(skipped),
            _count(db),
        )


def remember(run: Run) -> int:
    """Index ``run`` now, in the memory database of the runs folder it is in (call it when
    a run finishes); return how many memories it has there (0 when its conversation is
    not finished, or it is forgotten).

    Raises:
        MemoryStoreError: the database cannot be opened or written.
        RunError: the run's transcript or verdict cannot be read.
    """
    runs_dir = run.folder.parent
    rules = read_rules(runs_dir)
    inputs = _inputs(run)
    with connect(runs_dir) as db:
        if inputs is None:
            drop(db, run.run_id)
            return 0
        _index(db, inputs, rules)
        found = db.execute("SELECT count(*) FROM memories WHERE run_id = ?", (run.run_id,))
        return int(found.fetchone()[0])


def rebuild(runs_dir: Path) -> SyncReport:
    """Drop the memory database's tables and index the runs folder anew (forgotten
    memories stay out); a file that is no database, or a damaged one, is deleted and made
    again. Raises as :func:`sync`."""
    try:
        with connect(runs_dir) as db:
            ensure_schema(db, fresh=True)
    except MemoryStoreError as e:
        cause = e.__cause__
        if not isinstance(cause, sqlite3.DatabaseError) or isinstance(
            cause,
            sqlite3.OperationalError,  # busy, locked, unwritable: not damage
        ):
            raise
        for suffix in ("", "-wal", "-shm"):
            database(runs_dir).with_name(DATABASE + suffix).unlink(missing_ok=True)
    return sync(runs_dir)


# -- reading ----------------------------------------------------------------------------

_SELECT = (
    "SELECT m.run_id, m.turn, m.role, m.kind, m.model, m.time, r.task, m.content, r.score,"
    " m.keep, m.reason, m.improvements"
)


def _memory(row: sqlite3.Row, snippet: str | None = None, rank: float | None = None) -> Memory:
    keep = row["keep"]
    return Memory(
        run_id=row["run_id"],
        turn=row["turn"],
        role=row["role"],
        kind=row["kind"],
        model=row["model"],
        time=row["time"],
        task=row["task"],
        content=row["content"],
        score=row["score"],
        keep=None if keep is None else bool(keep),
        reason=row["reason"],
        improvements=row["improvements"],
        snippet=snippet,
        rank=rank,
    )


def _filters(role: str | None, min_score: float | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    values: list[Any] = []
    if role is not None:
        clauses.append("m.role = ?")
        values.append(role)
    if min_score is not None:
        clauses.append("r.score >= ?")
        values.append(min_score)
    return "".join(f" AND {c}" for c in clauses), values


def search(
    runs_dir: Path,
    query: str,
    *,
    role: str | None = None,
    min_score: float | None = None,
    limit: int = 20,
) -> list[Memory]:
    """The memories whose content matches ``query`` (FTS5 query syntax: words, "a
    phrase", prefix*, AND, OR, NOT, NEAR(...)), best first (bm25), at most ``limit``,
    each with a snippet; only ``role``'s, and only those of runs the judge scored
    ``min_score`` or more, when given. Reads the database as it is: :func:`sync` first.

    Raises:
        MemoryStoreError: the query is empty or not one FTS5 can parse (the message says
            how to quote it), or the database cannot be read.
    """
    if not query.strip():
        raise MemoryStoreError("the search is empty", fix=Fix("give words to search for"))
    where, values = _filters(role, min_score)
    sql = (
        f"{_SELECT}, snippet(memories_fts, 0, '[', ']', '...', 12) AS snippet,"
        " bm25(memories_fts) AS rank FROM memories_fts"
        " JOIN memories m ON m.id = memories_fts.rowid JOIN runs r ON r.run_id = m.run_id"
        f" WHERE memories_fts MATCH ?{where} ORDER BY rank, m.run_id, m.turn LIMIT ?"
    )
    with connect(runs_dir) as db:
        try:
            rows = db.execute(sql, [query, *values, limit]).fetchall()
        except sqlite3.OperationalError as e:
            if not str(e).startswith(("fts5:", "no such column", "unterminated string")):
                raise
            raise MemoryStoreError(
                f"cannot search for {query!r}: {one_line(e, 120)}",
                fix=Fix(
                    "put a word with characters other than letters and digits, or a phrase, "
                    'in double quotes ("gpt-4o", "home battery")'
                ),
            ) from e
        return [_memory(r, snippet=r["snippet"], rank=r["rank"]) for r in rows]


def memories(
    runs_dir: Path,
    *,
    role: str | None = None,
    min_score: float | None = None,
    keep_only: bool = False,
) -> list[Memory]:
    """The memories held, by run and turn: only ``role``'s, of runs judged ``min_score``
    or more, whose reflection says keep (``keep_only``), as asked. Reads the database as
    it is: :func:`sync` first.

    Raises:
        MemoryStoreError: the database cannot be read.
    """
    where, values = _filters(role, min_score)
    if keep_only:
        where += " AND m.keep = 1"
    sql = (
        f"{_SELECT} FROM memories m JOIN runs r ON r.run_id = m.run_id"
        f" WHERE 1{where} ORDER BY m.run_id, m.turn"
    )
    with connect(runs_dir) as db:
        return [_memory(r) for r in db.execute(sql, values)]


# -- forgetting -------------------------------------------------------------------------


def forget(runs_dir: Path, run_id: str | None = None, role: str | None = None) -> int:
    """Forget the memories of run ``run_id``, of ``role`` (in every run made until now),
    or of ``role`` in ``run_id``; return how many the database held.

    The rule is appended to ``<runs_dir>/memory-forgotten.jsonl`` first, so :func:`sync`
    and :func:`rebuild` keep those memories out; runs made later are remembered.

    Raises:
        MemoryStoreError: neither is given, or the database cannot be written.
        RunError: ``run_id`` is no run of the folder, nor of the database.
    """
    if run_id is None and role is None:
        raise MemoryStoreError(
            "nothing to forget: name a run or a role", fix=Fix("give a RUN_ID or a role")
        )
    with connect(runs_dir) as db:
        if run_id is not None:
            known = stored(db, run_id) is not None
            if not known:
                open_run(runs_dir, run_id)  # RunError when there is no such run
        record(runs_dir, Rule(run_id, role, timestamp()))
        clauses = [c for c, v in (("run_id = ?", run_id), ("role = ?", role)) if v is not None]
        values = [v for v in (run_id, role) if v is not None]
        with transaction(db):
            found = db.execute(f"DELETE FROM memories WHERE {' AND '.join(clauses)}", values)
            return found.rowcount

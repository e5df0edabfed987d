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
rebuild keeps it out.

Storage: the standard library's ``sqlite3``. ``sqlite-utils`` would add a dependency for
what a few lines of SQL do here, and its conveniences (schema inference, upserts without a
transaction of our choosing) are the opposite of what concurrent writers need: one explicit
``BEGIN IMMEDIATE`` transaction per run. The database is in WAL mode (readers never wait
for a writer) with ``synchronous=NORMAL`` (safe from corruption; a power cut may lose the
last transactions, which the next :func:`sync` redoes) and a busy timeout of
:data:`BUSY_TIMEOUT` seconds, so two processes syncing at once wait for each other's
transaction and neither duplicates nor loses a row. Schema (``PRAGMA user_version`` =
:data:`SCHEMA_VERSION`; a database of another version is rebuilt)::

    runs(run_id PRIMARY KEY, task, created, imported, score,     -- one per indexed run
         transcript_sha256, verdict_sha256, reflections_sha256,   -- what it was indexed
         forgotten_sha256, indexed)                               --   from (NULL: none)
    memories(id INTEGER PRIMARY KEY, run_id, turn, role, kind, model, time, content,
             keep, reason, improvements, UNIQUE(run_id, turn))    -- one per turn
    memories_fts USING fts5(content, content='memories', content_rowid='id')

``memories_fts`` is an external-content FTS5 index kept in step by triggers. Its rowid is
the explicit ``id`` (an implicit rowid could change on ``VACUUM``); ``(run_id, turn)`` is
the key that makes a second copy of a turn impossible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import stages
from .errors import Fix, MemoryStoreError, PipelineError, one_line
from .records import canonical_json, timestamp
from .resources import file_sha256
from .runs import MANIFEST, Run, list_runs, open_run

DATABASE = "memory.db"
FORGOTTEN = "memory-forgotten.jsonl"
REFLECTIONS = "reflect/reflections.json"
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 60.0
"""Seconds a writer waits for another's transaction (one run's turns) before failing."""

_SCHEMA = (
    """CREATE TABLE runs (
        run_id TEXT PRIMARY KEY, task TEXT NOT NULL, created TEXT NOT NULL,
        imported INTEGER NOT NULL, score NUMERIC,
        transcript_sha256 TEXT NOT NULL, verdict_sha256 TEXT, reflections_sha256 TEXT,
        forgotten_sha256 TEXT, indexed TEXT NOT NULL)""",
    """CREATE TABLE memories (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, turn INTEGER NOT NULL,
        role TEXT NOT NULL, kind TEXT NOT NULL, model TEXT, time TEXT NOT NULL,
        content TEXT NOT NULL, keep INTEGER, reason TEXT, improvements TEXT,
        UNIQUE (run_id, turn))""",
    "CREATE INDEX memories_role ON memories (role)",
    """CREATE VIRTUAL TABLE memories_fts USING fts5(
        content, content='memories', content_rowid='id',
        tokenize='unicode61 remove_diacritics 2')""",
    """CREATE TRIGGER memories_ai AFTER INSERT ON memories BEGIN
        INSERT INTO memories_fts (rowid, content) VALUES (new.id, new.content);
    END""",
    """CREATE TRIGGER memories_ad AFTER DELETE ON memories BEGIN
        INSERT INTO memories_fts (memories_fts, rowid, content)
        VALUES ('delete', old.id, old.content);
    END""",
    """CREATE TRIGGER memories_au AFTER UPDATE ON memories BEGIN
        INSERT INTO memories_fts (memories_fts, rowid, content)
        VALUES ('delete', old.id, old.content);
        INSERT INTO memories_fts (rowid, content) VALUES (new.id, new.content);
    END""",
)
_TABLES = ("memories_fts", "memories", "runs")
_FINGERPRINT = ("transcript_sha256", "verdict_sha256", "reflections_sha256", "forgotten_sha256")


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


def database(runs_dir: Path) -> Path:
    """The memory database of ``runs_dir``: ``<runs_dir>/memory.db``."""
    return runs_dir / DATABASE


# -- the database -----------------------------------------------------------------------


@contextlib.contextmanager
def _connect(runs_dir: Path) -> Iterator[sqlite3.Connection]:
    """An open connection (autocommit: transactions are explicit), the schema in place.
    sqlite3 errors inside the block become one-line :class:`MemoryStoreError`s."""
    path = database(runs_dir)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    except (OSError, sqlite3.Error) as e:
        raise MemoryStoreError(f"cannot open the memory database {path}: {e}", path=path) from e
    try:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA recursive_triggers = ON")  # INSERT OR REPLACE's deletes update FTS
        _ensure_schema(db)
        yield db
    except sqlite3.DatabaseError as e:
        raise MemoryStoreError(
            f"the memory database {path} failed: {one_line(e)}",
            fix=Fix("make it again from the runs", command=("memory", "rebuild")),
            path=path,
        ) from e
    finally:
        db.close()


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (``BEGIN IMMEDIATE``: a second writer waits
    here, not half-way through); rolled back if the block raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _ensure_schema(db: sqlite3.Connection, *, fresh: bool = False) -> None:
    if not fresh and db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    with _transaction(db):
        if not fresh and db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return  # another process made it meanwhile
        for table in _TABLES:  # derived data: a database of another version is made anew
            db.execute(f"DROP TABLE IF EXISTS {table}")
        for statement in _SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


# -- forgotten memories -----------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """A line of :data:`FORGOTTEN`: the memories of ``run_id`` (any when None) spoken by
    ``role`` (any when None), in runs made up to ``time``."""

    run_id: str | None
    role: str | None
    time: str

    def covers(self, run_id: str, created: str) -> bool:
        return self.run_id in (None, run_id) and _instant(created) <= _instant(self.time)


def _instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _rules(runs_dir: Path) -> list[_Rule]:
    """The rules of :data:`FORGOTTEN` (none when it does not exist). A last line cut short
    by a crash is ignored, as in a transcript.

    Raises:
        MemoryStoreError: a complete line is not a rule.
    """
    path = runs_dir / FORGOTTEN
    try:
        data = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise MemoryStoreError(f"cannot read {path}: {e}", path=path) from e
    rules = []
    for number, line in enumerate(data[: data.rfind("\n") + 1].splitlines(), start=1):
        try:
            value = json.loads(line)
            rules.append(_Rule(value.get("run_id"), value.get("role"), value["time"]))
            _instant(rules[-1].time)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MemoryStoreError(
                f"line {number} of {path} is not a forgotten-memory rule ({one_line(e, 80)})",
                fix=Fix("fix or delete that line"),
                path=path,
            ) from e
    return rules


# -- indexing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    """What a finished run's memories are made from, and the sha256 of each (None: not
    used): the transcript, the verdict (a done judge), the reflections (a done reflect)."""

    run: Run
    judged: bool
    reflected: bool
    hashes: tuple[str | None, str | None, str | None]

    def fingerprint(self, rules: Sequence[_Rule]) -> tuple[str | None, ...]:
        """The hashes and that of the forgotten-memory rules that cover the run (None:
        none): what the ``runs`` table records to tell a changed run."""
        mine = [asdict(r) for r in _covering(self.run, rules)]
        forgotten = hashlib.sha256(canonical_json(mine).encode()).hexdigest() if mine else None
        return (*self.hashes, forgotten)


def _covering(run: Run, rules: Sequence[_Rule]) -> list[_Rule]:
    return [r for r in rules if r.covers(run.run_id, run.manifest.created)]


def _inputs(run: Run) -> _Inputs | None:
    """The inputs of ``run``'s memories, or None when its conversation is not finished."""
    from .judge import VERDICT

    now = stages.statuses(run)
    if now[stages.conversation_stage(run)] != "done":
        return None
    judged = now.get("judge") == "done"
    reflect = now.get("reflect")
    if reflect is None:  # a graph without the stage: its recorded status
        entry = run.manifest.stages.get("reflect")
        reflect = entry.status if entry is not None else None
    reflected = reflect == "done" and run.path(REFLECTIONS).is_file()
    hashes = (
        file_sha256(run.path(run.transcript)),
        file_sha256(run.path(VERDICT)) if judged else None,
        file_sha256(run.path(REFLECTIONS)) if reflected else None,
    )
    return _Inputs(run, judged, reflected, hashes)


def _reflections(run: Run) -> dict[str, Mapping[str, Any]]:
    """Each role's reflection in ``reflect/reflections.json``, by role name; what is
    missing or malformed counts as no reflection."""
    try:
        found = json.loads(run.path(REFLECTIONS).read_text(encoding="utf-8"))["reflections"]
        return {
            r["role"]: r for r in found if isinstance(r, dict) and isinstance(r.get("role"), str)
        }
    except (OSError, ValueError, KeyError, TypeError):
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


def _stored(db: sqlite3.Connection, run_id: str) -> tuple[str | None, ...] | None:
    row = db.execute(
        f"SELECT {', '.join(_FINGERPRINT)} FROM runs WHERE run_id = ?", (run_id,)
    ).fetchone()
    return None if row is None else tuple(row)


def _index(db: sqlite3.Connection, inputs: _Inputs, rules: Sequence[_Rule]) -> str:
    """Store the memories of ``inputs``'s run, in one transaction, unless they are stored
    from the same inputs already: ``"added"``, ``"updated"`` or ``"unchanged"``.

    The forgotten-memory rules are read again inside the transaction: a :func:`forget`
    that ran since ``rules`` were read is obeyed (it records its rule before it deletes)."""
    from .judge import load_verdict

    run = inputs.run
    if _stored(db, run.run_id) == inputs.fingerprint(rules):
        return "unchanged"
    score = load_verdict(run).score if inputs.judged else None
    rows = _rows(inputs)
    with _transaction(db):
        rules = _rules(run.folder.parent)
        fingerprint = inputs.fingerprint(rules)
        before = _stored(db, run.run_id)  # as it is now that this process writes alone
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


def _drop(db: sqlite3.Connection, run_id: str) -> None:
    with _transaction(db):
        db.execute("DELETE FROM memories WHERE run_id = ?", (run_id,))
        db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))


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
    rules = _rules(runs_dir)
    done: dict[str, list[str]] = {"added": [], "updated": [], "unchanged": []}
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()  # finished, or unreadable: their memories stay
    with _connect(runs_dir) as db:
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
            _drop(db, run_id)
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
    rules = _rules(runs_dir)
    inputs = _inputs(run)
    with _connect(runs_dir) as db:
        if inputs is None:
            _drop(db, run.run_id)
            return 0
        _index(db, inputs, rules)
        found = db.execute("SELECT count(*) FROM memories WHERE run_id = ?", (run.run_id,))
        return int(found.fetchone()[0])


def rebuild(runs_dir: Path) -> SyncReport:
    """Drop the memory database's tables and index the runs folder anew (forgotten
    memories stay out). Raises as :func:`sync`."""
    with _connect(runs_dir) as db:
        _ensure_schema(db, fresh=True)
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
    with _connect(runs_dir) as db:
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
    with _connect(runs_dir) as db:
        return [_memory(r) for r in db.execute(sql, values)]


# -- forgetting -------------------------------------------------------------------------


def forget(runs_dir: Path, run_id: str | None = None, role: str | None = None) -> int:
    """Forget the memories of run ``run_id``, of ``role`` (in every run made until now),
    or of ``role`` in ``run_id``; return how many the database held.

    The rule is appended to ``<runs_dir>/memory-forgotten.jsonl`` first, so :func:`sync`
    and :func:`rebuild` keep those memories out; runs made later are remembered.

    Raises:
        MemoryStoreError: neither is given, or ``run_id`` is no run of the folder nor of
            the database.
    """
    if run_id is None and role is None:
        raise MemoryStoreError(
            "nothing to forget: name a run or a role", fix=Fix("give a RUN_ID or a role")
        )
    with _connect(runs_dir) as db:
        if run_id is not None:
            known = _stored(db, run_id) is not None
            if not known:
                open_run(runs_dir, run_id)  # RunError when there is no such run
        rule = _Rule(run_id, role, timestamp())
        _append(runs_dir / FORGOTTEN, json.dumps(asdict(rule), ensure_ascii=False))
        clauses = [c for c, v in (("run_id = ?", run_id), ("role = ?", role)) if v is not None]
        values = [v for v in (run_id, role) if v is not None]
        with _transaction(db):
            found = db.execute(f"DELETE FROM memories WHERE {' AND '.join(clauses)}", values)
            return found.rowcount


def _append(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())

"""The memory store's files: the SQLite database and the list of forgotten memories.

Storage: the standard library's ``sqlite3``. ``sqlite-utils`` would add a dependency for
what a few lines of SQL do here, and its conveniences (schema inference, upserts without a
transaction of our choosing) are the opposite of what concurrent writers need: one explicit
``BEGIN IMMEDIATE`` transaction per run. The database is in WAL mode (readers never wait
for a writer) with ``synchronous=NORMAL`` (safe from corruption; a power cut may lose the
last transactions, which the next :func:`pipeline.memory.sync` redoes) and a busy timeout of
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

Forgotten memories are kept in the runs folder, the source of truth, in
``memory-forgotten.jsonl`` (:data:`FORGOTTEN`): one JSON object per line,
``{"run_id": ID or null, "role": NAME or null, "time": ISO 8601 UTC}``: the memories of
that run (any, when null) spoken by that role (any, when null), in runs made up to
``time`` (:class:`Rule`). :mod:`pipeline.memory` indexes and reads through this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import Fix, MemoryStoreError, one_line
from .records import parse_time

DATABASE = "memory.db"
FORGOTTEN = "memory-forgotten.jsonl"
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 60.0
"""Seconds a writer waits for another's transaction (one run's turns) before failing."""

SCHEMA = (
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
TABLES = ("memories_fts", "memories", "runs")
FINGERPRINT = ("transcript_sha256", "verdict_sha256", "reflections_sha256", "forgotten_sha256")


def database(runs_dir: Path) -> Path:
    """The memory database of ``runs_dir``: ``<runs_dir>/memory.db``."""
    return runs_dir / DATABASE


# -- the database ---------------------------------------------------------------------


@contextlib.contextmanager
def connect(runs_dir: Path) -> Iterator[sqlite3.Connection]:
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
        _wal(db)
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA recursive_triggers = ON")  # INSERT OR REPLACE's deletes update FTS
        ensure_schema(db)
        yield db
    except sqlite3.OperationalError as e:
        if "locked" not in str(e) and "busy" not in str(e):
            raise _damaged(path, e) from e
        raise MemoryStoreError(
            f"the memory database {path} is in use by another process ({one_line(e)}, "
            f"after {BUSY_TIMEOUT:g} s)",
            fix=Fix("try again when it is done"),
            path=path,
        ) from e
    except sqlite3.DatabaseError as e:
        raise _damaged(path, e) from e
    finally:
        db.close()


def _damaged(path: Path, e: sqlite3.DatabaseError) -> MemoryStoreError:
    return MemoryStoreError(
        f"the memory database {path} failed: {one_line(e)}",
        fix=Fix("make it again from the runs", command=("memory", "rebuild")),
        path=path,
    )


def _wal(db: sqlite3.Connection) -> None:
    """Put the database in WAL mode (it stays so). Switching takes the file to itself and
    SQLite answers "locked" at once, without waiting, while another process uses it (two
    processes opening a new database together): so try again, for up to
    :data:`BUSY_TIMEOUT` seconds."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal":
                return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e):
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("database is locked (cannot switch it to WAL mode)")
        time.sleep(0.02)


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, taken at once (``BEGIN IMMEDIATE``: a second writer waits
    here, not half-way through); rolled back if the block raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def ensure_schema(db: sqlite3.Connection, *, fresh: bool = False) -> None:
    """Make the tables unless they are there at :data:`SCHEMA_VERSION`; with ``fresh``,
    drop them and make them anew (:func:`pipeline.memory.rebuild`)."""
    if not fresh and db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    with transaction(db):
        if not fresh and db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return  # another process made it meanwhile
        for table in TABLES:  # derived data: a database of another version is made anew
            db.execute(f"DROP TABLE IF EXISTS {table}")
        for statement in SCHEMA:
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def stored(db: sqlite3.Connection, run_id: str) -> tuple[str | None, ...] | None:
    """What run ``run_id`` was indexed from (the ``runs`` table's hashes, in the order of
    :data:`FINGERPRINT`), or None when it is not indexed."""
    row = db.execute(
        f"SELECT {', '.join(FINGERPRINT)} FROM runs WHERE run_id = ?", (run_id,)
    ).fetchone()
    return None if row is None else tuple(row)


def drop(db: sqlite3.Connection, run_id: str) -> None:
    """Take run ``run_id`` and its memories out, in one transaction."""
    with transaction(db):
        db.execute("DELETE FROM memories WHERE run_id = ?", (run_id,))
        db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))


# -- forgotten memories -----------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A line of :data:`FORGOTTEN`: the memories of ``run_id`` (any when None) spoken by
    ``role`` (any when None), in runs made up to ``time``."""

    run_id: str | None
    role: str | None
    time: str

    def covers(self, run_id: str, created: str) -> bool:
        """True for a run ``run_id`` made at ``created`` (ISO 8601 UTC)."""
        return self.run_id in (None, run_id) and parse_time(created) <= parse_time(self.time)


def read_rules(runs_dir: Path) -> list[Rule]:
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
            rules.append(Rule(value.get("run_id"), value.get("role"), value["time"]))
            parse_time(rules[-1].time)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MemoryStoreError(
                f"line {number} of {path} is not a forgotten-memory rule ({one_line(e, 80)})",
                fix=Fix("fix or delete that line"),
                path=path,
            ) from e
    return rules


def record(runs_dir: Path, rule: Rule) -> None:
    """Append ``rule`` to :data:`FORGOTTEN` and make it durable (flush and fsync)."""
    path = runs_dir / FORGOTTEN
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(rule), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())

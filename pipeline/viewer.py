"""What ``pipeline view`` shows, read from the runs folder (no web framework here).

- the runs list: :class:`Listing`, one :class:`RunRow` per run, each kept until one of
  the files it was read from changes (once read, 500 runs are listed from stats alone);
- a run page: :func:`run_page` (roles, transcript, tool calls, the tree of delegated
  runs, verdict, reflections, the stages that recorded model calls);
- the recorded calls of a turn or a stage, on demand: :func:`turn_calls`,
  :func:`stage_calls`;
- the live transcript of a running dialogue: :class:`Tail`, :func:`running`;
- a run's file, only from inside its folder: :func:`resolve`.

Nothing here writes to the runs folder.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PipelineError, RunError
from .runs import (
    IMPORTED_TRANSCRIPT,
    MANIFEST,
    RUN_ID_RE,
    TRANSCRIPT,
    Run,
    open_run,
)
from .stages import conversation_stage, graph, planned_stages, require, statuses, wanted
from .termination import strip_token
from .views import ended_by

if TYPE_CHECKING:
    from .records import RolesDocument, Turn, Verdict

# The files a row of the runs list is read from: it is read again when one changes.
_ROW_FILES = (
    MANIFEST,
    TRANSCRIPT,
    IMPORTED_TRANSCRIPT,
    "director/roles.json",
    "import/roles.json",
    "judge/verdict.json",
)
VERDICT = "judge/verdict.json"
COLOURS = 12  # speaker colours in the stylesheet (.speaker-0 ... .speaker-11)


@dataclass(frozen=True)
class RunRow:
    """One run in the runs list.

    Attributes:
        status: the run as a whole: ``running``, ``failed``, ``interrupted``, ``stale``
            (the first of these any stage it goes through has), else ``done`` when every
            one is done, else ``pending``.
        stages: each stage's status (:func:`pipeline.stages.statuses`).
        turns: the complete lines of its transcript.
        reason: how its conversation ended (``imported`` for an imported chat).
        score: the judge's score, when judged.
        error: why the run cannot be read (the other fields are then empty).
    """

    run_id: str
    created: str = ""
    task: str = ""
    status: str = ""
    stages: dict[str, str] = field(default_factory=dict)
    turns: int = 0
    reason: str | None = None
    score: int | None = None
    parent: str | None = None
    error: str | None = None

    def matches(self, text: str = "", status: str = "") -> bool:
        """True when the row's task or id holds ``text`` (any case) and its status is
        ``status`` (either may be empty: anything)."""
        if status and self.status != status and not (status == "unreadable" and self.error):
            return False
        needle = text.strip().lower()
        return not needle or needle in self.task.lower() or needle in self.run_id


STATUSES = ("done", "failed", "interrupted", "pending", "running", "stale")  # of overall


def shown_stages(run: Run, found: Mapping[str, str]) -> dict[str, str]:
    """``found`` (each stage's status) for the stages ``run`` goes through: the graph's,
    optional ones when planned or run."""
    return {n.name: found[n.name] for n in wanted(run, planned_stages(run))}


def overall(shown: Mapping[str, str]) -> str:
    """The status of a run as a whole, from its stages' (:func:`shown_stages`; see
    :attr:`RunRow.status`)."""
    for word in ("running", "failed", "interrupted", "stale"):
        if word in shown.values():
            return word
    return "done" if all(s == "done" for s in shown.values()) else "pending"


def count_lines(path: Path) -> int:
    """The complete lines of a file (0 when there is none), without parsing them."""
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def judge_score(run: Run) -> int | None:
    """The judge's score of ``run``, None when it has no readable verdict."""
    try:
        score = json.loads(run.path(VERDICT).read_text(encoding="utf-8")).get("score")
    except (OSError, ValueError, AttributeError):
        return None
    return score if isinstance(score, int) else None


def read_row(runs_dir: Path, run_id: str) -> RunRow:
    """The row of run ``run_id``, read from its files."""
    try:
        run = open_run(runs_dir, run_id)
        found = statuses(run)
    except RunError as e:
        return RunRow(run_id, error=e.message)
    reason = ended_by(run, found)
    link = run.manifest.parent
    return RunRow(
        run_id=run.run_id,
        created=run.manifest.created,
        task=run.task,
        status=overall(shown := shown_stages(run, found)),
        stages=shown,
        turns=count_lines(run.path(run.transcript)),
        reason=reason,
        score=judge_score(run),
        parent=link.run_id if link else None,
    )


def _stamp(folder: str) -> tuple[tuple[int, int] | None, ...]:
    """What the row of the run in ``folder`` depends on: each file's time and size."""
    out: list[tuple[int, int] | None] = []
    for name in _ROW_FILES:
        try:
            st = os.stat(os.path.join(folder, name))
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


class Listing:
    """The runs of a folder, one :class:`RunRow` each, sorted by id (by time). A row is
    read again only when one of its files changed, or while a stage of it is running
    (whether its process is alive is not in any file). One listing is read at a time:
    a second caller waits for the first and gets the rows it kept."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self._rows: dict[str, tuple[tuple[tuple[int, int] | None, ...], RunRow]] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The ids of the runs in the folder, sorted (by time), without reading them."""
        try:
            return sorted(
                entry.name
                for entry in os.scandir(self.runs_dir)
                if RUN_ID_RE.match(entry.name) and entry.is_dir()
            )
        except (FileNotFoundError, NotADirectoryError):
            return []

    def rows(self, names: Sequence[str] | None = None) -> list[RunRow]:
        """The rows of the runs ``names`` (all of them when None), in that order."""
        with self._lock:
            return self._read(self.names() if names is None else list(names), names is None)

    def _read(self, names: list[str], everything: bool) -> list[RunRow]:
        base = str(self.runs_dir)
        out = []
        for name in names:
            stamp = _stamp(os.path.join(base, name))
            kept = self._rows.get(name)
            if kept is not None and kept[0] == stamp:
                out.append(kept[1])
                continue
            row = read_row(self.runs_dir, name)
            if "running" not in row.stages.values():
                self._rows[name] = (stamp, row)
            out.append(row)
        if everything:
            for gone in set(self._rows) - set(names):
                del self._rows[gone]
        return out


# -- a run's page ----------------------------------------------------------------------


@dataclass(frozen=True)
class CallView:
    """A tool call of a turn, with the run it delegated to, if any."""

    id: str
    name: str
    arguments: str
    result: str | None
    error: str | None
    child: str | None


@dataclass(frozen=True)
class TurnView:
    """A turn as the page shows it.

    Attributes:
        colour: the speaker's colour (its position among the roles, modulo :data:`COLOURS`).
        content: what was said, the done token left out.
        calls: the model calls recorded for it can be asked for (a generated turn of a
            run whose calls are timed).
        children: runs its tool calls delegated to that no call names.
    """

    turn: int
    role: str
    colour: int
    kind: str
    content: str
    model: str | None
    time: str | None
    tool_calls: tuple[CallView, ...]
    calls: bool
    children: tuple[str, ...] = ()


def turn_view(
    line: Turn, done_token: str, children: Mapping[tuple[int, str | None], str], timed: bool
) -> TurnView:
    """``line`` as the page shows it; ``children`` maps (turn, tool call id) to the run
    that call delegated to (``None`` for a call the link does not name)."""
    calls = tuple(
        CallView(c.id, c.name, c.arguments, c.result, c.error, children.get((line.turn, c.id)))
        for c in line.tool_calls
    )
    ids = {c.id for c in calls}
    loose = tuple(
        r for (turn, call), r in children.items() if turn == line.turn and call not in ids
    )
    return TurnView(
        turn=line.turn,
        role=line.role,
        colour=line.role_index % COLOURS,
        kind=line.kind,
        content=strip_token(line.content, done_token),
        model=line.model,
        time=line.time,
        tool_calls=calls,
        calls=timed and line.kind == "generated" and line.time is not None,
        children=loose,
    )


@dataclass(frozen=True)
class TreeNode:
    """A run of a tree of delegated runs, with the runs it delegated to."""

    run_id: str
    task: str = ""
    status: str = ""
    current: bool = False
    error: str | None = None
    children: tuple[TreeNode, ...] = ()


def tree(run: Run) -> TreeNode | None:
    """The tree of delegated runs ``run`` belongs to, from its root; None for a run that
    is in none."""
    if run.manifest.parent is None and not run.manifest.children:
        return None
    runs_dir = run.folder.parent
    root = run
    seen = {run.run_id}
    while root.manifest.parent is not None and root.manifest.parent.run_id not in seen:
        try:
            root = open_run(runs_dir, root.manifest.parent.run_id)
        except RunError:
            break
        seen.add(root.run_id)

    def node(r: Run, depth: int) -> TreeNode:
        kids = []
        for name in (r.manifest.children or []) if depth < 32 else []:
            try:
                kids.append(node(open_run(runs_dir, name), depth + 1))
            except RunError as e:
                kids.append(TreeNode(name, error=e.message))
        found = statuses(r)
        return TreeNode(
            r.run_id, r.task, found.get(conversation_stage(r), ""), r.run_id == run.run_id,
            children=tuple(kids),
        )  # fmt: skip

    return node(root, 0)


@dataclass(frozen=True)
class RunPage:
    """Everything a run's page shows.

    Attributes:
        status, stages: the run's status as a whole, and each stage's.
        roles: its roles (an imported chat's speakers), None when it has none yet;
            ``problems`` says why when they cannot be read.
        turns: the transcript, ``lines`` of it (the live stream goes on from there).
        live: a stage is running: the page follows the transcript as it is written.
        call_stages: the stages that recorded model calls.
        files: each stage's files, relative to the run folder.
    """

    run: Run
    status: str
    stages: dict[str, str]
    roles: RolesDocument | None
    turns: tuple[TurnView, ...]
    lines: int
    verdict: Verdict | None
    reflections: tuple[Mapping[str, Any], ...]
    tree: TreeNode | None
    live: bool
    call_stages: tuple[str, ...]
    files: tuple[str, ...]
    reason: str | None
    problems: tuple[str, ...] = ()


def load_roles(run: Run) -> RolesDocument | None:
    """``run``'s roles or speakers (:func:`pipeline.director.load_roles`), None before
    its director is done.

    Raises:
        PipelineError: they cannot be read.
    """
    from .director import load_roles as roles_of

    if not run.imported and run.stage("director").status != "done":
        return None
    return roles_of(run)


def children_by_call(run: Run) -> dict[tuple[int, str | None], str]:
    """The runs ``run`` delegated to, by the turn and tool call that made each."""
    found: dict[tuple[int, str | None], str] = {}
    runs_dir = run.folder.parent
    for name in run.manifest.children or []:
        try:
            link = open_run(runs_dir, name).manifest.parent
        except RunError:
            continue
        if link is not None:
            found[(link.turn, link.tool_call_id)] = name
    return found


def run_page(run: Run) -> RunPage:
    """What ``run``'s page shows; a part that cannot be read is left out, and why is in
    ``problems``."""
    from .judge import load_verdict
    from .reflect import load_reflections

    problems: list[str] = []
    found = statuses(run)
    roles = None
    try:
        roles = load_roles(run)
    except PipelineError as e:
        problems.append(e.message)
    try:
        lines = run.read_transcript()
    except RunError as e:
        problems.append(e.message)
        lines = []
    timed = calls_timed(run)
    children = children_by_call(run)
    token = roles.done_token if roles is not None else ""
    turns = tuple(turn_view(line, token, children, timed) for line in lines)
    verdict = None
    if run.path(VERDICT).is_file():
        try:
            verdict = load_verdict(run)
        except PipelineError as e:
            problems.append(e.message)
    try:
        reflections = tuple(load_reflections(run))
    except PipelineError as e:
        problems.append(e.message)
        reflections = ()
    names = [node.name for node in graph(run)]
    ended = ended_by(run, found)
    files = [MANIFEST] + [f for name in names for f in run.stage_files(name)]
    return RunPage(
        run=run,
        status=overall(shown := shown_stages(run, found)),
        stages=shown,
        roles=roles,
        turns=turns,
        lines=len(lines),
        verdict=verdict,
        reflections=reflections,
        tree=tree(run),
        live="running" in found.values(),
        call_stages=tuple(n for n in names if run.path(f"{n}/calls").is_dir()),
        files=tuple(files),
        reason=None if ended == "imported" else ended,
        problems=tuple(problems),
    )


# -- recorded calls --------------------------------------------------------------------


def _call_files(run: Run, stage: str) -> list[Path]:
    return sorted(run.path(f"{stage}/calls").glob("*.json"))


def read_call_times(run: Run, stage: str) -> list[tuple[Path, str | None]]:
    """Each call file of ``stage``, in order, with the time its answer was complete."""
    out = []
    for path in _call_files(run, stage):
        try:
            out.append((path, json.loads(path.read_text(encoding="utf-8")).get("time")))
        except (OSError, ValueError, AttributeError):
            out.append((path, None))
    return out


def calls_timed(run: Run) -> bool:
    """True unless ``run``'s dialogue calls were recorded before their times were (one
    recording is all of one kind: its first call says)."""
    first = _call_files(run, "dialogue")[:1]
    try:
        return not first or json.loads(first[0].read_text(encoding="utf-8")).get("time") is not None
    except (OSError, ValueError, AttributeError):
        return False


def _call_json(path: Path) -> dict[str, Any]:
    """A call file as the page shows it: its number, then the record as stored."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {"number": path.stem, "unreadable": str(e)}
    return {"number": path.stem, **(record if isinstance(record, dict) else {})}


def stage_calls(run: Run, stage: str) -> list[dict[str, Any]]:
    """Every model call ``stage`` of ``run`` recorded (its current attempt), in order.

    Raises:
        RunError: ``run`` has no such stage.
    """
    require(run, stage)
    return [_call_json(path) for path in _call_files(run, stage)]


def turn_calls(run: Run, turn: int) -> list[dict[str, Any]]:
    """The model calls recorded for turn ``turn`` of ``run``'s dialogue: those whose
    answer came after the turn before it was complete and no later than it (the
    moderator's choice of its speaker, its rounds of tool calls, a failed try); none for
    a turn no model generated.

    Raises:
        RunError: the run has no such turn, or its turns or calls have no times (made
            before they were recorded).
    """
    lines = run.read_transcript()
    index = next((i for i, line in enumerate(lines) if line.turn == turn), None)
    if index is None:
        raise RunError(f"run {run.run_id} has no turn {turn}", run_id=run.run_id)
    if lines[index].kind != "generated":
        return []  # the opening line, a person's turn, an imported one: no model was asked
    end = lines[index].time
    earlier = [line.time for line in lines[:index] if line.time]
    start = earlier[-1] if earlier else ""
    if end is None:
        raise RunError(f"turn {turn} of run {run.run_id} has no time", run_id=run.run_id)
    calls = read_call_times(run, "dialogue")
    return [_call_json(path) for path, t in calls if t is not None and start < t <= end]


# -- live ------------------------------------------------------------------------------


def running(runs_dir: Path, run_id: str) -> bool:
    """True while a stage of the run is running (recorded so, its process alive)."""
    try:
        run = open_run(runs_dir, run_id)
    except RunError:
        return False
    return any(run.alive(name) for name in list(run.manifest.stages))


class Stamp:
    """A file's size and time: :meth:`changed` says whether they differ from the last look."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: tuple[int, int] | None = None

    def changed(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        now = (st.st_size, st.st_mtime_ns)
        if now == self.seen:
            return False
        self.seen = now
        return True


class Tail:
    """The transcript lines written after the first ``after``: :meth:`poll` returns the
    complete lines written since the last call (looking at the file only when its size
    or time changed); a line that is not a turn is counted, not returned."""

    def __init__(self, path: Path, after: int = 0) -> None:
        self.path = path
        self.offset = 0
        self.count = 0
        self._seen: tuple[int, int] | None = None
        if after > 0:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = b""
            while self.count < after:
                end = data.find(b"\n", self.offset)
                if end < 0:
                    break
                self.offset, self.count = end + 1, self.count + 1

    def poll(self) -> list[tuple[int, Turn]]:
        """The complete lines written since the last call, each with its number (from 1)."""
        from .records import Turn

        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        if (st.st_size, st.st_mtime_ns) == self._seen:
            return []
        self._seen = (st.st_size, st.st_mtime_ns)
        if st.st_size < self.offset:  # cut back (a rerun started over): follow the new one
            self.offset = self.count = 0
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        out = []
        for raw in complete.splitlines():
            self.count += 1
            try:
                out.append((self.count, Turn.from_json(json.loads(raw))))
            except (ValueError, KeyError, TypeError):
                continue  # not a turn: the page has no use for it
        return out


# -- files -----------------------------------------------------------------------------


def resolve(runs_dir: Path, run_id: str, relative: str) -> Path | None:
    """The file ``relative`` of run ``run_id``, when it is one inside the run's folder
    inside ``runs_dir``; None for anything else: a name that is no run id, a path with
    ``..``, ``.``, a hidden part, a backslash, a ``%`` or a NUL, a link out of the folder,
    a folder, a file that does not exist."""
    if not RUN_ID_RE.match(run_id) or any(c in relative for c in "\\%\x00"):
        return None
    parts = relative.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    try:
        root = runs_dir.resolve()
        base = (root / run_id).resolve()
        target = (base / relative).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if base.parent != root or not target.is_relative_to(base) or not target.is_file():
        return None
    return target


def filter_rows(rows: Sequence[RunRow], text: str = "", status: str = "") -> list[RunRow]:
    """The rows that match ``text`` and ``status`` (:meth:`RunRow.matches`)."""
    return [row for row in rows if row.matches(text, status)]

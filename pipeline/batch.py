"""Many conversations at once: one run per task of a tasks file, several at a time.

A tasks file holds one task per line, or a JSON object per line with the task and
options of its own (``{"task": "...", "turns": 6, "roles": 3, "judge": true}``, and
``"reflect": true``); blank
lines and lines starting with ``#`` are skipped. Each task becomes a normal run. The
batch manifest (``<runs root>/batches/<file name>.json``) records which run each task
became, so running the same batch again skips the runs that are complete and finishes
the others (:func:`finish_run`), instead of starting them over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import memory, stages, telemetry
from .errors import ConfigError, PipelineError
from .models import Models
from .parameters import (
    DialogueParameters,
    DirectorParameters,
    Persona,
    StageOption,
    ToolParameters,
    apply_options,
    options_of,
    shown,
)
from .records import utc_now
from .runs import Run, atomic_write_json, open_run, slugify

# The options a task may set: the director's and the dialogue's command-line options, by
# name (--director-max-tokens is director_max_tokens, --loop-detection/--no-loop-detection
# is loop_detection); temperature and seed set both stages, max_tokens the dialogue's.
TASK_OPTIONS: dict[str, StageOption] = {
    spec.name: spec for spec in options_of(DirectorParameters, DialogueParameters)
}
DIRECTOR_OPTIONS = frozenset(spec.name for spec in options_of(DirectorParameters))
DIALOGUE_OPTIONS = frozenset(spec.name for spec in options_of(DialogueParameters))
OPTIONS = DIRECTOR_OPTIONS | DIALOGUE_OPTIONS | {"task", "judge", "reflect", "persona"}


@dataclass(frozen=True)
class BatchTask:
    """One line of a tasks file.

    Attributes:
        line: its line number (1-based).
        task: the task text.
        options: its own options (keys of :data:`OPTIONS` but ``task``).
        key: what identifies it across runs of the batch: sha256 of its line number and text.
    """

    line: int
    task: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.line}:{self.task}".encode()).hexdigest()[:16]


@dataclass
class Outcome:
    """How one task of the batch went: ``done``, ``skipped`` (complete before), ``failed``
    (``error`` says why, and ``exception`` is the error itself)."""

    task: BatchTask
    status: str
    run_id: str | None = None
    turns: int = 0
    ended_by: str | None = None
    error: str | None = None
    exception: PipelineError | None = None


def read_tasks(path: Path) -> list[BatchTask]:
    """The tasks of a tasks file, each task's options checked as the command line checks
    them (type, range, choices, done token form; ``judge`` a boolean).

    Raises:
        ConfigError: the file cannot be read, or a line is bad JSON, has no task, an
            unknown option or a value the option does not allow; the message names the
            file and the line (and the option: ``tasks.txt:3: turns: 0 is not in the range
            1<=x<=1000``).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read the tasks file {path}: {e.strerror}", path=path) from e
    tasks = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            tasks.append(BatchTask(number, line))
            continue
        try:
            spec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number}: not valid JSON ({e.msg})", path=path) from e
        unknown = sorted(set(spec) - OPTIONS)
        if unknown:
            raise ConfigError(
                f"{path}:{number}: unknown option {unknown[0]!r} "
                f"(known: {', '.join(sorted(OPTIONS))})",
                path=path,
            )
        task = str(spec.pop("task", "")).strip()
        if not task:
            raise ConfigError(f'{path}:{number}: no "task"', path=path)
        for name, value in spec.items():
            try:
                if name in TASK_OPTIONS:
                    spec[name] = TASK_OPTIONS[name].validate(value)
                elif name in ("judge", "reflect") and not isinstance(value, bool):
                    raise ValueError(f"{shown(value)} is not a valid boolean")
                elif name == "persona" and not (isinstance(value, str) and value):
                    raise ValueError(f"{shown(value)} is not a persona's name")
            except ValueError as e:
                raise ConfigError(f"{path}:{number}: {name}: {e}", path=path) from e
        tasks.append(BatchTask(number, task, spec))
    if not tasks:
        raise ConfigError(f"{path} holds no task; write one task per line", path=path)
    return tasks


class Batch:
    """A tasks file run against a runs root; see :meth:`run`."""

    def __init__(
        self,
        tasks_file: Path,
        runs_dir: Path,
        models: Models,
        director: DirectorParameters,
        dialogue: DialogueParameters,
        *,
        judge: bool = False,
        tools: ToolParameters | None = None,
        reflect: bool = False,
        persona: str | None = None,
    ) -> None:
        self.tasks = read_tasks(tasks_file)
        self.tools = tools or ToolParameters()
        self.tasks_file = tasks_file
        self.runs_dir = runs_dir
        self.models = models
        self.director, self.dialogue, self.judge = director, dialogue, judge
        self.reflect = reflect
        self.persona = persona
        self.path = runs_dir / "batches" / f"{tasks_file.stem}.json"
        self._lock = threading.RLock()
        self._reserved: set[str] = set()
        self.record = self._load()
        self.turns_done = 0

    def _load(self) -> dict[str, Any]:
        if self.path.exists():
            try:
                record: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8"))
                return record
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"{self.path} is not valid JSON ({e}); delete it to start over", path=self.path
                ) from e
        return {"tasks_file": str(self.tasks_file), "tasks": {}}

    def note(self, task: BatchTask, **fields: Any) -> None:
        """Set ``fields`` of ``task``'s entry in the batch manifest and save it (atomically)."""
        with self._lock:
            entry = self.record["tasks"].setdefault(
                task.key, {"line": task.line, "task": task.task}
            )
            entry.update(fields)
            atomic_write_json(self.path, self.record)

    def run_id_for(self, task: BatchTask) -> str:
        """The run id of ``task``: the one recorded, or a new one recorded before the run is
        created, so that a batch killed at any moment never makes a task's run twice."""
        with self._lock:
            recorded = self.record["tasks"].get(task.key, {}).get("run_id")
            if recorded:
                return str(recorded)
            base = f"{utc_now():%Y%m%dT%H%M%SZ}-{slugify(task.task)}"
            run_id, n = base, 1
            while run_id in self._reserved or (self.runs_dir / run_id).exists():
                n += 1
                run_id = f"{base}-{n}"
            self._reserved.add(run_id)
            self.note(task, run_id=run_id)
            return run_id

    def _parameters(self, task: BatchTask) -> tuple[DirectorParameters, DialogueParameters]:
        """The batch's parameters with ``task``'s own options applied."""
        director = apply_options(self.director, task.options)
        dialogue = apply_options(self.dialogue, task.options)
        return director, dialogue

    def _persona(self, task: BatchTask) -> Persona | None:
        """The persona ``task`` casts (its own, else the batch's), from the config.

        Raises:
            ConfigError: there is no config, or it defines no such persona.
        """
        name = task.options.get("persona", self.persona)
        if name is None:
            return None
        config = self.models.config
        if config is None:
            raise ConfigError(f"no pipeline.toml to read the persona {name!r} from")
        return config.persona(name)

    def include(self, task: BatchTask) -> tuple[str, ...]:
        """The optional stages ``task``'s run includes (``judge``, ``reflect``): its own
        choice, else the batch's."""
        return tuple(
            name
            for name, asked in (("judge", self.judge), ("reflect", self.reflect))
            if task.options.get(name, asked)
        )

    def plan(self, task: BatchTask) -> stages.Plan:
        """The parameters of ``task``'s run: the batch's, with the task's own options.

        Raises:
            ConfigError: the persona it casts is not in the config.
        """
        return stages.Plan.of(
            *self._parameters(task), tools=self.tools, persona=self._persona(task)
        )

    def complete(self, task: BatchTask) -> Run | None:
        """``task``'s run when it is complete (nothing of it is pending), else None.

        Raises:
            RunError: its manifest is unreadable.
        """
        run_id = self.record["tasks"].get(task.key, {}).get("run_id")
        if not run_id or not (self.runs_dir / run_id / "run.json").is_file():
            return None
        run = open_run(self.runs_dir, run_id)
        return None if stages.pending(run, include=self.include(task)) else run

    def _process(self, task: BatchTask) -> Outcome:
        include = self.include(task)
        run_id = self.run_id_for(task)
        try:
            plan = self.plan(task)
            folder = self.runs_dir / run_id
            if (folder / "run.json").is_file():
                run = open_run(self.runs_dir, run_id)
            else:
                if folder.exists():  # a creation cut short: a folder with no manifest yet
                    shutil.rmtree(folder)
                run = plan.new_run(
                    self.runs_dir,
                    task.task,
                    run_id=run_id,
                    judge="judge" in include,
                    reflect="reflect" in include,
                )
            if not stages.pending(run, include=include):
                return self.outcome(task, run, "skipped")
            with run.locked():
                tools = self.models.tools(self.tools)
                ctx = stages.StageContext(run, self.models, plan, tools=tools)
                stages.advance(ctx, include=include)
            self.remember(run)
        except PipelineError as e:
            return self.failed(task, run_id, e)
        return self.outcome(task, run, "done")

    def remember(self, run: Run) -> None:
        """Index ``run`` in the memory database and send its traces: the driver's work,
        never a worker's."""
        with contextlib.suppress(PipelineError):  # `memory sync` catches up
            memory.remember(run)
        with contextlib.suppress(PipelineError):  # traces are best effort
            telemetry.export_run(run)

    def failed(self, task: BatchTask, run_id: str | None, error: PipelineError) -> Outcome:
        """Record that ``task`` failed with ``error`` (to be retried by running the batch
        again), and return its outcome."""
        self.note(task, status="failed", error=error.message)
        return Outcome(task, "failed", run_id, error=error.message, exception=error)

    def outcome(self, task: BatchTask, run: Run, status: str) -> Outcome:
        """Record that ``task``'s run is complete (``status`` ``done`` now, or ``skipped``:
        before) and return its outcome."""
        entry = run.stage("dialogue")
        self.note(task, run_id=run.run_id, status="done", error=None)
        outcome = Outcome(task, status, run.run_id, entry.turns or 0, entry.termination_reason)
        if status == "done":
            with self._lock:
                self.turns_done += outcome.turns
        return outcome

    def run(self, jobs: int, on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:
        """Process every task, ``jobs`` at a time (threads); call ``on_done`` as each ends.
        Returns the outcomes in the order of the tasks file."""
        outcomes: dict[str, Outcome] = {}
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(self._process, task): task for task in self.tasks}
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[outcome.task.key] = outcome
                if on_done:
                    on_done(outcome)
        return [outcomes[task.key] for task in self.tasks]

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
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .batchapi import Answer, BatchApi

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
        from .config import persona_of

        return persona_of(self.models.config, task.options.get("persona", self.persona))

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

    def _open(self, task: BatchTask, run_id: str) -> Run:
        """``task``'s run ``run_id``: the one made earlier, or a new one.

        Raises:
            PipelineError: it cannot be read or made.
        """
        include = self.include(task)
        folder = self.runs_dir / run_id
        if (folder / "run.json").is_file():
            return open_run(self.runs_dir, run_id)
        if folder.exists():  # a creation cut short: a folder with no manifest yet
            shutil.rmtree(folder)
        return self.plan(task).new_run(
            self.runs_dir,
            task.task,
            run_id=run_id,
            judge="judge" in include,
            reflect="reflect" in include,
        )

    def _advance(
        self,
        task: BatchTask,
        run: Run,
        models: stages.ClientSource | None = None,
        until: str | None = None,
    ) -> None:
        """Bring ``task``'s run to its end (up to stage ``until`` when given), with
        ``models`` (default: the batch's).

        Raises:
            PipelineError: a stage failed.
        """
        with run.locked():
            tools = self.models.tools(self.tools)
            ctx = stages.StageContext(run, models or self.models, self.plan(task), tools=tools)
            stages.advance(ctx, include=self.include(task), until=until)

    def _process(self, task: BatchTask) -> Outcome:
        run_id = self.run_id_for(task)
        try:
            run = self._open(task, run_id)
            if not stages.pending(run, include=self.include(task)):
                return self.outcome(task, run, "skipped")
            self._advance(task, run)
            self.remember(run)
        except PipelineError as e:
            return self.failed(task, run_id, e)
        return self.outcome(task, run, "done")

    def remember(self, run: Run) -> None:
        """Index ``run`` in the memory database and send its traces: the driver's work,
        never a worker's."""
        with contextlib.suppress(PipelineError):  # `memory sync` catches up
            memory.remember(run)
        telemetry.export_tree(run)  # best effort: its warnings are dropped

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

    def run(
        self,
        jobs: int,
        on_done: Callable[[Outcome], None] | None = None,
        *,
        api: BatchApi | None = None,
    ) -> list[Outcome]:
        """Process every task, ``jobs`` at a time (threads); call ``on_done`` as each ends.
        With ``api``, stage by stage instead (:meth:`_run_staged`). Returns the outcomes in
        the order of the tasks file.

        Raises:
            BatchApiError: with ``api``, a provider batch could not be used (the runs
                stay, pending).
        """
        if api is not None:
            return self._run_staged(jobs, on_done or (lambda outcome: None), api)
        outcomes: dict[str, Outcome] = {}
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(self._process, task): task for task in self.tasks}
            for future in as_completed(futures):
                outcome = future.result()
                outcomes[outcome.task.key] = outcome
                if on_done:
                    on_done(outcome)
        return [outcomes[task.key] for task in self.tasks]

    def _run_staged(
        self, jobs: int, on_done: Callable[[Outcome], None], api: BatchApi
    ) -> list[Outcome]:
        """Every task's run, one stage of the graph at a time: the first request of each
        run's one-answer stage (director, judge, reflection) goes in a provider batch
        (``api``, whose ledgers are held for the whole batch), which is waited for; then
        the stage runs for every run, ``jobs`` at a time, its answer taken from the batch
        (:class:`pipeline.batchapi.Answered`). A run whose stage fails leaves the later
        stages (and the batch's answer it failed with is not given again); a run is done,
        remembered and reported as soon as nothing of it is pending."""
        self.check_hosted()
        outcomes: dict[str, Outcome] = {}

        def finish(outcome: Outcome) -> None:
            outcomes[outcome.task.key] = outcome
            on_done(outcome)

        with api.held():
            going: dict[str, tuple[BatchTask, Run]] = {}
            for task in self.tasks:
                run_id = self.run_id_for(task)
                try:
                    run = self._open(task, run_id)
                    if not stages.pending(run, include=self.include(task)):
                        finish(self.outcome(task, run, "skipped"))
                        continue
                except PipelineError as e:
                    finish(self.failed(task, run_id, e))
                    continue
                going[task.key] = (task, run)
            for node in stages.GRAPH:
                self._stage_through(node, api, jobs, going, finish)
        return [outcomes[task.key] for task in self.tasks]

    def _stage_through(
        self,
        node: stages.Stage,
        api: BatchApi,
        jobs: int,
        going: dict[str, tuple[BatchTask, Run]],
        finish: Callable[[Outcome], None],
    ) -> None:
        """Run stage ``node`` of every run in ``going`` that has it pending (see
        :meth:`_run_staged`); a run that fails, or is then complete, leaves ``going``."""
        from .batchapi import Answered

        here = [
            (task, run)
            for task, run in going.values()
            if node.name in stages.pending(run, include=self.include(task))
        ]
        answers = self._batched(node.name, here, api, finish, going) if node.answer else {}

        def advance(task: BatchTask, run: Run) -> None:
            answered = answers.get(f"{run.run_id}:{node.name}")
            models = Answered(self.models, {node.name: answered}) if answered else None
            self._advance(task, run, models, until=node.name)

        spent = []
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(advance, task, run): (task, run) for task, run in here}
            for future in as_completed(futures):
                task, run = futures[future]
                try:
                    future.result()
                except PipelineError as e:
                    del going[task.key]
                    finish(self.failed(task, run.run_id, e))
                    if f"{run.run_id}:{node.name}" in answers:
                        spent.append(f"{run.run_id}:{node.name}")
        if spent:
            api.spend(node.name, spent)
        for key, (task, run) in list(going.items()):
            if not stages.pending(run, include=self.include(task)):
                del going[key]
                self.remember(run)
                finish(self.outcome(task, run, "done"))

    def check_hosted(self) -> None:
        """Raises a :class:`PipelineError` when a stage a provider batch would answer
        (the director; the judge and reflection when a task has them) runs on the
        embedded model, which has no Batch API; nothing is started or written then."""
        from .batchapi import refused_embedded
        from .endpoints import EmbeddedModel

        resolver = self.models.resolver
        if isinstance(resolver.director(), EmbeddedModel):
            raise refused_embedded("director")
        judged = any(self.include(task) for task in self.tasks)
        if judged and isinstance(resolver.judge(), EmbeddedModel):
            raise refused_embedded("judge")

    def _batched(
        self,
        stage: str,
        here: list[tuple[BatchTask, Run]],
        api: BatchApi,
        finish: Callable[[Outcome], None],
        going: dict[str, tuple[BatchTask, Run]],
    ) -> dict[str, Answer]:
        """The provider batch's answers to the first request of ``stage`` of each run in
        ``here``, by custom id; a run whose request cannot be worked out fails (and leaves
        ``going`` and ``here``)."""
        from .batchapi import Request

        requests = []
        for task, run in list(here):
            try:
                ctx = stages.StageContext(run, self.models, self.plan(task))
                endpoint, body = stages.first_request(ctx, stage)
            except PipelineError as e:
                here.remove((task, run))
                del going[task.key]
                finish(self.failed(task, run.run_id, e))
                continue
            requests.append(Request(f"{run.run_id}:{stage}", endpoint, body))
        return api.answers(stage, requests) if requests else {}

"""The cycle: a persona's curated memories, fine-tuned into its model, again and again.

One call of :func:`step` does at most one thing, so that cron can call it as often as it
likes (``pipeline cycle --role PERSONA --base-model M --every N``):

1. While the last cycle's job is running, it asks the server where the job stands and
   stops there.
2. When that job has just succeeded, it records the model and gives the
   ``pipeline.toml`` entry that uses it for the persona; with ``assign_to`` it writes the
   entry into that file itself (:func:`pipeline.configwrite.assign_role_model`).
3. Otherwise it curates the persona's memories (:func:`pipeline.curate.curate`), leaving
   out those an earlier cycle used. With at least ``every`` new ones, and ``submit``, it
   writes the dataset, submits the fine-tune job and records the cycle. Without
   ``submit`` it says what it would do and what it would cost.

Each persona's cycles are recorded in ``runs/cycles/<persona>.json`` (written atomically
at every change), and each call holds ``runs/cycles/<persona>.lock``: a second call while
one runs gets :class:`CycleBusy` at once. The datasets are ``runs/cycles/<persona>-N.jsonl``
with their sidecar manifests; each job has its ledger in ``runs/finetunes/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PipelineError
from .finetune import ENDED, SUCCEEDED
from .records import timestamp
from .runs import atomic_write_json, held_lock, slugify

if TYPE_CHECKING:
    from .finetune import FinetuneJobs, FinetuneLedger

CYCLES = "cycles"


class CycleBusy(PipelineError):
    """Another cycle of the same persona holds the lock."""


@dataclass
class Cycle:
    """One cycle: the memories it used, its dataset, its job and the model it made.

    Attributes:
        number: 1, 2, ... per persona.
        started: when it was submitted (ISO 8601 UTC).
        memories: the ``[run id, turn]`` of each memory in its dataset.
        dataset, dataset_sha256: the dataset file and its sha256.
        ledger: the local id of its fine-tune job's ledger.
        job_id, status, model: the server's job, its last known status, the model made.
        finished: when the job was seen to succeed (ISO 8601 UTC), or None.
        assigned: the config file the model was written into, or None.
    """

    number: int
    started: str
    memories: list[list[Any]]
    dataset: str
    dataset_sha256: str
    ledger: str
    job_id: str | None = None
    status: str = "pending"
    model: str | None = None
    finished: str | None = None
    assigned: str | None = None


@dataclass
class CycleLog:
    """A persona's cycles (``runs/cycles/<persona>.json``)."""

    persona: str
    base_model: str
    cycles: list[Cycle] = field(default_factory=list)

    def used(self) -> set[tuple[str, int]]:
        """The memories of every cycle that did not end without a model."""
        return {
            (str(r), int(t))
            for c in self.cycles
            if c.status == SUCCEEDED or c.status not in ENDED
            for r, t in c.memories
        }


@dataclass(frozen=True)
class Outcome:
    """What one :func:`step` did: ``waiting``, ``succeeded``, ``failed``, ``submitted``,
    ``would_submit`` or ``nothing``, said in one line (``message``), the cycle concerned,
    and for a model that just succeeded its ``pipeline.toml`` entry."""

    action: str
    message: str
    cycle: Cycle | None = None
    entry: str | None = None


def log_path(runs_dir: Path, persona: str) -> Path:
    return runs_dir / CYCLES / f"{slugify(persona, 60)}.json"


def load(runs_dir: Path, persona: str, base_model: str = "") -> CycleLog:
    """The cycles of ``persona`` so far (none yet: an empty log for ``base_model``)."""
    path = log_path(runs_dir, persona)
    if not path.is_file():
        return CycleLog(persona, base_model)
    value = json.loads(path.read_text(encoding="utf-8"))
    return CycleLog(value["persona"], value["base_model"], [Cycle(**c) for c in value["cycles"]])


def save(runs_dir: Path, log: CycleLog) -> None:
    atomic_write_json(log_path(runs_dir, log.persona), dataclasses.asdict(log))


@contextlib.contextmanager
def locked(runs_dir: Path, persona: str) -> Iterator[None]:
    """Hold the persona's cycle lock for the ``with`` block.

    Raises:
        CycleBusy: another process holds it.
    """
    busy = CycleBusy(f"another cycle of {persona} is running; nothing was done")
    with held_lock(log_path(runs_dir, persona).with_suffix(".lock"), busy):
        yield


def step(
    runs_dir: Path,
    jobs: FinetuneJobs,
    *,
    persona: str,
    base_model: str,
    every: int,
    submit: bool = False,
    assign_to: Path | None = None,
    curation: Mapping[str, Any] | None = None,
) -> Outcome:
    """Do the next thing the persona's cycle needs (see the module), holding its lock.

    Args:
        jobs: the fine-tuning endpoint's jobs (:class:`pipeline.finetune.FinetuneJobs`).
        every: how many new curated examples a cycle needs.
        submit: submit the job (the costly part); without, say what would be done.
        assign_to: the ``pipeline.toml`` to write the new model into for the persona.
        curation: more arguments for :func:`pipeline.curate.curate` (``min_score``,
            ``keep_only``, ``dedupe``, ``max_per_task``, ``mix``, ``mix_ratio``, ...).

    Raises:
        CycleBusy: another cycle of the persona is running.
        FinetuneError, DatasetError, ConfigError, MemoryStoreError: a step failed; what
            was recorded before it stays.
    """
    with locked(runs_dir, persona):
        log = load(runs_dir, persona, base_model)
        last = log.cycles[-1] if log.cycles else None
        if last is not None and last.status not in ENDED:
            return _follow(runs_dir, jobs, log, last, assign_to)
        return _next(runs_dir, jobs, log, every, submit, dict(curation or {}))


def _follow(
    runs_dir: Path, jobs: FinetuneJobs, log: CycleLog, last: Cycle, assign_to: Path | None
) -> Outcome:
    from .finetune import endpoint_entry, endpoint_name, find

    ledger = jobs.status(find(runs_dir, last.ledger))
    last.status, last.job_id = ledger.status, ledger.job_id
    if ledger.status not in ENDED:
        save(runs_dir, log)
        return Outcome(
            "waiting", f"cycle {last.number}: job {ledger.job_id} is {ledger.status}", last
        )
    if ledger.status != SUCCEEDED or not ledger.fine_tuned_model:
        save(runs_dir, log)
        reason = f": {ledger.error}" if ledger.error else ""
        return Outcome(
            "failed", f"cycle {last.number}: job {ledger.job_id} {ledger.status}{reason}", last
        )
    last.model, last.finished = ledger.fine_tuned_model, timestamp()
    name = endpoint_name(ledger)
    assignment = f"[assign.roles]\n{json.dumps(log.persona)} = {json.dumps(name)}"
    entry = f"{endpoint_entry(ledger, jobs.endpoint)}\n\n{assignment}"
    if assign_to is not None:
        _assign(assign_to, log.persona, ledger, jobs)
        last.assigned = str(assign_to)
    save(runs_dir, log)
    where = f"; {assign_to} now gives it to {log.persona}" if assign_to else ""
    return Outcome("succeeded", f"cycle {last.number}: {last.model} is ready{where}", last, entry)


def _assign(path: Path, persona: str, ledger: FinetuneLedger, jobs: FinetuneJobs) -> None:
    from .configwrite import assign_role_model
    from .finetune import endpoint_name

    assert ledger.fine_tuned_model is not None
    assign_role_model(
        path,
        role=persona,
        endpoint_name=endpoint_name(ledger),
        base_url=jobs.endpoint.base_url,
        model=ledger.fine_tuned_model,
        api_key_env=jobs.endpoint.api_key_env,
    )


def _next(
    runs_dir: Path,
    jobs: FinetuneJobs,
    log: CycleLog,
    every: int,
    submit: bool,
    curation: dict[str, Any],
) -> Outcome:
    from . import curate
    from .finetune import inspect_file

    try:
        curated = curate.curate(
            runs_dir,
            role=log.persona,
            base_model=log.base_model,
            exclude=log.used(),
            **curation,
        )
        found = len(curated.memories)
    except curate.NothingToCurate:  # no memory qualifies yet
        curated, found = None, 0
    if curated is None or found < every:
        return Outcome(
            "nothing",
            f"{found} new curated example(s) of {log.persona}, {every} needed; nothing to do",
        )
    number = len(log.cycles) + 1
    cost = curated.built.cost
    priced = f" (estimated ${cost:,.2f})" if cost is not None else ""
    if not submit:
        return Outcome(
            "would_submit",
            f"{found} new curated examples of {log.persona}: cycle {number} would fine-tune "
            f"{log.base_model} on them{priced}; nothing was sent",
        )
    path = runs_dir / CYCLES / f"{slugify(log.persona, 60)}-{number}.jsonl"
    curate.write(curated, path)
    ledger = jobs.start(
        inspect_file(path),
        base_model=log.base_model,
        suffix=slugify(log.persona, 40),
        source_runs=curated.built.runs,
    )
    cycle = Cycle(
        number,
        timestamp(),
        [[m.run_id, m.turn] for m in curated.memories],
        str(path),
        ledger.training.sha256,
        ledger.local_id,
    )
    log.cycles.append(cycle)
    save(runs_dir, log)  # recorded before anything is sent
    try:
        jobs.create(ledger)
    finally:
        cycle.status, cycle.job_id = ledger.status, ledger.job_id
        save(runs_dir, log)
    return Outcome(
        "submitted",
        f"cycle {number}: job {ledger.job_id} fine-tunes {log.base_model} on {found} "
        f"examples of {log.persona}{priced}",
        cycle,
    )


def report(runs_dir: Path, persona: str) -> list[Any]:
    """The metrics rows of every cycle of ``persona`` that made a model: the runs before
    it and the runs made with it (:func:`pipeline.metrics.report_rows`)."""
    from .metrics import TunedModel, report_rows
    from .runs import Run, list_runs

    log = load(runs_dir, persona)
    models = []
    since = None
    for c in log.cycles:
        if c.model and c.finished:
            models.append(TunedModel(str(c.number), c.model, c.finished, since))
            since = c.finished
    runs = [r for r in list_runs(runs_dir) if isinstance(r, Run)]
    return report_rows(runs, models)

"""A batch on Ray (``pipeline batch TASKS --ray``): each task a Ray task, on a local Ray
instance or on a cluster.

The driver is the ``pipeline batch`` process. It reads the tasks file, chooses and records
each task's run id in the batch manifest (as a local batch does, :mod:`pipeline.batch`),
submits the tasks that are not complete, and is the only process that writes the runs
folder: the run folders, the batch manifest and the memory database
(:func:`pipeline.memory.remember`). ``ray`` is imported here only, and this module only
when ``--ray`` is given.

**Where a run's files go.** A worker may be on another machine, with no access to the
driver's disk. So a task travels with the files of its run as the driver has them (none
for a new run; a run that failed or was cut short earlier, with its child runs, to be
finished from its last complete turn), and the worker makes or continues the run in a
temporary runs folder of its own (``pipeline-ray-<pid>-*`` in the system's temporary
folder, removed when the task ends, and by the next task on that machine when its worker
was killed). The fine-tune ledgers of the driver's runs folder go along too, read-only,
so a run records the job that made its model as it would locally. The task returns every
file of the run and of its child runs (tens of kilobytes for a short run, every call
recorded); the driver writes each run folder whole into ``batches/.incoming/`` of its
runs folder, then swaps it in for the old one with two renames (a driver killed between
them is put right by the next batch: the old folder is moved back). A worker that dies
leaves nothing in the driver's runs folder.

The other design, not built: every worker writes straight into one runs folder on a
filesystem all nodes share (NFS, a cluster filesystem), named with ``--runs-dir``. It
moves no bytes through Ray, but it needs such a filesystem with working locks
(``.lock``, SQLite's), and a worker killed mid-turn leaves a half run there for the
retry to find.

**Retries.** One mechanism: Ray's. A task whose worker process or node dies is run again
by Ray (``max_retries``, :data:`WORKER_RETRIES`) from the files it was sent, that is from
the run as the driver has it: the killed attempt's half run stayed in its temporary
folder and never reaches the driver. An error the pipeline reports (a model that
answered with an error after the SDK's retries, an unusable director's answer...) is not
retried by Ray (``retry_exceptions`` off): the task comes back ``failed`` with what it
made, as in a local batch, and running the same command again finishes it. The run id
is chosen and recorded in the batch manifest before the task is sent, so a retried task
makes the same run, and only the driver writes it: a task's run is made once, and is
counted done only when the driver holds it complete (nothing of it pending).

**After a driver crash**, the same command finishes only what is missing: complete runs
are skipped without starting Ray, the others are sent again with what the driver has of
them. The driver holds each sent run's lock (``.lock``) until its files are back, so no
``pipeline resume`` writes it meanwhile.

**One engine per node.** When a slot is assigned the embedded model, each node serves it
from one engine, shared by the node's tasks: a :class:`NodeEngine` actor placed on that
node (hard node affinity, no CPU reserved), which runs :class:`pipeline.local.LocalServer`
per GGUF file with a session for each task the node can run at once (its CPUs), started
when a task first asks. The actors are made by one :class:`EngineRegistry` actor, owned by
the driver, so they live as long as the batch, and are stopped at its end. A task reaches
its node's engine at ``127.0.0.1``. The GGUF file is the default model (downloaded into
each node's cache on first use) or a path that must exist on every node.

**Concurrency and rate limits against an API.** ``-j N`` holds for the whole cluster:
the driver keeps at most N tasks submitted at once (a window, a semaphore of N held by
the one process that submits), and a task makes one model call at a time, so the
cluster never has more than N requests in flight. Past that, rate limits (429) are
waited out by the SDK's retries with backoff, honouring ``retry-after`` (at least 8
retries in a batch), in each worker; there is no token bucket across the cluster. On a
local instance, Ray is started with N CPUs, a task taking one.

**Keys** stay out of run files, as everywhere: the variables the endpoints name
(``OPENAI_API_KEY``, ``api_key_env``) are passed to the job's workers in its Ray
runtime environment, which the cluster holds for the job's life.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import stages
from .endpoints import EmbeddedModel, Endpoint, Resolver
from .errors import ConfigError, Fix, PipelineError, RunError, one_line
from .finetune import LEDGERS
from .models import Models
from .runs import RUN_ID_RE, _alive, open_run

if TYPE_CHECKING:
    from .batch import Batch, BatchTask, Outcome
    from .local import LocalServer

WORKER_RETRIES = 3  # Ray runs a task again this many times when its worker dies
INCOMING = Path("batches") / ".incoming"  # run folders being written, in the runs folder
NAMESPACE = "converse-pipeline"
SCRATCH_PREFIX = "pipeline-ray-"
NOT_INSTALLED = "--ray needs the ray package, which is not installed"

Files = dict[str, bytes]
"""A folder's files by path relative to it (POSIX)."""
Tree = dict[str, Files]
"""Run folders' files by run id: a task's run and its child runs."""


def check_installed() -> None:
    """Raises:
    ConfigError: the ``ray`` extra is missing."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            NOT_INSTALLED,
            fix=(
                Fix("install it with pip install 'converse-pipeline[ray]'"),
                Fix("or drop --ray to run the batch on this machine"),
            ),
        )


# -- run folders as bytes -------------------------------------------------------------


def read_folder(folder: Path) -> Files:
    """Every file under ``folder`` but its lock and half-written temporary files."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".lock" and not _temporary(path.name)
    }


def _temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # runs.atomic_write_text's


def read_tree(runs_dir: Path, run_id: str) -> Tree:
    """The files of run ``run_id`` and of its child runs, theirs and so on (the runs it
    delegated to), as far as they exist under ``runs_dir``."""
    tree: Tree = {}
    todo = [run_id]
    while todo:
        name = todo.pop()
        folder = runs_dir / name
        if name in tree or not (folder / "run.json").is_file():
            continue
        tree[name] = read_folder(folder)
        todo += open_run(runs_dir, name).manifest.children or []
    return tree


def write_files(folder: Path, files: Mapping[str, bytes], *, sync: bool = False) -> None:
    """Write ``files`` under ``folder`` (made if missing); ``sync``: each flushed to disk.

    Raises:
        RunError: a path is not a plain relative one (``..``, absolute).
    """
    for relative, data in files.items():
        parts = Path(relative).parts
        if Path(relative).is_absolute() or not parts or ".." in parts:
            raise RunError(f"a worker sent a file with a bad path: {relative!r}", path=folder)
        path = folder.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())


def install(runs_dir: Path, tree: Tree) -> None:
    """Put each run folder of ``tree`` in ``runs_dir``, in place of the one there: written
    whole under ``batches/.incoming/``, then swapped in (the old folder renamed away, the
    new one renamed in, the old one deleted). Readers see the old folder or the new one,
    or, after a crash between the two renames, none until :func:`recover` runs.

    Raises:
        RunError: a run id or a path in ``tree`` is malformed, or the folder cannot be
            written.
    """
    incoming = runs_dir / INCOMING
    for run_id, files in tree.items():
        if not RUN_ID_RE.match(run_id):
            raise RunError(f"a worker sent a run with a bad id: {run_id!r}", path=runs_dir)
        token = uuid.uuid4().hex[:8]
        new, old = incoming / f"{run_id}.{token}.new", incoming / f"{run_id}.{token}.old"
        target = runs_dir / run_id
        try:
            write_files(new, files, sync=True)
            if target.exists():
                os.rename(target, old)
            os.rename(new, target)
        except OSError as e:
            shutil.rmtree(new, ignore_errors=True)
            raise RunError(
                f"cannot write run {run_id} into {runs_dir}: {e.strerror}",
                run_id=run_id,
                path=target,
            ) from e
        shutil.rmtree(old, ignore_errors=True)


def recover(runs_dir: Path) -> None:
    """Put right what a driver killed inside :func:`install` left: an old run folder
    moved away whose new one never came goes back; any other leftover is deleted."""
    incoming = runs_dir / INCOMING
    if not incoming.is_dir():
        return
    for path in sorted(incoming.iterdir()):
        run_id, _, kind = path.name.partition(".")
        target = runs_dir / run_id
        if kind.endswith(".old") and RUN_ID_RE.match(run_id) and not target.exists():
            os.rename(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        incoming.rmdir()  # left when empty


# -- the worker's side ----------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What a worker needs to make or finish one task's run."""

    run_id: str
    task: str
    plan: stages.Plan
    include: tuple[str, ...]
    resolver: Resolver
    timeout: float
    max_retries: int
    model_file: Path | None


@dataclass(frozen=True)
class Result:
    """What a task sends back: its run's files and its child runs', and the error that
    stopped it (None when it ended normally)."""

    tree: Tree
    error: PipelineError | None


def execute(job: Job, tree: Tree, context: Files, engines: Any | None) -> Result:
    """Make or finish ``job``'s run (a Ray task's body): lay out ``tree`` (the run as the
    driver has it) and ``context`` (the driver's fine-tune ledgers) in a temporary runs
    folder, advance the run there, and return its files. ``engines``: the
    :class:`EngineRegistry` actor, or None when no slot uses the embedded model."""
    _sweep()
    root = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    try:
        runs = root / "runs"
        write_files(runs, context)
        for run_id, files in tree.items():
            write_files(runs / run_id, files)
        error: PipelineError | None = None
        try:
            if (runs / job.run_id / "run.json").is_file():
                run = open_run(runs, job.run_id)
            else:
                run = job.plan.new_run(
                    runs,
                    job.task,
                    run_id=job.run_id,
                    judge="judge" in job.include,
                    reflect="reflect" in job.include,
                )
            engine = NodeEngineClient(engines) if engines is not None else None
            with (
                Models(
                    resolver=job.resolver,
                    timeout=job.timeout,
                    max_retries=job.max_retries,
                    model_file=job.model_file,
                    engine=engine,
                ) as models,
                run.locked(),
            ):
                ctx = stages.StageContext(run, models, job.plan, tools=models.tools(job.plan.tools))
                stages.advance(ctx, include=job.include)
        except PipelineError as e:
            error = e
        made = {
            folder.name: read_folder(folder)
            for folder in sorted(runs.iterdir())
            if folder.is_dir() and RUN_ID_RE.match(folder.name)
        }
        return Result(made, error)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _sweep() -> None:
    """Delete the temporary runs folders of workers that died (killed mid-task)."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name[len(SCRATCH_PREFIX) :].partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


# -- one engine per node --------------------------------------------------------------


class NodeEngine:
    """The embedded engine of one node (a Ray actor placed on it): a
    :class:`~pipeline.local.LocalServer` per GGUF file, started when first asked for, with
    ``sessions`` sessions (the tasks the node runs at once)."""

    def __init__(self, sessions: int) -> None:
        self.sessions = sessions
        self._servers: dict[str | None, LocalServer] = {}

    def _server(self, gguf: str | None) -> LocalServer:
        if gguf not in self._servers:
            from .local import LocalServer, resolve_model

            model = resolve_model(Path(gguf) if gguf else None)
            server = LocalServer(model, sessions=self.sessions)
            server.launch()
            self._servers[gguf] = server
        return self._servers[gguf]

    def launch(self, gguf: str | None) -> None:
        """Start serving ``gguf`` (the default model when None), without waiting."""
        self._server(gguf)

    def endpoint(self, gguf: str | None, structured_output: str) -> Endpoint:
        """The endpoint serving ``gguf``, once it answers (at ``127.0.0.1``: for this
        node's tasks).

        Raises:
            ConfigError, ModelFileError, LocalServerError: as
                :meth:`pipeline.models.Models` would on this node.
        """
        server = self._server(gguf)
        try:
            server.wait_ready()
        except PipelineError:
            del self._servers[gguf]  # the next task tries again
            raise
        return server.endpoint(structured_output)

    def stop(self) -> None:
        """Stop every server."""
        for server in self._servers.values():
            server.stop()
        self._servers.clear()


class EngineRegistry:
    """The :class:`NodeEngine` actor of each node, made when a task on that node first asks
    (a Ray actor itself, owned by the driver, so the engines live as long as the batch)."""

    def __init__(self) -> None:
        self._engines: dict[str, Any] = {}

    def engine(self, node_id: str) -> Any:
        """The handle of node ``node_id``'s engine actor."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node_id not in self._engines:
            nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
            cpus = next((n["Resources"].get("CPU", 1) for n in nodes if n["NodeID"] == node_id), 1)
            self._engines[node_id] = (
                ray.remote(NodeEngine)
                .options(
                    num_cpus=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                )
                .remote(max(1, int(cpus)))
            )
        return self._engines[node_id]

    def stop(self) -> None:
        """Stop every node's engine."""
        import ray

        ray.get([engine.stop.remote() for engine in self._engines.values()])


class NodeEngineClient:
    """The :class:`pipeline.models.SharedEngine` of a task: its node's :class:`NodeEngine`."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self._engine: Any = None

    def _actor(self) -> Any:
        import ray

        if self._engine is None:
            node = ray.get_runtime_context().get_node_id()
            self._engine = ray.get(self.registry.engine.remote(node))
        return self._engine

    def launch(self, gguf: Path | None) -> None:
        self._actor().launch.remote(str(gguf) if gguf else None)

    def endpoint(self, gguf: Path | None, structured_output: str) -> Endpoint:
        import ray

        try:
            found: Endpoint = ray.get(
                self._actor().endpoint.remote(str(gguf) if gguf else None, structured_output)
            )
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, PipelineError):
                raise e.cause from None
            raise
        return found


# -- the driver's side ----------------------------------------------------------------


def may_embed(resolver: Resolver) -> bool:
    """True when some slot may be assigned the embedded model."""
    if resolver.flags is not None:
        return False
    config = resolver.config
    if config is not None and any(isinstance(e, EmbeddedModel) for e in config.endpoints.values()):
        return True
    return isinstance(resolver.unassigned(), EmbeddedModel)


def key_variables(resolver: Resolver) -> dict[str, str]:
    """The API key variables the endpoints name, with their values here (those set)."""
    endpoints = [resolver.flags]
    if resolver.flags is None:
        endpoints.append(resolver.unassigned())  # type: ignore[arg-type]
        if resolver.config is not None:
            endpoints += resolver.config.endpoints.values()  # type: ignore[arg-type]
    names = {e.api_key_env for e in endpoints if isinstance(e, Endpoint) and e.api_key_env}
    return {name: os.environ[name] for name in sorted(names) if os.environ.get(name)}


@contextlib.contextmanager
def connected(address: str | None, cpus: int, env: Mapping[str, str]) -> Iterator[None]:
    """Ray, for the ``with`` block: the cluster at ``address`` joined, or a local
    instance of ``cpus`` CPUs started (no dashboard, logs kept quiet) and stopped after.
    ``env``: environment variables for this job's workers.

    Raises:
        ConfigError: ray is not installed, or the cluster cannot be joined.
    """
    check_installed()
    import ray

    options: dict[str, Any] = {
        "namespace": NAMESPACE,
        "logging_level": logging.ERROR,
        "log_to_driver": False,
    }
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **options)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"cannot join the Ray cluster at {address}: {one_line(e)}"
            if address
            else f"cannot start a local Ray instance: {one_line(e)}",
            fix=Fix("check the address with ray status, or drop it to start a local instance")
            if address
            else None,
        ) from e
    try:
        # what Ray prints (a worker that died...) goes with the progress, not into the table
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        ray.shutdown()


def run_batch(
    batch: Batch,
    jobs: int,
    on_done: Callable[[Outcome], None] | None = None,
    *,
    address: str | None = None,
) -> list[Outcome]:
    """Process every task of ``batch`` as a Ray task, at most ``jobs`` at once on the
    whole cluster, on the cluster at ``address`` or on a local instance; call ``on_done``
    as each ends. Returns the outcomes in the order of the tasks file. Complete runs are
    skipped before Ray is started.

    Raises:
        ConfigError: ray is not installed, the cluster cannot be joined, or the
            environment names an endpoint without a model.
    """
    outcomes: dict[str, Outcome] = {}

    def report(outcome: Outcome) -> None:
        outcomes[outcome.task.key] = outcome
        if on_done:
            on_done(outcome)

    recover(batch.runs_dir)
    todo: list[BatchTask] = []
    for task in batch.tasks:
        try:
            run = batch.complete(task)
        except PipelineError as e:
            report(batch.failed(task, None, e))
            continue
        if run is not None:
            report(batch.outcome(task, run, "skipped"))
        else:
            todo.append(task)
    if todo:
        check_installed()
        resolver = batch.models.resolver
        embedded = may_embed(resolver)  # decides the environment's endpoint here
        with connected(address, jobs, key_variables(resolver)):
            try:
                _Driver(batch, jobs, embedded).run(todo, report)
            finally:
                recover(batch.runs_dir)  # nothing is left there but a folder being written
    return [outcomes[task.key] for task in batch.tasks]


class _Driver:
    """Submits the tasks (at most ``jobs`` at once), and writes what comes back."""

    def __init__(self, batch: Batch, jobs: int, embedded: bool) -> None:
        import ray

        self.ray = ray
        self.batch = batch
        self.jobs = jobs
        models = batch.models
        self.remote = ray.remote(execute).options(
            max_retries=WORKER_RETRIES, retry_exceptions=False
        )
        ledgers = batch.runs_dir / LEDGERS
        context = {
            f"{LEDGERS}/{path.name}": path.read_bytes() for path in sorted(ledgers.glob("*.json"))
        }
        self.context = ray.put(context)
        self.registry: Any = (
            ray.remote(EngineRegistry).options(num_cpus=0).remote() if embedded else None
        )
        self.settings = (models.resolver, models.timeout, models.max_retries, models.model_file)

    def run(self, tasks: list[BatchTask], report: Callable[[Outcome], None]) -> None:
        waiting = deque(tasks)
        flying: dict[Any, tuple[BatchTask, str, contextlib.ExitStack]] = {}
        try:
            while waiting or flying:
                while waiting and len(flying) < self.jobs:
                    task = waiting.popleft()
                    submitted = self._submit(task)
                    if isinstance(submitted, tuple):
                        ref, run_id, lock = submitted
                        flying[ref] = (task, run_id, lock)
                    else:
                        report(submitted)
                if not flying:
                    continue
                (ref,), _ = self.ray.wait(list(flying), num_returns=1)
                task, run_id, lock = flying.pop(ref)
                with lock:
                    report(self._receive(task, run_id, ref))
        finally:
            for _, _, lock in flying.values():
                lock.close()
            if self.registry is not None:
                with contextlib.suppress(Exception):
                    self.ray.get(self.registry.stop.remote(), timeout=30)

    def _submit(self, task: BatchTask) -> tuple[Any, str, contextlib.ExitStack] | Outcome:
        """Send ``task`` with its run's files, its run's lock held; or its failure."""
        batch = self.batch
        run_id = batch.run_id_for(task)
        lock = contextlib.ExitStack()
        try:
            plan = batch.plan(task)
            folder = batch.runs_dir / run_id
            tree: Tree = {}
            if (folder / "run.json").is_file():
                run = open_run(batch.runs_dir, run_id)
                lock.enter_context(run.locked())  # no other process writes it meanwhile
                tree = read_tree(batch.runs_dir, run_id)
        except PipelineError as e:
            lock.close()
            return batch.failed(task, run_id, e)
        resolver, timeout, max_retries, model_file = self.settings
        job = Job(
            run_id, task.task, plan, batch.include(task), resolver, timeout, max_retries, model_file
        )
        return self.remote.remote(job, tree, self.context, self.registry), run_id, lock

    def _receive(self, task: BatchTask, run_id: str, ref: Any) -> Outcome:
        """Write what ``task`` sent back into the runs folder, and record how it went."""
        batch = self.batch
        try:
            result: Result = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            return batch.failed(task, run_id, PipelineError(_ray_failure(e)))
        try:
            install(batch.runs_dir, result.tree)
            if result.error is not None:
                return batch.failed(task, run_id, result.error)
            run = open_run(batch.runs_dir, run_id)
            if stages.pending(run, include=batch.include(task)):
                raise RunError(f"run {run_id} came back unfinished", run_id=run_id)
        except PipelineError as e:
            return batch.failed(task, run_id, e)
        batch.remember(run)
        return batch.outcome(task, run, "done")


def _ray_failure(error: Exception) -> str:
    """One line for a Ray task that failed outside the pipeline."""
    import ray

    if isinstance(error, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return f"its Ray worker died {WORKER_RETRIES + 1} times: {one_line(error, 200)}"
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause
        return f"its Ray task failed: {type(cause).__name__}: {one_line(cause, 200)}"
    return f"its Ray task failed: {type(error).__name__}: {one_line(error, 200)}"

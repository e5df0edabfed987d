"""Run folders: ids, layout, the manifest and the append-only transcript.

A run lives in ``<runs root>/<run id>/``::

    run.json                  the manifest (schemas/run.schema.json)
    director/prompt.txt       the director prompt exactly as rendered
    director/request.json     the request body sent (no credentials)
    director/response.json    the raw response
    director/roles.json       the parsed roles (schemas/roles.schema.json)
    dialogue/transcript.jsonl one JSON object per turn (schemas/transcript-line.schema.json)
    dialogue/transcript.md    the transcript rendered for reading

Run ids are ``YYYYMMDDTHHMMSSZ-<slug of the task>`` (UTC), so they sort by time.
JSON artifacts are written atomically (temporary file in the same folder, fsync,
``os.replace``); the transcript is appended and fsynced one turn at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .endpoints import Endpoint
from .errors import Fix, PipelineError, RunError
from .records import Manifest, StageRecord, Turn, sha256_of, timestamp, utc_now
from .resources import data_dir, file_sha256
from .stages import STAGE_NAMES

MANIFEST = "run.json"
TRANSCRIPT = "dialogue/transcript.jsonl"
IMPORTED_TRANSCRIPT = "import/transcript.jsonl"
RUN_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[a-z0-9-]+$")
_VERSIONED = ("openai", "jsonschema", "jinja2", "click", "xllamacpp")


def slugify(text: str, max_length: int = 40) -> str:
    """A lowercase ASCII slug of ``text`` (words joined by ``-``, at most ``max_length``
    characters, cut at a word boundary); ``"run"`` when nothing is left."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    slug = ""
    for word in words:
        candidate = f"{slug}-{word}" if slug else word
        if len(candidate) > max_length:
            break
        slug = candidate
    return slug or (words[0][:max_length] if words else "run")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def held_lock(path: Path, busy: PipelineError) -> Iterator[None]:
    """Hold the file lock ``path`` (its folder made if need be) for the ``with`` block,
    without waiting: one process at a time. The operating system releases it if the
    process dies, however it dies.

    Raises:
        PipelineError: ``busy``, when another process holds it.
    """
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout as e:
        raise busy from e
    try:
        yield
    finally:
        lock.release()


def jsonl(values: Iterable[object]) -> str:
    """One compact JSON document per line (UTF-8 characters kept), each ending in a newline."""
    return "".join(json.dumps(value, ensure_ascii=False) + "\n" for value in values)


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON (UTF-8, trailing newline), atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {
        "converse_pipeline": _version("converse-pipeline"),
        "python": platform.python_version(),
    }
    for name in _VERSIONED:
        found[name.replace("-", "_")] = _version(name)
    return found


def _version(distribution: str) -> str | None:
    from importlib import metadata  # imported here: it is slow to import

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _data_file_hashes() -> dict[str, str]:
    hashes = {}
    for folder in ("templates", "schemas"):
        base = data_dir(folder)
        for path in sorted(base.rglob("*")):
            if path.is_file():
                hashes[f"{folder}/{path.relative_to(base).as_posix()}"] = file_sha256(path)
    return hashes


def _alive(pid: Any) -> bool:
    """True when a process with id ``pid`` exists (a zombie counts as gone where /proc says)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True


class Run:
    """One run folder and its manifest, held in memory and saved atomically on each change.

    Create runs with :func:`create_run` and open them with :func:`open_run`.
    """

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self.folder = folder
        self.manifest = manifest
        self._adopt()

    def _adopt(self) -> None:
        """Give the stages of a run made before ``upstream`` was recorded the sha256 of what
        they read as it is now (in memory; saved with the next change), so that a later
        change upstream makes them stale as it makes a newer run's."""
        from .stages import graph, upstream

        known = {node.name for node in graph(self)}
        for name, entry in self.manifest.stages.items():
            if entry.upstream is None and entry.status in ("done", "failed"):
                entry.upstream = upstream(self, name) if name in known else None

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def imported(self) -> bool:
        """True for an imported chat (``pipeline import``): its conversation comes from its
        ``import`` stage, and it has no director or dialogue."""
        return "import" in self.manifest.stages

    @property
    def transcript(self) -> str:
        """Where the run's conversation is, relative to its folder: the dialogue's
        transcript, or an imported chat's (the same schema)."""
        return IMPORTED_TRANSCRIPT if self.imported else TRANSCRIPT

    def path(self, relative: str) -> Path:
        """Absolute path of an artifact given relative to the run folder."""
        return self.folder / relative

    def stage(self, name: str) -> StageRecord:
        """The manifest entry of stage ``name`` (a ``pending`` one if the manifest has none)."""
        return self.manifest.stages.setdefault(name, StageRecord())

    def alive(self, name: str) -> bool:
        """True when stage ``name`` is recorded ``running`` and its process still exists."""
        entry = self.stage(name)
        return entry.status == "running" and _alive(entry.pid)

    @contextlib.contextmanager
    def locked(self) -> Iterator[Run]:
        """Hold the run's lock (``.lock`` in its folder) for the ``with`` block: one writer per
        run. The operating system releases it if the process dies, however it dies.

        Raises:
            RunError: another process holds it.
        """
        busy = RunError(
            f"run {self.run_id} is in use by another pipeline process; "
            "wait for it to finish, or stop it",
            run_id=self.run_id,
        )
        with held_lock(self.path(".lock"), busy):
            self.reload()
            yield self

    def reload(self) -> None:
        """Read the manifest again from disk (another process may have changed it)."""
        self.manifest = _read_manifest(self.path(MANIFEST), self.run_id)
        self._adopt()

    # -- artifacts ---------------------------------------------------------------

    def write_json(self, relative: str, value: Any) -> Path:
        path = self.path(relative)
        atomic_write_json(path, value)
        return path

    def write_text(self, relative: str, text: str) -> Path:
        path = self.path(relative)
        atomic_write_text(path, text)
        return path

    def read_json(self, relative: str) -> Any:
        path = self.path(relative)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise RunError(
                f"run {self.run_id} has no {relative}", run_id=self.run_id, path=path
            ) from e
        except json.JSONDecodeError as e:
            raise self._unreadable(
                path, f"is not valid JSON ({e})", "fix or delete the file"
            ) from e

    def append_transcript(self, turn: Turn) -> None:
        """Append one turn to ``dialogue/transcript.jsonl`` and make it durable (flush + fsync)."""
        path = self.path(self.transcript)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            line = turn.to_json(self.manifest.manifest_version)  # an old run stays in its own
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_transcript(self, turns: Iterable[Turn]) -> None:
        """Write the whole transcript at once, atomically, in the lines
        :meth:`append_transcript` writes (an import: all of it or nothing)."""
        version = self.manifest.manifest_version
        self.write_text(self.transcript, jsonl(turn.to_json(version) for turn in turns))

    def read_transcript(self, *, repair: bool = False) -> list[Turn]:
        """The turns stored so far, in order (an absent transcript is empty).

        A process killed while appending can leave a last line without its newline: that
        turn is incomplete. With ``repair`` it is cut off the file (the turn will be
        generated again); without, it is ignored.

        Raises:
            RunError: a complete line is not JSON, or not a transcript line.
        """
        path = self.path(self.transcript)
        if not path.exists():
            return []
        data = path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if repair and len(complete) < len(data):
            with path.open("r+b") as f:
                f.truncate(len(complete))
                f.flush()
                os.fsync(f.fileno())
        lines = []
        for number, raw in enumerate(complete.decode("utf-8").splitlines(), start=1):
            try:
                lines.append(Turn.from_json(json.loads(raw)))
            except json.JSONDecodeError as e:
                what = f"is not JSON ({e.msg})"
                raise self._unreadable(path, what, "fix or delete that line", number) from e
            except (KeyError, TypeError) as e:
                what = f"is not a transcript line (no {e})"
                raise self._unreadable(path, what, "fix or delete that line", number) from e
        return lines

    def _unreadable(self, path: Path, what: str, fix: str, line: int | None = None) -> RunError:
        where = f"line {line} of {path}" if line is not None else str(path)
        return RunError(f"{where} {what}", fix=Fix(fix), run_id=self.run_id, path=path)

    def archive_stage(self, name: str) -> Path | None:
        """Move the stage folder's current files to ``<stage>/previous-N/`` (N = 1, 2, ...) so a
        new attempt starts clean and nothing is lost. Returns the archive folder, or None when
        the stage folder held no files."""
        folder = self.path(name)
        current = [p for p in folder.glob("*") if not p.name.startswith("previous-")]
        if not current:
            return None
        n = 1
        while (folder / f"previous-{n}").exists():
            n += 1
        archive = folder / f"previous-{n}"
        archive.mkdir()
        for p in current:
            shutil.move(str(p), archive / p.name)
        return archive

    # -- manifest ----------------------------------------------------------------

    def save(self) -> None:
        """Write the manifest atomically."""
        atomic_write_json(self.path(MANIFEST), self.manifest.to_json())

    def _end_stage(self, name: str, status: str, error: str | None) -> StageRecord:
        entry = self.stage(name)
        ended = utc_now()
        entry.status, entry.ended, entry.pid, entry.error = status, timestamp(ended), None, error
        entry.artifacts = self.stage_files(name)
        if entry.started:
            started = datetime.fromisoformat(entry.started.replace("Z", "+00:00"))
            entry.duration_s = round((ended - started).total_seconds(), 3)
        self.save()
        return entry

    def stage_files(self, name: str) -> list[str]:
        """The files in stage ``name``'s folder (relative to the run, sorted), leaving out
        earlier attempts kept in ``previous-N/``."""
        folder = self.path(name)
        if not folder.is_dir():
            return []
        return sorted(
            p.relative_to(self.folder).as_posix()
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".")
        )

    def finish_stage(self, name: str) -> StageRecord:
        """Mark stage ``name`` done (set its other fields first); its artifacts are the files
        in its folder."""
        return self._end_stage(name, "done", None)

    def fail_stage(self, name: str, error: str) -> StageRecord:
        """Mark stage ``name`` failed with ``error``; whatever it wrote stays on disk and is
        listed as its artifacts."""
        return self._end_stage(name, "failed", error)

    @contextlib.contextmanager
    def stage_running(
        self,
        name: str,
        *,
        endpoint: Endpoint | None,
        parameters: Mapping[str, Any],
        inputs: object,
        upstream: dict[str, str | None] | None = None,
    ) -> Iterator[StageRecord]:
        """Run the body as stage ``name``: a fresh entry marked ``running`` on entry, with
        the endpoint, the parameters, the process id, the sha256 of ``inputs``
        (:func:`~pipeline.records.sha256_of`) and the ``upstream`` outputs' sha256; marked
        ``failed`` if the body raises, whatever it raises (a :class:`PipelineError` gets the
        stage and run id attached; Ctrl-C is recorded as ``interrupted``). The body marks
        success itself with :meth:`finish_stage`. Yields the stage's manifest entry."""
        entry = StageRecord(
            status="running",
            started=timestamp(),
            pid=os.getpid(),
            endpoint=endpoint,
            parameters=dict(parameters),
            input_hash=sha256_of(inputs),
            upstream=upstream,
        )
        self.manifest.stages[name] = entry
        self.save()
        try:
            yield entry
        except PipelineError as e:
            e.stage, e.run_id = name, self.run_id
            entry.errors = getattr(e, "errors", None) or None  # StructuredOutputError's list
            self.fail_stage(name, e.message)
            raise
        except BaseException as e:  # Ctrl-C, or a bug: never leave the stage "running"
            reason = (
                "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            )
            self.fail_stage(name, reason)
            raise


def _read_manifest(path: Path, run_id: str) -> Manifest:
    try:
        return Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(
            f"the manifest of run {run_id} is unreadable ({e}): {path}", run_id=run_id, path=path
        ) from e
    except (KeyError, TypeError, AttributeError) as e:
        raise RunError(
            f"the manifest of run {run_id} is not a run manifest (at {e}): {path}",
            run_id=run_id,
            path=path,
        ) from e


def create_run(
    runs_dir: Path,
    task: str,
    planned: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    run_id: str | None = None,
    stage_names: Sequence[str] = STAGE_NAMES,
) -> Run:
    """Create a new run folder for ``task`` under ``runs_dir`` with a fresh manifest (every
    stage of ``stage_names`` ``pending``; ``planned`` gives the parameters a stage is to
    run with, so that a run interrupted before the stage starts is resumed as it was
    asked). A second run in the same second gets ``-2``, ``-3``... appended. ``run_id``
    chooses the id instead; it must look like one and be free.

    Raises:
        RunError: the runs folder cannot be created or written.
    """
    now = utc_now()
    base_id = f"{now:%Y%m%dT%H%M%SZ}-{slugify(task)}"
    if run_id is not None:
        if not RUN_ID_RE.match(run_id):
            raise RunError(
                f"{run_id!r} is not a run id (they look like 20261125T120000Z-my-task)",
                run_id=run_id,
            )
        if (runs_dir / run_id).exists():
            raise RunError(
                f"run {run_id} already exists in {runs_dir}; choose another id", run_id=run_id
            )
        base_id = run_id
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        run_id, n = base_id, 1
        while True:
            try:
                (runs_dir / run_id).mkdir()
                break
            except FileExistsError:
                n += 1
                run_id = f"{base_id}-{n}"
    except OSError as e:
        raise RunError(
            f"cannot create a run folder in {runs_dir}: {e.strerror}",
            fix=Fix("choose another {}", ("runs_dir",)),
            path=runs_dir,
        ) from e
    manifest = Manifest(
        run_id=run_id,
        task=task,
        created=timestamp(now),
        versions=_versions(),
        files=_data_file_hashes(),
        stages={name: StageRecord() for name in stage_names},
    )
    for name, parameters in (planned or {}).items():
        manifest.stages[name].parameters = dict(parameters)
    run = Run(runs_dir / run_id, manifest)
    run.save()
    return run


def open_run(runs_dir: Path, run_id: str) -> Run:
    """Open an existing run by id.

    Raises:
        RunError: the id is not the name of a run folder directly inside ``runs_dir``
            (paths such as ``../x`` or ``/abs`` are refused), or its manifest is unreadable.
    """
    if not RUN_ID_RE.match(run_id or ""):
        raise RunError(
            f"{run_id!r} is not a run id (they look like 20261125T120000Z-my-task); "
            f"list the runs in {runs_dir}",
            run_id=run_id,
        )
    folder = runs_dir / run_id
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise RunError(
            f"no run {run_id} in {runs_dir}",
            fix=Fix("check the id, or pass {} where it lives", ("runs_dir",)),
            run_id=run_id,
            path=folder,
        )
    return Run(folder, _read_manifest(manifest_path, run_id))


def list_runs(runs_dir: Path) -> list[Run | RunError]:
    """Every run folder in ``runs_dir``, sorted by id (that is, by creation time): an open
    :class:`Run`, or the :class:`RunError` that says why its manifest is unreadable."""
    if not runs_dir.is_dir():
        return []
    found: list[Run | RunError] = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir() and RUN_ID_RE.match(p.name)):
        try:
            if not (folder / MANIFEST).is_file():
                raise RunError(f"{folder / MANIFEST} is missing", path=folder)
            found.append(open_run(runs_dir, folder.name))
        except RunError as e:
            e.run_id = folder.name
            found.append(e)
    return found

"""Deleting runs (``pipeline rm``), without breaking what depends on them.

A run is depended on by the runs of its tree (the runs it delegated to, and the run that
delegated it: each names the other in ``run.json``) and by the fine-tuning ledgers
(``runs/finetunes/*.json``) whose dataset came from it (``source_runs``). Such a run is
kept unless the caller forces it, or unless what depends on it is deleted with it. A
forced delete unlinks the tree both ways; a ledger keeps the id of a run that is gone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from .errors import Fix, RunError
from .finetune import LEDGERS
from .runs import Run, open_run


def dependents(run: Run, ledgers: dict[str, list[str]]) -> list[tuple[str, str]]:
    """What depends on ``run``, as ``(id, phrase)``: ``(X, "run X (delegated to by
    it)")``, ``(Y, "run Y (it was delegated to by it)")``, ``(Z, "fine-tuning ledger Z")``,
    given each ledger's ``source_runs`` by ledger id (:func:`_ledger_sources`)."""
    found = [(c, f"run {c} (delegated to by it)") for c in run.manifest.children or []]
    if (parent := run.manifest.parent) is not None:
        found.append((parent.run_id, f"run {parent.run_id} (it was delegated to by it)"))
    found += [(k, f"fine-tuning ledger {k}") for k, runs in ledgers.items() if run.run_id in runs]
    return found


def _ledger_sources(runs_dir: Path) -> dict[str, list[str]]:
    """Each fine-tuning ledger's ``source_runs``, by ledger id (read as plain JSON: an
    unreadable ledger names none)."""
    found = {}
    for ledger in sorted((runs_dir / LEDGERS).glob("*.json")):
        try:
            found[ledger.stem] = (
                json.loads(ledger.read_text(encoding="utf-8")).get("source_runs") or []
            )
        except (OSError, ValueError, AttributeError):
            continue
    return found


def remove_runs(runs_dir: Path, run_ids: Sequence[str], *, force: bool = False) -> list[str]:
    """Delete the runs ``run_ids`` (their folders, all their files); return the ids
    deleted, in order. Nothing is deleted unless every run can be.

    Raises:
        RunError: a run does not exist, is in use by another process, or something
            outside ``run_ids`` depends on it and ``force`` is false (the message names
            what).
    """
    runs = [open_run(runs_dir, run_id) for run_id in dict.fromkeys(run_ids)]
    going = {run.run_id for run in runs}
    if not force:
        ledgers = _ledger_sources(runs_dir)
        for run in runs:
            kept = [phrase for key, phrase in dependents(run, ledgers) if key not in going]
            if kept:
                raise RunError(
                    f"run {run.run_id} is needed by {', '.join(kept)}; nothing was deleted",
                    fix=Fix("delete it anyway with {}", ("force",)),
                    run_id=run.run_id,
                )
    for run in runs:
        with run.locked():
            pass  # in use by another process: an error before anything is deleted
    for run in runs:
        _unlink(runs_dir, run, going)
        shutil.rmtree(run.folder)
    return [run.run_id for run in runs]


def _unlink(runs_dir: Path, run: Run, going: set[str]) -> None:
    """Take ``run`` out of the tree it belongs to: its parent no longer lists it, and the
    runs it delegated to become roots (the links go both ways: only those runs name it)."""
    parent = run.manifest.parent
    linked = [*(run.manifest.children or []), *([parent.run_id] if parent else [])]
    for run_id in linked:
        if run_id in going or not (runs_dir / run_id / "run.json").is_file():
            continue
        try:
            other = open_run(runs_dir, run_id)
        except RunError:
            continue
        manifest = other.manifest
        if run.run_id in (manifest.children or []):
            manifest.children = [c for c in manifest.children or [] if c != run.run_id]
            other.save()
        if manifest.parent is not None and manifest.parent.run_id == run.run_id:
            manifest.parent = None
            other.save()

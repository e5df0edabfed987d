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
from .runs import Run, list_runs, open_run


def dependents(runs_dir: Path, run: Run) -> list[tuple[str, str]]:
    """What depends on ``run``, as ``(id, phrase)``: ``(X, "run X (delegated to by
    it)")``, ``(Y, "run Y (it was delegated to by it)")``, ``(Z, "fine-tuning ledger Z")``."""
    found = [(c, f"run {c} (delegated to by it)") for c in run.manifest.children or []]
    if (parent := run.manifest.parent) is not None:
        found.append((parent.run_id, f"run {parent.run_id} (it was delegated to by it)"))
    for ledger in sorted((runs_dir / LEDGERS).glob("*.json")):
        try:
            sources = json.loads(ledger.read_text(encoding="utf-8")).get("source_runs") or []
        except (OSError, ValueError, AttributeError):
            continue
        if run.run_id in sources:
            found.append((ledger.stem, f"fine-tuning ledger {ledger.stem}"))
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
        for run in runs:
            kept = [phrase for key, phrase in dependents(runs_dir, run) if key not in going]
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
    runs it delegated to become roots."""
    others = list_runs(runs_dir)
    for other in others:
        if not isinstance(other, Run) or other.run_id in going:
            continue
        manifest = other.manifest
        if run.run_id in (manifest.children or []):
            manifest.children = [c for c in manifest.children or [] if c != run.run_id]
            other.save()
        if manifest.parent is not None and manifest.parent.run_id == run.run_id:
            manifest.parent = None
            other.save()

"""Lineage: where a fine-tuned model came from, and what came of it (``pipeline lineage``).

The chain is read from what each step wrote, never stored twice: the runs (transcripts),
the memories and dataset (the dataset's sidecar manifest, ``<FILE>.manifest.json``, lists
each run and turn it holds), the fine-tune job (its ledger in ``runs/finetunes/``), the
model (the ledger's ``fine_tuned_model``), and the runs made with that model (their
endpoints, and ``fine_tuned_models`` in their ``run.json``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import Fix, RunError
from .finetune import FinetuneLedger, job_for_model, ledgers
from .runs import RUN_ID_RE, Run, list_runs, open_run


@dataclass(frozen=True)
class Link:
    """One model's chain.

    Attributes:
        model: the fine-tuned model.
        ledger: its job's ledger.
        dataset: the training file, as the ledger recorded it.
        memories: the ``(run id, turn)`` the dataset holds (from its sidecar; empty when
            the file has none).
        source_runs: the runs it came from.
        made: the runs made with the model.
    """

    model: str
    ledger: FinetuneLedger
    dataset: str
    memories: tuple[tuple[str, int], ...]
    source_runs: tuple[str, ...]
    made: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "job_id": self.ledger.job_id,
            "ledger": self.ledger.local_id,
            "base_model": self.ledger.base_model,
            "status": self.ledger.status,
            "dataset": self.dataset,
            "dataset_sha256": self.ledger.training.sha256,
            "memories": [list(m) for m in self.memories],
            "source_runs": list(self.source_runs),
            "made": list(self.made),
        }


def lineage(runs_dir: Path, target: str) -> list[Link]:
    """The chains ``target`` belongs to: the model's, for a model; for a run, the chain of
    the model it was made with, then the chains of the models its turns went into.

    Raises:
        RunError: ``target`` is neither a model a ledger made nor a run.
    """
    runs = [r for r in list_runs(runs_dir) if isinstance(r, Run)]
    ledger = job_for_model(runs_dir, target)
    if ledger is not None:
        return [_link(ledger, runs)]
    if not RUN_ID_RE.match(target):
        raise RunError(
            f"{target!r} is no model a fine-tune job here made, and no run",
            fix=Fix("list the jobs", command=("finetune", "list")),
        )
    run = open_run(runs_dir, target)
    links = [
        _link(made, runs)
        for model in (run.manifest.fine_tuned_models or {})
        if (made := job_for_model(runs_dir, model)) is not None
    ]
    links += [
        _link(found, runs)
        for found in ledgers(runs_dir)
        if run.run_id in found.source_runs and found.fine_tuned_model
    ]
    return links


def _link(ledger: FinetuneLedger, runs: Sequence[Run]) -> Link:
    from .metrics import uses_model

    model = ledger.fine_tuned_model or ""
    dataset = ledger.training.path
    return Link(
        model,
        ledger,
        dataset,
        _memories(Path(dataset)),
        tuple(ledger.source_runs),
        tuple(r.run_id for r in runs if model and uses_model(r, model)),
    )


def _memories(dataset: Path) -> tuple[tuple[str, int], ...]:
    sidecar = dataset.with_name(dataset.name + ".manifest.json")
    try:
        listed = json.loads(sidecar.read_text(encoding="utf-8"))["examples"]["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return ()
    return tuple((str(e["run_id"]), int(e["turn"])) for e in listed)


def lineage_text(links: Sequence[Link]) -> str:
    """The chains as ``pipeline lineage`` prints them: runs, then memories, then dataset,
    then job, then model, then the runs made with it."""
    blocks = []
    for link in links:
        ledger = link.ledger
        by_run: dict[str, int] = {}
        for run_id, _ in link.memories:
            by_run[run_id] = by_run.get(run_id, 0) + 1
        lines = [
            f"runs:     {', '.join(link.source_runs) or '(not recorded)'}",
            "memories: "
            + (
                ", ".join(f"{run} ({n} turns)" for run, n in by_run.items())
                if by_run
                else "(the dataset has no sidecar)"
            ),
            f"dataset:  {link.dataset} (sha256 {ledger.training.sha256[:12]}..., "
            f"{ledger.training.examples} examples)",
            f"job:      {ledger.job_id or '(none)'} ({ledger.status}; ledger {ledger.local_id}, "
            f"base {ledger.base_model})",
            f"model:    {link.model or '(none yet)'}",
            f"made:     {', '.join(link.made) or '(no run yet)'}",
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)

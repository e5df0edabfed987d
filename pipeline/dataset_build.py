"""``pipeline dataset build``: runs in, a checked fine-tuning dataset out.

The runs (dialogues that ended, and imported chats) become :class:`pipeline.dataset.Source`
records; :func:`build` makes the examples from one speaker's side, splits off a
validation part, checks both as a provider would and prices the training; :func:`write`
writes them with a sidecar manifest, ``<FILE>.manifest.json``, which names every run and
turn the dataset holds and the sha256 of each file (``pipeline finetune create`` reads it
to record the runs a fine-tuned model came from).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import dataset, stages
from .errors import DatasetError, Fix
from .records import JSONObject
from .runs import Run, atomic_write_json

DEFAULT_CONTEXT = 10  # turns of context per example: long chats would grow as its square
DEFAULT_TOKEN_LIMIT = 16_385  # the smallest current example limit, when no model is named
VALIDATION_SUFFIX = ".validation.jsonl"
MANIFEST_SUFFIX = ".manifest.json"


@dataclass(frozen=True)
class Built:
    """A dataset, made and checked, not yet written.

    Attributes:
        train, validation: the examples of each part (validation empty when none).
        report, validation_report: what :func:`pipeline.dataset.check` found in each.
        runs: the runs that gave at least one example, in order.
        speaker, fmt, context: how it was made.
        base_model, epochs, cost: the estimated training cost in USD (None when the
            price table has no price for ``base_model``, or no model was named).
    """

    train: list[dataset.Example]
    validation: list[dataset.Example]
    report: dataset.Report
    validation_report: dataset.Report | None
    runs: list[str]
    speaker: str
    fmt: str
    context: int | None
    base_model: str | None
    epochs: int
    cost: float | None


def sources(runs: Sequence[Run], min_score: float | None) -> list[dataset.Source]:
    """The runs whose conversation is complete, as sources, with the judge's score;
    those under ``min_score`` (or unjudged, when it is set) are left out."""
    from .director import load_roles
    from .judge import load_verdict

    found = []
    for run in runs:
        now = stages.statuses(run)
        if now[stages.conversation_stage(run)] != "done":
            continue
        judged = now.get("judge") == "done"
        score = load_verdict(run).score if judged else None
        found.append(dataset.Source(run.run_id, load_roles(run), run.read_transcript(), score))
    return dataset.at_least(found, min_score)


def default_speaker(runs: Sequence[Run]) -> str:
    """The speaker to train when none is named: the ``--me`` side the imported chats
    share.

    Raises:
        DatasetError: the runs name no such side, or different ones.
    """
    from .importing import me

    sides = {me(run) for run in runs if run.imported}
    if len(sides) == 1 and None not in sides:
        (side,) = sides
        assert side is not None
        return side
    raise DatasetError(
        "no speaker to train: name the side whose turns are the answers",
        fix=Fix("pass {} NAME", ("speaker",)),
    )


def build(
    runs: Sequence[Run],
    *,
    speaker: str,
    fmt: str = "chat",
    context: int | None = DEFAULT_CONTEXT,
    min_score: float | None = None,
    validation: float = 0.0,
    seed: int = 0,
    base_model: str | None = None,
    epochs: int | None = None,
    prices: Path | None = None,
    token_limit: int | None = None,
) -> Built:
    """The dataset of ``speaker``'s turns in ``runs`` (see :func:`pipeline.dataset.build_examples`),
    a ``validation`` share split off with ``seed``, both checked against ``token_limit``
    (by default the base model's example limit from the price table) and priced for
    ``epochs`` (by default as OpenAI chooses them) of ``base_model``.

    Raises:
        DatasetError: no run qualifies, the speaker says nothing in them, the share is
            out of range, or the price table cannot be read.
    """
    found = sources(runs, min_score)
    if not found:
        raise DatasetError(
            "no run to learn from: none has a finished conversation"
            + (f" judged {min_score:g} or more" if min_score is not None else ""),
            fix=Fix("finish or judge the runs first, or lower {}", ("min_score",)),
        )
    examples = dataset.build_examples(found, speaker, fmt=fmt, context=context)
    return assemble(
        examples,
        runs=list(dict.fromkeys(e.run_id for e in examples)),
        speaker=speaker,
        fmt=fmt,
        context=context,
        validation=validation,
        seed=seed,
        base_model=base_model,
        epochs=epochs,
        prices=prices,
        token_limit=token_limit,
    )


def assemble(
    examples: Sequence[dataset.Example],
    *,
    runs: Sequence[str],
    speaker: str,
    fmt: str,
    context: int | None,
    validation: float = 0.0,
    seed: int = 0,
    base_model: str | None = None,
    epochs: int | None = None,
    prices: Path | None = None,
    token_limit: int | None = None,
) -> Built:
    """Examples made already (by :func:`build`, or curated from memories by
    :mod:`pipeline.curate`) as a dataset: a ``validation`` share split off with ``seed``,
    both parts checked and the training priced as :func:`build` says; ``runs`` are the
    runs they came from.

    Raises:
        DatasetError: the share is out of range, or the price table cannot be read.
    """
    train, held = dataset.split(examples, validation, seed)
    table = dataset.load_prices(prices)
    limit = token_limit or (
        dataset.model_entry(table.example_token_limit, base_model) if base_model else None
    )
    limit = limit or DEFAULT_TOKEN_LIMIT
    report = dataset.check(train, fmt=fmt, token_limit=limit, model=base_model)
    held_report = (
        dataset.check(held, fmt=fmt, token_limit=limit, model=base_model, minimum=1)
        if held
        else None
    )
    epochs = epochs or dataset.default_epochs(len(train))
    cost = (
        dataset.estimate_cost(report.total_tokens, base_model, epochs, table.training)
        if base_model
        else None
    )
    return Built(
        train,
        held,
        report,
        held_report,
        list(runs),
        speaker,
        fmt,
        context,
        base_model,
        epochs,
        cost,
    )


def write(built: Built, path: Path, *, manifest: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``built`` to ``path`` (and its validation part beside it, ``<stem>.validation.jsonl``)
    with the sidecar manifest; return the files written. The keys of ``manifest`` are
    added to the sidecar's (replacing those of the same name: ``examples`` for one that
    says more of each example).

    Raises:
        DatasetError: a check found problems (nothing is written; the message lists
            them).
    """
    problems = [*built.report.problems]
    if built.validation_report is not None:
        problems += [f"validation: {p}" for p in built.validation_report.problems]
    if problems:
        raise DatasetError(
            f"not written: {'; '.join(problems)}",
            fix=Fix("add runs, or change {} or {}", ("speaker", "context")),
            path=path,
        )
    files = {"train": (path, dataset.write_jsonl(path, built.train))}
    if built.validation:
        held = path.with_name(path.name.removesuffix(".jsonl") + VALIDATION_SUFFIX)
        files["validation"] = (held, dataset.write_jsonl(held, built.validation))
    listing: JSONObject = {
        "speaker": built.speaker,
        "format": built.fmt,
        "context": built.context,
        "runs": built.runs,
        "files": {
            part: {"path": p.name, "sha256": digest, "examples": len(getattr(built, part))}
            for part, (p, digest) in files.items()
        },
        "examples": {
            part: [{"run_id": e.run_id, "turn": e.turn} for e in getattr(built, part)]
            for part in files
        },
    }
    sidecar = path.with_name(path.name + MANIFEST_SUFFIX)
    atomic_write_json(sidecar, {**listing, **(manifest or {})})
    return [p for p, _ in files.values()] + [sidecar]


def source_runs(dataset_path: Path) -> list[str]:
    """The runs a dataset written by :func:`write` came from (from its sidecar manifest);
    empty for a file made another way."""
    import json

    sidecar = dataset_path.with_name(dataset_path.name + MANIFEST_SUFFIX)
    try:
        runs = json.loads(sidecar.read_text(encoding="utf-8")).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in runs if isinstance(r, str)]

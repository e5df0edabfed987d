"""Readable renderings of runs for the terminal: roles, transcripts, run summaries.

Pure functions from run data to text; headings are styled with :func:`click.style`,
which ``click.echo`` strips when the output is not a terminal.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import click

from .errors import RunError
from .stages import conversation_stage, graph
from .stages import statuses as stage_statuses
from .termination import strip_token

if TYPE_CHECKING:
    from .batch import Outcome
    from .batchapi import Estimate
    from .curate import Curated
    from .dataset_build import Built
    from .finetune import DatasetFile, FinetuneLedger, JobRow, LedgerFile, Update
    from .memory import Memory, SyncReport
    from .metrics import ReportRow
    from .records import RolesDocument, StageRecord, Turn, Verdict
    from .runs import Run
    from .stages import Plan
    from .viewer import TreeNode

TASK_WIDTH = 48


def turn_header(turn: int, role: str) -> str:
    """The heading printed before each turn: ``[3] Mentor``."""
    return click.style(f"[{turn}] {role}", bold=True)


def roles_text(roles: RolesDocument) -> str:
    """The role prompts and the opening line (``roles.json``) as text."""
    parts = []
    for i, role in enumerate(roles.roles, start=1):
        note = " (speaks first)" if i == 1 else ""
        parts.append(click.style(f"Role {i}: {role.name}{note}", bold=True))
        parts.append(f"{role.system_prompt}\n")
    parts.append(click.style(f"Opening line ({roles.roles[0].name})", bold=True))
    parts.append(roles.opening_line)
    return "\n".join(parts)


def transcript_text(lines: Sequence[Turn], done_token: str = "") -> str:
    """The transcript lines as text, one heading per turn (a person's marked as such),
    each after the note a person gave its speaker, the done token removed."""
    return "\n".join(f"\n{turn_text(line, done_token)}" for line in lines)


def turn_text(line: Turn, done_token: str = "") -> str:
    """One transcript line as text: ``[3] Student (a person)`` and what it said, after
    the note a person gave its speaker, if any."""
    note = f"(note to {line.role}: {line.note})\n" if line.note is not None else ""
    person = " (a person)" if line.kind == "human" else ""
    header = turn_header(line.turn, line.role) + person
    return f"{note}{header}\n{strip_token(line.content, done_token)}"


def verdict_text(verdict: Verdict) -> str:
    """The judge's verdict as text."""
    done = "completed" if verdict.completed else "not completed"
    parts = [
        click.style(f"Verdict: {done}, score {verdict.score}/10", bold=True),
        verdict.reasons,
    ]
    if verdict.deliverable:
        parts += [click.style("Deliverable", bold=True), verdict.deliverable]
    return "\n".join(parts)


def reflections_text(reflections: Sequence[Mapping[str, Any]]) -> str:
    """The reflections of a run, one block per role: goal met or not, keep or discard and
    why, the assessment and what to improve."""
    blocks = []
    for r in reflections:
        head = (
            f"Reflection on {r['role']}: goal {'met' if r['meets_goal'] else 'not met'}; "
            f"{'keep' if r['keep'] else 'discard'} ({r['reason']})"
        )
        body = [r["assessment"]] + (
            [f"To improve: {r['improvements']}"] if r["improvements"] else []
        )
        blocks.append("\n".join([click.style(head, bold=True), *body]))
    return "\n\n".join(blocks)


def ending(entry: StageRecord, reason: str | None = None) -> str:
    """How a dialogue stage ended: ``ended by loop at turn 10`` (``reason`` overrides the
    recorded termination reason)."""
    reason = reason or entry.termination_reason
    if not reason:
        return "not ended"
    at = entry.termination_turn
    return f"ended by {reason}" + (f" at turn {at}" if at else "")


@dataclass(frozen=True)
class RunSummary:
    """One run's listing (``pipeline runs``; :meth:`as_json` for ``--json``).

    Attributes:
        stages: each stage's status as :func:`pipeline.stages.status` says it.
        turns: the turns in its transcript so far.
        termination_reason: how the dialogue ended (``interrupted`` when its process died).
        parent: the run that delegated it, for a child run.
        error: for a run whose manifest cannot be read, why (the other fields are empty).
    """

    run_id: str
    created: str = ""
    task: str = ""
    stages: dict[str, str] = field(default_factory=dict)
    turns: int = 0
    termination_reason: str | None = None
    parent: str | None = None
    error: str | None = None

    def as_json(self) -> dict[str, object]:
        if self.error is not None:
            return {"run_id": self.run_id, "error": self.error}
        return {k: v for k, v in asdict(self).items() if k != "error"}


def ended_by(run: Run, found: Mapping[str, str]) -> str | None:
    """How ``run``'s conversation ended, given its stages' statuses ``found``: its
    termination reason, ``interrupted`` when its process died, ``imported`` for an
    imported chat, None while it goes on."""
    conversation = conversation_stage(run)
    if found.get(conversation) == "interrupted":
        return "interrupted"
    if run.imported:
        return "imported"
    entry = run.manifest.stages.get(conversation)
    return entry.termination_reason if entry is not None else None


def summary(run: Run) -> RunSummary:
    """One run's listing: id, created, task, each stage's status (``interrupted`` when its
    process is gone), turns so far and the dialogue's termination reason."""
    statuses = stage_statuses(run)
    reason = ended_by(run, statuses)
    link = run.manifest.parent
    return RunSummary(
        run.run_id,
        run.manifest.created,
        run.task,
        statuses,
        len(run.read_transcript()),
        reason,
        link.run_id if link else None,
    )


def unreadable(error: RunError) -> RunSummary:
    """The listing of a run whose manifest cannot be read."""
    return RunSummary(error.run_id or "?", error=error.message)


def runs_table(rows: Sequence[RunSummary]) -> str:
    """The listing as an aligned table, one run per line; an unreadable run gets a line
    that says why."""
    header = ("RUN", "CREATED", "DIRECTOR", "DIALOGUE", "TURNS", "ENDED BY", "PARENT")
    cells = {row.run_id: _cells(row) for row in rows if row.error is None}
    widths = [max(len(c[i]) for c in [header, *cells.values()]) for i in range(len(header))]

    def line(columns: Sequence[str], task: str) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + f"  {task}"

    out = [line(header, "TASK")]
    for row in rows:
        if row.error is not None:
            out.append(f"{row.run_id}  unreadable: {row.error}")
        else:
            out.append(line(cells[row.run_id], _cut(row.task)))
    return "\n".join(out)


def _cells(row: RunSummary) -> tuple[str, ...]:
    return (
        row.run_id,
        row.created[:16].replace("T", " "),
        row.stages.get("director", "-"),
        row.stages.get("dialogue", "import " + row.stages.get("import", "-")),
        str(row.turns),
        row.termination_reason or "-",
        row.parent or "-",
    )


def one_line(text: str) -> str:
    """``text`` on one line, cut to the width of a listing's task."""
    return _cut(text)


def _cut(text: str) -> str:
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= TASK_WIDTH else one_line[: TASK_WIDTH - 3] + "..."


def run_header(run: Run) -> str:
    """The facts of a run shown above its roles and transcript by ``pipeline show``; for a
    run in a tree of delegated runs, the tree."""
    info = summary(run)
    lines = [
        click.style(f"Run {run.run_id}", bold=True),
        f"Task: {run.task}",
        f"Created: {info.created}",
    ]
    if run.manifest.parent is not None or run.manifest.children:
        lines.append("Tree:\n" + tree_text(run))
    for model, made in (run.manifest.fine_tuned_models or {}).items():
        lines.append(f"Fine-tuned model: {model}, from job {made['job_id']} ({made['ledger']})")
    for name in (node.name for node in graph(run)):
        entry = run.stage(name)
        parts = [info.stages[name]]
        if name == "import":
            parts.append(imported_text(entry))
        if entry.endpoint:
            parts.append(f"{entry.endpoint.model} at {entry.endpoint.base_url}")
        if usage := entry.usage:
            parts.append(
                f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens"
            )
        if name == "dialogue" and info.turns:
            parts.append(f"{info.turns} turns")
        if name == "dialogue" and info.termination_reason:
            parts.append(ending(entry, info.termination_reason))
        if entry.usage_by_role:
            parts.append(
                "by role: "
                + ", ".join(
                    f"{role} {u.prompt_tokens}+{u.completion_tokens}"
                    for role, u in entry.usage_by_role.items()
                )
            )
        if entry.error:
            parts.append(f"error: {entry.error}")
        lines.append(f"{name.capitalize()}: " + "; ".join(parts))
    return "\n".join(lines)


def imported_text(entry: StageRecord) -> str:
    """What an import stage brought in: ``from chat.txt (whatsapp): 120 messages; left
    out: 3 media, 1 system``."""
    given = entry.parameters
    text = f"from {given.get('file')} ({given.get('format')}): {given.get('messages')} messages"
    if skipped := {k: v for k, v in (given.get("skipped") or {}).items() if v}:
        text += "; left out: " + ", ".join(f"{n} {what}" for what, n in skipped.items())
    if given.get("me"):
        text += f"; me: {given['me']}"
    return text


def dataset_text(built: Built) -> str:
    """What ``dataset build`` made, for stderr: examples, tokens and how they were
    counted, the estimated cost, and any problem found."""
    report = built.report
    counted = report.counter + (f" ({report.counter_note})" if report.counter_note else "")
    lines = [
        f"{report.count} training examples from {len(built.runs)} runs, speaker {built.speaker}"
        + (f"; {len(built.validation)} for validation" if built.validation else ""),
        f"tokens: {report.total_tokens:,} in all, {report.max_tokens:,} in the longest "
        f"example; counted with {counted}",
    ]
    if built.base_model is None:
        lines.append("cost: name the model to tune (--base-model) for an estimate")
    elif built.cost is None:
        lines.append(f"cost: no price for {built.base_model} (give one with --prices FILE)")
    else:
        lines.append(
            f"estimated training cost: ${built.cost:,.2f} ({built.epochs} epochs of "
            f"{built.base_model})"
        )
    return "\n".join(lines)


# -- memory and curation ------------------------------------------------------------


def search_text(found: Sequence[Memory]) -> str:
    """Search results, two lines each: where (run, turn, role, score), then the snippet."""
    lines = []
    for m in found:
        score = "unjudged" if m.score is None else f"score {m.score:g}"
        where = f"{m.run_id} turn {m.turn}  {m.role}  {score}"
        lines += [click.style(where, bold=True), "  " + " ".join((m.snippet or m.content).split())]
    return "\n".join(lines)


def sync_text(report: SyncReport, database: str) -> str:
    """What ``memory sync`` (or ``rebuild``) did, in one line."""
    return (
        f"{len(report.added)} runs added, {len(report.updated)} updated, "
        f"{len(report.removed)} removed, {report.unchanged} unchanged; "
        f"{report.memories} memories in {database}"
    )


def curated_text(curated: Curated) -> str:
    """What ``curate`` chose, for stderr, before :func:`dataset_text`'s lines."""
    lines = [
        f"{curated.candidates} memories qualified; {len(curated.duplicates)} near-duplicates "
        f"dropped, {len(curated.over_cap)} over the per-task cap; {len(curated.memories)} kept"
    ]
    if curated.mixed is not None:
        total = len(curated.memories) + len(curated.mixed.lines)
        share = len(curated.mixed.lines) / total if total else 0.0
        lines.append(
            f"{len(curated.mixed.lines)} outside examples from {curated.mixed.file} "
            f"({share:.1%} of the dataset)"
        )
    return "\n".join([*lines, dataset_text(curated.built)])


def batch_table(outcomes: Sequence[Outcome]) -> str:
    """A batch's summary, one task per line: status, turns, how it ended, run, task."""
    header = ("STATUS", "TURNS", "ENDED BY", "RUN")
    rows = [
        (
            o.status,
            str(o.turns),
            o.ended_by or "-",
            o.run_id or "-",
            _cut(o.task.task) + (f"  ({o.error})" if o.error else ""),
        )
        for o in outcomes
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)) + "  TASK"]
    for row in rows:
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + f"  {row[4]}"
        )
    return "\n".join(lines)


def diff_runs(a: Run, b: Run) -> str:
    """What differs between two runs: their inputs (task, template and schema hashes,
    endpoints, parameters), then unified diffs of the roles and of the transcripts.
    An empty string when nothing differs."""
    sections = []
    inputs = _input_differences(a, b)
    if inputs:
        sections.append("inputs that differ:\n" + "\n".join(f"  {line}" for line in inputs))
    for title, render in (("roles", _roles_plain), ("transcript", _transcript_plain)):
        lines = list(
            difflib.unified_diff(
                render(a).splitlines(),
                render(b).splitlines(),
                fromfile=f"{a.run_id}/{title}",
                tofile=f"{b.run_id}/{title}",
                lineterm="",
            )
        )
        if lines:
            sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _input_differences(a: Run, b: Run) -> list[str]:
    found = []
    if a.task != b.task:
        found.append(f"task: {a.task!r} | {b.task!r}")
    files_a, files_b = a.manifest.files, b.manifest.files
    for path in sorted(set(files_a) | set(files_b)):
        if files_a.get(path) != files_b.get(path):
            found.append(
                f"{path}: sha256 {_short(files_a.get(path))} | {_short(files_b.get(path))}"
            )
    names = dict.fromkeys(node.name for run in (a, b) for node in graph(run))
    for stage in names:
        ea, eb = a.stage(stage).to_json(), b.stage(stage).to_json()
        for key in ("endpoint", "role_endpoints", "parameters"):
            if ea.get(key) != eb.get(key):
                found.append(f"{stage} {key}: {_compact(ea.get(key))} | {_compact(eb.get(key))}")
        if ea.get("edits", 0) != eb.get("edits", 0):
            found.append(f"{stage} hand edits: {ea.get('edits', 0)} | {eb.get('edits', 0)}")
    return found


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "(none)"


def _compact(value: object) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _roles_plain(run: Run) -> str:
    from .director import ROLES
    from .importing import ROLES as SPEAKERS
    from .records import RolesDocument

    path = SPEAKERS if run.imported else ROLES
    if not run.path(path).exists():
        return ""
    return click.unstyle(roles_text(RolesDocument.from_json(run.read_json(path))))


def _transcript_plain(run: Run) -> str:
    return click.unstyle(transcript_text(run.read_transcript()))


def tree_text(run: Run) -> str:
    """The tree of delegated runs ``run`` belongs to, from its root: one run a line, its
    conversation's status and its task; ``*`` marks ``run``."""
    from .viewer import tree

    out: list[str] = []

    def walk(node: TreeNode, lead: str, branch: str) -> None:
        if node.error is not None:
            out.append(f"{lead}{branch}{node.run_id}  unreadable: {node.error}")
            return
        mark = " *" if node.current else ""
        out.append(f"{lead}{branch}{node.run_id}{mark}  {node.status}  {_cut(node.task)}")
        deeper = lead if not branch else lead + ("   " if branch == "└─ " else "│  ")
        for i, child in enumerate(node.children):
            walk(child, deeper, "└─ " if i == len(node.children) - 1 else "├─ ")

    root = tree(run)
    if root is not None:
        walk(root, "  ", "")
    return "\n".join(out)


def worst_case_text(plan: Plan, *, judge: bool, mcp: bool = False) -> str:
    """What ``generate --dry-run`` prints: the limits of the tree of runs and the most
    model calls it can make (:func:`pipeline.delegate.worst_case`; ``mcp``: the roles are
    offered MCP tools)."""
    from .delegate import worst_case

    most = worst_case(plan, judge=judge, tools=mcp)
    tools = plan.tools
    lines = ["dry run: nothing was called"]
    if tools.delegate:
        lines.append(
            f"runs: at most {most.runs} (the root and its delegated runs: depth "
            f"{tools.max_depth}, {tools.max_children} children per run)"
        )
    else:
        lines.append("runs: 1 (no delegation)")
    lines.append(
        f"model calls per run: at most {most.per_run} ({most.director} director, "
        f"{most.dialogue} dialogue over {plan.dialogue.turns - 1} generated turns"
        + (f", {most.judge} judge)" if judge else ")")
    )
    lines.append(f"model calls in all: at most {most.calls}")
    if plan.dialogue.max_tokens_total is not None:
        lines.append(f"tokens: the dialogue of each run stops at {plan.dialogue.max_tokens_total}")
    return "\n".join(lines)


# -- fine-tune jobs -----------------------------------------------------------------------


def upload_text(
    files: Sequence[tuple[str, DatasetFile]], base_url: str, base_model: str, suffix: str | None
) -> str:
    """What a fine-tune would upload, and where: each file (``training``, ``validation``)
    with its size and example count, the endpoint, the base model and the suffix."""
    width = max(len(kind) for kind, _ in files)
    lines = [f"upload to {base_url}:"]
    for kind, dataset in files:
        lines.append(
            f"  {kind.ljust(width)}  {dataset.path} ({dataset.bytes:,} bytes, "
            f"{dataset.examples:,} example{'s' if dataset.examples != 1 else ''})"
        )
    lines.append(f"to fine-tune {base_model}" + (f" (suffix {suffix})" if suffix else ""))
    return "\n".join(lines)


def ledger_text(ledger: FinetuneLedger) -> str:
    """A fine-tune's ledger for reading: its status, then what it knows, a line each."""

    def file_line(entry: LedgerFile) -> str:
        line = f"{entry.path} ({entry.bytes:,} bytes, {entry.examples:,} examples)"
        if entry.file_id:
            line += f", uploaded as {entry.file_id}"
            if entry.deleted:
                line += f", deleted {entry.deleted}"
        return line

    rows = [
        ("endpoint", ledger.base_url),
        ("job", ledger.job_id),
        ("base model", ledger.base_model),
        ("suffix", ledger.suffix),
        ("training", file_line(ledger.training)),
        ("validation", file_line(ledger.validation) if ledger.validation else None),
        ("source runs", ", ".join(ledger.source_runs) or None),
        ("model", ledger.fine_tuned_model),
        ("error", ledger.error),
    ]
    shown = [(name, value) for name, value in rows if value]
    width = max(len(name) for name, _ in shown)
    head = click.style(f"fine-tune {ledger.local_id}: {ledger.status}", bold=True)
    return "\n".join([head, *(f"  {name.ljust(width)}  {value}" for name, value in shown)])


def job_update(update: Update) -> str:
    """One line of a followed job's progress: an event, or the status it took."""
    from .finetune import StatusChange

    if isinstance(update, StatusChange):
        return f"status: {update.status}"
    level = "" if update.level == "info" else f"{update.level}: "
    return f"  {update.time[11:19]}  {level}{update.message}"


def finetune_table(rows: Sequence[JobRow]) -> str:
    """Fine-tune jobs, one a line: local id (``-`` for a job with no ledger here), job id,
    status, base model, fine-tuned model."""
    header = ("LOCAL ID", "JOB", "STATUS", "BASE MODEL", "FINE-TUNED MODEL")
    cells = [
        (r.local_id or "-", r.job_id or "-", r.status, r.base_model, r.fine_tuned_model or "-")
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *cells]
    )


def metrics_table(rows: Sequence[ReportRow]) -> str:
    """The metrics of each cycle's runs before and after its model
    (:func:`pipeline.metrics.report_rows`), one row each: runs, judged runs, mean and
    median score (2 decimals), distinct-1 and distinct-2 and repetition (3 decimals),
    the share of ended runs that ended by the done token (a percentage), the model; ``-``
    for a value a row has not (no judged run, no words...). Numbers are right-aligned."""
    header = (
        "CYCLE", "SIDE", "RUNS", "JUDGED", "MEAN", "MEDIAN",
        "DISTINCT-1", "DISTINCT-2", "REPETITION", "DONE", "MODEL",
    )  # fmt: skip
    return _grid([header, *(_metrics_cells(row) for row in rows)], numeric=range(2, 10))


def _grid(cells: Sequence[Sequence[str]], numeric: Sequence[int]) -> str:
    """Rows of cells in columns two spaces apart, those in ``numeric`` right-aligned."""
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    )


def batch_estimate_text(estimate: Estimate, *, batch_api: bool) -> str:
    """What ``pipeline batch --dry-run`` prints: the tasks to run, then per one-answer
    stage its requests, model, input tokens (``<=`` for a bound), output tokens at most
    and cost (an upper estimate) at Batch API and ordinary prices (``-`` without a price), their
    total, the dialogues' turns, and how tokens were counted and where prices come from."""
    way = "the Batch API (--batch-api)" if batch_api else "the ordinary API"
    lines = [f"{estimate.tasks} tasks, {estimate.to_run} to run; requests through {way}:"]

    def usd(value: float | None) -> str:
        return "-" if value is None else f"${value:,.4f}"

    header = (
        "STAGE", "MODEL", "REQUESTS", "INPUT TOKENS", "OUTPUT TOKENS", "BATCH API", "ORDINARY",
    )  # fmt: skip
    cells = [header]
    for row in estimate.stages:
        tokens = f"{row.input_tokens:,}" if row.counted else f"<= {row.input_tokens:,}"
        cells.append(
            (
                row.stage,
                row.model,
                str(row.requests),
                tokens,
                f"<= {row.output_tokens:,}",
                usd(row.batch_cost),
                usd(row.cost),
            )
        )
    if len(estimate.stages) > 1:

        def total(costs: list[float | None]) -> str:
            return "-" if None in costs else usd(sum(c or 0.0 for c in costs))

        cells.append(
            (
                "total",
                "",
                str(sum(row.requests for row in estimate.stages)),
                "",
                "",
                total([row.batch_cost for row in estimate.stages]),
                total([row.cost for row in estimate.stages]),
            )
        )
    if estimate.stages:
        lines.append(_grid(cells, numeric=range(2, 7)))
        lines.append(
            "costs are upper estimates: every answer at its token limit, every conversation "
            "at its longest"
        )
    else:
        lines.append("no director, judge or reflection request is left to send")
    if estimate.dialogue_runs:
        lines.append(
            f"dialogue: {estimate.dialogue_runs} runs, at most {estimate.dialogue_turns} turns, "
            "through the ordinary API (not priced here)"
        )
    unpriced = sorted({row.model for row in estimate.stages if row.cost is None})
    if unpriced:
        lines.append(
            f"no price for {', '.join(unpriced)}: give one with --prices FILE "
            "([chat_input], [chat_output], [batch_input], [batch_output], USD per 1M tokens)"
        )
    lines.append(
        f"tokens counted with {estimate.counter}; prices from {estimate.source} ({estimate.date})"
    )
    return "\n".join(lines)


def _metrics_cells(row: ReportRow) -> tuple[str, ...]:
    m = row.metrics

    def number(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return (
        row.cycle,
        row.side,
        str(m.runs),
        str(m.scores.judged),
        number(m.scores.mean, 2),
        number(m.scores.median, 2),
        number(m.distinct_1, 3),
        number(m.distinct_2, 3),
        number(m.repetition, 3),
        "-" if m.done_token_share is None else f"{m.done_token_share:.0%}",
        row.model,
    )

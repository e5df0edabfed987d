"""Metrics of a set of runs: are the runs made with a tuned model better or worse?

The fine-tuning cycle (issue 15) trains a persona's model on its own curated output. A
loop like that can reinforce its own errors, so the runs made before and after each
tuned model are compared on four signals (:func:`group_metrics`):

**Judge scores.** The distribution of ``judge/verdict.json``'s ``score`` (1 to 10,
:func:`pipeline.judge.load_verdict`) over the runs whose judge stage is ``done`` as
:func:`pipeline.stages.statuses` sees it (a stale, failed or pending judge does not
count, whatever file it left): how many, mean, median (:func:`statistics.median`: the
mean of the two middle scores for an even count), minimum, maximum, and the number of
runs at each score 1..10.

**Novelty: distinct-n** (Li, Galley, Brockett, Gao and Dolan 2016, "A
Diversity-Promoting Objective Function for Neural Conversation Models", NAACL), for
n = 1 and 2: the number of distinct n-grams divided by the number of n-grams,
over the words of every *generated* turn of every run of the set (pooled: a phrase that
recurs in two runs counts once among the distinct ones). Words are the turn's text
lowercased and split on white space (as :func:`pipeline.termination.similarity` splits
it: punctuation stays on its word, the done token is a word like any other); n-grams do
not cross turns. The paper divides by the number of generated tokens; here the
denominator is the number of n-grams, which is the same for n = 1 and, for n = 2, smaller
by one per turn, so that a set where no n-gram repeats scores exactly 1. The director's
opening line, human turns, tool results and imported turns are not generated, so they are
not counted. None when the set has no n-gram. Distinct-n falls as a set grows (more
text, more repeats: Liu et al. 2022, "Rethinking and Refining the Distinct Metric"), so
compare sets of similar size.

**Repetition**, with the loop detector's similarity
(:func:`pipeline.termination.similarity`): for each generated turn with at least one
word, the highest similarity between it and any earlier line of the same run but tool
results (the opening line, generated and human turns; 0.0 when there is none), and
the mean of these over all such turns of the set (pooled: a run weighs by its turns).
That similarity, with A and B the two word lists, M the size of their multiset
intersection and T = |A| + |B|, is 2M/T (word order ignored) when that is below 0.9 (the
loop threshold, :data:`pipeline.termination.DUPLICATE_RATIO`), and otherwise
:class:`difflib.SequenceMatcher`'s ratio over the words (order counted). 0 means no
turn shares a word with what came before; 1 means every turn repeats an earlier one.
None when the set has no such turn.

**Ended by the done token**: among the runs whose dialogue recorded a
``termination_reason``, the share that ended by ``done_token``; every other reason
(``loop``, ``max_turns``, ``token_budget``, ``empty_turn``, ``error``, ``interrupted``,
``human_quit``) counts as not done. A run whose dialogue has not ended (pending, still
running) is in no count. None when no run ended.

Only dialogue runs count: imported chats (``Run.imported``) are conversations between
people, not a model's output; :attr:`GroupMetrics.imported` says how many were left out.

Which runs are "before" and "after" a model is :func:`split_by_model`; one table row per
cycle and side is :func:`report_rows`, rendered by :func:`pipeline.views.metrics_table`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .records import parse_time
from .termination import similarity

if TYPE_CHECKING:
    from .records import Turn
    from .runs import Run

SCORES = range(1, 11)
"""The judge's scale (``schemas/verdict.schema.json``)."""
DONE_REASON = "done_token"


def words(text: str) -> list[str]:
    """The words of a turn as the metrics count them: lowercased, split on white space."""
    return text.lower().split()


def ngrams(turn_words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The ``n``-grams of one turn's words, in order (none when it has fewer than n)."""
    return [tuple(turn_words[i : i + n]) for i in range(len(turn_words) - n + 1)]


def distinct_n(turns: Sequence[Sequence[str]], n: int) -> float | None:
    """Distinct-n of ``turns`` (each a turn's words): distinct n-grams / n-grams, within
    turns, pooled over all of them (see the module's text); None when there are no
    n-grams."""
    found = [gram for turn in turns for gram in ngrams(turn, n)]
    return len(set(found)) / len(found) if found else None


def repetitions(lines: Sequence[Turn]) -> list[float]:
    """For each generated line of a transcript with at least one word, in order, its
    highest :func:`~pipeline.termination.similarity` to an earlier line that is not a
    tool result (0.0 when there is none)."""
    found = []
    for i, line in enumerate(lines):
        if not line.generated or not words(line.content):
            continue
        earlier = [e.content for e in lines[:i] if e.kind != "tool"]
        found.append(max((similarity(line.content, e) for e in earlier), default=0.0))
    return found


@dataclass(frozen=True)
class RunMetrics:
    """What one dialogue run contributes to the metrics of a set.

    Attributes:
        run_id: the run.
        score: the judge's score (1..10) when its judge stage is done, else None.
        termination_reason: how its dialogue ended, or None when it has not.
        turn_words: the words (:func:`words`) of each generated turn, in order.
        repetition: for each generated turn with a word, its repetition
            (:func:`repetitions`), in order.
    """

    run_id: str
    score: int | None
    termination_reason: str | None
    turn_words: tuple[tuple[str, ...], ...]
    repetition: tuple[float, ...]


def run_metrics(run: Run) -> RunMetrics:
    """The metrics of one dialogue run.

    Raises:
        ValueError: ``run`` is an imported chat (see the module's text).
        RunError: its transcript cannot be read, or its judge is done but its verdict
            cannot be read or is not a verdict.
    """
    from .judge import load_verdict
    from .stages import statuses

    if run.imported:
        raise ValueError(f"run {run.run_id} is an imported chat: it has no dialogue metrics")
    lines = run.read_transcript()
    judged = statuses(run).get("judge") == "done"
    dialogue = run.manifest.stages.get("dialogue")
    return RunMetrics(
        run_id=run.run_id,
        score=load_verdict(run).score if judged else None,
        termination_reason=dialogue.termination_reason if dialogue is not None else None,
        turn_words=tuple(tuple(words(line.content)) for line in lines if line.generated),
        repetition=tuple(repetitions(lines)),
    )


@dataclass(frozen=True)
class ScoreDistribution:
    """Judge scores of a set of runs.

    Attributes:
        judged: how many runs had a verdict that counts.
        mean, median: of their scores (median: :func:`statistics.median`); None for none.
        minimum, maximum: the lowest and highest score; None for none.
        histogram: the number of runs at each score, 1 to 10 (every score a key).
    """

    judged: int = 0
    mean: float | None = None
    median: float | None = None
    minimum: int | None = None
    maximum: int | None = None
    histogram: dict[int, int] = field(default_factory=lambda: dict.fromkeys(SCORES, 0))

    @classmethod
    def of(cls, scores: Sequence[int]) -> ScoreDistribution:
        """The distribution of ``scores`` (each 1..10)."""
        histogram = dict.fromkeys(SCORES, 0)
        for score in scores:
            histogram[score] += 1
        if not scores:
            return cls(histogram=histogram)
        return cls(
            judged=len(scores),
            mean=statistics.fmean(scores),
            median=float(statistics.median(scores)),
            minimum=min(scores),
            maximum=max(scores),
            histogram=histogram,
        )


@dataclass(frozen=True)
class GroupMetrics:
    """The metrics of a set of runs (definitions in the module's text).

    Attributes:
        runs: the dialogue runs counted.
        imported: imported chats left out.
        scores: the judge scores.
        distinct_1, distinct_2: distinct-n over generated turns, 0..1; None without words.
        repetition: mean repetition of generated turns, 0..1; None without such turns.
        repetition_turns: how many turns that mean is over.
        ended: the runs whose dialogue ended, by termination reason.
        done_token_share: the share of ``ended`` that ended by the done token, 0..1; None
            when no run ended.
    """

    runs: int
    imported: int
    scores: ScoreDistribution
    distinct_1: float | None
    distinct_2: float | None
    repetition: float | None
    repetition_turns: int
    ended: dict[str, int]
    done_token_share: float | None


def summarize(runs: Sequence[RunMetrics], *, imported: int = 0) -> GroupMetrics:
    """The metrics of a set from its runs' (``imported``: how many imported chats the
    set also had, reported as left out)."""
    turns = [turn for run in runs for turn in run.turn_words]
    repeated = [r for run in runs for r in run.repetition]
    ended: dict[str, int] = {}
    for run in runs:
        if run.termination_reason is not None:
            ended[run.termination_reason] = ended.get(run.termination_reason, 0) + 1
    total_ended = sum(ended.values())
    return GroupMetrics(
        runs=len(runs),
        imported=imported,
        scores=ScoreDistribution.of([r.score for r in runs if r.score is not None]),
        distinct_1=distinct_n(turns, 1),
        distinct_2=distinct_n(turns, 2),
        repetition=statistics.fmean(repeated) if repeated else None,
        repetition_turns=len(repeated),
        ended=dict(sorted(ended.items())),
        done_token_share=ended.get(DONE_REASON, 0) / total_ended if total_ended else None,
    )


def group_metrics(runs: Sequence[Run]) -> GroupMetrics:
    """The metrics of ``runs`` (see the module's text); imported chats are left out and
    counted.

    Raises:
        RunError: a run's transcript or verdict cannot be read (:func:`run_metrics`).
    """
    dialogue = [r for r in runs if not r.imported]
    return summarize([run_metrics(r) for r in dialogue], imported=len(runs) - len(dialogue))


# -- before and after a model ---------------------------------------------------------------


def uses_model(run: Run, model: str) -> bool:
    """True when a stage of ``run`` ran on ``model``: its ``endpoint``, one of its
    ``role_endpoints`` or its ``moderator_endpoint`` names it, or the manifest's
    ``fine_tuned_models`` does."""
    if model in (run.manifest.fine_tuned_models or {}):
        return True
    for entry in run.manifest.stages.values():
        endpoints = [entry.endpoint, entry.moderator_endpoint, *(entry.role_endpoints or [])]
        if any(e is not None and e.model == model for e in endpoints):
            return True
    return False


def split_by_model(
    runs: Sequence[Run], model: str, *, finished: str, since: str | None = None
) -> tuple[list[Run], list[Run]]:
    """``(before, after)``: the runs of ``runs`` made before ``model`` existed, and those
    made with it, each in the order given.

    - after: the runs that used ``model`` (:func:`uses_model`), whenever they were made;
    - before: the runs that did not, created (their manifest's ``created``) strictly
      before ``finished``, the time the job that made the model finished (ISO 8601), and,
      with ``since``, at or after ``since`` (the previous cycle's model, say);
    - a run made at or after ``finished`` without the model is in neither.

    Imported chats are classified like any run (they never use a model);
    :func:`group_metrics` leaves them out.

    Raises:
        ValueError: ``finished`` or ``since`` is not an ISO 8601 time.
    """
    end = parse_time(finished)
    start = parse_time(since) if since is not None else None
    before, after = [], []
    for run in runs:
        if uses_model(run, model):
            after.append(run)
            continue
        created = parse_time(run.manifest.created)
        if created < end and (start is None or created >= start):
            before.append(run)
    return before, after


@dataclass(frozen=True)
class TunedModel:
    """A model a cycle made, as :func:`report_rows` needs it.

    Attributes:
        cycle: the cycle's label in the table.
        model: the fine-tuned model's name.
        finished: when its job finished (ISO 8601).
        since: where its "before" starts (ISO 8601), or None for the first run.
    """

    cycle: str
    model: str
    finished: str
    since: str | None = None


@dataclass(frozen=True)
class ReportRow:
    """One row of the metrics table: a cycle's model and one side of it."""

    cycle: str
    model: str
    side: Literal["before", "after"]
    metrics: GroupMetrics


def report_rows(runs: Sequence[Run], models: Sequence[TunedModel]) -> list[ReportRow]:
    """Two rows per model, in the order given: the metrics of the runs before it, then of
    the runs after it (:func:`split_by_model`, :func:`group_metrics`). Each run is read
    once, however many rows it is in.

    Raises:
        ValueError: a time is not ISO 8601.
        RunError: a run's transcript or verdict cannot be read.
    """
    cache: dict[str, RunMetrics] = {}

    def metrics(group: list[Run]) -> GroupMetrics:
        dialogue = [r for r in group if not r.imported]
        for run in dialogue:
            if run.run_id not in cache:
                cache[run.run_id] = run_metrics(run)
        return summarize([cache[r.run_id] for r in dialogue], imported=len(group) - len(dialogue))

    rows = []
    for tuned in models:
        before, after = split_by_model(
            runs, tuned.model, finished=tuned.finished, since=tuned.since
        )
        rows.append(ReportRow(tuned.cycle, tuned.model, "before", metrics(before)))
        rows.append(ReportRow(tuned.cycle, tuned.model, "after", metrics(after)))
    return rows

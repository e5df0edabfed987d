"""A person in the conversation: the turns a person speaks, and the notes a person adds.

The dialogue stage asks a :class:`~pipeline.stages.HumanSource` (``StageContext.human``)
at each turn after the opening line: whether a person speaks it
(:meth:`~pipeline.stages.HumanSource.plays`) and, if so, for the turn
(:meth:`~pipeline.stages.HumanSource.turn`); otherwise for a note to the model about to
speak (:meth:`~pipeline.stages.HumanSource.note`, None for none). Each is given a
:class:`Cue`: the run, the turn, its speaker, the roles and the turns so far.

A person's turn is recorded as a transcript line of kind ``human``, with its time and no
model, endpoint or usage; a note is recorded on the line of the turn it preceded
(``note``) and shown to that turn's speaker (:func:`pipeline.dialogue.messages_for`). A
person who stops (:class:`HumanQuit`) leaves the dialogue ``failed`` with the termination
reason ``human_quit``, resumable from the last complete turn.

Sources here: :class:`Scripted` (turns and notes given up front: a library caller's, a
test's) and :class:`Recorded` (a replay: everything from the source run's transcript,
never from a keyboard). The CLI's terminal source is :mod:`pipeline.terminal`; a source
that plays no role is :class:`pipeline.stages.Nobody`.
"""

from __future__ import annotations

import collections
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import Fix, PipelineError, ReplayError, RunError
from .records import RolesDocument, Turn, timestamp

if TYPE_CHECKING:
    from .runs import Run

STAGE = "dialogue"


@dataclass(frozen=True)
class Cue:
    """The moment a person is asked: turn ``turn`` of run ``run_id``, spoken by role
    ``speaker`` (its position in ``roles``), after the turns ``lines``."""

    run_id: str
    turn: int
    speaker: int
    roles: RolesDocument
    lines: Sequence[Turn]

    @property
    def role(self) -> str:
        """The speaker's name."""
        return self.roles.roles[self.speaker].name

    @property
    def declares(self) -> bool:
        """True when the speaker may declare the task done (the termination contract)."""
        return self.speaker in self.roles.declarers

    @property
    def declarers(self) -> list[str]:
        """The names of the roles that may declare the task done."""
        names = self.roles.names
        return [names[i] for i in sorted(self.roles.declarers)]


@dataclass(frozen=True)
class Said:
    """A person's turn: its text, and when it was complete (ISO 8601 UTC)."""

    text: str
    time: str | None


class HumanQuit(PipelineError):
    """A person stopped the dialogue; the run stays resumable from its last complete turn.

    Attributes:
        turn: the turn the person was asked about (not spoken).
        plays: the roles the person played, to be given again when the run goes on.
        notes: the person was asked for notes before the models' turns.
    """

    def __init__(
        self, run_id: str, turn: int, *, plays: Collection[str] = (), notes: bool = False
    ) -> None:
        super().__init__(
            f"a person stopped the dialogue of run {run_id} before turn {turn}",
            fix=Fix("go on from there", command=("resume", run_id)),
            run_id=run_id,
            stage=STAGE,
        )
        self.turn = turn
        self.plays = tuple(sorted(plays))
        self.notes = notes

    @classmethod
    def at(cls, cue: Cue, *, plays: Collection[str] = (), notes: bool = False) -> HumanQuit:
        return cls(cue.run_id, cue.turn, plays=plays, notes=notes)


def declare_done(text: str, token: str) -> str:
    """``text`` with the done token appended on a line of its own (``token`` alone for an
    empty text)."""
    text = text.rstrip()
    return f"{text}\n{token}" if text else token


def check_roles(plays: Collection[str], roles: RolesDocument, run: Run) -> None:
    """Refuse to let a person play roles that are not among ``roles``, or take part in a
    run whose transcript cannot record it (made before version 2).

    Raises:
        RunError: a name of ``plays`` is no role's, or the run is too old.
    """
    names = roles.names
    unknown = [name for name in plays if name not in names]
    if unknown:
        raise RunError(
            f"run {run.run_id} has no role called {', '.join(map(repr, unknown))} for a "
            f"person to play; its roles are {', '.join(names)}",
            fix=Fix("name one of them with {}", options=("human",)),
            run_id=run.run_id,
            stage=STAGE,
        )
    if run.manifest.manifest_version < 2:
        raise RunError(
            f"run {run.run_id} was made before a person's turns and notes could be recorded",
            fix=Fix("start a new run", command=("generate", "TASK")),
            run_id=run.run_id,
            stage=STAGE,
        )


class Scripted:
    """A person whose turns and notes are given up front (a
    :class:`~pipeline.stages.HumanSource`): it plays the roles named ``plays``, speaking
    ``turns`` in order (None stops the dialogue: :class:`HumanQuit`), and adds
    ``notes[N]`` before a model's turn ``N``. When its turns run out it stops."""

    def __init__(
        self,
        plays: Collection[str] = (),
        turns: Iterable[str | None] = (),
        notes: Mapping[int, str] | None = None,
    ) -> None:
        self.names = frozenset(plays)
        self.turns = collections.deque(turns)
        self.notes = dict(notes or {})

    def check(self, roles: RolesDocument, run: Run) -> None:
        check_roles(self.names, roles, run)

    def plays(self, cue: Cue) -> bool:
        return cue.role in self.names

    def turn(self, cue: Cue) -> Said:
        text = self.turns.popleft() if self.turns else None
        if text is None:
            raise HumanQuit.at(cue, plays=self.names, notes=bool(self.notes))
        return Said(text, timestamp())

    def note(self, cue: Cue) -> str | None:
        return self.notes.get(cue.turn)


class Recorded:
    """The person of a replay (a :class:`~pipeline.stages.HumanSource`): each turn a
    person spoke in ``source``, and each note, answered from ``source``'s transcript, with
    its recorded time; a source whose person stopped (``human_quit``) stops again at the
    same turn. Nothing is read from a keyboard."""

    def __init__(self, source: Run) -> None:
        self.source = source
        self._lines: list[Turn] | None = None

    @property
    def lines(self) -> list[Turn]:
        if self._lines is None:
            self._lines = self.source.read_transcript()
        return self._lines

    def _recorded(self, cue: Cue) -> Turn | None:
        return self.lines[cue.turn - 1] if cue.turn <= len(self.lines) else None

    def _stopped(self, cue: Cue) -> bool:
        """True when the source's person stopped the dialogue before this turn."""
        reason = self.source.stage(STAGE).termination_reason
        return reason == "human_quit" and cue.turn == len(self.lines) + 1

    def check(self, roles: RolesDocument, run: Run) -> None:
        pass

    def plays(self, cue: Cue) -> bool:
        line = self._recorded(cue)
        return line is not None and line.kind == "human"

    def turn(self, cue: Cue) -> Said:
        line = self._recorded(cue)
        if line is None or line.kind != "human" or line.role_index != cue.speaker:
            raise ReplayError(
                f"turn {cue.turn} of run {self.source.run_id} was not spoken by a person as "
                f"{cue.role}, so the run cannot be replayed as it was",
                stage=STAGE,
            )
        return Said(line.content, line.time)

    def note(self, cue: Cue) -> str | None:
        line = self._recorded(cue)
        if line is None and self._stopped(cue):
            raise HumanQuit.at(cue)
        return line.note if line is not None else None

"""The person at the terminal: the command line's :class:`~pipeline.stages.HumanSource`.

Part of the command line (like :mod:`pipeline.options`): ``--human ROLE`` and
``--interject`` make a :class:`Terminal`. When a role it plays is to speak, it shows the
turns the person has not seen yet (those stored before this command, on ``resume``), then
reads the turn: any number of lines, ended by a line holding only ``.``. On a line of
their own, ``/edit`` opens ``$EDITOR`` on the turn typed so far, ``/done`` ends the turn
and declares the task done (only for the role the termination contract lets declare it),
``/quit`` stops the dialogue (``pipeline resume`` goes on). A line starting with ``//``
is sent with one ``/``; the end of the input (Ctrl-D) stops like ``/quit``. With
``interject``, before each model's turn it asks for a one-line note to that model (an
empty line: none; ``/quit`` stops).

Prompts go to standard error; the conversation itself is printed by the command's
listener, which :meth:`Terminal.watching` wraps to know what the person has seen.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import click

from .human import Cue, HumanQuit, Said, check_roles, declare_done
from .records import RolesDocument, Turn, timestamp

if TYPE_CHECKING:
    from .runs import Run
    from .stages import Listener

END = "."
COMMANDS = ("/edit", "/done", "/quit")


def turn_prompt(cue: Cue) -> str:
    """What the person is told when their turn comes."""
    done = ", /done declares the task done" if cue.declares else ""
    return (
        f"[{cue.turn}] {cue.role}: your turn. Type it, then a line with only {END!r} to "
        f"send it; /edit opens $EDITOR on it{done}, /quit stops (resume goes on later)."
    )


def note_prompt(cue: Cue) -> str:
    """The question asked before a model's turn, with ``interject``."""
    return f"note to {cue.role} before turn {cue.turn} (Enter: none, /quit: stop): "


class Terminal:
    """A person at this terminal who plays the roles named ``plays`` and, with
    ``interject``, may add a note before each model's turn (see the module).

    Args:
        edit: opens an editor on a text; the edited text, or None when it was not saved.
    """

    def __init__(
        self,
        plays: Collection[str] = (),
        *,
        interject: bool = False,
        edit: Callable[[str], str | None] | None = None,
    ) -> None:
        self.names = frozenset(plays)
        self.interject = interject
        self.edit = edit or (lambda text: click.edit(text, extension=".txt"))
        self.seen: set[int] = set()

    @property
    def active(self) -> bool:
        """True when the person takes part at all."""
        return bool(self.names) or self.interject

    def watching(self, listener: Listener) -> Listener:
        """``listener``, noting each turn it shows as seen by the person."""
        return _Watching(listener, self.seen)

    def check(self, roles: RolesDocument, run: Run) -> None:
        if self.active:
            check_roles(self.names, roles, run)

    def plays(self, cue: Cue) -> bool:
        return cue.role in self.names

    def turn(self, cue: Cue) -> Said:
        self._catch_up(cue)
        _say("\n" + turn_prompt(cue))
        typed: list[str] = []
        while True:
            line = _read("> ")
            command = line.strip() if line is not None else "/quit"
            if command == END:
                text = "\n".join(typed).strip()
                if text:
                    return Said(text, timestamp())
                _say("an empty turn is not sent: type it, or /quit")
            elif command == "/quit":
                raise self._quit(cue)
            elif command == "/done":
                if cue.declares:
                    text = declare_done("\n".join(typed).strip(), cue.roles.done_token)
                    return Said(text, timestamp())
                who = " or ".join(cue.declarers)
                _say(f"/done: only {who} may declare the task done; go on with your turn")
            elif command == "/edit":
                typed = self._edited(typed)
            elif line is not None and line.startswith("//"):
                typed.append(line[1:])
            elif line is not None and line.startswith("/"):
                _say(
                    f"{command.split()[0]} is no command ({', '.join(COMMANDS)}); "
                    "start a line with // to send it with one /"
                )
            elif line is not None:
                typed.append(line)

    def note(self, cue: Cue) -> str | None:
        if not self.interject:
            return None
        self._catch_up(cue)
        line = _read("\n" + note_prompt(cue))
        if line is None or line.strip() == "/quit":
            raise self._quit(cue)
        return line.strip() or None

    def _quit(self, cue: Cue) -> HumanQuit:
        return HumanQuit.at(cue, plays=self.names, notes=self.interject)

    def _edited(self, typed: list[str]) -> list[str]:
        """The turn typed so far, after ``$EDITOR``; as it was when the editor was closed
        without saving."""
        edited = self.edit("\n".join(typed) + "\n" if typed else "")
        if edited is None:
            _say("no change: the turn is as it was; go on typing")
            return typed
        text = edited.strip("\n")
        _say(f"the turn is now:\n{text}\n(go on typing, or end it with {END!r})")
        return text.split("\n") if text.strip() else []

    def _catch_up(self, cue: Cue) -> None:
        """Show the turns the person has not seen (the done token taken out)."""
        from .views import turn_text

        unseen = [line for line in cue.lines if line.turn not in self.seen]
        if unseen:
            _say("the conversation so far:" if not self.seen else "since then:")
        for line in unseen:
            _say("\n" + turn_text(line, cue.roles.done_token))
            self.seen.add(line.turn)


def _say(text: str) -> None:
    click.echo(text, err=True)


def _read(prompt: str) -> str | None:
    """One line typed after ``prompt`` (shown on standard error), None at the end of the
    input."""
    click.echo(prompt, nl=False, err=True)
    try:
        return input()
    except EOFError:
        _say("")
        return None


class _Watching:
    """A listener that passes everything on and notes the turns shown."""

    def __init__(self, inner: Listener, seen: set[int]) -> None:
        self.inner = inner
        self.seen = seen

    def turn_started(self, turn: int, role: str) -> None:
        self.inner.turn_started(turn, role)

    def delta(self, text: str) -> None:
        self.inner.delta(text)

    def turn_finished(self, turn: Turn) -> None:
        self.seen.add(turn.turn)
        self.inner.turn_finished(turn)

    def nested(self, run_id: str, task: str) -> Listener:
        return self.inner.nested(run_id, task)

"""Chat histories from WhatsApp, Telegram and ChatGPT exports, read as messages and turns.

:func:`parse_chats` reads an export file as :class:`Chat` records, each holding the
:class:`Message` records a person or model wrote, with what was left out (media, notices,
deleted messages...) counted in ``Chat.skipped`` under the keys of ``SKIP_KINDS``.
:func:`merge_turns` makes turns of them: consecutive messages of one speaker become one
turn. Each format's module says what it reads and where its shape is documented:
:mod:`.whatsapp`, :mod:`.telegram`, :mod:`.chatgpt`.

This package reads files and returns records; it writes nothing and prints nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..choices import IMPORT_FORMATS
from ..errors import ImportFormatError
from . import chatgpt, telegram, whatsapp
from .common import SKIP_KINDS, Chat, Message

__all__ = [
    "IMPORT_FORMATS",
    "SKIP_KINDS",
    "Chat",
    "ImportedTurn",
    "Message",
    "merge_turns",
    "parse_chats",
    "speakers",
]


@dataclass(frozen=True)
class ImportedTurn:
    """One turn of an imported chat: consecutive messages of one speaker.

    Attributes:
        speaker: who spoke it.
        text: the messages' texts joined with ``"\\n"``.
        time: the time of its last message (as :attr:`Message.time`), or None.
        messages: how many messages it was made of (at least 1).
    """

    speaker: str
    text: str
    time: str | None
    messages: int


def parse_chats(fmt: str, path: Path, *, conversation: str | None = None) -> list[Chat]:
    """Read the export ``path`` in the format ``fmt`` (one of ``IMPORT_FORMATS``).

    Args:
        fmt: ``"whatsapp"`` (the ``.txt`` of Export chat), ``"telegram"`` (Telegram
            Desktop's ``result.json``) or ``"chatgpt"`` (ChatGPT's ``conversations.json``).
        path: the file.
        conversation: which chat to read, by id or by name (Telegram) or title (ChatGPT);
            ignored for WhatsApp, whose export holds one chat and names none.

    Returns:
        whatsapp: one chat; telegram: one chat (the export's, or the one ``conversation``
        names in a full export); chatgpt: every conversation, or those whose id or title is
        ``conversation``. Several when several share the name or title given.

    Raises:
        ImportFormatError: a file that cannot be read as that format, a Telegram export with
            several chats and no ``conversation``, or a ``conversation`` that matches none;
            its one-line message names the file, the line or JSON path, and what was
            expected there.
    """
    if fmt == "whatsapp":
        return [whatsapp.parse(path)]
    if fmt == "telegram":
        return telegram.parse(path, conversation)
    if fmt == "chatgpt":
        return chatgpt.parse(path, conversation)
    expected = ", ".join(IMPORT_FORMATS)
    raise ImportFormatError(f'unknown import format "{fmt}"; expected one of {expected}', path=path)


def merge_turns(messages: Sequence[Message]) -> list[ImportedTurn]:
    """Consecutive messages of one speaker, merged into turns.

    The rule: a turn is a maximal run of consecutive messages by the same speaker; their
    texts are joined with ``"\\n"`` in order, and the turn takes the time of its last
    message. No gap in time splits a turn, however long. Messages a parser left out
    (media, notices, deleted ones) are not in ``messages``, so they split nothing either:
    ``A, B, <A's photo>, B`` gives the turns ``A, B`` (with B's two messages).
    """
    turns = []
    for speaker, run in itertools.groupby(messages, key=lambda message: message.speaker):
        group = list(run)
        text = "\n".join(message.text for message in group)
        turns.append(ImportedTurn(speaker, text, group[-1].time, len(group)))
    return turns


def speakers(messages: Iterable[Message | ImportedTurn]) -> list[str]:
    """The speakers of ``messages`` (or turns), each once, in order of first appearance."""
    return list(dict.fromkeys(message.speaker for message in messages))

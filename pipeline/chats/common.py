"""What the chat parsers share: the records they return, reading a file, and error wording."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import Fix, ImportFormatError, one_line

# What a parser leaves out, and counts in Chat.skipped under these keys:
SKIP_KINDS = (
    "media",  # a photo, voice note, sticker, file... with no text of its own
    "system",  # a notice of the app, not someone's words: encryption, group changes, system prompt
    "deleted",  # WhatsApp's "This message was deleted"
    "empty",  # a message without text (and, in ChatGPT, a node without a message)
    "hidden",  # ChatGPT: content the app does not show (reasoning, custom instructions, hidden)
    "tool",  # ChatGPT: a call to a tool and the tool's output
)


@dataclass(frozen=True)
class Message:
    """One message as the export holds it.

    Attributes:
        speaker: who wrote it, as the export names them.
        text: what they wrote, with its line breaks; never empty.
        time: when, in ISO 8601: ``"2024-03-12T21:05"`` (or with ``:SS``) in the local time
            the file shows, without a zone, for WhatsApp; ``"2024-03-12T21:05:00Z"`` (UTC)
            for Telegram and ChatGPT; None when the export gives none.
        line: the 1-based line of the file it starts on (WhatsApp), or its 1-based index in
            the chat's message list (Telegram) or on the conversation's path (ChatGPT).
    """

    speaker: str
    text: str
    time: str | None
    line: int


@dataclass(frozen=True)
class Chat:
    """One chat (one conversation) of an export.

    Attributes:
        title: the chat's name (Telegram) or the conversation's title (ChatGPT); None for
            WhatsApp, whose export has none.
        conversation_id: the chat's id (Telegram) or the conversation's id (ChatGPT), as a
            string; None for WhatsApp.
        messages: the messages kept, in order.
        skipped: how many messages were left out, by kind (keys from ``SKIP_KINDS``; only
            the kinds that occurred).
    """

    title: str | None
    conversation_id: str | None
    messages: tuple[Message, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)


def fail(
    path: Path,
    expected: str,
    fix: Fix,
    *,
    line: int | None = None,
    column: int | None = None,
    at: str | None = None,
) -> ImportFormatError:
    """The one-line error ``"<path> line <n>: <expected>"``, or ``"<path> at <JSON path>:
    ..."``, or ``"<path>: ..."`` when neither is given."""
    place = str(path)
    if line is not None:
        place += f" line {line}" + (f" column {column}" if column is not None else "")
    elif at is not None:
        place += f" at {at}"
    return ImportFormatError(f"{place}: {expected}", path=path, fix=fix, line=line, where=at)


def shown(value: object, limit: int = 60) -> str:
    """A found value as the error messages quote it: JSON, on one line, cut short."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return json.dumps(one_line(text, limit), ensure_ascii=False)


def kind_of(value: object) -> str:
    """The JSON name of a value's type, for "expected ..., found a list" messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def json_key(name: str) -> str:
    """``name`` as a step of a JSON path: ``.messages``, or ``["3f2a-..."]``."""
    return f".{name}" if re.fullmatch(r"[A-Za-z_]\w*", name) else f"[{json.dumps(name)}]"


def read_text(path: Path, fix: Fix) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark dropped).

    Raises:
        ImportFormatError: the file cannot be read, or is not UTF-8 (naming the line).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise fail(path, f"cannot read it ({e.strerror or e})", fix) from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        expected = f"expected UTF-8 text, found the byte 0x{data[e.start]:02x}"
        raise fail(path, expected, fix, line=line) from e


def load_json(path: Path, what: str, fix: Fix) -> Any:
    """The file's JSON document.

    Raises:
        ImportFormatError: unreadable, not UTF-8, or not JSON (naming the line and column).
    """
    text = read_text(path, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        expected = f"expected {what}, found invalid JSON ({e.msg})"
        raise fail(path, expected, fix, line=e.lineno, column=e.colno) from None


def utc(seconds: object) -> str | None:
    """A unix time (a number, or digits in a string) as ``"YYYY-MM-DDTHH:MM:SSZ"``; None
    when it is not one."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float, str)):
        return None
    try:
        moment = datetime.fromtimestamp(float(seconds), timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def choices(names: list[str], limit: int = 10) -> str:
    """Names for an error message: the first ``limit``, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


CHOOSE = Fix("choose one with {}", ("conversation",))

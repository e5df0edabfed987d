"""WhatsApp's chat export: the ``.txt`` file that "Export chat" writes, with or without media.

WhatsApp documents no format for it ("How to export your chat history" in its help centre
only says it is a .txt file); what is read here is what exports from Android and iOS in
several languages hold, as listed in the field notes (``shared/FIELD-NOTES.md``, "Chat
exports") and kept as fixtures in ``tests/fixtures/chats/``:

- a message starts with a header: ``12/03/24, 21:05 - Name: text`` (Android) or
  ``[12/03/24, 21:05:33] Name: text`` (iOS, the comma optional); 2- or 4-digit years,
  ``/`` or ``.`` between the date's fields, seconds or not, 24-hour clocks or 12-hour ones
  with ``AM``/``PM``, ``am``/``pm``, ``a.m.`` or ``a. m.``, after any space (a narrow
  no-break space, U+202F, on newer Android); marks such as U+200E (LEFT-TO-RIGHT MARK)
  before the header are ignored, and so are bidi marks and iOS's ``~`` in names;
- a line without a header continues the message before it (joined with ``"\\n"``);
- the day/month order is read from the file: a first field above 12 anywhere means day
  first, else a second field above 12 means month first, else day first is assumed. The
  time is kept as the file shows it (local time, no zone);
- left out and counted: media (a single-line ``<...>`` message such as ``<Media omitted>``
  in any language, ``image omitted`` and the like, ``<attached: ...>``, ``... (file
  attached)``; a caption under such a line is kept as the message); system notices (a
  header without ``Name:``, ``X changed the subject...``, ``X created group...``, the
  end-to-end encryption notice, and any iOS message whose text starts with U+200E, which
  is how iOS marks the app's own notices); "This message was deleted" and "You deleted
  this message" (as ``deleted``: there is nothing of the speaker left in it); empty
  messages. A trailing ``<This message was edited>`` is dropped.

Why no library: whatstk 0.9.1 and chat-miner 0.6.0 both need pandas (plus plotly and
seaborn, or polars, matplotlib and wordcloud: 720 MB installed together), and on these
fixtures whatstk folded the Spanish ``a. m.`` lines into the message before and read
``9:05 p. m.`` as 09:05, chat-miner joined multi-line messages with spaces, and both took
``Alice changed the subject from "Trip" to "Trip: day 2"`` for a message by
``Alice changed the subject from "Trip" to "Trip``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import Fix
from .common import Chat, Message, fail, read_text, shown

FIX = Fix("give the .txt file that WhatsApp's Export chat wrote, unchanged")
EXAMPLES = '"12/03/24, 21:05 - Name: text" or "[12/03/24, 21:05:33] Name: text"'

# Marks that exports put before headers, around phone numbers and before notices.
MARKS = "\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff"
_DROP_MARKS = str.maketrans("", "", MARKS)

_DATE = r"(?P<date>(?P<a>\d{1,2})[/.](?P<b>\d{1,2})[/.](?P<year>\d{4}|\d{2}))"
_TIME = (
    r"(?P<time>(?P<hour>\d{1,2}):(?P<minute>\d{2})(?::(?P<second>\d{2}))?"
    r"(?:\s*(?P<half>[AaPp]\.?\s*[Mm]\.?))?)"
)
_HEADERS = (
    re.compile(rf"{_DATE},?\s+{_TIME}\s+-\s+(?P<rest>.*)"),  # Android
    re.compile(rf"\[{_DATE},?\s+{_TIME}\]\s+(?P<rest>.*)"),  # iOS
)
# Notices whose text holds a colon, so that they would pass for "Name: text".
_ACTION = re.compile(
    r'[^:"]+ (?:created group|changed the subject|changed the group name|changed this group\'s) '
)
_ENCRYPTION = re.compile(  # the notice, under a name in older iOS exports
    r"Messages (?:and calls are end-to-end encrypted|to this \w+ are now secured with end-to-end"
    r" encryption)\. [^\n]*"
)
_DELETED = re.compile(r"(?:This message was deleted|You deleted this message)\.?")
_MEDIA = re.compile(
    r"<[^<>\n]+>"  # Android without media: <Media omitted>; iOS with media: <attached: ...>
    r"|.+ \(file attached\)"  # Android with media
    r"|(?:.*\s)?\u200e?(?:image|video|audio|sticker|GIF|document|Contact card) omitted"  # iOS
)
_EDITED = re.compile(r"\s*<This message was edited>$")


@dataclass
class _Entry:
    line: int
    header: re.Match[str]
    continuation: list[str]


def parse(path: Path) -> Chat:
    """Read a WhatsApp ``.txt`` export.

    Returns:
        one :class:`Chat` (no title, no id); times are naive local ``YYYY-MM-DDTHH:MM[:SS]``.

    Raises:
        ImportFormatError: the file is unreadable or not UTF-8, its first non-empty line
            is no message header, or a header holds an impossible date or time.
    """
    entries: list[_Entry] = []
    for number, raw in enumerate(read_text(path, FIX).split("\n"), 1):
        line = raw.removesuffix("\r")
        header = _header(line.lstrip(MARKS))
        if header:
            entries.append(_Entry(number, header, []))
        elif entries:
            entries[-1].continuation.append(line)
        elif line.strip():
            found = f"found {shown(line)}"
            expected = f"expected a message line like {EXAMPLES}, {found}"
            raise fail(path, expected, FIX, line=number)
    if not entries:
        expected = f"expected a message line like {EXAMPLES}, found an empty file"
        raise fail(path, expected, FIX, line=1)

    day_first, reading = _order(entries)
    messages: list[Message] = []
    skipped: Counter[str] = Counter()
    for entry in entries:
        time = _time(path, entry, day_first, reading)
        kind, speaker, text = _classify(entry.header["rest"], entry.continuation)
        if kind:
            skipped[kind] += 1
        else:
            messages.append(Message(speaker, text, time, entry.line))
    return Chat(None, None, tuple(messages), dict(skipped))


def _header(line: str) -> re.Match[str] | None:
    for pattern in _HEADERS:
        match = pattern.fullmatch(line)
        if match:
            return match
    return None


def _order(entries: list[_Entry]) -> tuple[bool, str]:
    """Whether dates are day first, and why (for error messages)."""
    for entry in entries:
        if int(entry.header["a"]) > 12:
            return True, f"read day first, as line {entry.line} shows"
    for entry in entries:
        if int(entry.header["b"]) > 12:
            return False, f"read month first, as line {entry.line} shows"
    return True, "read day first, the default when no date has a field above 12"


def _time(path: Path, entry: _Entry, day_first: bool, reading: str) -> str:
    """The header's date and time as ``YYYY-MM-DDTHH:MM[:SS]``."""
    header = entry.header
    a, b, year, hour = int(header["a"]), int(header["b"]), int(header["year"]), int(header["hour"])
    day, month = (a, b) if day_first else (b, a)
    year += 2000 if len(header["year"]) == 2 else 0
    if header["half"]:
        afternoon = header["half"].lstrip().lower().startswith("p")
        hour = hour % 12 + 12 * afternoon if 1 <= hour <= 12 else 24  # 24: invalid below
    try:
        moment = datetime(year, month, day, hour, int(header["minute"]), int(header["second"] or 0))
    except ValueError:
        found = shown(f"{header['date']} {header['time']}")
        expected = f"expected a real date and time, found {found} ({reading})"
        raise fail(path, expected, FIX, line=entry.line) from None
    return moment.isoformat(timespec="seconds" if header["second"] else "minutes")


def _classify(rest: str, continuation: list[str]) -> tuple[str | None, str, str]:
    """(the skipped kind or None, the speaker, the text) of a message."""
    if _ACTION.match(rest):
        return "system", "", ""
    speaker, colon, first = rest.partition(": ")
    if not colon:
        if not rest.endswith(":"):
            return "system", "", ""
        speaker, first = rest[:-1], ""
    text = "\n".join([first, *continuation]).strip()
    marked = text.startswith("\u200e")  # how iOS marks media and the app's notices
    text = _EDITED.sub("", text.lstrip(MARKS)).strip()
    if _DELETED.fullmatch(text):
        return "deleted", "", ""
    head, _, caption = text.partition("\n")
    if _MEDIA.fullmatch(head):
        text = caption.strip()
        if not text:
            return "media", "", ""
    elif marked or _ENCRYPTION.fullmatch(text):
        return "system", "", ""
    if not text:
        return "empty", "", ""
    name = speaker.translate(_DROP_MARKS).strip()
    return None, name.removeprefix("~").strip() or name, text

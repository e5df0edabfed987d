"""Telegram Desktop's chat export: ``result.json`` ("Export chat history", format JSON).

Telegram documents the export only as a feature of Telegram Desktop; the shape read here is
the one the field notes give (``shared/FIELD-NOTES.md``, "Chat exports"): one chat is
``{"name", "type", "id", "messages": [...]}``, and a full export ("Export Telegram data")
nests the chats under ``{"chats": {"list": [...]}}``. A message is ``{"id", "type":
"message" | "service", "date", "date_unixtime", "from", "from_id", "text", ...}``, where
``text`` is a string or a list of pieces, each a string or ``{"type", "text"}`` (a link,
bold text...); the pieces are joined as they are. Media add keys such as ``photo``,
``file``, ``media_type`` or ``sticker_emoji``.

Left out and counted: service messages (``system``: joins, pins, calls...), messages with
media and no text (``media``; a caption is kept as the message), and other messages without
text (``empty``). A message whose ``from`` is null (a deleted account) is spoken by its
``from_id``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import Fix
from .common import CHOOSE, Chat, Message, choices, fail, kind_of, load_json, utc

FIX = Fix("give the result.json of Telegram Desktop's Export chat history, in JSON")
MEDIA_KEYS = frozenset(
    {
        "photo",
        "file",
        "media_type",
        "sticker_emoji",
        "poll",
        "location_information",
        "contact_information",
        "place_name",
        "game_title",
        "invoice_information",
    }
)


def parse(path: Path, conversation: str | None = None) -> list[Chat]:
    """Read a Telegram Desktop ``result.json``: one chat, or a full export's chats.

    Args:
        conversation: the id or name of the chat to read from a full export (or to check a
            single chat's export against); needed when the export holds more than one.

    Returns:
        the chat chosen, as a one-element list (several if several share that name);
        times are UTC ``YYYY-MM-DDTHH:MM:SSZ`` from ``date_unixtime`` (else ``date`` as is).

    Raises:
        ImportFormatError: not JSON; no ``messages`` nor ``chats.list``; a message or text
            piece of the wrong shape (naming its JSON path); several chats and no
            ``conversation``; a ``conversation`` that names none of them (listing them).
    """
    document = load_json(path, "Telegram Desktop's result.json", FIX)
    if not isinstance(document, dict):
        raise fail(path, f"expected an object, found {kind_of(document)}", FIX, at="$")
    if "messages" in document:
        chats: list[tuple[str, Any]] = [("$", document)]
    else:
        listing = document.get("chats")
        found = listing.get("list") if isinstance(listing, dict) else None
        if not isinstance(found, list):
            expected = 'expected "messages" (one chat) or "chats": {"list": [...]} (a full export)'
            raise fail(path, expected, FIX, at="$")
        chats = [(f"$.chats.list[{i}]", chat) for i, chat in enumerate(found)]
        for where, chat in chats:
            if not isinstance(chat, dict):
                expected = f"expected a chat object, found {kind_of(chat)}"
                raise fail(path, expected, FIX, at=where)
    return [_chat(path, where, chat) for where, chat in _choose(path, chats, conversation)]


def _choose(
    path: Path, chats: list[tuple[str, Any]], conversation: str | None
) -> list[tuple[str, Any]]:
    names = [f'"{chat.get("name")}" (id {chat.get("id")})' for _, chat in chats]
    if conversation is not None:
        chosen = [(w, c) for w, c in chats if conversation in (str(c.get("id")), c.get("name"))]
        if not chosen:
            expected = f'no chat has the id or name "{conversation}"; the chats are: '
            raise fail(path, expected + choices(names), CHOOSE)
        return chosen
    if not chats:
        raise fail(path, "expected a chat, found none", FIX, at="$.chats.list")
    if len(chats) > 1:
        expected = f"the export holds {len(chats)} chats: {choices(names)}; expected one chosen"
        raise fail(path, expected, CHOOSE)
    return chats


def _chat(path: Path, where: str, chat: dict[str, Any]) -> Chat:
    items = chat.get("messages")
    if not isinstance(items, list):
        at = f"{where}.messages"
        raise fail(path, f"expected a list of messages, found {kind_of(items)}", FIX, at=at)
    messages: list[Message] = []
    skipped: Counter[str] = Counter()
    for index, item in enumerate(items, 1):
        at = f"{where}.messages[{index - 1}]"
        if not isinstance(item, dict):
            raise fail(path, f"expected a message object, found {kind_of(item)}", FIX, at=at)
        if item.get("type", "message") != "message":
            skipped["system"] += 1
            continue
        text = _text(path, at, item.get("text", "")).strip()
        if not text:
            skipped["media" if MEDIA_KEYS & item.keys() else "empty"] += 1
            continue
        messages.append(Message(_speaker(item), text, _time(item), index))
    title = chat.get("name")
    ident = chat.get("id")
    return Chat(
        title if isinstance(title, str) else None,
        None if ident is None else str(ident),
        tuple(messages),
        dict(skipped),
    )


def _text(path: Path, at: str, text: object) -> str:
    if isinstance(text, str):
        return text
    if not isinstance(text, list):
        expected = f"expected a string or a list of text pieces, found {kind_of(text)}"
        raise fail(path, expected, FIX, at=f"{at}.text")
    pieces = []
    for i, piece in enumerate(text):
        if isinstance(piece, dict):
            piece = piece.get("text")
        if not isinstance(piece, str):
            expected = (
                f'expected a string or an object with a "text" string, found {kind_of(piece)}'
            )
            raise fail(path, expected, FIX, at=f"{at}.text[{i}]")
        pieces.append(piece)
    return "".join(pieces)


def _speaker(item: dict[str, Any]) -> str:
    for key in ("from", "from_id"):
        name = item.get(key)
        if isinstance(name, str) and name.strip():
            return name.strip()
    return "Unknown"


def _time(item: dict[str, Any]) -> str | None:
    moment = utc(item.get("date_unixtime"))
    if moment is None and isinstance(item.get("date"), str):
        return str(item["date"])
    return moment

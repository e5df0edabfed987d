"""ChatGPT's data export: ``conversations.json`` (Settings, Data controls, Export data).

OpenAI documents the export ("How do I export my ChatGPT history and data?") but not the
file's shape; what is read here is the one the field notes give (``shared/FIELD-NOTES.md``,
"Chat exports"): a list of ``{"id", "title", "create_time", "current_node", "mapping":
{node id: {"id", "message", "parent", "children"}}}``, where a ``message`` is null or
``{"author": {"role"}, "content": {"content_type", "parts"}, "create_time", "recipient",
"metadata"}``.

A conversation is a tree: editing a message or regenerating an answer adds a sibling
branch. The conversation as last shown is the path from ``current_node`` back through
``parent`` links to the root, reversed; other branches are left out, uncounted.

On that path, left out and counted: nodes without a message and messages without text
(``empty``); ``system`` messages (and any role but ``user`` and ``assistant``); ``tool``
messages and the assistant's calls to tools (a ``recipient`` other than ``all``) as
``tool``; content ChatGPT does not show as a message (``hidden``: a message marked
``is_visually_hidden_from_conversation``, or content other than ``text`` and
``multimodal_text``, such as reasoning or custom instructions); messages whose parts are
only images, audio or files (``media``). The text of a message is its string parts (and the
``text`` of its ``audio_transcription`` parts, in voice conversations), joined with
``"\\n"``. The speakers are named ``User`` and ``ChatGPT``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import Fix
from .common import CHOOSE, Chat, Message, choices, fail, json_key, kind_of, load_json, utc

FIX = Fix("give the conversations.json of ChatGPT's data export")
SPEAKERS = {"user": "User", "assistant": "ChatGPT"}
TEXT_CONTENT = ("text", "multimodal_text")


def parse(path: Path, conversation: str | None = None) -> list[Chat]:
    """Read ChatGPT's ``conversations.json``.

    Args:
        conversation: an id or title; only the conversations that have it are read.

    Returns:
        one :class:`Chat` per conversation read, in the file's order; a message's ``line``
        is its 1-based position on the path from the root, and its time is UTC
        ``YYYY-MM-DDTHH:MM:SSZ`` (None when the export gives none).

    Raises:
        ImportFormatError: not JSON; not a list of conversation objects; a conversation
            whose ``current_node`` is not in its ``mapping`` or whose parent chain is
            broken or loops (naming the JSON path); a ``conversation`` that matches none
            (listing the titles).
    """
    document = load_json(path, "ChatGPT's conversations.json", FIX)
    if not isinstance(document, list):
        found = f"expected a list of conversations, found {kind_of(document)}"
        raise fail(path, found, FIX, at="$")
    chats: list[Chat] = []
    titles: list[str] = []
    for i, item in enumerate(document):
        if not isinstance(item, dict):
            found = f"expected a conversation object, found {kind_of(item)}"
            raise fail(path, found, FIX, at=f"$[{i}]")
        ident = item.get("id") or item.get("conversation_id")
        title = item.get("title")
        titles.append(json.dumps(title if isinstance(title, str) else ident, ensure_ascii=False))
        if conversation is None or conversation in (ident, title):
            chats.append(_chat(path, f"$[{i}]", item))
    if conversation is not None and not chats:
        expected = f'no conversation has the id or title "{conversation}"; the titles are: '
        raise fail(path, expected + choices(titles), CHOOSE)
    return chats


def _chat(path: Path, where: str, item: dict[str, Any]) -> Chat:
    mapping = item.get("mapping")
    if not isinstance(mapping, dict):
        found = f"expected an object of nodes, found {kind_of(mapping)}"
        raise fail(path, found, FIX, at=f"{where}.mapping")
    messages: list[Message] = []
    skipped: Counter[str] = Counter()
    for index, node in enumerate(_active_path(path, where, mapping, item.get("current_node")), 1):
        kind, message = _read(node.get("message"), index)
        if message:
            messages.append(message)
        else:
            skipped[kind] += 1
    ident = item.get("id") or item.get("conversation_id")
    title = item.get("title")
    return Chat(
        title if isinstance(title, str) else None,
        None if ident is None else str(ident),
        tuple(messages),
        dict(skipped),
    )


def _active_path(
    path: Path, where: str, mapping: dict[str, Any], current: object
) -> list[dict[str, Any]]:
    """The nodes from the root to ``current``."""
    nodes: list[dict[str, Any]] = []
    seen: set[str] = set()
    node_id, link = current, f"{where}.current_node"  # link: where node_id was read
    while node_id is not None:
        if not isinstance(node_id, str) or node_id not in mapping:
            expected = "expected the id of a node of the mapping"
            if nodes:
                expected += " (the parent chain from current_node is broken)"
            raise fail(path, f"{expected}, found {json.dumps(node_id)}", FIX, at=link)
        if node_id in seen:
            loop = f"found a loop back to {json.dumps(node_id)}"
            raise fail(path, f"expected the parent chain to reach the root, {loop}", FIX, at=link)
        seen.add(node_id)
        node = mapping[node_id]
        at = f"{where}.mapping{json_key(node_id)}"
        if not isinstance(node, dict):
            raise fail(path, f"expected a node object, found {kind_of(node)}", FIX, at=at)
        nodes.append(node)
        node_id, link = node.get("parent"), f"{at}.parent"
    return nodes[::-1]


def _read(message: object, index: int) -> tuple[str, Message | None]:
    """(the skipped kind, or "" and the message kept)."""
    if not isinstance(message, dict):
        return "empty", None
    author = message.get("author")
    role = author.get("role") if isinstance(author, dict) else None
    if role == "tool" or message.get("recipient", "all") != "all":
        return "tool", None
    if role not in SPEAKERS:
        return "system", None
    metadata = message.get("metadata")
    content = message.get("content")
    if isinstance(metadata, dict) and metadata.get("is_visually_hidden_from_conversation"):
        return "hidden", None
    if not isinstance(content, dict) or content.get("content_type") not in TEXT_CONTENT:
        return "hidden", None
    parts = content.get("parts")
    parts = parts if isinstance(parts, list) else []
    texts = [text for text in map(_part_text, parts) if text is not None]
    text = "\n".join(part for part in texts if part.strip()).strip()
    if not text:
        return ("media" if len(texts) < len(parts) else "empty"), None
    return "", Message(SPEAKERS[role], text, utc(message.get("create_time")), index)


def _part_text(part: object) -> str | None:
    """A part's text: a string, or the transcript of a voice message; None for media."""
    if isinstance(part, dict) and part.get("content_type") == "audio_transcription":
        part = part.get("text")
    return part if isinstance(part, str) else None

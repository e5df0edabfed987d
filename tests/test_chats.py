"""Chat exports (pipeline.chats): each fixture's speakers, turns and texts, asserted exactly;
every WhatsApp header variant; what is left out and counted; and the one-line errors."""

from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path

import pytest

from pipeline.chats import (
    SKIP_KINDS,
    ImportedTurn,
    Message,
    merge_turns,
    parse_chats,
    speakers,
)
from pipeline.errors import ImportFormatError

FIXTURES = Path(__file__).parent / "fixtures" / "chats"
LRM, NNBSP, NBSP = "\u200e", "\u202f", "\u00a0"
E2E = (
    "Messages and calls are end-to-end encrypted. No one outside of this chat, not even WhatsApp,"
    " can read or listen to them."
)
PHONE = "\u202a+44 7700 900123\u202c"  # as exports wrap phone numbers

# Each fixture: the speakers, the turns after merging (speaker, text), what was skipped, and
# each kept message's (line, time).
FIXTURE_CASES = [
    pytest.param(
        "whatsapp",
        "whatsapp-android-gb.txt",  # 24-hour, dd/mm/yy, multi-line, file attached, edited
        ["Alice", "Bob", "+44 7700 900123"],
        [
            ("Alice", "Are we still on for Saturday?\nI can bring the tent"),
            ("Bob", "Yes!\nLet me check the weather first.\n\nIt might rain.\nForecast says sun"),
            ("+44 7700 900123", "Count me in too"),
            ("Bob", "Great, three of us then\nThe car park"),
        ],
        {"system": 5, "media": 2, "deleted": 1},
        [
            (4, "2024-03-12T21:02"),
            (5, "2024-03-12T21:02"),
            (6, "2024-03-12T21:05"),
            (12, "2024-03-12T21:08"),
            (14, "2024-03-13T08:16"),
            (15, "2024-03-13T08:20"),
            (16, "2024-03-13T08:21"),
        ],
        id="whatsapp-android-gb",
    ),
    pytest.param(
        "whatsapp",
        "whatsapp-ios-gb.txt",  # [dd/mm/yyyy, hh:mm:ss], U+200E marks, "~ Name"
        ["Alice", "Dana", "Carol"],
        [
            ("Alice", "Are we still on for Saturday?"),
            ("Dana", "Yes: see you at 9"),
            ("Carol", "hi all"),
            ("Alice", "Morning!"),
        ],
        {"system": 2, "media": 3, "deleted": 1},
        [
            (3, "2024-03-12T21:02:10"),
            (5, "2024-03-12T21:04:30"),
            (8, "2024-03-12T21:06:00"),
            (10, "2024-03-13T07:00:00"),
        ],
        id="whatsapp-ios-gb",
    ),
    pytest.param(
        "whatsapp",
        "whatsapp-android-us.txt",  # m/d/yy, 12-hour with U+202F before AM/PM
        ["Alice", "Bob"],
        [
            ("Alice", "hey"),
            ("Bob", "hey yourself\nstill up?"),
            ("Alice", "sorry, was asleep\nlunch?"),
        ],
        {"system": 1, "deleted": 1},
        [
            (2, "2024-03-12T21:05"),
            (3, "2024-03-12T21:06"),
            (4, "2024-03-13T00:01"),
            (5, "2024-03-13T12:30"),
            (7, "2024-03-13T12:32"),
        ],
        id="whatsapp-android-us",
    ),
    pytest.param(
        "whatsapp",
        "whatsapp-android-es.txt",  # d/m/yy, "a. m." / "p. m." (one with no-break spaces)
        ["Lucía", "Marta"],
        [("Lucía", "Hola\n¿Vienes mañana?"), ("Marta", "Sí, claro"), ("Lucía", "Genial")],
        {"media": 1},
        [
            (1, "2024-03-12T21:05"),
            (2, "2024-03-12T21:06"),
            (3, "2024-03-13T07:15"),
            (5, "2024-03-13T12:00"),
        ],
        id="whatsapp-android-es",
    ),
    pytest.param(
        "whatsapp",
        "whatsapp-ios-us.txt",  # [m/d/yy h:mm:ss pm] without a comma, a leading mark
        ["Alice", "Bob"],
        [("Alice", "hey"), ("Bob", "hi\nline two\nnight")],
        {"system": 1},
        [(2, "2024-03-12T21:05:33"), (3, "2024-03-12T21:06:01"), (5, "2024-03-13T00:00:01")],
        id="whatsapp-ios-us",
    ),
    pytest.param(
        "telegram",
        "telegram-result.json",  # text as strings and as lists of pieces, media, services
        ["Alice", "Bob", "Carol", "user444"],
        [
            ("Alice", "Are we still on for Saturday?\nRoute: https://example.org/route (12 km)"),
            ("Bob", "Yes! Bring snacks.\nAnd water.\nThe view from last time"),
            ("Carol", "Hi all, thanks for the invite"),
            ("user444", "hello from a deleted account"),
            ("Carol", "Saturday: sunny"),
        ],
        {"system": 2, "media": 3, "empty": 1},
        [
            (2, "2024-03-12T21:02:00Z"),
            (3, "2024-03-12T21:03:00Z"),
            (5, "2024-03-12T21:05:30Z"),
            (7, "2024-03-12T21:07:00Z"),
            (10, "2024-03-12T21:10:00Z"),
            (12, "2024-03-12T21:12:00Z"),
            (13, "2024-03-12T21:13:00Z"),
        ],
        id="telegram-result",
    ),
    pytest.param(
        "chatgpt",
        "chatgpt-conversations.json",  # "Packing list": an edited question made two branches
        ["User", "ChatGPT"],
        [
            ("User", "What should I pack for a two-day hike?"),
            ("ChatGPT", "Water, food, a map and layers."),
            ("User", "And if it snows?"),
            ("ChatGPT", "Microspikes and a warm layer."),
            ("User", "Like these?"),
            ("ChatGPT", "Yes, those work.\nKeep them dry."),
        ],
        {"empty": 1, "system": 1, "hidden": 1, "tool": 2, "media": 1},
        [
            (3, "2024-03-12T20:00:00Z"),
            (4, "2024-03-12T20:00:05Z"),
            (5, "2024-03-12T20:02:00Z"),
            (9, "2024-03-12T20:02:09Z"),
            (10, "2024-03-12T20:03:00Z"),
            (12, "2024-03-12T20:03:20Z"),
            (13, "2024-03-12T20:03:21Z"),
        ],
        id="chatgpt-branched",
    ),
]


@pytest.mark.parametrize(
    ("fmt", "name", "expected_speakers", "expected_turns", "skipped", "lines_and_times"),
    FIXTURE_CASES,
)
def test_each_fixture_imports_to_its_speakers_turns_and_texts(
    fmt, name, expected_speakers, expected_turns, skipped, lines_and_times
):
    conversation = "Packing list" if fmt == "chatgpt" else None
    [chat] = parse_chats(fmt, FIXTURES / name, conversation=conversation)
    turns = merge_turns(chat.messages)
    assert speakers(chat.messages) == expected_speakers
    assert [(turn.speaker, turn.text) for turn in turns] == expected_turns
    assert dict(chat.skipped) == skipped
    assert set(skipped) <= set(SKIP_KINDS)
    assert [(m.line, m.time) for m in chat.messages] == lines_and_times
    ends = list(accumulate(turn.messages for turn in turns))  # each turn's last message
    assert ends[-1] == len(chat.messages)
    assert [turn.time for turn in turns] == [chat.messages[end - 1].time for end in ends]


def test_the_chatgpt_branch_left_behind_by_an_edit_is_not_imported():
    [chat] = parse_chats(
        "chatgpt", FIXTURES / "chatgpt-conversations.json", conversation="Packing list"
    )
    texts = [m.text for m in chat.messages]
    assert "And if it snows?" in texts
    assert "And for rain?" not in texts
    assert "A poncho." not in texts
    assert (chat.title, chat.conversation_id) == (
        "Packing list",
        "c0ffee00-0000-4000-8000-000000000001",
    )


def test_every_chatgpt_conversation_is_read_without_a_choice():
    chats = parse_chats("chatgpt", FIXTURES / "chatgpt-conversations.json")
    assert [chat.title for chat in chats] == ["Packing list", "Greeting"]
    greeting = chats[1]
    assert [(m.speaker, m.text) for m in greeting.messages] == [
        ("User", "Say hi"),
        ("ChatGPT", "Hi!"),
    ]
    assert greeting.skipped == {"empty": 2}  # the root node, and an answer with no text
    by_id = parse_chats(
        "chatgpt", FIXTURES / "chatgpt-conversations.json", conversation=greeting.conversation_id
    )
    assert by_id == [greeting]


@pytest.mark.parametrize(
    ("conversation", "title", "conversation_id", "texts", "skipped"),
    [
        ("Bob", "Bob", "222", ["ping", "pong"], {}),
        (
            "4242",
            "Hiking club",
            "4242",
            ["Are we still on for Saturday?", "Route: https://example.org/route (12 km)"],
            {"system": 1},
        ),
    ],
)
def test_a_full_telegram_export_is_read_by_chat_id_or_name(
    conversation, title, conversation_id, texts, skipped
):
    [chat] = parse_chats("telegram", FIXTURES / "telegram-full.json", conversation=conversation)
    assert (chat.title, chat.conversation_id) == (title, conversation_id)
    assert [m.text for m in chat.messages] == texts
    assert chat.skipped == skipped


def test_a_single_telegram_chat_names_itself():
    [chat] = parse_chats("telegram", FIXTURES / "telegram-result.json")
    assert (chat.title, chat.conversation_id) == ("Hiking club", "4242")


# One WhatsApp message line of each header variant: (line, speaker, text, time).
HEADER_CASES = [
    ("13/03/24, 21:05 - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    ("13/03/2024, 21:05 - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    ("13.03.24, 21:05 - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    ("[13/03/24, 21:05:33] Alice: hi", "Alice", "hi", "2024-03-13T21:05:33"),
    ("[13/03/24 21:05:33] Alice: hi", "Alice", "hi", "2024-03-13T21:05:33"),
    (f"{LRM}[13/03/2024, 21:05:33] Alice: hi", "Alice", "hi", "2024-03-13T21:05:33"),
    (f"{LRM}13/03/24, 21:05 - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    ("3/13/24, 9:05 PM - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    (f"3/13/24, 9:05{NNBSP}PM - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    ("[3/13/24, 9:05:33 PM] Alice: hi", "Alice", "hi", "2024-03-13T21:05:33"),
    ("13/03/24, 9:05 pm - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    ("13/03/24, 9:05 am - Alice: hi", "Alice", "hi", "2024-03-13T09:05"),
    ("13/03/24, 9:05 p.m. - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    ("13/03/24, 9:05 a. m. - Alice: hi", "Alice", "hi", "2024-03-13T09:05"),
    (f"13/03/24, 9:05{NBSP}p.{NBSP}m. - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    (f"13/03/24, 9:05{NNBSP}p.{NNBSP}m. - Alice: hi", "Alice", "hi", "2024-03-13T21:05"),
    ("13/03/24, 12:05 a. m. - Alice: hi", "Alice", "hi", "2024-03-13T00:05"),
    ("13/03/24, 12:05 PM - Alice: hi", "Alice", "hi", "2024-03-13T12:05"),
    (f"13/03/24, 21:05 - {PHONE}: hi", "+44 7700 900123", "hi", "2024-03-13T21:05"),
    (f"[13/03/24, 21:05:33] ~{NNBSP}Carol: hi", "Carol", "hi", "2024-03-13T21:05:33"),
    ("13/03/24, 21:05 - Alice: Yes: at 9", "Alice", "Yes: at 9", "2024-03-13T21:05"),
    ("13/03/24, 21:05 - Alice: hi <This message was edited>", "Alice", "hi", "2024-03-13T21:05"),
    (
        "13/03/24, 21:05 - Alice: Messages and calls are end-to-end encrypted. Right?\nI think so",
        "Alice",
        "Messages and calls are end-to-end encrypted. Right?\nI think so",
        "2024-03-13T21:05",
    ),
    (
        "13/03/24, 21:05 - Alice: IMG-1.jpg (file attached)\ncaption",
        "Alice",
        "caption",
        "2024-03-13T21:05",
    ),
]


@pytest.mark.parametrize(("line", "speaker", "text", "time"), HEADER_CASES)
def test_every_whatsapp_header_variant(tmp_path, line, speaker, text, time):
    path = tmp_path / "chat.txt"
    path.write_text(line + "\n", encoding="utf-8")
    [chat] = parse_chats("whatsapp", path)
    assert chat.messages == (Message(speaker, text, time, 1),)
    assert chat.skipped == {}
    assert (chat.title, chat.conversation_id) == (None, None)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (f"13/03/24, 21:05 - {E2E} Tap to learn more.", "system"),
        (
            "13/03/24, 21:05 - Messages to this group are now secured with end-to-end encryption.",
            "system",
        ),
        (f"[13/03/24, 21:05:33] Alice: {E2E}", "system"),
        ("13/03/24, 21:05 - Alice added Bob", "system"),
        ('13/03/24, 21:05 - Alice changed the subject from "A" to "B: C"', "system"),
        ('13/03/24, 21:05 - Alice created group "Trip: 1"', "system"),
        (f"[13/03/24, 21:05:33] Trip: {LRM}Alice added you", "system"),
        ("13/03/24, 21:05 - Alice: <Media omitted>", "media"),
        ("13/03/24, 21:05 - Alice: <Médias omis>", "media"),
        (f"[13/03/24, 21:05:33] Alice: {LRM}image omitted", "media"),
        (f"[13/03/24, 21:05:33] Alice: {LRM}<attached: 00000003-PHOTO-2024-03-13.jpg>", "media"),
        (f"[13/03/24, 21:05:33] Alice: Report.pdf • {LRM}3 pages {LRM}document omitted", "media"),
        ("13/03/24, 21:05 - Alice: IMG-20240313-WA0001.jpg (file attached)", "media"),
        ("13/03/24, 21:05 - Alice: This message was deleted", "deleted"),
        ("13/03/24, 21:05 - Alice: You deleted this message", "deleted"),
        (f"[13/03/24, 21:05:33] Alice: {LRM}This message was deleted.", "deleted"),
        ("13/03/24, 21:05 - Alice: ", "empty"),
    ],
)
def test_each_whatsapp_line_left_out_is_counted_as_its_kind(tmp_path, line, kind):
    path = tmp_path / "chat.txt"
    path.write_text(line + "\n", encoding="utf-8")
    [chat] = parse_chats("whatsapp", path)
    assert chat.messages == ()
    assert chat.skipped == {kind: 1}


def test_whatsapp_crlf_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "chat.txt"
    path.write_bytes(
        "\ufeff13/03/24, 21:05 - Alice: one\r\ntwo\r\n13/03/24, 21:06 - Bob: three\r\n".encode()
    )
    [chat] = parse_chats("whatsapp", path)
    assert chat.messages == (
        Message("Alice", "one\ntwo", "2024-03-13T21:05", 1),
        Message("Bob", "three", "2024-03-13T21:06", 3),
    )


@pytest.mark.parametrize(
    ("lines", "times"),
    [
        (
            ["04/03/24, 10:00 - A: x", "05/03/24, 10:00 - B: y"],
            ["2024-03-04T10:00", "2024-03-05T10:00"],
        ),  # no evidence: day first
        (
            ["04/03/24, 10:00 - A: x", "25/03/24, 10:00 - B: y"],
            ["2024-03-04T10:00", "2024-03-25T10:00"],
        ),
        (
            ["04/03/24, 10:00 - A: x", "04/25/24, 10:00 - B: y"],
            ["2024-04-03T10:00", "2024-04-25T10:00"],
        ),
    ],
)
def test_whatsapp_day_month_order_is_read_from_the_file(tmp_path, lines, times):
    path = tmp_path / "chat.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    [chat] = parse_chats("whatsapp", path)
    assert [m.time for m in chat.messages] == times


def test_merge_rule():
    messages = [
        Message("A", "one", "2024-01-01T10:00", 1),
        Message("A", "two", "2024-03-01T10:00", 2),  # months later: still the same turn
        Message("B", "three", None, 3),
        Message("A", "four", "2024-03-02T10:00", 5),
    ]
    assert merge_turns(messages) == [
        ImportedTurn("A", "one\ntwo", "2024-03-01T10:00", 2),
        ImportedTurn("B", "three", None, 1),
        ImportedTurn("A", "four", "2024-03-02T10:00", 1),
    ]
    assert merge_turns([]) == []
    assert speakers(messages) == ["A", "B"]
    assert speakers(merge_turns(messages)) == ["A", "B"]


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


WHATSAPP_EXAMPLES = '"12/03/24, 21:05 - Name: text" or "[12/03/24, 21:05:33] Name: text"'
CHATGPT_ONE = (
    '[{"id": "c1", "title": "T", "current_node": "%s", "mapping": {'
    '"r": {"id": "r", "message": null, "parent": null, "children": ["a"]}, '
    '"a": {"id": "a", "message": null, "parent": "%s", "children": ["b"]}, '
    '"b": {"id": "b", "message": null, "parent": "a", "children": []}}}]'
)

# (format, file name, content, conversation, the problem after "<path>", line, where)
ERROR_CASES = [
    (
        "whatsapp",
        "chat.txt",
        "\n\nHello there\n12/03/24, 21:05 - A: b\n",
        None,
        f' line 3: expected a message line like {WHATSAPP_EXAMPLES}, found "Hello there"',
        3,
        None,
    ),
    (
        "whatsapp",
        "chat.txt",
        "\n \n",
        None,
        f" line 1: expected a message line like {WHATSAPP_EXAMPLES}, found an empty file",
        1,
        None,
    ),
    (
        "whatsapp",
        "chat.txt",
        "13/03/24, 21:05 - A: x\nmore\n3/13/24, 21:06 - B: y\n",
        None,
        (
            " line 3: expected a real date and time, "
            'found "3/13/24 21:06" (read day first, as line 1 shows)'
        ),
        3,
        None,
    ),
    (
        "whatsapp",
        "chat.txt",
        "12/03/24, 13:05 PM - A: x\n",
        None,
        (
            " line 1: expected a real date and time, "
            'found "12/03/24 13:05 PM" '
            "(read day first, the default when no date has a field above 12)"
        ),
        1,
        None,
    ),
    (
        "whatsapp",
        "chat.txt",
        "31/02/24, 10:00 - A: x\n",
        None,
        (
            " line 1: expected a real date and time, "
            'found "31/02/24 10:00" (read day first, as line 1 shows)'
        ),
        1,
        None,
    ),
    (
        "whatsapp",
        "chat.txt",
        b"12/03/24, 21:05 - A: x\n12/03/24, 21:06 - B: \xff\n",
        None,
        " line 2: expected UTF-8 text, found the byte 0xff",
        2,
        None,
    ),
    (
        "telegram",
        "result.json",
        '{"messages": [\n  {"id": 1,}\n]}',
        None,
        (
            " line 2 column 12: expected Telegram Desktop's result.json, "
            "found invalid JSON (Expecting property name enclosed in double quotes)"
        ),
        2,
        None,
    ),
    ("telegram", "result.json", "[]", None, " at $: expected an object, found a list", None, "$"),
    (
        "telegram",
        "result.json",
        '{"name": "x"}',
        None,
        ' at $: expected "messages" (one chat) or "chats": {"list": [...]} (a full export)',
        None,
        "$",
    ),
    (
        "telegram",
        "result.json",
        '{"messages": {}}',
        None,
        " at $.messages: expected a list of messages, found an object",
        None,
        "$.messages",
    ),
    (
        "telegram",
        "result.json",
        '{"messages": ["hi"]}',
        None,
        " at $.messages[0]: expected a message object, found a string",
        None,
        "$.messages[0]",
    ),
    (
        "telegram",
        "result.json",
        '{"messages": [{"type": "message", "from": "A", "text": 5}]}',
        None,
        " at $.messages[0].text: expected a string or a list of text pieces, found a number",
        None,
        "$.messages[0].text",
    ),
    (
        "telegram",
        "result.json",
        '{"messages": [{"from": "A", "text": ["a", {"type": "bold"}]}]}',
        None,
        (
            " at $.messages[0].text[1]: expected a string or an object "
            'with a "text" string, found null'
        ),
        None,
        "$.messages[0].text[1]",
    ),
    (
        "telegram",
        "result.json",
        '{"chats": {"list": []}}',
        None,
        " at $.chats.list: expected a chat, found none",
        None,
        "$.chats.list",
    ),
    (
        "telegram",
        "result.json",
        '{"name": "Bob", "id": 2, "messages": []}',
        "Alice",
        ': no chat has the id or name "Alice"; the chats are: "Bob" (id 2)',
        None,
        None,
    ),
    (
        "chatgpt",
        "conversations.json",
        "{}",
        None,
        " at $: expected a list of conversations, found an object",
        None,
        "$",
    ),
    (
        "chatgpt",
        "conversations.json",
        "[1]",
        None,
        " at $[0]: expected a conversation object, found a number",
        None,
        "$[0]",
    ),
    (
        "chatgpt",
        "conversations.json",
        '[{"id": "c1", "mapping": []}]',
        None,
        " at $[0].mapping: expected an object of nodes, found a list",
        None,
        "$[0].mapping",
    ),
    (
        "chatgpt",
        "conversations.json",
        CHATGPT_ONE % ("nope", "r"),
        None,
        ' at $[0].current_node: expected the id of a node of the mapping, found "nope"',
        None,
        "$[0].current_node",
    ),
    (
        "chatgpt",
        "conversations.json",
        CHATGPT_ONE % ("b", "gone"),
        None,
        (
            " at $[0].mapping.a.parent: expected the id of a node of the mapping "
            '(the parent chain from current_node is broken), found "gone"'
        ),
        None,
        "$[0].mapping.a.parent",
    ),
    (
        "chatgpt",
        "conversations.json",
        CHATGPT_ONE % ("b", "b"),
        None,
        (
            " at $[0].mapping.a.parent: expected the parent chain to reach the root, "
            'found a loop back to "b"'
        ),
        None,
        "$[0].mapping.a.parent",
    ),
    (
        "chatgpt",
        "conversations.json",
        CHATGPT_ONE % ("b", "r"),
        "Camping",
        ': no conversation has the id or title "Camping"; the titles are: "T"',
        None,
        None,
    ),
]


ERROR_IDS = [
    "whatsapp-not-a-header",
    "whatsapp-empty",
    "whatsapp-month-first-in-a-day-first-file",
    "whatsapp-13-pm",
    "whatsapp-31-february",
    "whatsapp-not-utf8",
    "telegram-invalid-json",
    "telegram-not-an-object",
    "telegram-no-messages",
    "telegram-messages-not-a-list",
    "telegram-message-not-an-object",
    "telegram-text-a-number",
    "telegram-piece-without-text",
    "telegram-no-chats",
    "telegram-no-such-chat",
    "chatgpt-not-a-list",
    "chatgpt-not-a-conversation",
    "chatgpt-mapping-not-an-object",
    "chatgpt-current-node-missing",
    "chatgpt-broken-parent-chain",
    "chatgpt-parent-loop",
    "chatgpt-no-such-conversation",
]


@pytest.mark.parametrize(
    ("fmt", "name", "content", "conversation", "problem", "line", "where"),
    ERROR_CASES,
    ids=ERROR_IDS,
)
def test_bad_input_gets_a_one_line_error_naming_where_and_what_was_expected(
    tmp_path, fmt, name, content, conversation, problem, line, where
):
    path = _write(tmp_path, name, content)
    with pytest.raises(ImportFormatError) as caught:
        parse_chats(fmt, path, conversation=conversation)
    error = caught.value
    assert error.problem == f"{path}{problem}"
    assert "\n" not in str(error)
    assert (error.path, error.line, error.where) == (path, line, where)
    assert error.fixes


def test_a_full_telegram_export_with_several_chats_needs_a_choice():
    path = FIXTURES / "telegram-full.json"
    with pytest.raises(ImportFormatError) as caught:
        parse_chats("telegram", path)
    assert str(caught.value) == (
        f'{path}: the export holds 2 chats: "Bob" (id 222), "Hiking club" (id 4242); '
        "expected one chosen; choose one with the conversation setting"
    )
    with pytest.raises(ImportFormatError) as caught:
        parse_chats("telegram", path, conversation="Zed")
    assert caught.value.problem == (
        f'{path}: no chat has the id or name "Zed"; the chats are: "Bob" (id 222), '
        '"Hiking club" (id 4242)'
    )
    assert caught.value.fixes[0].options == ("conversation",)


def test_a_chatgpt_conversation_that_matches_nothing_lists_the_titles():
    path = FIXTURES / "chatgpt-conversations.json"
    with pytest.raises(ImportFormatError) as caught:
        parse_chats("chatgpt", path, conversation="Camping")
    assert caught.value.problem == (
        f'{path}: no conversation has the id or title "Camping"; '
        'the titles are: "Packing list", "Greeting"'
    )


def test_missing_file_and_unknown_format(tmp_path):
    path = tmp_path / "gone.txt"
    with pytest.raises(ImportFormatError) as caught:
        parse_chats("whatsapp", path)
    assert caught.value.problem == f"{path}: cannot read it (No such file or directory)"
    with pytest.raises(ImportFormatError) as caught:
        parse_chats("signal", path)
    assert (
        str(caught.value)
        == 'unknown import format "signal"; expected one of whatsapp, telegram, chatgpt'
    )


def test_chatgpt_voice_messages_are_read_from_their_transcripts(tmp_path):
    audio = {"content_type": "audio_asset_pointer", "asset_pointer": "sediment://file_1"}
    said = {"content_type": "audio_transcription", "text": "Is it windy up there?"}
    answer = {"content_type": "audio_transcription", "text": "Very, take a shell."}

    def node(ident, parent, role, parts):
        content = {"content_type": "multimodal_text", "parts": parts}
        message = {"author": {"role": role}, "content": content, "create_time": None}
        return {"id": ident, "message": message, "parent": parent, "children": []}

    mapping = {
        "u": node("u", None, "user", [said, audio]),
        "a": node("a", "u", "assistant", [answer, audio]),
        "m": node("m", "a", "user", [audio]),
    }
    document = [{"id": "v", "title": "Voice", "current_node": "m", "mapping": mapping}]
    path = _write(tmp_path, "conversations.json", json.dumps(document))
    [chat] = parse_chats("chatgpt", path)
    assert chat.messages == (
        Message("User", "Is it windy up there?", None, 1),
        Message("ChatGPT", "Very, take a shell.", None, 2),
    )
    assert chat.skipped == {"media": 1}

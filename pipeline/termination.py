"""When a conversation should end, and why.

Left alone, two chat models that have finished a task keep thanking each other and
saying goodbye (the gpt-converse transcripts trade "Goodbye!" for a dozen turns). A
dialogue here ends for one of these reasons (``termination_reason`` in the manifest):

``done_token``
    the role allowed to declare the task done wrote the done token (``<TASK_DONE>``);
    the next speaker then gets ``closing_turns`` (default 1) final turns.
``loop``
    the last turns only trade pleasantries (thanks, goodbyes), or repeat earlier turns
    almost word for word (:class:`difflib.SequenceMatcher` ratio over words).
``max_turns``, ``token_budget``, ``empty_turn``
    the turn limit, the token budget, or a turn with no text.
``error``, ``interrupted``
    a failed call, or Ctrl-C / a killed process.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import Turn

from .choices import DEFAULT_DONE_TOKEN as DEFAULT_DONE_TOKEN

REASONS = (
    "done_token", "loop", "max_turns", "token_budget", "empty_turn", "error", "interrupted",
    "human_quit",  # a person in the conversation stopped it
)  # fmt: skip

# Closing formulas chat models trade once a task is over. A sentence that starts with
# one of these, or nearly equals one (difflib), is a pleasantry.
PLEASANTRIES = (
    "thank you", "thanks", "many thanks", "i appreciate", "much appreciated",
    "you're welcome", "you are welcome", "my pleasure", "it was my pleasure",
    "it was a pleasure", "it's been a pleasure", "the pleasure is mine", "glad i could help",
    "happy to help", "i'm glad", "i am glad", "i hope this helps", "i hope that this",
    "i hope this information", "this will be very helpful", "this has been very helpful",
    "that was very helpful", "if you have any further questions", "if you have any more",
    "feel free to reach out", "don't hesitate to reach out", "i will keep that in mind",
    "i'll keep that in mind", "have a great day", "have a nice day", "have a good day",
    "have a wonderful day", "you too", "same to you", "likewise", "goodbye", "good bye",
    "bye", "farewell", "take care", "see you", "talk to you later", "ending conversation",
    "end of conversation", "best of luck", "good luck", "all the best", "cheers",
)  # fmt: skip
PLEASANTRY_CUTOFF = 0.8
DUPLICATE_RATIO = 0.9
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORDS = re.compile(r"[^a-z0-9' ]+")


def _sentences(text: str) -> list[str]:
    normalized = text.replace("\u2019", "'").lower()  # a typographic apostrophe
    found = []
    for sentence in _SENTENCE_END.split(normalized):
        words = " ".join(_WORDS.sub(" ", sentence).split())
        if words:
            found.append(words)
    return found


def is_pleasantry(text: str) -> bool:
    """True when every sentence of ``text`` is a closing formula (thanks, goodbye, ...) and
    none asks a question; an empty text is not a pleasantry."""
    if "?" in text:
        return False
    sentences = _sentences(text)
    return bool(sentences) and all(_pleasant(s) for s in sentences)


def _pleasant(sentence: str) -> bool:
    if any(sentence == p or sentence.startswith(p + " ") for p in PLEASANTRIES):
        return True
    return bool(difflib.get_close_matches(sentence, PLEASANTRIES, n=1, cutoff=PLEASANTRY_CUTOFF))


def similarity(a: str, b: str) -> float:
    """difflib's ratio of two texts compared word by word, 0 (nothing in common) to 1
    (the same words in the same order), ignoring case."""
    matcher = difflib.SequenceMatcher(None, a.lower().split(), b.lower().split(), autojunk=False)
    if matcher.real_quick_ratio() < DUPLICATE_RATIO or matcher.quick_ratio() < DUPLICATE_RATIO:
        return matcher.quick_ratio()
    return matcher.ratio()


def detect_loop(contents: Sequence[str], participants: int, window: int = 2) -> bool:
    """True when the conversation ``contents`` (one text per turn, oldest first) has
    stopped making progress: its last ``window`` turns are all pleasantries, or its last
    ``window + 1`` turns each nearly repeat (word-level ratio >= 0.9) one of the
    ``participants`` turns before them."""
    if len(contents) >= window and all(is_pleasantry(c) for c in contents[-window:]):
        return True
    span = window + 1
    if len(contents) < span + 1:
        return False
    for i in range(len(contents) - span, len(contents)):
        earlier = contents[max(0, i - participants) : i]
        if not any(similarity(contents[i], e) >= DUPLICATE_RATIO for e in earlier):
            return False
    return True


def strip_token(text: str, token: str) -> str:
    """``text`` with every ``token`` removed and the white space it leaves trimmed."""
    if not token:
        return text
    return re.sub(r"[ \t]*" + re.escape(token) + r"[ \t]*", " ", text).strip()


class TokenFilter:
    """Passes streamed text through with ``token`` removed, holding back any tail that
    might be the start of a token split across chunks."""

    def __init__(self, token: str) -> None:
        self.token = token
        self._held = ""

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that can be shown now."""
        if not self.token:
            return text
        data = (self._held + text).replace(self.token, "")
        keep = 0
        for size in range(min(len(self.token) - 1, len(data)), 0, -1):
            if self.token.startswith(data[-size:]):
                keep = size
                break
        self._held = data[len(data) - keep :] if keep else ""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> str:
        """What is still held back, at the end of the stream."""
        held, self._held = self._held, ""
        return held


def said_done(turn: Turn, token: str) -> bool:
    """True when a turn contains the done token."""
    return bool(token) and token in turn.content

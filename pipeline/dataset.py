"""Fine-tuning datasets: training examples from conversations, from one speaker's side.

A :class:`Source` is one conversation (a dialogue run, an imported chat). For the speaker
being trained, :func:`build_examples` makes one :class:`Example` per turn that speaker
spoke, its earlier turns (all, or the last ``context``) being what it answers. Turns
with no text (an empty answer) and tool lines are left out, as context and as targets:
the fine-tuning format refuses empty messages. A turn with nothing before it to answer
and no system prompt makes no example.

Two formats (:data:`DATASET_FORMATS`):

``chat``
    OpenAI chat fine-tuning lines, ``{"messages": [...]}``
    (https://platform.openai.com/docs/guides/fine-tuning), as the dialogue showed the
    speaker its conversation (:func:`pipeline.dialogue.messages_for`): its system prompt,
    the others' turns as ``user``, its own as ``assistant``, the turn it is trained on
    last. Its earlier turns carry ``"weight": 0``, so each turn is trained once, in its
    own example. With more than two speakers, a ``user`` message's text starts with its
    speaker's name, as in the dialogue, and the message carries that name as ``name``
    too: the API's way to tell apart speakers who share a role. The API accepts ASCII
    letters, digits, ``_`` and ``-`` there, so accents are dropped and other characters
    become ``_`` (``Cé Lia`` → ``Ce_Lia``); a name with nothing left, or the same as an
    earlier speaker's, becomes ``speaker<N>`` (N: its place in the roles). Every line
    fits ``schemas/finetune.schema.json``. For example::

        {"messages": [{"role": "user", "content": "Shall we start?"},
                      {"role": "assistant", "content": "Yes, go ahead."}]}

``completion``
    The legacy ``{"prompt", "completion"}`` pairs of the GPT-3 models (``davinci-002``,
    ``babbage-002``), after OpenAI's guidance (https://help.openai.com/en/articles/6811186,
    and the legacy fine-tuning guide): the prompt is the system prompt, a blank line and
    the context as ``Name: text`` lines, and ends with a fixed separator
    (:data:`SEPARATOR`, ``"\\n\\n###\\n\\n"``) that appears nowhere else in it; the
    completion is a space, the turn's text, and a fixed stop sequence (:data:`STOP`,
    ``" END"``) that appears nowhere else in it. For example::

        {"prompt": "Ann: Shall we start?\\n\\n###\\n\\n", "completion": " Yes, go ahead. END"}

:func:`check` does what providers check before they train (at least 10 examples, each
ending with the trained speaker, each within a token limit), :func:`split` holds out a
seeded validation share, :func:`estimate_cost` prices a job from ``prices.toml``.

Tokens are counted with ``tiktoken`` (the ``dataset`` extra) when the encoding of the
model can be loaded, and estimated otherwise; every count says which
(:class:`TokenCounter`). tiktoken downloads an encoding's file on first use and keeps it
in ``TIKTOKEN_CACHE_DIR`` (by default a folder of the system's temporary directory); a
machine that cannot reach the download host counts with tiktoken once the file is put
there, and otherwise gets the estimate, after at most :data:`ENCODING_TIMEOUT` seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from . import schemas
from .choices import DATASET_FORMATS
from .config import read_toml
from .dialogue import messages_for, named, role_prompt
from .errors import DatasetError, Fix, one_line
from .export import FINETUNE_SCHEMA
from .records import JSONObject, RolesDocument, Turn
from .runs import atomic_write_text, jsonl

SEPARATOR = "\n\n###\n\n"
"""The end of every completion-format prompt: OpenAI's suggested separator for the legacy
format (the seed's too), which chat text seldom holds."""
STOP = " END"
"""The end of every completion: a stop sequence that chat text seldom holds (a newline
would not do: chat messages span lines)."""
MINIMUM_EXAMPLES = 10
"""The fewest examples OpenAI's fine-tuning accepts in a training file."""
DEFAULT_ENCODING = "o200k_base"
"""tiktoken's encoding for counting when no model is named: that of the gpt-4o and
gpt-4.1 models."""
ENCODING_TIMEOUT = 10.0
"""Seconds to wait for tiktoken to load an encoding (it may download the file, with no
time-out of its own) before counting with the estimate."""
CHARS_PER_TOKEN = 4
"""The estimate's rule of thumb: a token is about 4 characters of English text
(https://help.openai.com/en/articles/4936856-what-are-tokens-and-how-to-count-them)."""
TOKENS_PER_MESSAGE = 3
"""A chat message's own tokens besides its text, and the reply's priming per example
(OpenAI cookbook, "How to count tokens with tiktoken"); a ``name`` adds one more."""
PRICES_FILE = Path(__file__).with_name("prices.toml")
"""The shipped price table: USD per 1M training tokens, and the longest example, per base
model, with its source and date."""


# -- sources and examples ---------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One conversation to learn from.

    Attributes:
        run_id: the run it comes from (named in the examples and the problems).
        roles: its roles; an imported chat's may have an empty ``system_prompt``.
        turns: its turns, in order.
        score: the judge's score, None when it was not judged (see :func:`at_least`).
    """

    run_id: str
    roles: RolesDocument
    turns: Sequence[Turn]
    score: float | None = None


@dataclass(frozen=True)
class Example:
    """One training example: ``body`` is its line in the dataset (``{"messages"}`` or
    ``{"prompt", "completion"}``), made for turn number ``turn`` of run ``run_id``."""

    run_id: str
    turn: int
    body: JSONObject


def at_least(sources: Iterable[Source], min_score: float | None) -> list[Source]:
    """The sources the judge scored ``min_score`` or more (all of them when it is None;
    an unjudged source is left out when it is not)."""
    return [
        s for s in sources if min_score is None or (s.score is not None and s.score >= min_score)
    ]


def build_examples(
    sources: Iterable[Source],
    speaker: str,
    *,
    fmt: str = "chat",
    context: int | None = None,
    system_prompt: str | None = None,
    separator: str = SEPARATOR,
    stop: str = STOP,
) -> list[Example]:
    """One example per turn of ``speaker`` (a role name) in ``sources``, in order, from
    its point of view (see the module's documentation for the formats).

    Args:
        fmt: one of :data:`DATASET_FORMATS`.
        context: how many of the turns before each one it answers; None for all of them,
            0 for none (then only a system prompt comes before it).
        system_prompt: the system prompt of every example; None for the one the dialogue
            gave the speaker (:func:`pipeline.dialogue.role_prompt`), or none when its
            role has no prompt (an imported chat); ``""`` for none.
        separator, stop: the completion format's end of prompt and of completion.

    A source in which ``speaker`` says nothing adds nothing.

    Raises:
        DatasetError: ``speaker`` speaks in none of the sources (the message names those
            who do), or ``context`` is negative.
        ValueError: ``fmt`` is not a dataset format.
    """
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; one of {', '.join(DATASET_FORMATS)}")
    if context is not None and context < 0:
        raise DatasetError(
            f"the context is {context} turns; it must be 0 or more",
            fix=Fix("give {} a number of turns from 0 up", ("context",)),
        )
    examples: list[Example] = []
    speakers: dict[str, None] = {}  # every speaker met, in order
    for source in sources:
        turns = [t for t in source.turns if t.kind != "tool" and t.content.strip()]
        speakers.update(dict.fromkeys(t.role for t in turns))
        if speaker not in source.roles.names:
            continue
        index = source.roles.names.index(speaker)
        system = _system(source.roles, index, system_prompt)
        for position, turn in enumerate(turns):
            if turn.role_index != index:
                continue
            start = 0 if context is None else max(0, position - context)
            before = turns[start:position]
            if not before and system is None:
                continue  # nothing to answer, nothing to go by
            if fmt == "chat":
                body = _chat(source.roles, index, before, turn, system)
            else:
                body = _completion(before, turn, system, separator, stop)
            examples.append(Example(source.run_id, turn.turn, body))
    if speaker not in speakers:
        raise DatasetError(
            f"{speaker!r} says nothing in the conversations given; "
            f"their speakers are {', '.join(speakers) or 'none'}",
            fix=Fix("name one of them with {}", ("speaker",)),
        )
    return examples


def _system(roles: RolesDocument, index: int, override: str | None) -> str | None:
    if override is not None:
        return override or None
    if not roles.roles[index].system_prompt.strip():
        return None
    return role_prompt(roles, index)


def _chat(
    roles: RolesDocument, index: int, before: list[Turn], turn: Turn, system: str | None
) -> JSONObject:
    # what the dialogue sent this role, less its system prompt, and the turn it answered; a
    # person's notes are instructions to the model, not its conversation (nor its answer)
    unnoted = [dataclasses.replace(t, note=None) for t in [*before, turn]]
    messages = messages_for(index, roles, unnoted)[1:]
    names = _message_names(roles.names) if named(roles) else None
    for message, earlier in zip(messages[:-1], before, strict=True):
        if message["role"] == "assistant":
            message["weight"] = 0  # trained in its own example
        elif names is not None:
            message["name"] = names[earlier.role_index]
    head = [] if system is None else [{"role": "system", "content": system}]
    return {"messages": head + messages}  # checked with the rest (check)


_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]+")


def _message_names(names: Sequence[str]) -> list[str]:
    """Each role's ``name`` for the API (see the module's documentation), at most 64
    characters."""
    found: list[str] = []
    for position, name in enumerate(names, 1):
        ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
        clean = _NOT_IN_NAME.sub("_", ascii_name).strip("_")[:64]
        found.append(clean if clean and clean not in found else f"speaker{position}")
    return found


def _completion(
    before: list[Turn], turn: Turn, system: str | None, separator: str, stop: str
) -> JSONObject:
    parts = [system] if system else []
    if before:
        parts.append("\n".join(f"{t.role}: {t.content}" for t in before))
    completion = f" {turn.content.strip()}{stop}"
    return {"prompt": "\n\n".join(parts) + separator, "completion": completion}


# -- splitting and writing --------------------------------------------------------------


def split(
    examples: Sequence[Example], validation: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """``examples`` cut into a training and a validation part, each in the order given.

    The validation part is ``round(len(examples) * validation)`` examples (at least one
    when ``validation`` is above 0 and there are two examples or more; never all of
    them): those whose sha256 of ``seed``, run id and turn is smallest. The same seed
    gives the same split on any machine and Python version, and adding examples does not
    change how the others rank.

    Raises:
        DatasetError: ``validation`` is not from 0 up to (not including) 1.
    """
    if not 0 <= validation < 1:
        raise DatasetError(
            f"the validation share is {validation}; it must be from 0 up to (not including) 1",
            fix=Fix("give {} a share such as 0.1", ("validation",)),
        )
    total = len(examples)
    wanted = round(total * validation)
    if validation > 0 and total >= 2:
        wanted = min(max(wanted, 1), total - 1)

    def key(position: int) -> tuple[str, int]:
        example = examples[position]
        text = f"{seed}\0{example.run_id}\0{example.turn}"
        return hashlib.sha256(text.encode()).hexdigest(), position

    held = set(sorted(range(total), key=key)[:wanted])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def write_jsonl(path: Path, examples: Iterable[Example]) -> str:
    """Write the examples' lines to ``path`` as JSON Lines (UTF-8), atomically; return the
    file's sha256 (hex)."""
    text = jsonl(e.body for e in examples)
    atomic_write_text(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCounter:
    """How tokens are counted.

    Attributes:
        name: ``"tiktoken <encoding>"``, or ``"estimate"``: ``ceil(characters / 4)``
            (:data:`CHARS_PER_TOKEN`).
        note: why the estimate is used (tiktoken missing, the encoding not loadable, a
            model tiktoken does not know); None for tiktoken.
        length: the number of tokens of a text.
    """

    name: str
    note: str | None
    length: Callable[[str], int]


def _estimate(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _estimate_counter(note: str) -> TokenCounter:
    return TokenCounter("estimate", note, _estimate)


def token_counter(model: str | None) -> TokenCounter:
    """The counter for ``model`` (None: :data:`DEFAULT_ENCODING`): tiktoken with the
    model's encoding when tiktoken is installed, knows the model and can load the
    encoding within :data:`ENCODING_TIMEOUT` seconds, else the estimate. A failed load is
    not tried again in the same process."""
    try:
        import tiktoken
    except ImportError:
        return _estimate_counter(
            "tiktoken is not installed (pip install 'converse-pipeline[dataset]')"
        )
    if model is None:
        name = DEFAULT_ENCODING
    else:
        try:
            name = tiktoken.encoding_name_for_model(model)
        except KeyError:
            return _estimate_counter(f"tiktoken knows no encoding for the model {model!r}")
    encoding, problem = _encoding(name)
    if encoding is None:
        return _estimate_counter(problem or f"tiktoken could not load {name}")
    # special tokens' text (<|endoftext|>) in a chat is plain text, not a special token
    return TokenCounter(
        f"tiktoken {name}", None, lambda text: len(encoding.encode(text, disallowed_special=()))
    )


@cache
def _encoding(name: str) -> tuple[Any, str | None]:
    """tiktoken's encoding ``name`` and None, or None and why it could not be had. It is
    loaded on a daemon thread: a download that hangs (tiktoken gives requests no time-out)
    is left behind after :data:`ENCODING_TIMEOUT` seconds."""
    import tiktoken

    loaded: list[Any] = []

    def load() -> None:
        try:
            loaded.append(tiktoken.get_encoding(name))
        except Exception as e:  # no network, a refused download, a bad cached file...
            loaded.append(e)

    thread = threading.Thread(target=load, name="pipeline-tiktoken", daemon=True)
    thread.start()
    thread.join(ENCODING_TIMEOUT)
    if not loaded:
        return None, (
            f"tiktoken did not load {name} within {ENCODING_TIMEOUT:g} s "
            "(it downloads the file on first use; put it in TIKTOKEN_CACHE_DIR to count offline)"
        )
    if isinstance(loaded[0], Exception):
        return None, f"tiktoken could not load {name}: {one_line(loaded[0], 200)}"
    return loaded[0], None


def _tokens(value: str | Sequence[Mapping[str, Any]], counter: TokenCounter) -> int:
    if isinstance(value, str):
        return counter.length(value)
    total = TOKENS_PER_MESSAGE  # the reply's priming
    for message in value:
        total += TOKENS_PER_MESSAGE
        total += sum(counter.length(v) for v in message.values() if isinstance(v, str))
        total += 1 if "name" in message else 0
    return total


def count_tokens(
    text_or_messages: str | Sequence[Mapping[str, Any]], model: str | None = None
) -> tuple[int, str]:
    """The tokens of a text, or of chat messages as OpenAI counts them (OpenAI cookbook,
    "How to count tokens with tiktoken": each message's string values, 3 more per
    message, 1 more for a ``name``, 3 for the reply's priming), for ``model`` (see
    :func:`token_counter`), and the counter used: ``"tiktoken <encoding>"`` or
    ``"estimate"``."""
    counter = token_counter(model)
    return _tokens(text_or_messages, counter), counter.name


def _example_tokens(body: Mapping[str, Any], counter: TokenCounter) -> int:
    if "messages" in body:
        messages = body["messages"] if isinstance(body["messages"], list) else []
        return _tokens([m for m in messages if isinstance(m, Mapping)], counter)
    return sum(counter.length(v) for v in body.values() if isinstance(v, str))


def file_tokens(path: Path, model: str | None = None) -> tuple[int, int, TokenCounter]:
    """The training tokens of a dataset file (JSON lines, as :func:`check` counts an
    example), its number of examples, and the counter used. Lines that are not JSON
    objects count as none.

    Raises:
        OSError: the file cannot be read.
    """
    counter = token_counter(model)
    tokens = examples = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            body = json.loads(line)
        except ValueError:
            continue
        if isinstance(body, dict):
            examples += 1
            tokens += _example_tokens(body, counter)
    return tokens, examples, counter


# -- checking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """What :func:`check` found.

    Attributes:
        count: the examples checked.
        total_tokens, max_tokens: their tokens, all together and of the longest (chat
            examples counted as :func:`count_tokens` counts messages, completion ones as
            the prompt's and the completion's text).
        counter, counter_note: the :class:`TokenCounter` used, and why it is the estimate.
        problems: one line per kind of problem, naming the examples (run and turn, at
            most three, then how many more); none when the examples can be sent.
    """

    count: int
    total_tokens: int
    max_tokens: int
    counter: str
    counter_note: str | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def check(
    examples: Sequence[Example],
    *,
    fmt: str,
    token_limit: int,
    minimum: int = MINIMUM_EXAMPLES,
    model: str | None = None,
    separator: str = SEPARATOR,
    stop: str = STOP,
) -> Report:
    """Check ``examples`` as a provider would before training: at least ``minimum`` of
    them; each in format ``fmt`` (a chat line fits ``schemas/finetune.schema.json``, and
    no message is empty), ending with the trained speaker (a chat line with an assistant
    message that is trained, a completion with text), and within ``token_limit`` tokens
    counted for ``model`` (see :func:`token_counter`); a completion-format prompt ends with
    ``separator`` and a completion starts with a space and ends with ``stop``, neither
    holding its marker anywhere else.

    Raises:
        ValueError: ``fmt`` is not a dataset format.
    """
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; one of {', '.join(DATASET_FORMATS)}")
    counter = token_counter(model)
    found: dict[str, list[str]] = {}
    sizes = []
    for example in examples:
        where = f"{example.run_id} turn {example.turn}"
        size = _example_tokens(example.body, counter)
        sizes.append(size)
        kinds = (
            _chat_problems(example.body)
            if fmt == "chat"
            else _completion_problems(example.body, separator, stop)
        )
        for kind in kinds:
            found.setdefault(kind, []).append(where)
        if size > token_limit:
            found.setdefault(f"over the limit of {token_limit:,} tokens", []).append(
                f"{where} ({size:,} tokens)"
            )
    problems = []
    if len(examples) < minimum:
        problems.append(f"{_examples(len(examples))}; fine-tuning needs at least {minimum}")
    for kind, places in found.items():
        more = f" and {len(places) - 3} more" if len(places) > 3 else ""
        problems.append(f"{_examples(len(places))} {kind}: {', '.join(places[:3])}{more}")
    return Report(
        count=len(examples),
        total_tokens=sum(sizes),
        max_tokens=max(sizes, default=0),
        counter=counter.name,
        counter_note=counter.note,
        problems=tuple(problems),
    )


def _examples(count: int) -> str:
    return f"{count} example" if count == 1 else f"{count} examples"


def _chat_problems(body: JSONObject) -> list[str]:
    if schemas.errors(body, FINETUNE_SCHEMA):
        return ["not in the chat fine-tuning format"]
    messages = body["messages"]
    kinds = []
    last = messages[-1]
    if last["role"] != "assistant" or last.get("weight", 1) == 0:
        kinds.append("not ending with the trained speaker (a trained assistant message)")
    if any(not m["content"].strip() for m in messages):
        kinds.append("with an empty message")
    return kinds


def _completion_problems(body: JSONObject, separator: str, stop: str) -> list[str]:
    prompt, completion = body.get("prompt"), body.get("completion")
    if set(body) != {"prompt", "completion"} or not (
        isinstance(prompt, str) and isinstance(completion, str)
    ):
        return ["not a prompt and completion pair"]
    shown_separator, shown_stop = json.dumps(separator), json.dumps(stop)
    kinds = []
    if not prompt.endswith(separator):
        kinds.append(f"with a prompt not ending with the separator {shown_separator}")
    elif separator in prompt[: -len(separator)]:
        kinds.append(f"with the separator {shown_separator} inside the prompt")
    if not completion.startswith(" "):
        kinds.append("with a completion not starting with a space")
    text = completion.removesuffix(stop) if completion.endswith(stop) else completion
    if not text.strip():
        kinds.append("not ending with the trained speaker (an empty completion)")
    if not completion.endswith(stop):
        kinds.append(f"with a completion not ending with the stop sequence {shown_stop}")
    elif stop in text:
        kinds.append(f"with the stop sequence {shown_stop} inside the completion")
    return kinds


# -- cost -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriceTable:
    """Prices and limits per model (``prices.toml``).

    Attributes:
        training: USD per 1M training tokens.
        example_token_limit: the most tokens one training example may have.
        source, date: where the figures come from, and when they were taken.
        chat_input, chat_output: USD per 1M input (prompt) and output (completion) tokens
            of a chat completion through the ordinary API.
        batch_input, batch_output: the same through the Batch API.
    """

    training: Mapping[str, float]
    example_token_limit: Mapping[str, int]
    source: str
    date: str
    chat_input: Mapping[str, float] = field(default_factory=dict)
    chat_output: Mapping[str, float] = field(default_factory=dict)
    batch_input: Mapping[str, float] = field(default_factory=dict)
    batch_output: Mapping[str, float] = field(default_factory=dict)


def load_prices(override: Path | None = None) -> PriceTable:
    """The shipped table (:data:`PRICES_FILE`), with the file ``override`` laid over it:
    TOML, or JSON when its name ends in ``.json``, with the same keys (``source``,
    ``date``, ``[training]``, ``[example_token_limit]``, ``[chat_input]``,
    ``[chat_output]``, ``[batch_input]`` and ``[batch_output]`` by model, all optional); each
    model it lists replaces or adds to the shipped entry.

    Raises:
        DatasetError: ``override`` is missing, unreadable, not TOML (JSON), or has an
            unknown key or a value that is not a number (a whole one for limits) of 0 or
            more; the message names the file and the key.
    """
    tables = [_read_prices(PRICES_FILE)]
    if override is not None:
        tables.append(_read_prices(override))
    merged: dict[str, Any] = {key: {} for key, kind in _PRICE_KEYS.items() if kind is not str}
    for table in tables:
        for key, value in table.items():
            if isinstance(value, dict):
                merged[key].update(value)
            else:
                merged[key] = value
    return PriceTable(**merged)


_PRICE_KEYS = {
    "source": str,
    "date": str,
    "training": float,
    "example_token_limit": int,
    "chat_input": float,
    "chat_output": float,
    "batch_input": float,
    "batch_output": float,
}


def _read_prices(path: Path) -> dict[str, Any]:
    def fail(problem: str) -> DatasetError:
        return DatasetError(
            f"{path}: {problem}", fix=Fix("fix the file given with {}", ("prices",)), path=path
        )

    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise fail("no such prices file") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise fail(f"cannot read it as JSON ({e})") from e
    else:
        data = read_toml(path, what="prices file", error=DatasetError)
    if not isinstance(data, dict):
        raise fail("not a table of prices")
    for key, value in data.items():
        kind = _PRICE_KEYS.get(key)
        if kind is None:
            raise fail(f"unknown key {key!r} (known: {', '.join(_PRICE_KEYS)})")
        if kind is str:
            if not isinstance(value, str):
                raise fail(f"{key}: not a string")
            continue
        if not isinstance(value, dict):
            raise fail(f"{key}: not a table of models")
        for model, figure in value.items():
            number = isinstance(figure, (int, float)) and not isinstance(figure, bool)
            if not number or figure < 0 or (kind is int and not isinstance(figure, int)):
                wanted = "a whole number" if kind is int else "a number"
                raise fail(f"{key}.{model}: {figure!r} is not {wanted} of 0 or more")
    return data


_SNAPSHOT = re.compile(r"\d[\d-]*")
T = TypeVar("T")


def model_entry(table: Mapping[str, T], model: str) -> T | None:
    """``model``'s entry in ``table``: its own, else that of the name it is a dated
    snapshot of (``gpt-3.5-turbo-0125`` → ``gpt-3.5-turbo``), else that of its one dated
    snapshot in the table (``gpt-4o`` → ``gpt-4o-2024-08-06``); a fine-tuned model
    (``ft:BASE:...``) counts as its base. None when there is none, or several."""
    if model.startswith("ft:"):
        model = model[3:].split(":", 1)[0]
    if model in table:
        return table[model]
    found = [v for k, v in table.items() if _snapshot_of(model, k) or _snapshot_of(k, model)]
    return found[0] if len(found) == 1 else None


def _snapshot_of(name: str, base: str) -> bool:
    return name.startswith(base + "-") and _SNAPSHOT.fullmatch(name[len(base) + 1 :]) is not None


def default_epochs(examples: int) -> int:
    """The epochs OpenAI trains for when none are asked (OpenAI cookbook, "Data
    preparation and analysis for chat model fine-tuning"): 3, but more for small files
    (enough passes for 100 examples, at most 25) and fewer for large ones (25,000, at
    least 1)."""
    if examples <= 0:
        return 3
    if examples * 3 < 100:
        return min(25, 100 // examples)
    if examples * 3 > 25_000:
        return max(1, 25_000 // examples)
    return 3


def estimate_cost(
    tokens: int, base_model: str, epochs: int, prices: Mapping[str, float]
) -> float | None:
    """USD to train ``base_model`` for ``epochs`` on a file of ``tokens`` tokens, from
    ``prices`` (USD per 1M training tokens by model, e.g. ``load_prices().training``;
    see :func:`model_entry`); None when the table has no price for the model."""
    price = model_entry(prices, base_model)
    return None if price is None else tokens * epochs * price / 1_000_000

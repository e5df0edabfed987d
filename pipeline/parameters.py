"""The parameters of the stages, and the command-line options that set them.

Each stage's parameters are a frozen dataclass. Its ``asdict`` is recorded in the run
manifest and hashed into the stage's inputs, so the fields' names, order and defaults are
part of the run format. A field that a command-line option sets declares that option in
its metadata (:func:`option`): the CLI builds its click options from these declarations
(:func:`pipeline.options.stage_options`) and a batch's tasks file accepts the same options
by name (:mod:`pipeline.batch`), so each default, range and help text is written once,
here. An option declared on fields of several classes (``--temperature``, ``--seed``) is
one option that sets all of them.

Imported when the CLI starts, so it imports only the standard library and
:mod:`pipeline.choices`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

from .choices import DEFAULT_DONE_TOKEN, FLOORS, TOOL_CALL_CHOICES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# The endpoints' HTTP defaults, used by pipeline.client and shown by the CLI's options.
DEFAULT_TIMEOUT_S = 600.0  # seconds to wait for each HTTP request
DEFAULT_MAX_RETRIES = 2  # the SDK's retries on 408/409/429/5xx and connection errors

T = TypeVar("T")

DONE_TOKEN_PATTERN = r"<[A-Z][A-Z0-9_]{1,30}>"


def check_done_token(value: str) -> str:
    """``value`` if it is a done token (:data:`DONE_TOKEN_PATTERN`: capitals, digits and
    ``_`` in angle brackets, e.g. ``<TASK_DONE>``).

    Raises:
        ValueError: it is not; the message says what one looks like.
    """
    if not re.fullmatch(DONE_TOKEN_PATTERN, value):
        raise ValueError(
            f"{value!r} is not a done token: use capitals, digits and _ in angle brackets, "
            "e.g. <TASK_DONE>"
        )
    return value


# The checks an option can name (Option.check): each takes a value of the option's type and
# returns it, or raises ValueError with a message that ends up after the option's name.
CHECKS: dict[str, Callable[[Any], Any]] = {"done_token": check_done_token}


# Option and StageOption are named tuples, not dataclasses: each frozen dataclass made at
# import costs about a millisecond of every command's start-up.


class Option(NamedTuple):
    """A command-line option that sets a parameters field: the field's ``metadata["option"]``,
    made by :func:`option`.

    Attributes:
        flag: ``--name``, or ``--name/--no-name`` for a boolean switch.
        help: the help text.
        range: ``(min, max)`` of a number, both included; either may be None for no bound.
        choices: the values allowed (a tuple of :mod:`pipeline.choices`).
        check: the name of the function of :data:`CHECKS` that validates the value.
        metavar: the value's name in ``--help`` [default: click's, from the type].
        show_default: whether ``--help`` shows the default.
    """

    flag: str
    help: str
    range: tuple[float | None, float | None] | None = None
    choices: tuple[str, ...] | None = None
    check: str | None = None
    metavar: str | None = None
    show_default: bool = True

    @property
    def name(self) -> str:
        """The option's name, a Python identifier: the parameter click passes, and the key
        of a tasks file (``--director-max-tokens`` gives ``director_max_tokens``,
        ``--loop-detection/--no-loop-detection`` gives ``loop_detection``)."""
        return self.flag.partition("/")[0].removeprefix("--").replace("-", "_")

    @property
    def switch(self) -> bool:
        """Whether the option is a ``--name/--no-name`` boolean switch."""
        return "/" in self.flag


def option(
    default: T,
    flag: str,
    *,
    help: str,
    range: tuple[float | None, float | None] | None = None,
    choices: tuple[str, ...] | None = None,
    check: str | None = None,
    metavar: str | None = None,
    show_default: bool = True,
) -> T:
    """A dataclass field with ``default`` that the command-line option ``flag`` sets; the
    other arguments are those of :class:`Option`.

    Raises:
        ValueError: ``flag`` is neither ``--name`` nor ``--name/--no-name``, or ``check``
            is not in :data:`CHECKS`.
    """
    on, _, off = flag.partition("/")
    if not re.fullmatch(r"--[a-z][a-z0-9-]*", on) or (off and off != "--no-" + on[2:]):
        raise ValueError(f"{flag!r} is not an option flag: --name or --name/--no-name")
    if check is not None and check not in CHECKS:
        raise ValueError(f"{flag}: no check is called {check!r}")
    declared = Option(flag, help, range, choices, check, metavar, show_default)
    return dataclasses.field(default=default, metadata={"option": declared})


# The options both the director and the dialogue have: one option sets both fields.
def _temperature() -> float:
    return option(0.7, "--temperature", help="Sampling temperature.", range=(0, 2))


def _seed() -> int | None:
    return option(
        None,
        "--seed",
        help="Sampling seed, sent to servers that accept one. Best effort: to reproduce a "
        "run exactly, use pipeline replay.",
    )


@dataclass(frozen=True)
class DirectorParameters:
    """Parameters of the director call.

    Attributes:
        max_tokens: the most tokens the answer may use.
        temperature: sampling temperature (0 to 2).
        repair_attempts: how many times an unusable answer is sent back to be corrected.
        roles: how many roles the director writes (2 to 8).
        done_token: the token that declares the task done.
        seed: sent to endpoints that accept one (best effort); None to send none.
    """

    # The order of the options in --help (the fields' own order is the manifest's).
    HELP_ORDER: ClassVar[tuple[str, ...]] = (
        "roles", "done_token", "max_tokens", "repair_attempts", "temperature", "seed",
    )  # fmt: skip

    max_tokens: int = option(
        2048,
        "--director-max-tokens",
        help="Most tokens for the director's answer.",
        range=(1, None),
    )
    temperature: float = _temperature()
    repair_attempts: int = option(
        2,
        "--repair-attempts",
        help="Times an unusable director answer is sent back to be corrected.",
        range=(0, 10),
    )
    roles: int = option(
        2,
        "--roles",
        help="How many roles the director writes (more than two: an AI meeting).",
        range=(2, 8),
    )
    done_token: str = option(
        DEFAULT_DONE_TOKEN,
        "--done-token",
        help="The token with which the declaring role ends the conversation.",
        check="done_token",
    )
    seed: int | None = _seed()


@dataclass(frozen=True)
class Persona:
    """A role that stays the same across runs (``[personas.NAME]`` in ``pipeline.toml``):
    the director must cast it under this name, and its system prompt is kept as written.

    Attributes:
        name: the role's name in every run that casts it; memory, curation, the cycle and
            ``[assign] roles`` key on it.
        system_prompt: its system prompt, word for word.
    """

    name: str
    system_prompt: str


@dataclass(frozen=True)
class DialogueParameters:
    """Parameters of the dialogue stage.

    Attributes:
        turns: the most turns, the opening line included (at least 1).
        max_tokens: the most tokens one generated turn may use.
        temperature: sampling temperature (0 to 2).
        closing_turns: turns the next speaker gets after the done token (0 or more).
        max_tokens_total: stop once the dialogue has used this many tokens (prompt and
            completion as the API reports them; without usage, streamed chunks count as
            completion tokens); None for no budget.
        detect_loops: stop when the roles only trade pleasantries or repeat themselves.
        floor: ``round-robin``, or ``moderator`` (a model picks each next speaker).
        seed: sent to endpoints that accept one (best effort); None to send none.
    """

    turns: int = option(
        10,
        "--turns",
        help="Most turns in the dialogue, the opening line included.",
        range=(1, 1000),
    )
    max_tokens: int = option(
        512, "--max-tokens", help="Most tokens per dialogue turn.", range=(1, None)
    )
    temperature: float = _temperature()
    closing_turns: int = option(
        1,
        "--closing-turns",
        help="Turns the next speaker gets after the done token.",
        range=(0, 8),
    )
    max_tokens_total: int | None = option(
        None,
        "--max-tokens-total",
        help="Stop the dialogue once it has used this many tokens.",
        range=(1, None),
    )
    detect_loops: bool = option(
        True,
        "--loop-detection/--no-loop-detection",
        help="Stop when the roles only trade pleasantries or repeat themselves.",
    )
    floor: str = option(
        "round-robin",
        "--floor",
        help="Who speaks next with three or more roles: in turn, or as a moderator model picks.",
        choices=FLOORS,
    )
    seed: int | None = _seed()


@dataclass(frozen=True)
class JudgeParameters:
    """Parameters of the judge call.

    Attributes:
        max_tokens: the most tokens the verdict may use.
        temperature: sampling temperature (0 to 2).
        repair_attempts: times an unusable verdict is sent back to be corrected.
        seed: sent to endpoints that accept one; None to send none.
    """

    max_tokens: int = 2048
    temperature: float = 0.0
    repair_attempts: int = 2
    seed: int | None = None


@dataclass(frozen=True)
class ToolParameters:
    """How roles call tools (see :mod:`pipeline.tools`).

    Attributes:
        tool_calls: the tool-call dialect: ``tools`` (OpenAI tool calls), ``prompt`` (a text
            protocol), or ``auto`` (known per server, else ``tools``, falling back to
            ``prompt`` when the server refuses them).
        max_rounds: the most rounds of tool calls in one turn; after them, the model is
            asked for its turn without tools.
        delegate: every role gets the ``delegate`` tool, which hands a sub-task to a
            child run (:mod:`pipeline.delegate`).
        max_depth: how deep runs may nest: a run at this depth (the root is 0) may not
            delegate.
        max_children: the most child runs one run may start.
    """

    tool_calls: str = option(
        "auto",
        "--tool-calls",
        help="How roles call tools: OpenAI tool calls, a text protocol in the prompt, or "
        "auto (known per server, else tool calls, falling back to the prompt).",
        choices=TOOL_CALL_CHOICES,
    )
    max_rounds: int = option(
        4,
        "--max-tool-rounds",
        help="Most rounds of tool calls in one turn.",
        range=(1, 32),
    )
    delegate: bool = option(
        False,
        "--delegate/--no-delegate",
        help="Give every role a delegate tool that hands a sub-task to a child run.",
    )
    max_depth: int = option(
        2, "--max-depth", help="How deep delegated runs may nest.", range=(0, 10)
    )
    max_children: int = option(
        4, "--max-children", help="Most child runs one run may start.", range=(0, 100)
    )


# The classes whose fields have command-line options, in the order of their options in
# --help; an option declared on several of them comes after all the others.
STAGE_PARAMETERS: tuple[type, ...] = (DirectorParameters, DialogueParameters, ToolParameters)

_KINDS = {int: "integer", float: "number", bool: "boolean", str: "string"}


class StageOption(NamedTuple):
    """One command-line option of the stages, as :func:`options_of` gathers it.

    Attributes:
        option: its declaration.
        default: the fields' default.
        kind: the type of its value: int, float, bool or str.
        optional: whether None is a value (the fields are ``X | None``).
        fields: ``(parameters class, field name)`` of every field it sets.
    """

    option: Option
    default: Any
    kind: type
    optional: bool
    fields: tuple[tuple[type, str], ...]

    @property
    def name(self) -> str:
        """See :attr:`Option.name`."""
        return self.option.name

    def validate(self, value: Any) -> Any:
        """``value``, as read from JSON, checked as the command line checks the option: its
        type (null only for an optional option; an integer is a number too, and becomes a
        float), its range, its choices and its check.

        Raises:
            ValueError: the value is not allowed; the message says why, e.g.
                ``0 is not in the range 1<=x<=1000``.
        """
        if value is None and self.optional:
            return None
        kinds = (int, float) if self.kind is float else (self.kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and self.kind is not bool):
            raise ValueError(f"{shown(value)} is not a valid {_KINDS[self.kind]}")
        value = self.kind(value)  # an int given for a float option becomes a float
        declared = self.option
        if declared.range is not None:
            low, high = declared.range
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"{shown(value)} is not in the range {_describe(low, high)}")
        if declared.choices is not None and value not in declared.choices:
            allowed = ", ".join(map(repr, declared.choices))
            raise ValueError(f"{shown(value)} is not one of {allowed}")
        if declared.check is not None:
            value = CHECKS[declared.check](value)
        return value


def shown(value: Any) -> str:
    """``value`` (read from JSON) as a message shows it: a string quoted as click quotes it
    (``'moderator'``), anything else as JSON (``true``, ``null``, ``2.5``)."""
    import json  # not at start-up: only a bad value in a tasks file needs it

    return repr(value) if isinstance(value, str) else json.dumps(value)


def _describe(low: float | None, high: float | None) -> str:
    """A range as click describes it: ``1<=x<=1000``, ``x>=1``, ``x<=2``."""
    if low is None:
        return f"x<={high}"
    return f"x>={low}" if high is None else f"{low}<=x<={high}"


# What options_of found, by its arguments, and _declared, by class: the CLI asks once per
# command, and typing.get_type_hints is slow enough to show in the start-up time.
_OPTIONS: dict[tuple[type, ...], tuple[StageOption, ...]] = {}
_DECLARED: dict[type, list[tuple[str, Option, Any, type, bool]]] = {}


def _declared(cls: type) -> list[tuple[str, Option, Any, type, bool]]:
    """``cls``'s option fields in its HELP_ORDER (else the fields' order): name, option,
    default, value type, optional."""
    if cls in _DECLARED:
        return _DECLARED[cls]
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        declared = f.metadata.get("option")
        if declared is None:
            continue
        kind, optional = hints[f.name], False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(kind) if a is not type(None)]
            kind, optional = rest[0], len(rest) < len(typing.get_args(kind))
        if kind not in _KINDS or (declared.switch and kind is not bool):
            raise ValueError(f"{cls.__name__}.{f.name}: {kind} is not an option's type")
        found[f.name] = (f.name, declared, f.default, kind, optional)
    order = getattr(cls, "HELP_ORDER", tuple(found))
    if sorted(order) != sorted(found):
        raise ValueError(f"{cls.__name__}.HELP_ORDER does not list its options: {order}")
    _DECLARED[cls] = [found[name] for name in order]
    return _DECLARED[cls]


def options_of(*classes: type) -> tuple[StageOption, ...]:
    """The command-line options that set fields of ``classes`` (parameters dataclasses), in
    their ``--help`` order: each class's own options, then those declared on several of
    :data:`STAGE_PARAMETERS` (even when only one of them is among ``classes``: converse
    shows --temperature last as generate does). An option declared on several of
    ``classes`` is one :class:`StageOption` that sets every such field.

    Raises:
        ValueError: an option is declared differently (help, range, default...) on two
            fields, two options have one name (``--x`` and ``--x/--no-x``), or a field's
            declaration is unusable (see :class:`Option`).
    """
    if classes in _OPTIONS:
        return _OPTIONS[classes]
    flags = [declared.flag for cls in STAGE_PARAMETERS for _, declared, *_ in _declared(cls)]
    shared = {flag for flag in flags if flags.count(flag) > 1}
    gathered: dict[str, StageOption] = {}
    for cls in classes:
        for name, declared, default, kind, optional in _declared(cls):
            here = StageOption(declared, default, kind, optional, ((cls, name),))
            before = gathered.get(declared.flag)
            if before is None:
                gathered[declared.flag] = here
            elif before._replace(fields=()) != here._replace(fields=()):
                first = ".".join((before.fields[0][0].__name__, before.fields[0][1]))
                raise ValueError(
                    f"{declared.flag} is declared differently on {first} and {cls.__name__}.{name}"
                )
            else:
                gathered[declared.flag] = before._replace(fields=(*before.fields, (cls, name)))
    names = [spec.name for spec in gathered.values()]
    if len(set(names)) < len(names):
        raise ValueError(f"two options of {', '.join(c.__name__ for c in classes)} share a name")
    ordered = sorted(gathered.values(), key=lambda spec: spec.option.flag in shared)
    _OPTIONS[classes] = tuple(ordered)
    return _OPTIONS[classes]


P = TypeVar("P", bound="DataclassInstance")


def apply_options(params: P, values: Mapping[str, Any]) -> P:
    """``params`` with the fields set by the options in ``values`` replaced.

    ``values`` maps option names (:attr:`Option.name`, e.g. ``director_max_tokens``) to
    values already checked (by click, or :meth:`StageOption.validate`); names of options
    that set no field of ``params``, and other keys, are left out.
    """
    changes = {
        field: values[spec.name]
        for spec in options_of(type(params))
        if spec.name in values
        for _, field in spec.fields
    }
    return dataclasses.replace(params, **changes)

"""The command-line options shared by several commands, and what they turn into.

Kept apart from :mod:`pipeline.cli` so the commands read in one sitting. Options are
bundled: the endpoint options reach a command as one :class:`EndpointFlags`, the stage
options as :class:`~pipeline.director.DirectorParameters` and
:class:`~pipeline.dialogue.DialogueParameters`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .choices import FLOORS, STRUCTURED_OUTPUT_CHOICES

if TYPE_CHECKING:
    from pathlib import Path

    from .local import LocalServer
    from .models import Models
    from .runs import Run


class PathType(click.Path):
    """click.Path giving a pathlib.Path, with pathlib imported only when one is given."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from pathlib import Path

        return Path(os.fsdecode(super().convert(value, param, ctx)))


def with_options(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """A decorator applying click ``options`` in the order listed (first shown first)."""

    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


RUNS_DIR_KEY = "pipeline.runs_dir"


def flag(option: str) -> str:
    """The command-line flag of a setting named in a :class:`pipeline.errors.Fix`
    (``director_max_tokens`` → ``--director-max-tokens``)."""
    return "--" + option.replace("_", "-")


def _remember_runs_dir(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    ctx.meta[RUNS_DIR_KEY] = value  # for the command lines in error messages
    return value


def runs_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--runs-dir",
        type=PathType(file_okay=False),
        default="runs",
        envvar="PIPELINE_RUNS_DIR",
        show_default=True,
        show_envvar=True,
        callback=_remember_runs_dir,
        help="Folder that holds the run folders.",
    )(f)


class EndpointFlags:
    """The endpoint options of one command, and how to turn them into model clients."""

    NAMES = (
        "base_url",
        "model",
        "api_key_env",
        "structured_output",
        "timeout",
        "max_retries",
        "config",
        "model_file",
    )

    def __init__(self, **values: Any) -> None:
        self.base_url: str | None = values["base_url"]
        self.model: str | None = values["model"]
        self.api_key_env: str | None = values["api_key_env"]
        self.structured_output: str = values["structured_output"]
        self.timeout: float = values["timeout"]
        self.max_retries: int = values["max_retries"]
        self.config: Path | None = values["config"]
        self.model_file: Path | None = values["model_file"]

    def models(self, run: Run | None = None, *, min_retries: int = 0, sessions: int = 1) -> Models:
        """The director's, the moderator's, the judge's and the roles' clients for these
        flags and, for an existing ``run``, its recorded endpoints. What each is assigned
        is decided by :class:`pipeline.endpoints.Resolver` (the order is documented there);
        the embedded model is sized for ``sessions`` dialogues at once, and an existing run
        continues only on the GGUF file it was made with."""
        from .endpoints import Resolver
        from .models import Models, recorded_models

        resolver = Resolver.for_command(
            base_url=self.base_url,
            model=self.model,
            api_key_env=self.api_key_env,
            structured_output=self.structured_output,
            config_path=self.config,
            recorded=run.stage("director").endpoint if run else None,
        )
        return Models(
            resolver=resolver,
            timeout=self.timeout,
            max_retries=max(self.max_retries, min_retries),
            on_server_start=announce_server,
            sessions=sessions,
            model_file=self.model_file,
            recorded_models=recorded_models(run.manifest) if run else None,
            notify=lambda message: click.echo(message, err=True),
        )


_ENDPOINT_OPTIONS = [
    click.option(
        "--base-url",
        metavar="URL",
        help="OpenAI-compatible API root, e.g. http://localhost:11434/v1 "
        "[default: $OPENAI_BASE_URL, else OpenAI if $OPENAI_API_KEY is set, "
        "else the embedded model]",
    ),
    click.option(
        "--model", envvar="PIPELINE_MODEL", show_envvar=True, help="Model name to ask for."
    ),
    click.option(
        "--api-key-env",
        metavar="NAME",
        help="Environment variable holding the API key [default: OPENAI_API_KEY].",
    ),
    click.option(
        "--structured-output",
        type=click.Choice(STRUCTURED_OUTPUT_CHOICES),
        default="auto",
        show_default=True,
        help="How to ask for JSON: the json_schema response format, json_object with a "
        "schema, the schema in the prompt, or auto (known per server, else try each).",
    ),
    click.option(
        "--config",
        type=PathType(dir_okay=False),
        help="Config file with named endpoints and their assignments [default: ./pipeline.toml "
        "if present]. Flags override it.",
    ),
    click.option(
        "--model-file",
        type=PathType(dir_okay=False),
        help="GGUF file for the embedded model [default: SmolLM2-135M-Instruct, "
        "downloaded on first use]. See pipeline models.",
    ),
    click.option(
        "--timeout",
        type=click.FloatRange(min=0.1),
        default=600.0,
        show_default=True,
        help="Seconds to wait for each HTTP request.",
    ),
    click.option(
        "--max-retries",
        type=click.IntRange(min=0),
        default=2,
        show_default=True,
        help="Retries on 408/409/429/5xx and connection errors (the SDK's policy).",
    ),
]


def endpoint_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the endpoint options; the command receives them as one ``flags`` argument."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flags = EndpointFlags(**{name: kwargs.pop(name) for name in EndpointFlags.NAMES})
        return f(*args, flags=flags, **kwargs)

    return with_options(_ENDPOINT_OPTIONS)(wrapper)


_DIRECTOR_OPTIONS = [
    click.option(
        "--roles",
        "n_roles",
        type=click.IntRange(2, 8),
        default=2,
        show_default=True,
        help="How many roles the director writes (more than two: an AI meeting).",
    ),
    click.option(
        "--done-token",
        default="<TASK_DONE>",
        show_default=True,
        callback=lambda ctx, param, value: _done_token(value),
        help="The token with which the declaring role ends the conversation.",
    ),
    click.option(
        "--director-max-tokens",
        type=click.IntRange(min=1),
        default=2048,
        show_default=True,
        help="Most tokens for the director's answer.",
    ),
    click.option(
        "--repair-attempts",
        type=click.IntRange(0, 10),
        default=2,
        show_default=True,
        help="Times an unusable director answer is sent back to be corrected.",
    ),
]

_DIALOGUE_OPTIONS = [
    click.option(
        "--turns",
        type=click.IntRange(1, 1000),
        default=10,
        show_default=True,
        help="Most turns in the dialogue, the opening line included.",
    ),
    click.option(
        "--max-tokens",
        type=click.IntRange(min=1),
        default=512,
        show_default=True,
        help="Most tokens per dialogue turn.",
    ),
    click.option(
        "--closing-turns",
        type=click.IntRange(0, 8),
        default=1,
        show_default=True,
        help="Turns the next speaker gets after the done token.",
    ),
    click.option(
        "--max-tokens-total",
        type=click.IntRange(min=1),
        help="Stop the dialogue once it has used this many tokens.",
    ),
    click.option(
        "--loop-detection/--no-loop-detection",
        default=True,
        show_default=True,
        help="Stop when the roles only trade pleasantries or repeat themselves.",
    ),
    click.option(
        "--floor",
        type=click.Choice(FLOORS),
        default="round-robin",
        show_default=True,
        help="Who speaks next with three or more roles: in turn, or as a moderator model picks.",
    ),
]

_COMMON_OPTIONS = [
    click.option(
        "--temperature",
        type=click.FloatRange(0, 2),
        default=0.7,
        show_default=True,
        help="Sampling temperature.",
    ),
    click.option(
        "--seed",
        type=int,
        help="Sampling seed, sent to servers that accept one. Best effort: to reproduce a "
        "run exactly, use pipeline replay.",
    ),
]


def _done_token(value: str) -> str:
    if not re.fullmatch(r"<[A-Z][A-Z0-9_]{1,30}>", value):
        raise click.BadParameter(
            f"{value!r} is not a done token: use capitals, digits and _ in angle brackets, "
            "e.g. <TASK_DONE>"
        )
    return value


def stage_options(*, director: bool, dialogue: bool) -> Callable[[Any], Any]:
    """Add the options of the director and/or dialogue stages; the command receives them
    as ``director_params`` / ``dialogue_params``."""
    options = (
        (_DIRECTOR_OPTIONS if director else [])
        + (_DIALOGUE_OPTIONS if dialogue else [])
        + _COMMON_OPTIONS
    )

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from .dialogue import DialogueParameters
            from .director import DirectorParameters

            temperature, seed = kwargs.pop("temperature"), kwargs.pop("seed")
            if director:
                kwargs["director_params"] = DirectorParameters(
                    max_tokens=kwargs.pop("director_max_tokens"),
                    temperature=temperature,
                    repair_attempts=kwargs.pop("repair_attempts"),
                    roles=kwargs.pop("n_roles"),
                    done_token=kwargs.pop("done_token"),
                    seed=seed,
                )
            if dialogue:
                kwargs["dialogue_params"] = DialogueParameters(
                    turns=kwargs.pop("turns"),
                    max_tokens=kwargs.pop("max_tokens"),
                    temperature=temperature,
                    closing_turns=kwargs.pop("closing_turns"),
                    max_tokens_total=kwargs.pop("max_tokens_total"),
                    detect_loops=kwargs.pop("loop_detection"),
                    floor=kwargs.pop("floor"),
                    seed=seed,
                )
            return f(*args, **kwargs)

        return with_options(options)(wrapper)

    return decorate


def announce_server(server: LocalServer) -> None:
    """Say on stderr that the embedded server started, and where."""
    click.echo(f"embedded model server started at {server.base_url} (pid {server.pid})", err=True)

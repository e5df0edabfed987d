"""The command-line options shared by several commands, and what they turn into.

Kept apart from :mod:`pipeline.cli` so the commands read in one sitting. Options are
bundled: the endpoint options reach a command as one :class:`EndpointFlags`, the stage
options as :class:`~pipeline.parameters.DirectorParameters` and
:class:`~pipeline.parameters.DialogueParameters`, whose fields declare them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import click

from .choices import STRUCTURED_OUTPUT_CHOICES
from .parameters import (
    CHECKS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT_S,
    DialogueParameters,
    DirectorParameters,
    StageOption,
    ToolParameters,
    apply_options,
    options_of,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .endpoints import Resolver
    from .local import LocalServer
    from .models import Models
    from .runs import Run


class StageChoice(click.Choice[str]):
    """A stage name (:data:`pipeline.stages.STAGE_NAMES`), the graph read when a command
    first needs it, not when ``pipeline`` starts."""

    def __init__(self) -> None:
        self.case_sensitive = True

    @property  # click sets it in __init__; here it is read when first needed
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        from .stages import STAGE_NAMES

        return STAGE_NAMES


class PathType(click.Path):
    """click.Path giving a pathlib.Path, with pathlib imported only when one is given."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from pathlib import Path

        return Path(os.fsdecode(super().convert(value, param, ctx)))


Command = Callable[..., Any]


def with_options(options: Sequence[Callable[[Command], Command]]) -> Callable[[Command], Command]:
    """A decorator applying click ``options`` in the order listed (first shown first)."""

    def apply(f: Command) -> Command:
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

    def resolver(self, *, model_required: bool = True) -> Resolver:
        """The :class:`pipeline.endpoints.Resolver` of these flags (the config file they
        name, or ``./pipeline.toml``), for a command that needs no model client, such as
        ``finetune``, which sends no model name (``model_required=False``).

        Raises:
            ConfigError: as :meth:`pipeline.endpoints.Resolver.for_command`.
        """
        from .endpoints import Resolver

        return Resolver.for_command(
            base_url=self.base_url,
            model=self.model,
            api_key_env=self.api_key_env,
            structured_output=self.structured_output,
            config_path=self.config,
            model_required=model_required,
        )

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
        default=DEFAULT_TIMEOUT_S,
        show_default=True,
        help="Seconds to wait for each HTTP request.",
    ),
    click.option(
        "--max-retries",
        type=click.IntRange(min=0),
        default=DEFAULT_MAX_RETRIES,
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


def stage_option(spec: StageOption) -> Callable[[Any], Any]:
    """The click option for ``spec``: its type from the fields' type and the declared range
    or choices, its default the fields' default, its callback the declared check (whose
    ValueError becomes click's BadParameter)."""
    declared = spec.option
    kind: Any = spec.kind
    if declared.choices is not None:
        kind = click.Choice(declared.choices)
    elif declared.range is not None:
        number_range: Any = click.FloatRange if spec.kind is float else click.IntRange
        kind = number_range(*declared.range)
    extra: dict[str, Any] = {}
    if not declared.switch:
        extra["type"] = kind
    if declared.metavar is not None:
        extra["metavar"] = declared.metavar
    if declared.check is not None:
        extra["callback"] = functools.partial(_checked, CHECKS[declared.check])
    return click.option(
        declared.flag,
        spec.name,
        default=spec.default,
        show_default=declared.show_default,
        help=declared.help,
        **extra,
    )


def _checked(
    check: Callable[[Any], Any], ctx: click.Context, param: click.Parameter, value: Any
) -> Any:
    if value is None:
        return None
    try:
        return check(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx, param) from e


def stage_options(*, director: bool, dialogue: bool, tools: bool = False) -> Callable[[Any], Any]:
    """Add the options of the director and/or dialogue stages and of tool use, as their
    parameters' fields declare them (:func:`pipeline.parameters.options_of`: --temperature
    and --seed, which both stages have, are one option setting both); the command
    receives the parameters as ``director_params`` / ``dialogue_params`` / ``tool_params``."""
    stages: list[tuple[str, type[Any]]] = []
    if director:
        stages.append(("director_params", DirectorParameters))
    if dialogue:
        stages.append(("dialogue_params", DialogueParameters))
    if tools:
        stages.append(("tool_params", ToolParameters))
    specs = options_of(*(cls for _, cls in stages))

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {spec.name: kwargs.pop(spec.name) for spec in specs}
            for arg, cls in stages:
                kwargs[arg] = apply_options(cls(), values)
            return f(*args, **kwargs)

        return with_options([stage_option(spec) for spec in specs])(wrapper)

    return decorate


def announce_server(server: LocalServer) -> None:
    """Say on stderr that the embedded server started, and where."""
    click.echo(f"embedded model server started at {server.base_url} (pid {server.pid})", err=True)

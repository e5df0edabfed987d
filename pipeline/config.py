"""The config file, ``pipeline.toml``: reading and checking it.

It names endpoints and assigns them to the director, the moderator, the judge, the
roles and fine-tuning, and names the MCP servers whose tools the roles may call
(``schemas/config.schema.json``; :mod:`pipeline.mcptools` reads the ``[mcp]`` table).
Where those assignments stand among the flags, the environment and the rest is decided in
one place, :mod:`pipeline.endpoints`, which also defines :class:`Endpoint` and
:class:`EmbeddedModel` (still importable from here).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .endpoints import (
    DEFAULT_KEY_ENV,
    OPENAI_BASE_URL,
    EmbeddedModel,
    Endpoint,
    resolve_endpoint,
)
from .errors import ConfigError, Fix, PipelineError
from .parameters import Persona

if TYPE_CHECKING:
    from .mcptools import McpConfig

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_KEY_ENV",
    "OPENAI_BASE_URL",
    "Config",
    "EmbeddedModel",
    "Endpoint",
    "load_config",
    "resolve_endpoint",
]

CONFIG_FILE = "pipeline.toml"


@dataclass(frozen=True)
class Config:
    """A parsed config file.

    Attributes:
        path: where it was read from.
        endpoints: the named endpoints, :class:`EmbeddedModel` for the embedded engine.
        assign: ``default``, ``director``, ``moderator``, ``judge``, ``finetune`` (endpoint
            names) and ``roles`` (a list by position, or a table by role name or 1-based
            position).
        mcp: the MCP servers and the tools each role may call
            (:class:`pipeline.mcptools.McpConfig`), or None.
        personas: the personas by name (``[personas.NAME]``).
    """

    path: Path
    endpoints: dict[str, Endpoint | EmbeddedModel]
    assign: dict[str, Any]
    mcp: McpConfig | None = None
    personas: dict[str, Persona] = field(default_factory=dict)

    def persona(self, name: str) -> Persona:
        """The persona ``name``.

        Raises:
            ConfigError: the config defines no such persona.
        """
        if name not in self.personas:
            raise ConfigError(
                f"{self.path}: no persona named {name!r} "
                f"(defined: {', '.join(self.personas) or 'none'})",
                fix=Fix("define it under [personas.NAME] with a system_prompt"),
                path=self.path,
            )
        return self.personas[name]

    def name_for(self, stage: str) -> str | None:
        """The endpoint name assigned to ``director`` or ``moderator`` (or the default)."""
        return self.assign.get(stage) or self.assign.get("default")

    def name_for_role(self, index: int, name: str) -> str | None:
        """The endpoint name assigned to role ``index`` (0-based) called ``name``."""
        roles = self.assign.get("roles")
        if isinstance(roles, list) and index < len(roles):
            return str(roles[index])
        if isinstance(roles, dict):
            chosen = roles.get(name) or roles.get(str(index + 1))
            if chosen:
                return str(chosen)
        return self.assign.get("default")

    def unknown_roles(self, names: list[str]) -> list[str]:
        """Role names in ``assign.roles`` that are not among ``names`` (nor positions)."""
        roles = self.assign.get("roles")
        if not isinstance(roles, dict):
            return []
        positions = {str(i + 1) for i in range(len(names))}
        return [key for key in roles if key not in names and key not in positions]


def read_toml(
    path: Path, *, what: str = "config file", error: type[PipelineError] = ConfigError
) -> dict[str, Any]:
    """The TOML file at ``path``, parsed (``what`` names the kind of file in messages).

    Raises:
        error: the file is missing, cannot be read, or is not TOML; the message names it.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise error(f"{path}: no such {what}", path=path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read it ({e})", path=path) from e
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML ({e})", path=path) from e
    return data


def persona_of(config: Config | None, name: str | None) -> Persona | None:
    """The persona ``name`` of ``config`` (None for no name).

    Raises:
        ConfigError: there is no config, or it defines no such persona.
    """
    if name is None:
        return None
    if config is None:
        raise ConfigError(
            f"no pipeline.toml to read the persona {name!r} from",
            fix=Fix("define it there under [personas.NAME], or pass {}", ("config",)),
        )
    return config.persona(name)


def load_config(path: Path | None, *, cwd: Path | None = None) -> Config | None:
    """Read ``path``, or ``pipeline.toml`` in ``cwd`` (default: the working directory)
    when no path is given; None when there is no file to read.

    Raises:
        ConfigError: the file named is missing, is not TOML, has an unknown key or a wrong
            value, or assigns an endpoint it does not define; the message names the file
            and the key.
    """
    if path is None:
        path = (cwd or Path.cwd()) / CONFIG_FILE
        if not path.is_file():
            return None
    data = read_toml(path)
    _check_shape(path, data)
    endpoints: dict[str, Endpoint | EmbeddedModel] = {}
    for name, spec in data.get("endpoints", {}).items():
        if spec.get("embedded"):
            gguf = spec.get("gguf")
            # a relative path is relative to the config file, as in most tools' configs
            endpoints[name] = EmbeddedModel(path.parent / Path(gguf).expanduser() if gguf else None)
            continue
        if "gguf" in spec:
            raise ConfigError(
                f"{path}: endpoints.{name}.gguf: only an embedded endpoint serves a GGUF file "
                "(add embedded = true, or remove gguf)",
                path=path,
            )
        missing = [k for k in ("base_url", "model") if k not in spec]
        if missing:
            raise ConfigError(
                f"{path}: endpoints.{name}: needs {' and '.join(missing)} (or embedded = true)",
                path=path,
            )
        # an endpoint table has the keys of an endpoint's description
        endpoints[name] = Endpoint.from_description(
            {**spec, "base_url": spec["base_url"].rstrip("/")}
        )
    assign = dict(data.get("assign", {}))
    for key, value in _assignments(assign):
        if value not in endpoints:
            raise ConfigError(
                f"{path}: assign.{key}: no endpoint named {value!r} "
                f"(defined: {', '.join(endpoints) or 'none'})",
                path=path,
            )
    mcp = None
    if "mcp" in data:
        from .mcptools import McpConfig

        mcp = McpConfig.parse(path, data["mcp"])
    personas = {
        name: Persona(name, spec["system_prompt"])
        for name, spec in data.get("personas", {}).items()
    }
    return Config(path, endpoints, assign, mcp, personas)


def _assignments(assign: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = [(k, v) for k, v in assign.items() if k != "roles"]
    roles = assign.get("roles", [])
    if isinstance(roles, list):
        pairs += [(f"roles[{i}]", v) for i, v in enumerate(roles)]
    else:
        pairs += [(f"roles.{k}", v) for k, v in roles.items()]
    return pairs


def _check_shape(path: Path, data: Any) -> None:
    from jsonschema import Draft202012Validator

    from . import schemas

    validator = Draft202012Validator(schemas.load("config.schema.json"))
    unknown_first = lambda e: (e.validator != "additionalProperties", list(map(str, e.path)))  # noqa: E731
    for error in sorted(validator.iter_errors(data), key=unknown_first):
        where = ".".join(str(p) for p in error.path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            unknown = sorted(set(error.instance) - known)
            key = ".".join(filter(None, [where, unknown[0]]))
            raise ConfigError(
                f"{path}: {key}: unknown key (known here: {', '.join(sorted(known))})", path=path
            )
        raise ConfigError(f"{path}: {where or 'top level'}: {error.message}", path=path)

"""Which model endpoint a stage or a role talks to.

Resolution, highest first:

1. command-line flags: ``--base-url``, ``--model``, ``--api-key-env NAME`` (one endpoint
   for everything);
2. the config file (``pipeline.toml`` in the working directory, or ``--config PATH``):
   named endpoints assigned to the director, the moderator and each role
   (``schemas/config.schema.json``);
3. the environment variables the ``openai`` SDK reads: ``OPENAI_BASE_URL`` and
   ``OPENAI_API_KEY`` (a key alone means OpenAI's own API);
4. the embedded offline model (see :mod:`pipeline.local`).

API keys are read from the environment at call time and are never part of an
:class:`Endpoint`'s description, so they cannot reach ``runs/`` or logs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint and the model to ask there.

    Attributes:
        base_url: the API root, e.g. ``http://127.0.0.1:11434/v1``.
        model: the model name sent in each request.
        api_key_env: the environment variable holding the key, or None for servers
            that need none.
        structured_output: how structured answers are asked for: ``auto`` or a dialect of
            :mod:`pipeline.structured`.
        embedded: True for the embedded offline model.
        params: extra request parameters sent with every call (``top_p``, ``seed``...).
        server: what kind of server this is, when known: ``"llama.cpp"`` (the embedded
            engine, or a server that said so at ``/props``), which decides the schema form
            of structured output (:mod:`pipeline.structured`); None when unknown.
        gguf, gguf_sha256: for the embedded model, the GGUF file served and its sha256.
    """

    base_url: str
    model: str
    api_key_env: str | None = DEFAULT_KEY_ENV
    structured_output: str = "auto"
    embedded: bool = False
    params: dict[str, Any] = field(default_factory=dict, compare=False)
    server: str | None = None
    gguf: str | None = None
    gguf_sha256: str | None = None

    def api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The key to send: the value of ``api_key_env``, or a placeholder for servers that
        need no key (the SDK refuses an empty one)."""
        env = os.environ if environ is None else environ
        return (env.get(self.api_key_env) if self.api_key_env else None) or "no-key"

    def describe(self) -> dict[str, Any]:
        """The endpoint as recorded in a manifest: never the key itself."""
        return {
            "base_url": self.base_url,
            "model": self.model,
            "embedded": self.embedded,
            "structured_output": self.structured_output,
            "api_key_env": self.api_key_env,
            **({"params": self.params} if self.params else {}),
            **({"server": self.server} if self.server else {}),
            **({"gguf": self.gguf, "gguf_sha256": self.gguf_sha256} if self.gguf else {}),
        }

    @classmethod
    def from_description(cls, described: dict[str, Any]) -> Endpoint:
        """The endpoint a manifest recorded with :meth:`describe`."""
        return cls(
            base_url=described["base_url"],
            model=described["model"],
            api_key_env=described.get("api_key_env"),
            structured_output=described.get("structured_output", "auto"),
            embedded=described.get("embedded", False),
            params=dict(described.get("params", {})),
            server=described.get("server"),
            gguf=described.get("gguf"),
            gguf_sha256=described.get("gguf_sha256"),
        )


@dataclass(frozen=True)
class EmbeddedModel:
    """The embedded engine as a configured endpoint.

    Attributes:
        gguf: the GGUF file to serve; None for the command's model file (``--model-file``)
            or, failing that, the default model.
    """

    gguf: Path | None = None


def resolve_endpoint(
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key_env: str | None = None,
    structured_output: str = "auto",
    environ: Mapping[str, str] | None = None,
) -> Endpoint | None:
    """Resolve the endpoint from flags and environment; None means "use the embedded model".

    Args:
        base_url, model, api_key_env: the command-line flags (None when not given).
        structured_output: the ``--structured-output`` choice for this endpoint.
        environ: the environment to read (default ``os.environ``).

    Raises:
        ConfigError: ``--api-key-env`` names a variable that is not set, or a server is
            configured but no model is named.
    """
    env = os.environ if environ is None else environ
    key_env = api_key_env or DEFAULT_KEY_ENV
    if api_key_env and not env.get(api_key_env):
        raise ConfigError(
            f"--api-key-env names {api_key_env}, which is not set; "
            f"export {api_key_env}=<your key> or drop the flag"
        )
    url = base_url or env.get("OPENAI_BASE_URL") or None
    if url is None and (env.get(key_env) or api_key_env):
        url = OPENAI_BASE_URL
    if url is None:
        if model:
            raise ConfigError(
                f"--model {model} was given but no server: pass --base-url URL "
                "(or set OPENAI_BASE_URL or OPENAI_API_KEY)"
            )
        return None
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"base URL {url!r} must start with http:// or https://")
    if not model:
        raise ConfigError(f"no model given for {url}: pass --model NAME (or set PIPELINE_MODEL)")
    return Endpoint(
        base_url=url.rstrip("/"),
        model=model,
        api_key_env=key_env if env.get(key_env) else None,
        structured_output=structured_output,
    )


CONFIG_FILE = "pipeline.toml"


@dataclass(frozen=True)
class Config:
    """A parsed config file.

    Attributes:
        path: where it was read from.
        endpoints: the named endpoints, :class:`EmbeddedModel` for the embedded engine.
        assign: ``default``, ``director``, ``moderator`` (endpoint names) and ``roles``
            (a list by position, or a table by role name or 1-based position).
    """

    path: Path
    endpoints: dict[str, Endpoint | EmbeddedModel]
    assign: dict[str, Any]

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
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: no such config file", path=path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e})", path=path) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})", path=path) from e
    _check_shape(path, data)
    endpoints: dict[str, Endpoint | EmbeddedModel] = {}
    for name, spec in data["endpoints"].items():
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
        endpoints[name] = Endpoint(
            base_url=spec["base_url"].rstrip("/"),
            model=spec["model"],
            api_key_env=spec.get("api_key_env"),
            structured_output=spec.get("structured_output", "auto"),
            params=dict(spec.get("params", {})),
        )
    assign = dict(data.get("assign", {}))
    for key, value in _assignments(assign):
        if value not in endpoints:
            raise ConfigError(
                f"{path}: assign.{key}: no endpoint named {value!r} "
                f"(defined: {', '.join(endpoints) or 'none'})",
                path=path,
            )
    return Config(path, endpoints, assign)


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

"""Which model endpoint each slot of a command talks to: the one place that decides it.

A command has slots: the director, the moderator, the judge and each role (and, for
``pipeline finetune``, the fine-tuning API). What a slot is assigned is, highest first:

1. the command-line flags (``--base-url``, ``--model``, ``--api-key-env``; the SDK's
   environment variables fill in what they leave out, see :func:`resolve_endpoint`):
   one endpoint for everything, and the config file is then not read;
2. the config file's assignments (``pipeline.toml``, read by :mod:`pipeline.config`):
   the director, the moderator and the judge (both the director's unless assigned), each
   role by position or name, fine-tuning (``finetune``), and the ``default`` for any slot
   not named;
3. the environment variables the ``openai`` SDK reads, ``OPENAI_BASE_URL`` and
   ``OPENAI_API_KEY`` (a key alone means OpenAI's own API); a server named there with no
   model named is an error;
4. for an existing run, the endpoint that ran its director (recorded in ``run.json``);
5. the embedded offline model (see :mod:`pipeline.local`).

:class:`Resolver` encodes that order; :class:`~pipeline.models.Models` asks it what each
slot is assigned, and turns the answer into a client (starting the embedded server when
the answer is :class:`EmbeddedModel`).

API keys are read from the environment at call time and are never part of an
:class:`Endpoint`'s description, so they cannot reach ``runs/`` or logs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, Fix

if TYPE_CHECKING:
    from .config import Config
    from .records import RolesDocument

OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint and the model to ask there.

    Two endpoints are equal when every attribute is, ``params`` included: endpoints that
    differ only in their extra parameters send different requests (and get different
    clients, :class:`~pipeline.models.Models` keeping one per endpoint). ``params`` is
    left out of the hash, a dict having none; equal endpoints still hash the same.

    Attributes:
        base_url: the API root, e.g. ``http://127.0.0.1:11434/v1``.
        model: the model name sent in each request.
        api_key_env: the environment variable holding the key, or None for servers that
            need none.
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
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    server: str | None = None
    gguf: str | None = None
    gguf_sha256: str | None = None

    def api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The key to send: the value of ``api_key_env``, or a placeholder for servers that
        need no key (the SDK refuses an empty one)."""
        env = os.environ if environ is None else environ
        return (env.get(self.api_key_env) if self.api_key_env else None) or "no-key"

    def describe(self) -> dict[str, Any]:
        """The endpoint as recorded in a manifest: never the key itself.
        :meth:`from_description` turns it back into the same endpoint."""
        return {
            "base_url": self.base_url,
            "model": self.model,
            "embedded": self.embedded,
            "structured_output": self.structured_output,
            "api_key_env": self.api_key_env,
            **({"params": dict(self.params)} if self.params else {}),
            **({"server": self.server} if self.server else {}),
            **({"gguf": self.gguf, "gguf_sha256": self.gguf_sha256} if self.gguf else {}),
        }

    @classmethod
    def from_description(cls, described: Mapping[str, Any]) -> Endpoint:
        """The endpoint ``described`` as :meth:`describe` does (a manifest's entry, or a
        config file's endpoint table, which has the same keys): the one way to build an
        endpoint from a dict. Keys left out take their defaults but ``api_key_env``, which
        is None (no key)."""
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


Assigned = Endpoint | EmbeddedModel
"""What a slot is assigned: an endpoint, or the embedded model (started on demand)."""


def resolve_endpoint(
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key_env: str | None = None,
    structured_output: str = "auto",
    environ: Mapping[str, str] | None = None,
    model_required: bool = True,
) -> Endpoint | None:
    """The endpoint the flags and the environment name; None when they name no server.

    Args:
        base_url, model, api_key_env: the command-line flags (None when not given).
        structured_output: the ``--structured-output`` choice for this endpoint.
        environ: the environment to read (default ``os.environ``).
        model_required: False for a use that sends no model name (the fine-tuning API):
            a server with no model named is then an endpoint whose ``model`` is "".

    Raises:
        ConfigError: ``api_key_env`` names a variable that is not set, a model is named but
            no server, or (``model_required``) a server but no model.
    """
    env = os.environ if environ is None else environ
    key_env = api_key_env or DEFAULT_KEY_ENV
    if api_key_env and not env.get(api_key_env):
        raise ConfigError(
            f"the API key variable {api_key_env} is not set",
            fix=Fix(f"export {api_key_env}=<your key>, or drop {{}}", ("api_key_env",)),
        )
    url = base_url or env.get("OPENAI_BASE_URL") or None
    if url is None and (env.get(key_env) or api_key_env):
        url = OPENAI_BASE_URL
    if url is None:
        if model:
            raise ConfigError(
                f"model {model} was given but no server",
                fix=Fix("pass {} URL (or set OPENAI_BASE_URL or OPENAI_API_KEY)", ("base_url",)),
            )
        return None
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"base URL {url!r} must start with http:// or https://")
    if not model and model_required:
        raise ConfigError(
            f"no model given for {url}",
            fix=Fix("pass {} NAME (or set PIPELINE_MODEL)", ("model",)),
        )
    return Endpoint(
        base_url=url.rstrip("/"),
        model=model or "",
        api_key_env=key_env if env.get(key_env) else None,
        structured_output=structured_output,
    )


_UNSET: Any = object()


class Resolver:
    """What each slot of one command is assigned, in the order of this module.

    Args:
        flags: the endpoint the command-line flags name, or None when no flag was given.
        config: the parsed config file, or None.
        recorded: the endpoint that ran an existing run's director, from its manifest;
            None for a new run.
        structured_output: the ``--structured-output`` choice, for an endpoint found in
            the environment.
        environ: the environment to read (default ``os.environ``, read when a slot is
            first left to it).
        model_required: False when the command sends no model name (fine-tuning): an
            endpoint found in the environment may then name no model (see
            :func:`resolve_endpoint`).
    """

    def __init__(
        self,
        *,
        flags: Endpoint | None = None,
        config: Config | None = None,
        recorded: Endpoint | None = None,
        structured_output: str = "auto",
        environ: Mapping[str, str] | None = None,
        model_required: bool = True,
    ) -> None:
        self.flags = flags
        self.config = config
        self.recorded = recorded
        self.structured_output = structured_output
        self.environ = environ
        self.model_required = model_required
        self._fallback: Assigned = _UNSET
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        """What pickles (a resolver sent to a Ray worker): what it was given and what it
        has decided, not its lock. The environment's endpoint is decided on the side that
        asked first: call :meth:`unassigned` before sending it to decide it here."""
        state = dict(self.__dict__)
        del state["_lock"]
        state["_fallback"] = None if self._fallback is _UNSET else self._fallback
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._fallback is None:
            self._fallback = _UNSET
        self._lock = threading.Lock()

    @classmethod
    def for_command(
        cls,
        *,
        base_url: str | None = None,
        model: str | None = None,
        api_key_env: str | None = None,
        structured_output: str = "auto",
        config_path: Path | None = None,
        recorded: Endpoint | None = None,
        environ: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        model_required: bool = True,
    ) -> Resolver:
        """The resolver for a command given these flags: with any of ``base_url``,
        ``model``, ``api_key_env``, their endpoint serves every slot and no config file is
        read; otherwise ``config_path``, or ``pipeline.toml`` in ``cwd`` (default: the
        working directory) when there is one. ``model_required``: see
        :func:`resolve_endpoint`.

        Raises:
            ConfigError: the flags name no usable endpoint (see :func:`resolve_endpoint`),
                or the config file is unusable (see :func:`pipeline.config.load_config`).
        """
        if any((base_url, model, api_key_env)):
            flags = resolve_endpoint(
                base_url=base_url,
                model=model,
                api_key_env=api_key_env,
                structured_output=structured_output,
                environ=environ,
                model_required=model_required,
            )
            config = None
        else:
            from .config import load_config

            flags, config = None, load_config(config_path, cwd=cwd)
        return cls(
            flags=flags,
            config=config,
            recorded=recorded,
            structured_output=structured_output,
            environ=environ,
            model_required=model_required,
        )

    # -- the slots -------------------------------------------------------------------

    def director(self) -> Assigned:
        """The director's endpoint."""
        return self._slot(lambda c: c.name_for("director"))

    def moderator(self) -> Assigned:
        """The moderator's endpoint: the director's unless the config file assigns one."""
        return self._slot(lambda c: c.assign.get("moderator") or c.name_for("director"))

    def judge(self) -> Assigned:
        """The judge's endpoint: the director's unless the config file assigns one."""
        return self._slot(lambda c: c.assign.get("judge") or c.name_for("director"))

    def finetune(self) -> Assigned:
        """The fine-tuning API's endpoint: the config file's ``finetune`` assignment, else
        its ``default``, else as any unassigned slot (which may be the embedded model,
        which has no fine-tuning API: :func:`pipeline.finetune.finetune_endpoint` refuses
        it)."""
        return self._slot(lambda c: c.assign.get("finetune") or c.assign.get("default"))

    def role(self, index: int, name: str) -> Assigned:
        """The endpoint of role ``index`` (0-based), called ``name``."""
        return self._slot(lambda c: c.name_for_role(index, name))

    def roles(self, roles_doc: RolesDocument) -> list[Assigned]:
        """The endpoint of each role of ``roles_doc``, in order."""
        return [self.role(i, role.name) for i, role in enumerate(roles_doc.roles)]

    # -- the order -------------------------------------------------------------------

    def _slot(self, assigned_in: Callable[[Config], str | None]) -> Assigned:
        if self.flags is not None:
            return self.flags
        if self.config is not None:
            name = assigned_in(self.config)
            if name is not None:
                return self.config.endpoints[name]
        return self.unassigned()

    def unassigned(self) -> Assigned:
        """What a slot that neither the flags nor the config file assign gets: the
        environment's endpoint, else the recorded director's (unless that was the embedded
        model), else the embedded model. Decided once, when first asked.

        Raises:
            ConfigError: the environment names a server but no model.
        """
        with self._lock:
            if self._fallback is _UNSET:
                found = resolve_endpoint(
                    structured_output=self.structured_output,
                    environ=self.environ,
                    model_required=self.model_required,
                )
                recorded = self.recorded
                if found is None and recorded is not None and not recorded.embedded:
                    found = recorded
                self._fallback = found or EmbeddedModel()
            return self._fallback

"""The model clients of one command: the director's, the moderator's, the judge's and
each role's.

What each slot is assigned is for :class:`~pipeline.endpoints.Resolver` to say (the order
is documented there, once); :class:`Models` turns that into clients. The embedded model
gets one server per GGUF file, with a slot for each conversation (see
:mod:`pipeline.local`); it is started the first time a client needs it and stopped when
the :class:`Models` context closes, as are the MCP servers of :meth:`Models.tools`. An
existing run continues only on the GGUF file it was
made with (by sha256). Clients are shared per endpoint, the whole endpoint: two endpoints
that differ in anything (their ``params``, their key's variable...) get a client each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .client import ModelClient, identify_server
from .endpoints import Assigned, EmbeddedModel, Endpoint, Resolver
from .errors import ConfigError, Fix
from .parameters import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S

if TYPE_CHECKING:
    from .config import Config
    from .local import LocalServer
    from .mcptools import McpTools
    from .modelfiles import GGUFInfo
    from .parameters import ToolParameters
    from .records import Manifest, RolesDocument
    from .stages import ToolSource


class SharedEngine(Protocol):
    """Embedded servers that someone else runs and shares: on a Ray cluster, the one engine
    of each node, shared by that node's tasks (:mod:`pipeline.raybatch`)."""

    def launch(self, gguf: Path | None) -> None:
        """Start serving ``gguf`` (the default model when None), without waiting."""

    def endpoint(self, gguf: Path | None, structured_output: str) -> Endpoint:
        """The endpoint that serves ``gguf``, once it answers."""
        ...


class Models:
    """Model clients for the director, the moderator and the roles; a context manager.

    Args:
        resolver: what each slot is assigned. Give either a resolver or (some of)
            ``flags``, ``config``, ``recorded`` and ``structured_output``, of which one is
            made (they are the arguments of :class:`~pipeline.endpoints.Resolver`).
        flags: the endpoint from command-line flags, or None when no flag was given.
        config: the parsed config file, or None.
        recorded: the endpoint that ran an existing run's director (from its manifest),
            used when nothing else is configured; None for a new run.
        structured_output: the ``--structured-output`` choice for endpoints that do not
            set their own (flags, environment, embedded); default ``auto``.
        timeout, max_retries: passed to every :class:`~pipeline.client.ModelClient`.
        on_server_start: called when an embedded server starts answering.
        sessions: how many dialogues run at once (a batch's ``-j``): an embedded server's
            slots and KV cache are sized for that many.
        model_file: the GGUF for the embedded model where the config names none (the
            default model when None).
        recorded_models: the embedded GGUF files an existing run was made with, as
            ``{sha256: path}``; serving any other file is an error.
        notify: called with one-line progress messages (a model download).
        engine: embedded servers run elsewhere and shared, used instead of starting one
            here (a Ray node's engine); None: this object starts its own.
    """

    def __init__(
        self,
        *,
        resolver: Resolver | None = None,
        flags: Endpoint | None = None,
        config: Config | None = None,
        recorded: Endpoint | None = None,
        structured_output: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        on_server_start: Callable[[LocalServer], None] | None = None,
        sessions: int = 1,
        model_file: Path | None = None,
        recorded_models: dict[str, str] | None = None,
        notify: Callable[[str], None] | None = None,
        engine: SharedEngine | None = None,
    ) -> None:
        if resolver is None:
            resolver = Resolver(
                flags=flags,
                config=config,
                recorded=recorded,
                structured_output=structured_output or "auto",
            )
        elif (flags, config, recorded, structured_output) != (None, None, None, None):
            raise TypeError(
                "Models: give a resolver, or flags, config, recorded and structured_output, "
                "not both"
            )
        self.resolver = resolver
        self.structured_output = resolver.structured_output
        self.timeout = timeout
        self.max_retries = max_retries
        self.on_server_start = on_server_start
        self._stack = contextlib.ExitStack()
        self.sessions = sessions
        self.model_file = model_file
        self.recorded_models = recorded_models or {}
        self.notify = notify
        self.engine = engine
        self._servers: dict[Path | None, LocalServer] = {}
        self._clients: dict[Endpoint, ModelClient] = {}  # by the whole endpoint
        self._kinds: dict[str, str | None] = {}
        self._lock = threading.RLock()  # a batch asks for clients from several threads
        self._mcp: McpTools | None = None

    def __enter__(self) -> Models:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.__exit__(*exc_info)  # the server stops at once on Ctrl-C

    @property
    def servers(self) -> list[LocalServer]:
        """The embedded servers launched so far."""
        return list(self._servers.values())

    @property
    def config(self) -> Config | None:
        """The config file read, or None."""
        return self.resolver.config

    @property
    def flags(self) -> Endpoint | None:
        """The endpoint the command-line flags name, or None."""
        return self.resolver.flags

    # -- the slots -------------------------------------------------------------------

    def director(self) -> ModelClient:
        """The director's client."""
        return self._client(self.resolver.director())

    def moderator(self) -> ModelClient:
        """The moderator's client (the director's unless the config assigns one)."""
        return self._client(self.resolver.moderator())

    def judge(self) -> ModelClient:
        """The judge's client (the director's unless the config assigns one)."""
        return self._client(self.resolver.judge())

    def reflector(self) -> ModelClient:
        """The client that writes the reflections: the judge's."""
        return self.judge()

    def roles(self, roles_doc: RolesDocument) -> list[ModelClient]:
        """One client per role of ``roles_doc``, in order."""
        with self._lock:
            return [self._client(assigned) for assigned in self.prepare(roles_doc)]

    def tools(self, params: ToolParameters) -> ToolSource | None:
        """The tools the roles may call: ``delegate`` when ``params.delegate``, and the MCP
        tools the config allows (:mod:`pipeline.mcptools`; their servers start when first
        needed and stop with this context); None for none."""
        from .tools import Combined

        sources: list[ToolSource] = []
        if params.delegate:
            from .delegate import Delegation

            sources.append(Delegation())
        config = self.config
        if config is not None and config.mcp is not None and config.mcp.roles:
            with self._lock:
                if self._mcp is None:
                    from .mcptools import McpTools

                    self._mcp = self._stack.enter_context(McpTools(config.mcp))
            sources.append(self._mcp)
        if len(sources) <= 1:
            return sources[0] if sources else None
        return Combined(sources)

    def child(self, run_id: str) -> Models:
        """A child run's clients: the same (see :class:`pipeline.stages.ClientSource`)."""
        return self

    def prepare(self, roles_doc: RolesDocument) -> list[Assigned]:
        """Start loading the embedded servers that :meth:`roles` will need, without waiting
        (say, while the user reviews the roles); return what each role is assigned."""
        assigned = self.resolver.roles(roles_doc)
        with self._lock:
            for choice in assigned:
                if isinstance(choice, EmbeddedModel):
                    if self.engine is not None:
                        self.engine.launch(choice.gguf or self.model_file)
                    else:
                        self._launch(choice)
        return assigned

    # -- clients ---------------------------------------------------------------------

    def _client(self, assigned: Assigned) -> ModelClient:
        with self._lock:
            if isinstance(assigned, EmbeddedModel):
                endpoint = self._embedded(assigned)
            else:
                endpoint = self._identified(assigned)
            if endpoint not in self._clients:  # equal endpoints: equal in every attribute
                self._clients[endpoint] = ModelClient(
                    endpoint, timeout=self.timeout, max_retries=self.max_retries
                )
            return self._clients[endpoint]

    def _identified(self, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` with the kind of server it is (asked once per base URL), which
        decides the schema form of structured answers; endpoints that never ask for a
        schema, or whose host is known, are not asked."""
        from urllib.parse import urlparse

        from .structured import KNOWN_HOSTS

        if (
            endpoint.server is not None
            or endpoint.structured_output == "prompt"
            or urlparse(endpoint.base_url).hostname in KNOWN_HOSTS
        ):
            return endpoint
        if endpoint.base_url not in self._kinds:
            self._kinds[endpoint.base_url] = identify_server(endpoint)
        return dataclasses.replace(endpoint, server=self._kinds[endpoint.base_url])

    def _launch(self, choice: EmbeddedModel) -> LocalServer:
        """The embedded server for ``choice``'s GGUF file, launched if it was not (without
        waiting for it to load).

        Raises:
            ConfigError: the ``local`` extra is missing, or the file is not the one the
                run was made with.
            ModelFileError: the file is missing or not GGUF, or the download failed.
        """
        from .local import LocalServer, resolve_model

        gguf = choice.gguf or self.model_file
        if gguf not in self._servers:
            model = resolve_model(gguf, self.notify)
            self._check_recorded(model)
            server = LocalServer(model, sessions=self.sessions)
            self._stack.push(server)  # stopped with this context, even if Ctrl-C cuts start-up
            server.launch()
            self._servers[gguf] = server
        return self._servers[gguf]

    def _check_recorded(self, model: GGUFInfo) -> None:
        if self.recorded_models and model.sha256 not in self.recorded_models:
            made_with = ", ".join(sorted(set(self.recorded_models.values())))
            raise ConfigError(
                f"this run was made with the embedded model {made_with}, not "
                f"{model.path} (sha256 {model.sha256[:12]}...)",
                fix=(
                    Fix("continue it on the same file with {} PATH", ("model_file",)),
                    Fix("or start a new run", command=("generate", "TASK")),
                ),
            )

    def _embedded(self, choice: EmbeddedModel) -> Endpoint:
        if self.engine is not None:
            return self.engine.endpoint(choice.gguf or self.model_file, self.structured_output)
        server = self._launch(choice)
        if not server.ready:
            _import_sdk()  # the SDK's 0.4 s import overlaps with the model loading
            server.wait_ready()
            if self.on_server_start:
                self.on_server_start(server)
        return server.endpoint(self.structured_output)


def recorded_models(manifest: Manifest) -> dict[str, str]:
    """The embedded GGUF files a run's stages were made with, as ``{sha256: path}`` (empty
    for a run made before GGUF files were recorded, or on no embedded model)."""
    described: list[Endpoint] = []
    for entry in manifest.stages.values():
        described += [e for e in (entry.endpoint, entry.moderator_endpoint) if e is not None]
        described += entry.role_endpoints or []
    return {e.gguf_sha256: e.gguf or "?" for e in described if e.gguf_sha256}


def _import_sdk() -> None:
    import openai  # noqa: F401

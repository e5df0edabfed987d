"""The model clients of one command: the director's, the moderator's and each role's.

Each is resolved in the order of :mod:`pipeline.config`: command-line flags (one
endpoint for everything), then the config file's assignments, then the environment,
then, for an existing run, the endpoint that ran its director, then the embedded model.
Slots on the embedded model get a server each (each role, the moderator; the director and
the judge share the first role's), so that every conversation a server holds only grows
and is never re-read (see :mod:`pipeline.local`). A server is started the first time a
client needs it and stopped when the :class:`Models` context closes. Clients are shared
per endpoint.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .client import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S, ModelClient
from .config import Config, Endpoint, resolve_endpoint

if TYPE_CHECKING:
    from .local import LocalServer

_UNSET = object()
Slot = int | str  # which embedded server: a role's index, or "moderator"


class Models:
    """Model clients for the director, the moderator and the roles; a context manager.

    Args:
        flags: the endpoint from command-line flags, or None when no flag was given.
        config: the parsed config file, or None.
        recorded: the endpoint description that ran an existing run's director (from its
            manifest), used when nothing else is configured; None for a new run.
        structured_output: the ``--structured-output`` choice for endpoints that do not
            set their own (flags, environment, embedded).
        timeout, max_retries: passed to every :class:`~pipeline.client.ModelClient`.
        on_server_start: called when an embedded server starts answering.
        shared_embedded: one embedded server, with llama-cpp-python's state cache, for
            every slot (for interleaved conversations: a batch with ``-j`` above 1), instead
            of one per role plus one for the moderator.
    """

    def __init__(
        self,
        *,
        flags: Endpoint | None = None,
        config: Config | None = None,
        recorded: dict[str, Any] | None = None,
        structured_output: str = "auto",
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        on_server_start: Callable[[LocalServer], None] | None = None,
        shared_embedded: bool = False,
    ) -> None:
        self.flags = flags
        self.config = config
        self.recorded = recorded
        self.structured_output = structured_output
        self.timeout = timeout
        self.max_retries = max_retries
        self.on_server_start = on_server_start
        self._stack = contextlib.ExitStack()
        self.shared_embedded = shared_embedded
        self._servers: dict[Slot, LocalServer] = {}
        self._clients: dict[tuple[str, str], ModelClient] = {}
        self._fallback: Any = _UNSET
        self._lock = threading.RLock()  # a batch asks for clients from several threads

    def __enter__(self) -> Models:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.__exit__(*exc_info)  # the server stops at once on Ctrl-C

    # -- the slots -------------------------------------------------------------------

    def director(self) -> ModelClient:
        """The director's client."""
        return self._client(self._assigned(lambda c: c.name_for("director")))

    def moderator(self) -> ModelClient:
        """The moderator's client (the director's unless the config assigns one)."""
        return self._client(
            self._assigned(lambda c: c.assign.get("moderator") or c.name_for("director")),
            "moderator",
        )

    def judge(self) -> ModelClient:
        """The judge's client (the director's unless the config assigns one)."""
        return self._client(
            self._assigned(lambda c: c.assign.get("judge") or c.name_for("director"))
        )

    def roles(self, roles_doc: dict[str, Any]) -> list[ModelClient]:
        """One client per role of ``roles_doc``, in order. Roles on the embedded model get
        a server each (see :mod:`pipeline.local`), all loading at once."""
        with self._lock:
            endpoints = self.prepare(roles_doc)
            return [self._client(endpoint, i) for i, endpoint in enumerate(endpoints)]

    def prepare(self, roles_doc: dict[str, Any]) -> list[Endpoint | None]:
        """Start loading the embedded servers that :meth:`roles` will need, without waiting
        (say, while the user reviews the roles); return each role's endpoint, None for the
        embedded model."""
        endpoints = [
            self._assigned(_role_picker(i, role["name"]))
            for i, role in enumerate(roles_doc["roles"])
        ]
        with self._lock:
            for i, endpoint in enumerate(endpoints):
                if endpoint is None:
                    self._launch(i)
        return endpoints

    # -- resolution ------------------------------------------------------------------

    def _assigned(self, pick: Callable[[Config], str | None]) -> Endpoint | None:
        """The endpoint for one slot; None means the embedded model."""
        if self.flags is not None:
            return self.flags
        if self.config is not None:
            name = pick(self.config)
            if name is not None:
                return self.config.endpoints[name]
        return self._unassigned()

    def _unassigned(self) -> Endpoint | None:
        with self._lock:
            return self._resolve_unassigned()

    def _resolve_unassigned(self) -> Endpoint | None:
        if self._fallback is _UNSET:
            found = resolve_endpoint(structured_output=self.structured_output)
            recorded = self.recorded or {}
            if found is None and recorded and not recorded.get("embedded"):
                found = Endpoint(
                    base_url=recorded["base_url"],
                    model=recorded["model"],
                    api_key_env=recorded.get("api_key_env"),
                    structured_output=recorded.get("structured_output", "auto"),
                    params=dict(recorded.get("params", {})),
                )
            self._fallback = found
        chosen: Endpoint | None = self._fallback
        return chosen

    def _client(self, endpoint: Endpoint | None, slot: Slot = 0) -> ModelClient:
        with self._lock:
            if endpoint is None:
                endpoint = self._embedded(slot)
            key = (endpoint.base_url, endpoint.model)
            if key not in self._clients:
                self._clients[key] = ModelClient(
                    endpoint, timeout=self.timeout, max_retries=self.max_retries
                )
            return self._clients[key]

    def _launch(self, slot: Slot) -> LocalServer:
        """The embedded server of ``slot``, launched if it was not (without waiting)."""
        from .local import LocalServer, model_path

        slot = 0 if self.shared_embedded else slot
        if slot not in self._servers:
            model_path()  # a clear error when the local extra is missing
            server = LocalServer(state_cache=self.shared_embedded)
            self._stack.push(server)  # stopped with this context, even if Ctrl-C cuts start-up
            server.launch()
            self._servers[slot] = server
        return self._servers[slot]

    def _embedded(self, slot: Slot) -> Endpoint:
        server = self._launch(slot)
        if not server.ready:
            _import_sdk()  # the SDK's 0.4 s import overlaps with the model loading
            server.wait_ready()
            if self.on_server_start:
                self.on_server_start(server)
        return server.endpoint(self.structured_output)


def _import_sdk() -> None:
    import openai  # noqa: F401


def _role_picker(index: int, name: str) -> Callable[[Config], str | None]:
    return lambda config: config.name_for_role(index, name)

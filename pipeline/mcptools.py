"""Tools from MCP servers (the Model Context Protocol), offered to the roles that the config
allows, and answered from the recording when a run is replayed.

``pipeline.toml`` names stdio servers and an allow-list per role::

    [mcp.servers.calc]
    command = "python"
    args = ["calc_server.py"]
    timeout = 10            # seconds per tool call (default 30)

    [mcp.roles]
    "*" = ["calc.add"]      # every role
    Analyst = ["calc.mul"]  # and this one (by name, or "2" by position)

A role is offered the union of the lists that match it; a tool not named is never offered.
Servers start when a dialogue first needs their tools and stop with the command; they are
spoken to through the official ``mcp`` SDK (the optional ``mcp`` extra, imported only
then). Each call has the server's timeout; a call that fails, times out or reaches a dead
server comes back to the model as an error result, like any tool's
(:meth:`pipeline.tools.Toolbox.call`).

What each role was offered is saved as ``dialogue/tools.json``, and every call with its
result is in the transcript. A replay offers the same tools from that file and answers
each call with the result recorded for it: an MCP server is never started again.

Protocol: https://modelcontextprotocol.io/specification (``tools/list``, ``tools/call``);
SDK: https://github.com/modelcontextprotocol/python-sdk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, Fix, ReplayError
from .records import JSONObject
from .tools import OFFERED, Tool, Toolbox, ToolError, ToolUse

if TYPE_CHECKING:
    from .runs import Run
    from .stages import StageContext

DEFAULT_TIMEOUT_S = 30.0
MINIMAL_ENV = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "TMPDIR")
_NAME = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class McpServer:
    """One stdio MCP server of the config (``[mcp.servers.NAME]``).

    Attributes:
        name: its name in the config (the ``SERVER`` of ``SERVER.TOOL``).
        command, args: the program to start and its arguments.
        env: variables set for it, on top of :data:`MINIMAL_ENV` taken from the
            environment; never written into a run.
        pass_env: names of variables passed on from the environment.
        cwd: the working directory to start it in, or None for the current one.
        timeout: seconds a tool call may take.
        startup_timeout: seconds the server may take to answer the handshake.
    """

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    pass_env: tuple[str, ...] = ()
    cwd: Path | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    startup_timeout: float = DEFAULT_TIMEOUT_S

    def environment(self) -> dict[str, str]:
        """The server process's environment."""
        keep = (*MINIMAL_ENV, *self.pass_env)
        return {**{k: os.environ[k] for k in keep if k in os.environ}, **self.env}


@dataclass(frozen=True)
class McpConfig:
    """The ``[mcp]`` table of the config: servers by name, and the allow-list
    (``SERVER.TOOL`` names by role name, 1-based position or ``*``)."""

    servers: Mapping[str, McpServer]
    roles: Mapping[str, tuple[str, ...]]

    @classmethod
    def parse(cls, path: Path, table: Mapping[str, Any]) -> McpConfig:
        """The ``[mcp]`` table of config file ``path``, already checked against its schema.

        Raises:
            ConfigError: the allow-list names a server that is not defined.
        """
        servers = {
            name: McpServer(
                name,
                spec["command"],
                tuple(spec.get("args", ())),
                dict(spec.get("env", {})),
                tuple(spec.get("pass_env", ())),
                path.parent / spec["cwd"] if "cwd" in spec else None,
                float(spec.get("timeout", DEFAULT_TIMEOUT_S)),
                float(spec.get("startup_timeout", DEFAULT_TIMEOUT_S)),
            )
            for name, spec in table["servers"].items()
        }
        roles = {key: tuple(names) for key, names in table.get("roles", {}).items()}
        for key, names in roles.items():
            for qualified in names:
                server = qualified.split(".", 1)[0]
                if server not in servers:
                    raise ConfigError(
                        f"{path}: mcp.roles.{key}: {qualified!r} names no server "
                        f"(defined: {', '.join(servers) or 'none'})",
                        path=path,
                    )
        return cls(servers, roles)

    def allowed(self, index: int, name: str) -> list[str]:
        """The ``SERVER.TOOL`` names role ``index`` (0-based) called ``name`` is offered,
        in the order of the config, each once."""
        found: dict[str, None] = {}
        for key in ("*", str(index + 1), name):
            found.update(dict.fromkeys(self.roles.get(key, ())))
        return list(found)


class McpTools:
    """The MCP tools of the roles (a :class:`pipeline.stages.ToolSource`): each server is
    started the first time a role needs one of its tools, and stopped by :meth:`close`.
    Safe to share between the threads of a batch and the runs of a tree."""

    def __init__(self, config: McpConfig) -> None:
        self.config = config
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()
        self._portal: Any = None

    def close(self) -> None:
        """Stop every server started (each gets its stdin closed, then SIGTERM)."""
        with self._lock:
            self._stack.close()
            self._sessions.clear()
            self._portal = None

    def __enter__(self) -> McpTools:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def child(self, run_id: str) -> McpTools:
        return self

    def toolbox(self, ctx: StageContext, speaker: int, role: str) -> Toolbox:
        """The tools role ``role`` (at position ``speaker``) of ``ctx``'s run may call, from
        the servers started for them.

        Raises:
            ConfigError: the ``mcp`` extra is missing, a server does not start, or an
                allowed tool is not among its tools.
        """
        go_on = Fix("then go on", command=("resume", ctx.run.run_id))
        tools = []
        for qualified in self.config.allowed(speaker, role):
            server, tool = qualified.split(".", 1)
            try:
                session = self._session(server)
            except ConfigError as e:
                raise ConfigError(e.problem, fix=(*e.fixes, go_on), run_id=ctx.run.run_id) from e
            spec = session.tools.get(tool)
            if spec is None:
                raise ConfigError(
                    f"mcp.roles: the MCP server {server!r} has no tool {tool!r} "
                    f"(it has: {', '.join(session.tools) or 'none'})",
                    fix=(Fix("fix the allow-list in the config"), go_on),
                    path=_config_path(ctx),
                    run_id=ctx.run.run_id,
                )
            tools.append(_tool(server, spec, session.call))
        return Toolbox(tools)

    def _session(self, name: str) -> _Session:
        with self._lock:
            if name not in self._sessions:
                if self._portal is None:
                    self._portal = self._stack.enter_context(_portal())
                server = self.config.servers[name]
                cm = self._portal.wrap_async_context_manager(_connect(server))
                try:
                    client = cm.__enter__()
                except Exception as e:  # anyio wraps the cause in exception groups
                    cause = _innermost(e)
                    raise ConfigError(
                        f"the MCP server {name!r} ({server.command}) did not start: "
                        f"{type(cause).__name__}: {cause}",
                        fix=Fix(f"check mcp.servers.{name} in the config"),
                    ) from cause
                self._stack.push(lambda *exc: cm.__exit__(None, None, None))
                self._sessions[name] = _Session(server, self._portal, client)
            return self._sessions[name]


class _Session:
    """One started server: its tools by name, and calls to them."""

    def __init__(self, server: McpServer, portal: Any, client: Any) -> None:
        self.server = server
        self.portal = portal
        self.client = client
        self.tools: dict[str, Any] = {}
        params = None
        while True:  # tools/list is paginated
            page = portal.call(functools.partial(client.list_tools, params=params))
            self.tools.update({t.name: t for t in page.tools})
            if not page.next_cursor:
                break
            params = _page(page.next_cursor)

    def call(self, name: str, arguments: dict[str, Any]) -> str:
        """The text of tool ``name``'s result.

        Raises:
            ToolError: the tool reported an error, the call timed out, or the server
                failed; the message says which.
        """
        from mcp import MCPError

        try:
            result = self.portal.call(
                lambda: self.client.call_tool(
                    name, arguments, read_timeout_seconds=self.server.timeout
                )
            )
        except MCPError as e:  # a JSON-RPC error: a time-out, a dead server, ...
            raise ToolError(f"MCP server {self.server.name}: {e}") from e
        text = "\n".join(
            block.text if block.type == "text" else f"[{block.type} content not shown]"
            for block in result.content
        )
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content, ensure_ascii=False)
        if result.is_error:
            raise ToolError(text or "the tool failed")
        return text


def _tool(server: str, spec: Any, call: Any) -> Tool:
    """The :class:`Tool` offering MCP tool ``spec`` of ``server`` (its name made fit for
    the OpenAI ``tools`` format: letters, digits, ``_`` and ``-``)."""
    original = spec.name

    def run(arguments: dict[str, Any], use: ToolUse) -> str:
        return str(call(original, arguments))

    return Tool(
        _NAME.sub("_", original)[:64],
        spec.description or "",
        dict(spec.input_schema),
        run,
        source=f"mcp:{server}",
    )


def _page(cursor: str) -> Any:
    from mcp.types import PaginatedRequestParams

    return PaginatedRequestParams(cursor=cursor)


@contextlib.contextmanager
def _portal() -> Iterator[Any]:
    """An event loop in a thread of its own, for the async SDK (anyio's blocking portal)."""
    try:
        import mcp  # noqa: F401
        from anyio.from_thread import start_blocking_portal
    except ImportError as e:
        raise ConfigError(
            "the config names MCP servers, but the mcp package is not installed",
            fix=Fix("pip install 'converse-pipeline[mcp]'"),
        ) from e
    with start_blocking_portal(backend="asyncio") as portal:
        yield portal


@contextlib.asynccontextmanager
async def _connect(server: McpServer) -> Any:
    """A started server's initialised client session (entered and left in one task of the
    portal's loop, as anyio requires). Its stderr is passed through to ours."""
    import sys

    import anyio
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(
        command=server.command,
        args=list(server.args),
        env=server.environment(),
        cwd=str(server.cwd) if server.cwd else None,
    )
    async with (
        stdio_client(params, errlog=sys.__stderr__ or sys.stderr) as (read, write),
        ClientSession(read, write) as session,
    ):
        with anyio.fail_after(server.startup_timeout):
            await session.initialize()
        yield session


def _innermost(e: BaseException) -> BaseException:
    """The first leaf of (nested) exception groups (``BaseExceptionGroup`` is 3.11+)."""
    while isinstance(inner := getattr(e, "exceptions", None), tuple) and inner:
        e = inner[0]
    return e


def _config_path(ctx: StageContext) -> Path | None:
    config = getattr(ctx.models, "config", None)
    return getattr(config, "path", None)


# -- what was offered, and replay ----------------------------------------------------------


class RecordedMcpTools:
    """The MCP tools a recorded run offered, each call answered with the result recorded
    for it (a :class:`pipeline.stages.ToolSource` for replay).

    Args:
        source: the recorded run.
        replayed: the id of the run that replays it (its children are the source's
            children of the same suffix).
    """

    def __init__(self, source: Run, replayed: str) -> None:
        self.source = source
        self.replayed = replayed
        path = source.path(OFFERED)
        self.offered = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def child(self, run_id: str) -> RecordedMcpTools:
        from .runs import open_run

        suffix = run_id.removeprefix(self.replayed)
        return RecordedMcpTools(
            open_run(self.source.folder.parent, self.source.run_id + suffix), run_id
        )

    def toolbox(self, ctx: StageContext, speaker: int, role: str) -> Toolbox:
        roles = self.offered.get("roles", [])
        specs = roles[speaker]["tools"] if speaker < len(roles) else []
        return Toolbox(
            [
                Tool(
                    s["function"]["name"],
                    s["function"]["description"],
                    s["function"]["parameters"],
                    self._answer,
                    source=s["source"],
                )
                for s in specs
                if s["source"].startswith("mcp:")
            ]
        )

    def _answer(self, arguments: dict[str, Any], use: ToolUse) -> str:
        for call in _recorded_calls(self.source, use.turn):
            if call.get("id") == use.call.id:
                if call.get("error") is not None:
                    raise ToolError(call["error"])
                return str(call.get("result") or "")
        raise ReplayError(
            f"run {self.source.run_id} recorded no result for tool call {use.call.id} of "
            f"turn {use.turn}, so it cannot be replayed",
            stage="dialogue",
        )


def _recorded_calls(run: Run, turn: int) -> list[JSONObject]:
    """The tool calls of turn ``turn`` of ``run``: from its transcript, or from the turn it
    left pending."""
    for line in run.read_transcript():
        if line.turn == turn:
            return [c.to_json() for c in line.tool_calls or ()]
    from .tooluse import PENDING

    path = run.path(PENDING)
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("turn") == turn:
            return [c for r in saved["rounds"] for c in r["calls"]]
    return []

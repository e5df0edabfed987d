"""``pipeline view``: a local web app over the runs folder (the ``view`` extra).

A Starlette application (:func:`create_app`) served by uvicorn (:func:`serve`). Pages
are rendered with :func:`pipeline.templates.web_environment` (autoescaped) from what
:mod:`pipeline.viewer` reads; the assets (``web/static/``: a stylesheet and a small
script) are shipped in the package and served from memory: no CDN, no network.

Routes:

====================================  ==================================================
``/``                                 the runs list (``?q=`` text, ``&status=``)
``/runs/{id}``                        a run's page
``/runs/{id}/live?after=N``           server-sent events: the transcript's lines after
                                      the first N as they are written (``turn``), then
                                      ``end`` when no stage is running any more
``/runs/{id}/calls/{stage}[?turn=N]`` the recorded model calls (JSON), of a turn or a stage
``/runs/{id}/files/{path}``           a file of the run, resolved inside its folder
``/diff?a=&b=``                       what differs between two runs
``/memory?q=&role=&min_score=``       a search of the memory store
``/lineage?target=``                  a model's or a run's lineage
``/static/{name}``                    the stylesheet and the script
====================================  ==================================================

Security (:class:`Guard`): bound to 127.0.0.1 by default, where requests must name a
local host (``Host:``: a page elsewhere cannot reach the runs by DNS rebinding). Bound
to any other address, every request must carry the token printed at start (``?token=``,
then the cookie it sets, or ``Authorization: Bearer``): without it 401, a wrong one 403.
Every response forbids scripts, styles and connections from anywhere but the app.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from . import viewer
from .errors import Fix, PipelineError, RunError
from .resources import data_dir
from .runs import Run, open_run
from .templates import web_environment

if TYPE_CHECKING:
    from .records import Turn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COOKIE = "pipeline_view_token"
POLL = 0.2  # seconds between looks at a running transcript
PING = 15.0  # seconds between comments on a quiet stream (a closed page is noticed)
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
PAGE_SIZE = 100  # runs on a page of the runs list
PAGES = ("runs.html", "run.html", "turn.html", "diff.html", "memory.html", "lineage.html")
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def needs_token(host: str) -> bool:
    """True when serving on ``host`` must require a token: any address but the loopback
    names (127.0.0.1, localhost, ::1)."""
    return host not in LOCAL_HOSTS


class Guard:
    """The ASGI middleware that lets a request through only with the token (when there is
    one), or, without a token, only addressed to a local host name; and that adds the
    security headers to every response."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        set_cookie = False
        if self.token is not None:
            given, from_query = self._given(scope, headers)
            if given is None:
                await _refuse(send, 401, "this view needs its token: add ?token=... to the URL")
                return
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                await _refuse(send, 403, "wrong token")
                return
            set_cookie = from_query
        elif not self._local(headers.get("host", "")):
            await _refuse(send, 403, "this view answers only requests to a local host name")
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = list(SECURITY_HEADERS)
                if set_cookie and self.token is not None:
                    cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                    extra.append((b"set-cookie", cookie.encode()))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _given(self, scope: Scope, headers: dict[str, str]) -> tuple[str | None, bool]:
        """The token the request carries, and whether it came in the query string."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("token"):
            return query["token"][0], True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed cookie header is no token
            cookie = SimpleCookie()
        if COOKIE in cookie:
            return cookie[COOKIE].value, False
        scheme, _, value = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip(), False
        return None, False

    def _local(self, host: str) -> bool:
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        name = name.strip("[]")
        return name in LOCAL_HOSTS


async def _refuse(send: Send, status: int, text: str) -> None:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *SECURITY_HEADERS,
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="pipeline view"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- the application ---------------------------------------------------------------------


def _render(name: str, code: int = 200, **data: Any) -> HTMLResponse:
    return HTMLResponse(web_environment().get_template(name).render(**data), status_code=code)


class View:
    """The pages over one runs folder."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        self.listing = viewer.Listing(runs_dir)
        self.stopping: Callable[[], bool] = lambda: False  # the server is shutting down
        static = data_dir("web") / "static"
        self.static = {
            p.name: (p.read_bytes(), STATIC_TYPES.get(p.suffix, "application/octet-stream"))
            for p in static.iterdir()
            if p.is_file()
        }

    def warm(self) -> threading.Thread:
        """Compile the pages and read the first page of the runs list ahead of the first
        request, in a thread of its own (a daemon: it never holds up an exit)."""

        def read() -> None:
            for name in PAGES:
                web_environment().get_template(name)
            self.listing.rows(self.listing.names()[:PAGE_SIZE])  # the first page

        thread = threading.Thread(target=read, name="view-warm-up", daemon=True)
        thread.start()
        return thread

    def page(self, name: str, code: int = 200, **data: Any) -> HTMLResponse:
        return _render(name, code, runs_dir=str(self.runs_dir), **data)

    def run(self, request: Request) -> Run:
        """The run the path names; 404 for anything else."""
        try:
            return open_run(self.runs_dir, request.path_params["run_id"])
        except RunError as e:
            raise HTTPException(404, e.message) from e

    # pages (plain functions: Starlette runs them in its thread pool, as they read files)

    def runs(self, request: Request) -> HTMLResponse:
        """The runs list, :data:`PAGE_SIZE` rows a page (``?page=N``). Unfiltered, only the
        page's runs are read; a filter reads every run (rows are kept between requests)."""
        text = request.query_params.get("q", "")
        status = request.query_params.get("status", "")
        asked = request.query_params.get("page", "1")
        number = int(asked) if asked.isdigit() and int(asked) > 0 else 1
        if text or status:
            every = self.listing.rows()
            total, matching = len(every), viewer.filter_rows(every, text, status)
            pages = max(1, -(-len(matching) // PAGE_SIZE))
            number = min(number, pages)
            shown = matching[(number - 1) * PAGE_SIZE : number * PAGE_SIZE]
        else:
            names = self.listing.names()
            total = len(names)
            pages = max(1, -(-total // PAGE_SIZE))
            number = min(number, pages)
            shown = self.listing.rows(names[(number - 1) * PAGE_SIZE : number * PAGE_SIZE])
        choices = sorted({*viewer.STATUSES, *(row.status for row in shown if row.status)})
        return self.page(
            "runs.html",
            rows=shown,
            total=total,
            q=text,
            status=status,
            statuses=choices,
            page=number,
            pages=pages,
        )

    def run_page(self, request: Request) -> HTMLResponse:
        page = viewer.run_page(self.run(request))
        return self.page("run.html", page=page, run=page.run)

    def calls(self, request: Request) -> JSONResponse:
        run = self.run(request)
        stage = request.path_params["stage"]
        turn = request.query_params.get("turn")
        try:
            if turn is not None:
                if stage != "dialogue" or not turn.isdigit():
                    raise HTTPException(404, "only the dialogue's turns have calls")
                found = viewer.turn_calls(run, int(turn))
            else:
                found = viewer.stage_calls(run, stage)
        except RunError as e:
            raise HTTPException(404, e.message) from e
        return JSONResponse(found)

    def file(self, request: Request) -> FileResponse:
        path = viewer.resolve(
            self.runs_dir, request.path_params["run_id"], request.path_params["path"]
        )
        if path is None:
            raise HTTPException(404, "no such file")
        kind = "application/json" if path.suffix == ".json" else "text/plain"
        return FileResponse(path, media_type=f"{kind}; charset=utf-8")

    def diff(self, request: Request) -> HTMLResponse:
        from .views import diff_runs

        a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
        lines: list[str] | None = None
        error = None
        if a and b:
            try:
                lines = diff_runs(open_run(self.runs_dir, a), open_run(self.runs_dir, b)).split(
                    "\n"
                )
            except RunError as e:
                error = e.message
        ids = self.listing.names()
        return self.page(
            "diff.html", 404 if error else 200, a=a, b=b, lines=lines, error=error, ids=ids
        )

    def memory(self, request: Request) -> HTMLResponse:
        from . import memory
        from .memorydb import database

        query = request.query_params.get("q", "")
        role = request.query_params.get("role", "")
        score = request.query_params.get("min_score", "")
        found, error = None, None
        exists = database(self.runs_dir).is_file()
        if query and exists:
            try:
                minimum = float(score) if score else None
                found = memory.search(
                    self.runs_dir, query, role=role or None, min_score=minimum, limit=50
                )
            except ValueError:
                error = f"min score {score!r} is not a number"
            except PipelineError as e:
                error = e.message
        return self.page(
            "memory.html",
            400 if error else 200,
            q=query,
            role=role,
            min_score=score,
            found=found,
            error=error,
            exists=exists,
        )

    def lineage(self, request: Request) -> HTMLResponse:
        from .lineage import lineage

        target = request.query_params.get("target", "").strip()
        links, error = None, None
        if target:
            try:
                links = lineage(self.runs_dir, target)
            except PipelineError as e:
                error = e.message
        return self.page(
            "lineage.html", 404 if error else 200, target=target, links=links, error=error
        )

    async def static_file(self, request: Request) -> Response:
        found = self.static.get(request.path_params["name"])
        if found is None:
            raise HTTPException(404, "no such file")
        body, kind = found
        return Response(body, media_type=kind, headers={"cache-control": "no-cache"})

    async def live(self, request: Request) -> StreamingResponse:
        """The run's transcript lines after the first ``after`` (or the ``Last-Event-ID``),
        each as a ``turn`` event with its HTML and its line number as the event id, as
        they are written; then ``end``."""
        run = await run_in_threadpool(self.run, request)
        # a reconnecting EventSource sends the number of the last line it got
        start = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        after = int(start) if start.isdigit() else 0
        token = ""
        try:
            roles = await run_in_threadpool(viewer.load_roles, run)
            token = roles.done_token if roles is not None else ""
        except PipelineError:
            pass
        tail = viewer.Tail(run.path(run.transcript), after)
        template = web_environment().get_template("turn.html")
        timed = await run_in_threadpool(viewer.calls_timed, run)

        manifest = viewer.Stamp(run.path("run.json"))

        def alive() -> bool:
            """A stage is running; the manifest read again only when it changed."""
            if manifest.changed():
                try:
                    run.reload()
                except RunError:
                    return False
            return any(run.alive(name) for name in list(run.manifest.stages))

        def fragments(lines: list[tuple[int, Turn]]) -> list[str]:
            """Each line's HTML, with the runs its tool calls delegated to."""
            children = viewer.children_by_call(run)
            return [
                template.render(t=viewer.turn_view(line, token, children, timed), run=run)
                for _, line in lines
            ]

        async def events() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            quiet = 0.0
            while True:
                going = await run_in_threadpool(alive)
                lines = await run_in_threadpool(tail.poll)
                shown = await run_in_threadpool(fragments, lines) if lines else []
                for (number, line), html in zip(lines, shown, strict=True):
                    data = json.dumps({"turn": line.turn, "html": html})
                    yield f"id: {number}\nevent: turn\ndata: {data}\n\n"
                if not going:
                    final = await run_in_threadpool(viewer.read_row, self.runs_dir, run.run_id)
                    data = json.dumps(
                        {"status": final.status, "stages": final.stages, "turns": tail.count}
                    )
                    yield f"event: end\ndata: {data}\n\n"
                    return
                if self.stopping():  # end the stream; the page's EventSource will retry
                    return
                quiet = 0.0 if lines else quiet + POLL
                if quiet >= PING:
                    quiet = 0.0
                    yield ": ping\n\n"
                await asyncio.sleep(POLL)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )


def create_app(runs_dir: Path, *, token: str | None = None, view: View | None = None) -> ASGIApp:
    """The view over ``runs_dir`` (``view``'s pages when given): every request must carry
    ``token`` when one is given; without one, requests must be addressed to a local host
    name."""
    view = view or View(runs_dir)

    async def not_found(request: Request, exc: Exception) -> Response:
        detail = exc.detail if isinstance(exc, HTTPException) else "not found"
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        return view.page("error.html", status, message=detail or "not found")

    routes = [
        Route("/", view.runs),
        Route("/runs/{run_id}", view.run_page),
        Route("/runs/{run_id}/live", view.live),
        Route("/runs/{run_id}/calls/{stage}", view.calls),
        Route("/runs/{run_id}/files/{path:path}", view.file),
        Route("/diff", view.diff),
        Route("/memory", view.memory),
        Route("/lineage", view.lineage),
        Route("/static/{name}", view.static_file),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    return Guard(app, token)


# -- serving -----------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host``:``port`` (0: a free port).

    Raises:
        PipelineError: the address cannot be bound (in use, not this machine's).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise PipelineError(f"cannot listen on {host}: {e}", fix=Fix("check {}", ("host",))) from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise PipelineError(
            f"cannot listen on {host}:{port}: {e.strerror}",
            fix=Fix("choose another {}", ("port",)),
        ) from e
    sock.set_inheritable(True)
    return sock


def url(host: str, port: int) -> str:
    """The address to open for ``host`` and ``port``."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


class Server:
    """The view served by uvicorn on a socket already listening (:func:`listen`):
    :meth:`run` serves until :meth:`stop` or Ctrl-C."""

    def __init__(self, runs_dir: Path, sock: socket.socket, token: str | None) -> None:
        import uvicorn

        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.view = View(runs_dir)
        config = uvicorn.Config(
            create_app(runs_dir, token=token, view=self.view),
            log_config=None,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.view.stopping = lambda: bool(self.server.should_exit)

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.sock.close()

    def stop(self) -> None:
        self.server.should_exit = True


def serve(runs_dir: Path, host: str, port: int, notify: Callable[[str], None] = print) -> None:
    """Serve the view of ``runs_dir`` on ``host``:``port`` until Ctrl-C; ``notify`` gets
    where (and, for an address that needs one, the token, generated here).

    Raises:
        PipelineError: the address cannot be bound.
    """
    token = secrets.token_urlsafe(32) if needs_token(host) else None
    sock = listen(host, port)
    server = Server(runs_dir, sock, token)
    server.view.warm()  # the runs list is read while the browser is being opened
    address = url(host, server.port)
    if token is None:
        notify(f"viewing {runs_dir} at {address} (Ctrl-C to stop)")
    else:
        notify(f"viewing {runs_dir} at {address}?token={token} (Ctrl-C to stop)")
        notify(f"token: {token} (every request must carry it: ?token=, or Authorization: Bearer)")
    server.run()

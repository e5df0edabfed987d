"""A fake Hugging Face Hub on 127.0.0.1: the file-download part of its HTTP API.

It answers ``HEAD`` and ``GET`` on ``/{owner}/{name}/resolve/{revision}/{filename}`` as the
Hub does for a file stored with LFS, so huggingface_hub's real ``hf_hub_download`` runs
against it (point it here with ``HF_ENDPOINT=hub.url``):

- found: 200 with ``X-Repo-Commit`` (the commit the revision is at), ``ETag`` (the
  file's sha256, quoted), ``Content-Length``, ``Content-Disposition`` (the file's name);
  ``GET`` sends the bytes. No ``X-Xet-Hash``
  header, so huggingface_hub downloads over plain HTTP, not with Xet.
- unknown repository: 401 ``X-Error-Code: RepoNotFound`` (what the Hub answers, to
  avoid telling private repositories from missing ones);
- unknown revision: 404 ``X-Error-Code: RevisionNotFound``;
- unknown file: 404 ``X-Error-Code: EntryNotFound``, with ``X-Repo-Commit``.

Every request is recorded in :attr:`FakeHub.requests` (method, path, headers).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

COMMIT = "4f1c3e2d5b6a79808182838485868788898a8b8c"  # 40 hex digits, as the Hub's commits


def gguf_bytes(size: int = 4096) -> bytes:
    """A small made-up GGUF file: the magic ``GGUF``, then ``size - 4`` patterned bytes."""
    return b"GGUF" + bytes(i % 251 for i in range(size - 4))


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


class FakeHub:
    """Serves ``files``, a map of ``(repo, filename)`` to bytes, all at revision ``main``
    (= :data:`COMMIT`, also accepted by hash). Start with :meth:`start` or ``with``."""

    def __init__(self, files: dict[tuple[str, str], bytes]) -> None:
        self.files = files
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )  # a short poll interval: stop() waits for one

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, method: str, repo: str, filename: str) -> int:
        """How many ``method`` requests asked for ``filename`` of ``repo``."""
        return sum(
            1
            for r in self.requests
            if r.method == method
            and r.path.startswith(f"/{repo}/resolve/")
            and unquote(r.path).endswith(f"/{filename}")
        )

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._resolve(send_body=False)

            def do_GET(self) -> None:
                self._resolve(send_body=True)

            def _resolve(self, send_body: bool) -> None:
                with hub._lock:
                    hub.requests.append(
                        Request(
                            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
                        )
                    )
                parts = self.path.split("?")[0].lstrip("/").split("/")
                repo, revision = "/".join(parts[:2]), unquote("/".join(parts[3:4]))
                filename = unquote("/".join(parts[4:]))
                if parts[2:3] != ["resolve"] or repo not in {r for r, _ in hub.files}:
                    self._error(401, "RepoNotFound", "Repository not found")
                elif revision not in ("main", COMMIT):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                elif (repo, filename) not in hub.files:
                    self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": COMMIT})
                else:
                    data = hub.files[repo, filename]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Accept-Ranges", "bytes")
                    base = filename.rsplit("/", 1)[-1]  # names the progress bar, as on the Hub
                    self.send_header(
                        "Content-Disposition",
                        f"inline; filename*=UTF-8''{base}; filename=\"{base}\";",
                    )
                    self.end_headers()
                    if send_body:
                        self.wfile.write(data)

            def _error(
                self,
                code: int,
                error_code: str,
                message: str,
                headers: dict[str, str] | None = None,
            ) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", message)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        return Handler

"""The embedded offline model: llama.cpp's own server (``xllamacpp``) in a child process.

:class:`LocalServer` starts :mod:`pipeline.engine` as a child process on a free 127.0.0.1
port, polls it until ``/v1/models`` answers, and always stops it when the context exits
(normal exit, error, Ctrl-C). On Linux the child is also asked to receive SIGTERM if the
parent dies (``PR_SET_PDEATHSIG``), so even a killed ``pipeline`` leaves no orphan server.
A child process keeps Ctrl-C handling and memory accounting simple: the engine's threads
never share an interpreter with the pipeline's.

One server serves one GGUF file to every slot of a command (the director, each role, the
moderator, the judge): it has a slot per conversation (:data:`SLOTS`), all in one KV cache
of :func:`context_tokens` tokens. llama.cpp gives a request the slot whose cached prompt
shares the longest prefix with it, so each role's growing conversation keeps its slot and
only the newest message is read on each turn. A batch with ``-j N`` gets N times the
slots and the cache, and its dialogues are decoded together (continuous batching).

The GGUF is the default model (:func:`pipeline.modelfiles.default_model`) unless a file is
given (``--model-file``, or ``gguf`` in ``pipeline.toml``). Its context size and chat
template are its own: the cache holds the model's training context, at most
:data:`MAX_CONTEXT` tokens per conversation.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from .endpoints import Endpoint
from .errors import ConfigError, Fix, LocalServerError
from .modelfiles import GGUFInfo, Notify, default_model, describe

SERVER_KIND = "llama.cpp"
START_TIMEOUT_S = 120.0
SLOTS = 10  # up to 8 roles, a moderator and the director or judge: one conversation each
MAX_CONTEXT = 8192  # tokens of KV cache per concurrent dialogue, at most
NOT_INSTALLED = "no model endpoint is configured and the embedded engine is not installed"
INSTALL_FIXES = (
    Fix("install it with pip install 'converse-pipeline[local]'"),
    Fix("or point at a server with {} URL {} NAME (or OPENAI_BASE_URL)", ("base_url", "model")),
)


def check_installed() -> None:
    """Raises:
    ConfigError: the ``local`` extra (xllamacpp, gguf) is missing."""
    for module in ("xllamacpp", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(NOT_INSTALLED, fix=INSTALL_FIXES)


def resolve_model(gguf: Path | None = None, notify: Notify | None = None) -> GGUFInfo:
    """The :class:`~pipeline.modelfiles.GGUFInfo` of ``gguf``, or of the default model
    (downloaded on first use) when it is None.

    Raises:
        ConfigError: the ``local`` extra is missing.
        ModelFileError: the file is missing or not GGUF, or the download failed.
    """
    check_installed()
    return describe(gguf if gguf is not None else default_model(notify), notify)


def context_tokens(model: GGUFInfo, sessions: int = 1) -> int:
    """The KV cache size for ``sessions`` concurrent dialogues: the model's training
    context (or :data:`MAX_CONTEXT` when the file does not say), at most
    :data:`MAX_CONTEXT`, times ``sessions``."""
    return min(model.context_length or MAX_CONTEXT, MAX_CONTEXT) * max(1, sessions)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(host: str, port: int, model: GGUFInfo, *, sessions: int = 1) -> list[str]:
    """The command line that serves ``model`` on ``host:port`` for ``sessions`` concurrent
    dialogues (see :mod:`pipeline.engine`)."""
    return [
        sys.executable, "-m", "pipeline.engine",
        "--model", model.path,
        "--alias", model.name,
        "--host", host,
        "--port", str(port),
        "--parallel", str(SLOTS * max(1, sessions)),
        "--ctx", str(context_tokens(model, sessions)),
        "--threads", str(os.cpu_count() or 1),
    ]  # fmt: skip


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalServer:
    """The embedded model server as a child process; use it as a context manager.

    Args:
        model: the GGUF file to serve.
        host, port: where to listen (a free port when None).
        sessions: how many dialogues it serves at once (slots and KV cache scale with it).

    Attributes:
        base_url: the OpenAI API root, ``http://127.0.0.1:<port>/v1``.
        pid: the child's process id, once started.
    """

    def __init__(
        self,
        model: GGUFInfo,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        sessions: int = 1,
    ) -> None:
        self.model = model
        self.host = host
        self.port = port or free_port(host)
        self.base_url = f"http://{host}:{self.port}/v1"
        self.sessions = sessions
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._timeout = self._deadline = 0.0
        self._ready = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def ready(self) -> bool:
        """True once the server has answered."""
        return self._ready

    def endpoint(self, structured_output: str = "auto") -> Endpoint:
        """The :class:`~pipeline.endpoints.Endpoint` for this server."""
        return Endpoint(
            base_url=self.base_url,
            model=self.model.name,
            api_key_env=None,
            structured_output=structured_output,
            embedded=True,
            server=SERVER_KIND,
            gguf=self.model.path,
            gguf_sha256=self.model.sha256,
        )

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server and wait until ``/v1/models`` answers (:meth:`launch`, then
        :meth:`wait_ready`).

        Raises:
            LocalServerError: the server exited or did not answer within ``timeout`` seconds.
        """
        self.launch(timeout)
        self.wait_ready()

    def launch(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server process and return at once; :meth:`wait_ready` waits for it,
        up to ``timeout`` seconds from now."""
        command = server_command(self.host, self.port, self.model, sessions=self.sessions)
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches pipeline, which stops the server in order
            preexec_fn=_die_with_parent,
        )
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout

    def wait_ready(self) -> None:
        """Wait until the launched server answers ``/v1/models`` (at once when it already
        did).

        Raises:
            LocalServerError: the server exited, or did not answer by the launch's deadline.
        """
        assert self.process is not None, "launch() first"
        while not self._ready and time.monotonic() < self._deadline:
            if self.process.poll() is not None:
                tail = self._log_tail()
                self.stop()
                raise LocalServerError(
                    f"the embedded model server exited during start-up "
                    f"(code {self.process.returncode}): {tail}"
                )
            self._ready = self._answers()
            if not self._ready:
                time.sleep(0.1)
        if not self._ready:
            self.stop()
            raise LocalServerError(
                f"the embedded model server did not answer on {self.base_url} "
                f"within {self._timeout:.0f} s"
            )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no output"

    def stop(self, grace: float = 5.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``grace`` seconds; SIGKILL at once
        when ``grace`` is 0) and reap it."""
        process = self.process
        if process is not None and process.poll() is None:
            if grace > 0:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(grace)
            if process.poll() is None:
                process.kill()
            process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        # On Ctrl-C a request may still be in flight, and a graceful shutdown would wait
        # for the model to finish it: nothing on the server is worth that wait.
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.stop(grace=0 if interrupted else 5.0)


def serve(host: str, port: int, model: GGUFInfo) -> int:
    """Serve ``model`` in the foreground until it exits or Ctrl-C; return its exit code.
    Its log goes to this process's terminal."""
    command = [*server_command(host, port, model), "--verbose"]
    process = subprocess.Popen(command, preexec_fn=_die_with_parent)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()

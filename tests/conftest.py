"""Shared fixtures: an isolated environment, the fake server, a CLI runner."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pipeline.cli import cli

from .fakeserver import Action, FakeServer, Reply

ROLES = {
    "roles": [
        {
            "name": "Student",
            "system_prompt": "I want you to act as a student writing a paper on AI ethics. "
            "I am your mentor. When the paper is done, end your message with <TASK_DONE>.",
        },
        {
            "name": "Mentor",
            "system_prompt": "I want you to act as my mentor, an expert in AI ethics. "
            "I am your student.",
        },
    ],
    "termination": {
        "done_token": "<TASK_DONE>",
        "declared_by": "Student",
        "acceptance_criteria": "A complete draft that the mentor has approved.",
    },
    "opening_line": "Could you suggest some topics for a paper on AI ethics?",
}


def conversation(body: dict[str, Any]) -> Action:
    """Default fake behaviour: roles for a structured request; "reply N" for turn N."""
    if body.get("response_format"):
        return Reply(json.dumps(ROLES))
    return Reply(f"reply {len(body['messages'])}")


# Threads a test may leave running, by name prefix: a library's own long-lived threads that
# no test can stop. Nothing needs one yet.
ALLOWED_THREAD_PREFIXES: tuple[str, ...] = ()

# Every signal whose handler a test could change (SIGINT and SIGTERM: cli.main sets them),
# but SIGALRM: pytest-timeout's, which it resets itself when a test fails.
SIGNALS = [s for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGALRM)]


def environment() -> dict[str, str]:
    """os.environ but for what pytest itself changes during a test."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


def os_handler(signum: int) -> int | None:
    """The address of the process's handler for ``signum`` as the OS knows it (sigaction),
    which a library outside Python can change unseen by ``signal.getsignal``; None where
    it cannot be read (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    action = ctypes.create_string_buffer(256)  # struct sigaction; sa_handler comes first
    if ctypes.CDLL(None).sigaction(int(signum), None, action) != 0:
        return None
    return int.from_bytes(action.raw[: ctypes.sizeof(ctypes.c_void_p)], sys.byteorder)


@dataclass(frozen=True)
class ProcessState:
    """What one test can change for the tests after it: signal handlers, the main thread's
    signal mask, running threads, the environment. Take it on the main thread."""

    handlers: dict[signal.Signals, Any]
    os_handlers: dict[signal.Signals, int | None]
    mask: set[int | signal.Signals]
    threads: set[threading.Thread]
    environ: dict[str, str]

    @classmethod
    def now(cls) -> ProcessState:
        return cls(
            handlers={signum: signal.getsignal(signum) for signum in SIGNALS},
            os_handlers={signum: os_handler(signum) for signum in SIGNALS},
            mask=signal.pthread_sigmask(signal.SIG_BLOCK, []),
            threads=set(threading.enumerate()),
            environ=environment(),
        )

    def left_behind(self, allowed_threads: tuple[str, ...] = ALLOWED_THREAD_PREFIXES) -> list[str]:
        """What differs from this state now, one sentence each; what can be put back (all
        but threads) is put back. New daemon threads, and new threads whose name starts
        with one of ``allowed_threads``, do not count."""
        leaks = []
        for signum, handler in self.handlers.items():
            if (now := signal.getsignal(signum)) != handler:
                leaks.append(f"the {signum.name} handler is {now!r}, was {handler!r}")
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(signum, handler)
        for signum, address in self.os_handlers.items():
            if (now_address := os_handler(signum)) != address:
                # code outside Python (a C or Rust library) replaced the process's handler:
                # Python's getsignal cannot see it; setting Python's own puts it back
                leaks.append(f"the {signum.name} handler was replaced outside Python")
                handler = signal.getsignal(signum)
                if handler is not None:
                    signal.signal(signum, handler)
                del now_address
        if (mask := signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)) != self.mask:
            leaks.append(f"the blocked signals are {sorted(mask)}, were {sorted(self.mask)}")
        for thread in threading.enumerate():
            if (
                thread not in self.threads
                and not thread.daemon
                and not thread.name.startswith(allowed_threads)
            ):
                leaks.append(f"thread {thread.name!r} is still running")
        if (environ := environment()) != self.environ:
            changed = {name for name, _ in environ.items() ^ self.environ.items()}
            leaks.append(f"the environment variables {sorted(changed)} changed")
            for name in environ.keys() - self.environ.keys():
                del os.environ[name]
            os.environ.update(self.environ)
        return leaks


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt during the test, as in a terminal, whatever this
    process inherited: a shell starts a background job (``pytest &``) with SIGINT ignored,
    and Python then leaves it ignored, so neither a SIGINT nor ``_thread.interrupt_main``
    would raise anything (issue 18). The handler is put back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(autouse=True)
def leaves_the_process_as_it_found_it() -> Iterator[None]:
    """Fail (at teardown) a test that leaves process-wide state behind for the tests after
    it (join the threads you start; restore what you change, e.g. with monkeypatch). Set
    up before the other fixtures (clean_env, the first to ask for monkeypatch, needs it),
    so torn down after them: what they put back is not reported."""
    before = ProcessState.now()
    yield
    if leaks := before.left_behind():
        pytest.fail("the test left process-wide state behind: " + "; ".join(leaks))


@pytest.fixture(autouse=True)
def clean_env(leaves_the_process_as_it_found_it: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's endpoint settings or keys. (After the state check is
    set up, so that monkeypatch has put the environment back when the check runs.)"""
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "PIPELINE_MODEL",
        "PIPELINE_RUNS_DIR",
        "PIPELINE_DEBUG",
        "EDITOR",
        "VISUAL",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer(conversation) as server:
        yield server


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def invoke(runs_dir: Path):  # type: ignore[no-untyped-def]
    """Run the CLI in-process with --runs-dir pointing into tmp_path."""

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(cli, [*args, "--runs-dir", str(runs_dir)], input=input, env=env)

    return run


def run_folders(runs_dir: Path) -> list[Path]:
    """The run folders of ``runs_dir``, sorted (not its batches, ledgers or memory)."""
    from pipeline.runs import RUN_ID_RE

    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and RUN_ID_RE.match(p.name))


def only_run(runs_dir: Path) -> Path:
    """The single run folder under runs_dir."""
    folders = [p for p in runs_dir.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders
    return folders[0]


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run but its manifest and lock, by relative path: what a replay
    reproduces byte for byte."""
    return {
        p.relative_to(run_dir).as_posix(): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in ("run.json", ".lock")
    }


def task_of(prompt: str) -> str:
    """The task in a director's prompt (between ``<task>`` lines)."""
    import re

    return re.search(r"<task>\n(.*?)\n</task>", prompt, re.DOTALL).group(1)  # type: ignore[union-attr]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def unusable_director_error(run: Path, attempts: int, problem: str) -> str:
    """The one-line error for a director stage with no usable answer."""
    return (
        f"Error: run {run.name}: the director's answer was unusable after {attempts} attempt(s): "
        f"{problem}; the answers are in {run / 'director'}; "
        f"regenerate with: pipeline rerun {run.name} director --runs-dir {run.parent}"
    )


# -- fine-tuning -----------------------------------------------------------------------


def write_dataset(path: Path, examples: int) -> Path:
    """A chat fine-tuning dataset of ``examples`` lines at ``path``."""
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "You are Ana."},
                    {"role": "user", "content": f"How was day {i}?"},
                    {"role": "assistant", "content": "Fine, thanks."},
                ]
            }
        )
        for i in range(1, examples + 1)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def only_ledger(runs_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The single fine-tune ledger under runs_dir: its path and its JSON."""
    (path,) = (runs_dir / "finetunes").glob("*.json")
    return path, json.loads(path.read_text())


def timeless(ledger: dict[str, Any]) -> dict[str, Any]:
    """``ledger`` with its times (checked to be ISO 8601 UTC) replaced by ``"<time>"``, and
    its history as the statuses alone."""
    import re

    def check(value: str | None) -> str | None:
        if value is None:
            return None
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", value), value
        return "<time>"

    files = {
        key: None
        if ledger[key] is None
        else {**ledger[key], "deleted": check(ledger[key]["deleted"])}
        for key in ("training", "validation")
    }
    history = [h["status"] for h in ledger["history"] if check(h["time"])]
    return {**ledger, **files, "created": check(ledger["created"]), "history": history}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tiktoken_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No network for tiktoken, whatever this machine can reach: an empty cache folder of
    its own (TIKTOKEN_CACHE_DIR, yielded), and HTTPS through a proxy that refuses
    connections, so a download fails at once and tokens are counted the same everywhere.
    What the library remembers of earlier loads is forgotten before and after."""
    from pipeline import dataset

    dataset._encoding.cache_clear()
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    proxy = f"http://127.0.0.1:{closed_port()}"
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    yield cache
    dataset._encoding.cache_clear()

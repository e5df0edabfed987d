"""Batches on Ray (``pipeline batch --ray``, :mod:`pipeline.raybatch`): a local Ray
instance of two CPUs, started once for the module in a process of its own, which each
batch joins through ``python -m pipeline batch --ray --ray-address`` (so Ray's threads and
signal handlers stay out of this process, and the CLI is exercised whole), against the
fake server; and the driver's handling of run folders, which needs no Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import raybatch

from .conftest import ROLES, conversation, read_jsonl, run_files, run_folders
from .fakeserver import Action, FakeServer, Reply, Reset, Status

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed (pip install -e '.[ray]', or the test extra)",
)
TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
HEAD = """
import logging, sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the tests close it
ray.shutdown()
"""


# Ray's token authentication, the head's and every client's: a token of this module's own,
# so nothing is read from or written to ~/.ray
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def clean_env() -> dict[str, str]:
    return {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OPENAI_", "PIPELINE_", "RAY_")) or k == "PIPELINE_CACHE_DIR"
        },
        **RAY_AUTH,
    }


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """The address of a local Ray instance of 2 CPUs, for the whole module."""
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=clean_env(),
        text=True,
    )
    assert head.stdout is not None and head.stdin is not None
    address = head.stdout.readline().strip()
    try:
        assert address, "the Ray instance did not start"
        yield address
    finally:
        head.stdin.close()
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        head.stdout.close()


def ray_batch(
    address: str, tasks: Path, runs_dir: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "batch", str(tasks), "--ray", "--ray-address",
         address, "--runs-dir", str(runs_dir), *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def tasks_file(folder: Path, count: int) -> Path:
    path = folder / "tasks.txt"
    path.write_text("".join(f"task number {i}\n" for i in range(count)))
    return path


def batch_record(runs_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((runs_dir / "batches" / "tasks.json").read_text())
    return record


def timeless(files: dict[str, bytes]) -> dict[str, bytes]:
    return {path: TIME.sub(b"<time>", data) for path, data in files.items()}


# -- on Ray ---------------------------------------------------------------------------


@needs_ray
def test_a_batch_on_ray_makes_the_runs_a_local_batch_makes(ray_address, fake, invoke, tmp_path):
    tasks = tasks_file(tmp_path, 40)
    endpoint = ("--base-url", fake.base_url, "--model", "m", "--turns", "4")
    local = invoke("batch", str(tasks), "-j", "4", *endpoint)  # into tmp_path/runs
    assert local.exit_code == 0, local.output
    on_ray = ray_batch(ray_address, tasks, tmp_path / "ray-runs", "-j", "4", *endpoint)
    assert on_ray.returncode == 0, on_ray.stderr

    rows = on_ray.stdout.splitlines()
    assert rows[0].split() == ["STATUS", "TURNS", "ENDED", "BY", "RUN", "TASK"]
    assert [row.split()[:2] for row in rows[1:]] == [["done", "4"]] * 40
    mine, theirs = batch_record(tmp_path / "ray-runs"), batch_record(tmp_path / "runs")
    assert mine["tasks"].keys() == theirs["tasks"].keys()
    assert all(entry["status"] == "done" for entry in mine["tasks"].values())
    assert len(run_folders(tmp_path / "ray-runs")) == 40
    for key, entry in mine["tasks"].items():
        ray_run = tmp_path / "ray-runs" / entry["run_id"]
        local_run = tmp_path / "runs" / theirs["tasks"][key]["run_id"]
        assert timeless(run_files(ray_run)) == timeless(run_files(local_run)), entry["task"]
    assert not (tmp_path / "ray-runs" / raybatch.INCOMING).exists()
    # the driver, not a worker, remembered every run
    with sqlite3.connect(tmp_path / "ray-runs" / "memory.db") as db:
        (remembered,) = db.execute("SELECT count(DISTINCT run_id) FROM memories").fetchone()
    assert remembered == 40

    again = ray_batch(ray_address, tasks, tmp_path / "ray-runs", *endpoint)
    assert again.returncode == 0, again.stderr
    assert [row.split()[0] for row in again.stdout.splitlines()[1:]] == ["skipped"] * 40


def client_pid(port: int) -> int | None:
    """The process that holds the TCP connection from 127.0.0.1:``port`` (Linux)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}"):
            inode = fields[9]
    if inode is None:
        return None
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == f"socket:[{inode}]":
                return int(fd.parts[2])
        except OSError:
            continue
    return None


def kill_ray_worker(fake: FakeServer, killed: list[int]) -> bool:
    """SIGKILL the Ray worker process whose request ``fake`` is answering (found by its
    connection in /proc), noting its pid in ``killed``; False when the caller is not one."""
    pid = client_pid(fake.local.client[1])
    if pid is None or b"ray::" not in Path(f"/proc/{pid}/cmdline").read_bytes():
        return False
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)
    return True


@needs_ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker in /proc")
def test_a_worker_killed_mid_task_leaves_every_run_complete_once(ray_address, tmp_path):
    killed: list[int] = []
    count = 0
    lock = threading.Lock()

    def responder(body: dict[str, Any]) -> Action:
        nonlocal count
        with lock:
            count += 1
            kill = count == 12  # the third task or so, halfway through its dialogue
        if kill and kill_ray_worker(fake, killed):
            return Reset()
        return conversation(body)

    tasks = tasks_file(tmp_path, 8)
    runs_dir = tmp_path / "runs"
    with FakeServer(responder) as fake:
        done = ray_batch(
            ray_address, tasks, runs_dir, "--base-url", fake.base_url, "--model", "m",
            "--turns", "4",
        )  # fmt: skip
        requests = len(fake.chat_requests())
    assert done.returncode == 0, done.stderr
    assert killed, "no Ray worker was killed"
    assert "A worker died or was killed" in done.stderr  # Ray's words, not in the table
    assert [row.split()[0] for row in done.stdout.splitlines()[1:]] == ["done"] * 8
    record = batch_record(runs_dir)
    assert len(record["tasks"]) == 8
    assert all(entry["status"] == "done" for entry in record["tasks"].values())
    assert sorted(p.name for p in run_folders(runs_dir)) == sorted(
        entry["run_id"] for entry in record["tasks"].values()
    )  # one run per task: the retry made the same run, once
    for entry in record["tasks"].values():
        turns = read_jsonl(runs_dir / entry["run_id"] / "dialogue" / "transcript.jsonl")
        assert [turn["turn"] for turn in turns] == [1, 2, 3, 4]
    assert requests > 8 * 4  # the killed task's calls were made again
    assert not list(Path(tempfile.gettempdir()).glob(f"pipeline-ray-{killed[0]}-*"))


@needs_ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker in /proc")
def test_a_task_whose_worker_always_dies_fails_after_ray_s_retries(ray_address, tmp_path):
    killed: list[int] = []

    def responder(body: dict[str, Any]) -> Action:
        prompt = body["messages"][-1]["content"] if body.get("response_format") else ""
        if "task number 0" in prompt and kill_ray_worker(fake, killed):
            return Reset()
        return conversation(body)

    tasks = tasks_file(tmp_path, 2)
    runs_dir = tmp_path / "runs"
    with FakeServer(responder) as fake:
        done = ray_batch(
            ray_address, tasks, runs_dir, "--base-url", fake.base_url, "--model", "m",
            "--turns", "2",
        )  # fmt: skip
    assert done.returncode == 1
    assert len(killed) == raybatch.WORKER_RETRIES + 1
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: 1 of 2 tasks failed; run the same command again to retry them"
    )
    record = batch_record(runs_dir)
    (failed,) = [e for e in record["tasks"].values() if e["status"] == "failed"]
    assert failed["task"] == "task number 0"
    assert failed["error"].startswith("its Ray worker died 4 times: ")
    assert not (runs_dir / failed["run_id"]).exists()  # nothing of it reached the runs
    assert len(run_folders(runs_dir)) == 1


@needs_ray
def test_killing_the_driver_and_running_it_again_finishes_only_what_is_missing(
    ray_address, tmp_path
):
    def slow(body: dict[str, Any]) -> Action:
        if body.get("response_format"):
            return Reply(json.dumps(ROLES))
        return Reply(f"reply {len(body['messages'])}", delay=0.1)

    tasks = tasks_file(tmp_path, 8)
    runs_dir = tmp_path / "runs"
    with FakeServer(slow) as fake:
        command = [
            sys.executable, "-m", "pipeline", "batch", str(tasks), "--ray", "--ray-address",
            ray_address, "--runs-dir", str(runs_dir), "--base-url", fake.base_url,
            "--model", "m", "--turns", "4", "-j", "2",
        ]  # fmt: skip
        driver = subprocess.Popen(
            command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def finished() -> list[str]:
            try:
                record = batch_record(runs_dir)
            except (FileNotFoundError, json.JSONDecodeError):
                return []
            return [e["run_id"] for e in record["tasks"].values() if e.get("status") == "done"]

        deadline = time.monotonic() + 60
        while len(finished()) < 2:
            assert time.monotonic() < deadline and driver.poll() is None, "no task finished"
            time.sleep(0.05)
        driver.kill()
        driver.wait()
        done_before = finished()
        assert len(done_before) < 8, "the batch ended before it could be killed"
        stamps = {r: (runs_dir / r / "run.json").stat().st_mtime_ns for r in done_before}

        again = subprocess.run(
            command, env=clean_env(), capture_output=True, text=True, timeout=120
        )
    assert again.returncode == 0, again.stderr
    rows = again.stdout.splitlines()[1:]
    assert sorted(row.split()[0] for row in rows) == sorted(
        ["skipped"] * len(done_before) + ["done"] * (8 - len(done_before))
    )
    record = batch_record(runs_dir)
    assert all(entry["status"] == "done" for entry in record["tasks"].values())
    assert sorted(p.name for p in run_folders(runs_dir)) == sorted(
        entry["run_id"] for entry in record["tasks"].values()
    )
    for run_id, stamp in stamps.items():  # finished runs were not redone
        assert (runs_dir / run_id / "run.json").stat().st_mtime_ns == stamp
    for entry in record["tasks"].values():
        turns = read_jsonl(runs_dir / entry["run_id"] / "dialogue" / "transcript.jsonl")
        assert [turn["turn"] for turn in turns] == [1, 2, 3, 4]


@needs_ray
def test_a_failed_run_is_finished_on_ray_from_its_last_complete_turn(
    ray_address, invoke, runs_dir, tmp_path
):
    count = 0

    def fails_once(body: dict[str, Any]) -> Action:
        nonlocal count
        count += 1
        return Status(400, "bad request") if count == 4 else conversation(body)

    tasks = tasks_file(tmp_path, 2)
    endpoint = ("--model", "m", "--turns", "4")
    with FakeServer(fails_once) as fake:
        first = invoke("batch", str(tasks), "-j", "1", "--base-url", fake.base_url, *endpoint)
        assert first.exit_code == 1  # task 0: director, turns 2 and 3, then the 400
        (failed,) = [e for e in batch_record(runs_dir)["tasks"].values() if e["line"] == 1]
        transcript = runs_dir / failed["run_id"] / "dialogue" / "transcript.jsonl"
        before = transcript.read_bytes()
        assert len(before.splitlines()) == 3
        sent = len(fake.chat_requests())
        again = ray_batch(ray_address, tasks, runs_dir, "--base-url", fake.base_url, *endpoint)
        assert again.returncode == 0, again.stderr
        assert len(fake.chat_requests()) == sent + 1  # turn 4 only
    assert sorted(row.split()[0] for row in again.stdout.splitlines()[1:]) == ["done", "skipped"]
    assert transcript.read_bytes().startswith(before)
    assert [turn["turn"] for turn in read_jsonl(transcript)] == [1, 2, 3, 4]
    assert len(run_folders(runs_dir)) == 2


@needs_ray
def test_the_workers_get_the_key_from_the_driver_s_environment(ray_address, fake, tmp_path):
    tasks = tasks_file(tmp_path, 2)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "batch", str(tasks), "--ray", "--ray-address",
         ray_address, "--runs-dir", str(tmp_path / "runs"), "--base-url", fake.base_url,
         "--model", "m", "--api-key-env", "FAKE_API_KEY", "--turns", "2"],
        env={**clean_env(), "FAKE_API_KEY": "sk-driver"},  # set here only, not on the node
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    chats = [r for r in fake.received if r.path.endswith("/chat/completions")]
    assert len(chats) == 2 * 2
    assert {r.headers["authorization"] for r in chats} == {"Bearer sk-driver"}
    for run in run_folders(tmp_path / "runs"):
        assert b"sk-driver" not in b"".join(run_files(run).values())


@needs_ray
def test_without_an_address_ray_starts_a_local_instance_and_stops_it(fake, tmp_path):
    tasks = tasks_file(tmp_path, 3)
    token = secrets.token_hex(32)  # marks the processes of this instance
    env = {**clean_env(), "RAY_AUTH_TOKEN": token}  # no RAY_ADDRESS
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "batch", str(tasks), "--ray", "-j", "2",
         "--runs-dir", str(tmp_path / "runs"), "--base-url", fake.base_url, "--model", "m",
         "--turns", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [row.split()[0] for row in done.stdout.splitlines()[1:]] == ["done"] * 3
    if sys.platform.startswith("linux"):
        assert not processes_with(f"RAY_AUTH_TOKEN={token}".encode()), "Ray was left running"


def processes_with(variable: bytes) -> list[int]:
    """The processes whose environment holds ``variable`` (NAME=value)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


@needs_ray
@pytest.mark.embedded
@pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None, reason="needs the local extra")
def test_the_tasks_of_a_node_share_its_one_embedded_engine(ray_address, fake, tmp_path):
    config = tmp_path / "pipeline.toml"  # the fake directs (at once); the roles are embedded
    config.write_text(
        f'[endpoints.fake]\nbase_url = "{fake.base_url}"\nmodel = "m"\n\n'
        "[endpoints.offline]\nembedded = true\n\n"
        '[assign]\ndirector = "fake"\ndefault = "offline"\n'
    )
    tasks = tasks_file(tmp_path, 3)
    runs_dir = tmp_path / "runs"
    done = ray_batch(
        ray_address, tasks, runs_dir, "-j", "3", "--config", str(config), "--turns", "2",
        "--max-tokens", "8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    servers = set()
    for run in run_folders(runs_dir):
        manifest = json.loads((run / "run.json").read_text())
        dialogue = manifest["stages"]["dialogue"]
        assert dialogue["status"] == "done"
        assert all(endpoint["embedded"] for endpoint in dialogue["role_endpoints"])
        servers |= {endpoint["base_url"] for endpoint in dialogue["role_endpoints"]}
    (base_url,) = servers  # one engine for the node's tasks
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # stopped with the batch


# -- the driver's side, without Ray --------------------------------------------------------


def test_a_run_folder_sent_back_replaces_the_old_one_whole(tmp_path):
    runs = tmp_path / "runs"
    old = runs / "20261125T120000Z-a"
    (old / "dialogue").mkdir(parents=True)
    (old / "dialogue" / "gone.json").write_text("old")
    (old / "run.json").write_text("old")
    raybatch.install(
        runs,
        {
            "20261125T120000Z-a": {"run.json": b"new", "dialogue/transcript.jsonl": b"{}\n"},
            "20261125T120000Z-a-child": {"run.json": b"child"},
        },
    )
    assert raybatch.read_folder(old) == {"run.json": b"new", "dialogue/transcript.jsonl": b"{}\n"}
    assert raybatch.read_folder(runs / "20261125T120000Z-a-child") == {"run.json": b"child"}
    assert list((runs / raybatch.INCOMING).iterdir()) == []
    for bad in ({"../x": {}}, {"20261125T120000Z-b": {"../escape": b""}}):
        with pytest.raises(raybatch.RunError):
            raybatch.install(runs, bad)
    assert not (tmp_path / "escape").exists()


def test_a_driver_killed_while_swapping_a_run_folder_in_gets_it_back(tmp_path):
    runs = tmp_path / "runs"
    incoming = runs / raybatch.INCOMING
    moved = incoming / "20261125T120000Z-a.1234abcd.old"  # renamed away, the new one not in
    moved.mkdir(parents=True)
    (moved / "run.json").write_text("{}")
    (incoming / "20261125T120000Z-b.5678abcd.new").mkdir()  # half written
    raybatch.recover(runs)
    assert (runs / "20261125T120000Z-a" / "run.json").read_text() == "{}"
    assert not incoming.exists()


def test_a_task_travels_with_its_run_and_its_child_runs(tmp_path):
    from pipeline.records import ParentLink
    from pipeline.runs import create_run

    runs = tmp_path / "runs"
    parent = create_run(runs, "a task", run_id="20261125T120000Z-a-task")
    child = create_run(runs, "a part", run_id="20261125T120000Z-a-task-d1")
    child.manifest.parent = ParentLink(parent.run_id, 2, "call")
    child.save()
    parent.manifest.children = [child.run_id]
    parent.save()
    create_run(runs, "another", run_id="20261125T120000Z-another")
    with parent.locked():  # its lock stays behind
        tree = raybatch.read_tree(runs, parent.run_id)
    assert sorted(tree) == [parent.run_id, child.run_id]
    assert sorted(tree[parent.run_id]) == ["run.json"]
    assert json.loads(tree[child.run_id]["run.json"])["parent"]["run_id"] == parent.run_id


def test_without_ray_installed_ray_batches_say_what_to_install(monkeypatch, invoke, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a)
    )
    tasks = tasks_file(tmp_path, 1)
    endpoint = ("--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    result = invoke("batch", str(tasks), "--ray", *endpoint)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "Error: --ray needs the ray package, which is not installed; install it with pip "
        "install 'converse-pipeline[ray]'; or drop --ray to run the batch on this machine"
    )


def test_ray_address_needs_ray_and_local_jobs_stay_at_64(invoke, tmp_path):
    tasks = tasks_file(tmp_path, 1)
    endpoint = ("--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    result = invoke("batch", str(tasks), "--ray-address", "127.0.0.1:1", *endpoint)
    assert result.exit_code == 2
    assert "--ray-address needs --ray" in result.stderr
    result = invoke("batch", str(tasks), "-j", "65", *endpoint)
    assert result.exit_code == 2
    assert "65 is more than 64 on one machine (use --ray to go further)" in result.stderr

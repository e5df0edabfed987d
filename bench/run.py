"""Benchmarks: where the time goes. Run with `python bench/run.py` from the repository root
(in the environment of `pip install -e '.[local,test]'`); it prints a table of figures,
each a ratio measured side by side in this one run, with its target.

  overhead     wall time of `pipeline generate --yes` (20 turns) against a fake server that
               answers each call after 2 s (a short turn of a real model), over the sum of
               those delays; the detail splits the overhead into a fixed part and a part
               per turn, from runs that wait for nothing
  startup      `pipeline --help` over `python -c "import click"` (medians of 15 runs)
  batch        a batch of 20 tasks with -j 1 over the same batch with -j 8 (fake server)
  scaling      embedded model, as the pipeline runs it (one server, a slot per role):
               seconds per generated token at turn 12 over turn 2; and, for comparison, the
               same on llama-server
  engine       the embedded server over llama.cpp's llama-server set up the same way (same
               GGUF, slots, unified KV cache, threads) on the same 6-turn dialogue; skipped,
               with a note, when neither $LLAMA_SERVER nor llama-server on PATH names one
  memory       peak resident memory of every model process over a 6-turn two-role
               dialogue (VmHWM), embedded and llama-server, beside the figure before the
               engine changed
  throughput   `pipeline batch` of 4 tasks on the embedded model at -j 1 and -j 4:
               aggregate completion tokens per second (every stage's usage)
  ray          `pipeline batch` of 200 tasks against a fake server that answers each call
               after a fixed delay: tasks per minute with --ray on a local Ray instance
               (-j 8: 8 CPUs, a worker process each) over -j 8 on this machine (threads);
               and Ray's fixed cost, a batch of one task with --ray less the same without
               (skipped when ray is not installed)

`--quick` shortens the delays (figures are then noisier); `--only NAME...` runs some;
`--markdown FILE` also writes the table as Markdown with a description of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ROLES  # noqa: E402
from tests.fakeserver import FakeServer, Reply  # noqa: E402


def _env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENAI_", "PIPELINE_")) or k == "PIPELINE_CACHE_DIR"
    }


def _delayed(delay: float) -> Callable[[dict[str, Any]], Reply]:
    def respond(body: dict[str, Any]) -> Reply:
        if body.get("response_format"):
            return Reply(json.dumps(ROLES), delay=delay)
        n = len(body["messages"])
        return Reply(f"turn {n}: point {n * 7}, detail {n * 13}, step {n * 29}.", delay=delay)

    return respond


def _generate_seconds(fake: FakeServer, turns: int) -> float:
    """Wall seconds of one `pipeline generate --yes` of ``turns`` turns against ``fake``."""
    with tempfile.TemporaryDirectory() as runs:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable, "-m", "pipeline", "generate", "--yes",
                "--turns", str(turns), "--no-loop-detection", "--runs-dir", runs,
                "--base-url", fake.base_url, "--model", "m", "write a paper",
            ],
            env=_env(),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return time.perf_counter() - started


def bench_overhead(delay: float) -> dict[str, Any]:
    """The figure the issue asks for, plus where the overhead goes: a fixed part (start-up,
    the SDK's import) and a part per turn, from runs of 2 and 20 turns that wait for
    nothing (medians of 3)."""
    turns = 20
    with FakeServer(_delayed(0.0)) as instant:
        short = statistics.median(_generate_seconds(instant, 2) for _ in range(3))
        long = statistics.median(_generate_seconds(instant, turns) for _ in range(3))
    per_turn = (long - short) / (turns - 2)
    fixed = short - 2 * per_turn
    with FakeServer(_delayed(delay)) as fake:
        wall = _generate_seconds(fake, turns)
        calls = len(fake.chat_requests())
    served = calls * delay
    return {
        "figure": f"overhead: wall / server time (20 turns of {delay:g} s)",
        "value": wall / served,
        "target": "<= 1.02",
        "ok": wall / served <= 1.02,
        "detail": f"{wall:.2f} s wall for {calls} calls of {delay:.2f} s; overhead: "
        f"{fixed:.2f} s fixed + {per_turn * 1000:.1f} ms per turn",
    }


def _median_seconds(command: list[str], runs: int = 15) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=_env(), check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_startup() -> dict[str, Any]:
    script = Path(sys.executable).parent / "pipeline"  # the console script users run
    cli = _median_seconds([str(script), "--help"])
    click = _median_seconds([sys.executable, "-c", "import click"])
    return {
        "figure": "startup: pipeline --help / import click",
        "value": cli / click,
        "target": "<= 1.5",
        "ok": cli / click <= 1.5,
        "detail": f"{cli * 1000:.0f} ms vs {click * 1000:.0f} ms",
    }


def bench_batch(delay: float) -> dict[str, Any]:
    from pipeline.batch import Batch
    from pipeline.config import Endpoint
    from pipeline.models import Models
    from pipeline.parameters import DialogueParameters, DirectorParameters

    seconds = {}
    with FakeServer(_delayed(delay)) as fake:
        for jobs in (1, 8):
            with tempfile.TemporaryDirectory() as tmp:
                tasks = Path(tmp) / "tasks.txt"
                tasks.write_text("".join(f"task number {i}\n" for i in range(20)))
                models = Models(flags=Endpoint(fake.base_url, "m", None))
                batch = Batch(
                    tasks,
                    Path(tmp) / "runs",
                    models,
                    DirectorParameters(),
                    DialogueParameters(turns=3),
                )
                started = time.perf_counter()
                outcomes = batch.run(jobs)
                seconds[jobs] = time.perf_counter() - started
                assert all(o.status == "done" for o in outcomes), outcomes
    ratio = seconds[1] / seconds[8]
    return {
        "figure": "batch: 20 tasks, -j 1 / -j 8",
        "value": ratio,
        "target": ">= 6",
        "ok": ratio >= 6,
        "detail": f"{seconds[1]:.2f} s vs {seconds[8]:.2f} s",
    }


def _dialogue_timings(clients: list[Any], turns: int, max_tokens: int) -> list[tuple[float, int]]:
    """(seconds, streamed chunks) of each generated turn of a dialogue between ROLES, the
    speaker's client answering; a chunk is about one token on llama.cpp servers."""
    from pipeline.client import chat_body
    from pipeline.dialogue import messages_for
    from pipeline.records import RolesDocument, Turn

    roles = RolesDocument.from_json(ROLES)
    lines = [Turn(1, roles.names[0], 0, roles.opening_line, kind="opening")]
    timings = []
    for turn in range(2, turns + 1):
        speaker = (turn - 1) % 2
        client = clients[speaker]
        body = chat_body(
            client.endpoint,
            messages_for(speaker, roles, lines),
            max_tokens=max_tokens,
            temperature=0.0,
            seed=1,
            stream=True,
        )
        started = time.perf_counter()
        result = client.stream(body, lambda record: None)  # nothing recorded
        timings.append((time.perf_counter() - started, max(result.chunks, 1)))
        lines.append(Turn(turn, roles.names[speaker], speaker, result.content))
    return timings


def _embedded_dialogue(turns: int, memory: list[int] | None = None) -> list[tuple[float, int]]:
    """A dialogue on the embedded model as the pipeline runs it: one server, a slot per
    role. ``memory`` receives the peak resident memory of its model processes (bytes)."""
    from pipeline.models import Models
    from pipeline.records import RolesDocument

    with Models() as models:
        roles = RolesDocument.from_json(ROLES)
        timings = _dialogue_timings(models.roles(roles), turns, max_tokens=120)
        if memory is not None:
            memory.append(sum(_peak_rss(server.pid) for server in models.servers))
        return timings


def _llama_server_dialogue(
    binary: str, turns: int, memory: list[int] | None = None
) -> list[tuple[float, int]]:
    """The same dialogue on llama.cpp's llama-server, set up as the embedded server is."""
    from pipeline.client import ModelClient
    from pipeline.endpoints import Endpoint

    with _LlamaServer(binary) as (url, pid):
        clients = [ModelClient(Endpoint(url, "m", None)) for _ in range(2)]
        timings = _dialogue_timings(clients, turns, max_tokens=120)
        if memory is not None:
            memory.append(_peak_rss(pid))
        return timings


def _peak_rss(pid: int | None) -> int:
    """The peak resident memory of process ``pid`` so far, in bytes (Linux's VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _scaling(timings: list[list[tuple[float, int]]]) -> tuple[float, float, float]:
    """Seconds per token at the first and last generated turn (best of the runs given)
    and their ratio."""
    first = min(seconds / chunks for seconds, chunks in (run[0] for run in timings))
    last = min(seconds / chunks for seconds, chunks in (run[-1] for run in timings))
    return first, last, last / first


def bench_scaling() -> list[dict[str, Any]]:
    """Turn 12 against turn 2, best of two fresh 12-turn dialogues, as the pipeline runs
    them; then, for comparison, on llama.cpp's llama-server when there is one."""
    setups: list[tuple[str, Callable[[], list[tuple[float, int]]], int]] = [
        ("embedded, a slot per role", lambda: _embedded_dialogue(12), 2),
    ]
    binary = _llama_server()
    if binary:
        setups.append(("llama-server, same setup", lambda: _llama_server_dialogue(binary, 12), 1))
    rows = []
    for setup, dialogue, repeats in setups:
        started = time.perf_counter()
        timings = [dialogue() for _ in range(repeats)]
        wall = (time.perf_counter() - started) / repeats
        first, last, ratio = _scaling(timings)
        product = setup.startswith("embedded")
        rows.append(
            {
                "figure": f"scaling: s/token at turn 12 / turn 2 ({setup})",
                "value": ratio,
                "target": "<= 1.2" if product else "(compare)",
                "ok": ratio <= 1.2 if product else None,
                "detail": f"{first * 1000:.1f} ms vs {last * 1000:.1f} ms per token; "
                f"{wall:.1f} s per dialogue",
            }
        )
    return rows


def _llama_server() -> str | None:
    """llama.cpp's server binary: ``$LLAMA_SERVER``, else ``llama-server`` on PATH."""
    return os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")


class _LlamaServer:
    """llama.cpp's own llama-server, set up as the embedded server is: the same GGUF, KV
    cache size, slots (a unified KV cache) and threads. Gives ``(base_url, pid)``."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> tuple[str, int]:
        from pipeline.local import SLOTS, context_tokens, free_port, resolve_model

        model = resolve_model()
        threads = str(os.cpu_count() or 1)
        port = free_port()
        command = [
            self.binary, "-m", model.path, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(context_tokens(model)), "-np", str(SLOTS), "--kv-unified",
            "-t", threads, "-tb", threads, "--no-warmup",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        return url, self.process.pid

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()


def bench_engine() -> dict[str, Any]:
    """Seconds per token over the same 6-turn dialogue: embedded servers over llama-server
    (``$LLAMA_SERVER`` or ``llama-server`` on PATH), best of two each, interleaved."""
    binary = _llama_server()
    if binary is None:
        return {
            "figure": "engine: embedded / llama-server",
            "value": None,
            "target": "<= 1.1",
            "ok": None,
            "detail": "skipped: llama-server is not on PATH (nor $LLAMA_SERVER)",
        }

    def per_token(timings: list[tuple[float, int]]) -> float:
        return sum(s for s, _ in timings) / sum(c for _, c in timings)

    embedded, reference = [], []
    for _ in range(3):
        embedded.append(per_token(_embedded_dialogue(6)))
        reference.append(per_token(_llama_server_dialogue(binary, 6)))
    ratio = min(embedded) / min(reference)
    return {
        "figure": "engine: embedded / llama-server (s/token, 6 turns)",
        "value": ratio,
        "target": "<= 1.05",
        "ok": ratio <= 1.05,
        "detail": f"{min(embedded) * 1000:.1f} ms vs {min(reference) * 1000:.1f} ms per token; "
        "best of 3 each, interleaved",
    }


BEFORE_MEMORY_MB = 740  # two llama-cpp-python servers of about 370 MB (bench/RESULTS.md, 2026-11)


def bench_memory() -> list[dict[str, Any]]:
    """Peak resident memory of the model processes over a 6-turn two-role dialogue."""
    embedded: list[int] = []
    _embedded_dialogue(6, memory=embedded)
    rows = [
        {
            "figure": "memory: peak MB of the model processes, 2-role dialogue (embedded)",
            "value": embedded[0] / 1e6,
            "target": f"(before: {BEFORE_MEMORY_MB})",
            "ok": None,
            "detail": "one server; before: two llama-cpp-python servers, ~370 MB each",
        }
    ]
    binary = _llama_server()
    if binary:
        reference: list[int] = []
        _llama_server_dialogue(binary, 6, memory=reference)
        rows.append(
            {
                "figure": "memory: peak MB, 2-role dialogue (llama-server, same setup)",
                "value": reference[0] / 1e6,
                "target": "(compare)",
                "ok": None,
                "detail": "one llama-server",
            }
        )
    return rows


THROUGHPUT_TASKS = [
    "write a haiku about rain",
    "list three uses of a paperclip",
    "plan a picnic for four friends",
    "explain what a hash table is",
]


def bench_throughput() -> dict[str, Any]:
    """``pipeline batch`` of 4 tasks on the embedded model, -j 1 against -j 4: aggregate
    completion tokens per second, from every stage's recorded usage."""
    rates = {}
    for jobs in (1, 4):
        with tempfile.TemporaryDirectory() as folder:
            tasks = Path(folder) / "tasks.txt"
            tasks.write_text("\n".join(THROUGHPUT_TASKS) + "\n")
            runs = Path(folder) / "runs"
            command = [sys.executable, "-m", "pipeline", "batch", str(tasks), "-j", str(jobs),
                       "--turns", "6", "--max-tokens", "64", "--runs-dir", str(runs),
                       "--director-max-tokens", "1024"]  # fmt: skip
            started = time.perf_counter()
            done = subprocess.run(command, env=_env(), capture_output=True, text=True)
            wall = time.perf_counter() - started
            if done.returncode != 0:  # some task failed: its tokens still count
                print(f"-j {jobs}: {done.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            tokens = 0
            for manifest in runs.glob("*/run.json"):
                for stage in json.loads(manifest.read_text())["stages"].values():
                    tokens += (stage.get("usage") or {}).get("completion_tokens", 0)
            rates[jobs] = (tokens / wall, tokens, wall)
    ratio = rates[4][0] / rates[1][0]
    return {
        "figure": "throughput: batch of 4 on the embedded model, tokens/s -j 4 / -j 1",
        "value": ratio,
        "target": "(report)",
        "ok": None,
        "detail": "; ".join(
            f"-j {j}: {rate:.1f} tokens/s ({tokens} tokens in {wall:.1f} s)"
            for j, (rate, tokens, wall) in rates.items()
        ),
    }


RAY_TASKS = 200
RAY_DELAY = 0.25  # seconds per model call: a short answer of a hosted model


def _batch_seconds(fake: FakeServer, tasks: int, *args: str) -> float:
    """Wall seconds of ``pipeline batch`` of ``tasks`` tasks of 3 turns (3 calls each)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tasks.txt"
        path.write_text("".join(f"task number {i}\n" for i in range(tasks)))
        command = [sys.executable, "-m", "pipeline", "batch", str(path), "--turns", "3",
                   "--no-loop-detection", "--runs-dir", str(Path(folder) / "runs"),
                   "--base-url", fake.base_url, "--model", "m", *args]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, env=_env(), capture_output=True, text=True)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()[-500:]}")
        return wall


def bench_ray() -> list[dict[str, Any]]:
    """Tasks per minute of a batch on a local Ray instance against the same batch on
    threads, both at -j 8 against a fixed-latency fake server, and Ray's fixed cost."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        skipped = {"value": None, "target": "(report)", "ok": None, "detail": "ray not installed"}
        return [{"figure": "ray: tasks/min", **skipped}]
    with FakeServer(_delayed(RAY_DELAY)) as fake:
        one_local = _batch_seconds(fake, 1)
        one_ray = _batch_seconds(fake, 1, "--ray")
        local = _batch_seconds(fake, RAY_TASKS, "-j", "8")
        on_ray = _batch_seconds(fake, RAY_TASKS, "-j", "8", "--ray")
    fixed = one_ray - one_local
    per_minute = {name: RAY_TASKS * 60 / wall for name, wall in (("local", local), ("ray", on_ray))}
    steady = RAY_TASKS * 60 / max(on_ray - fixed, 1e-9)
    return [
        {
            "figure": f"ray: {RAY_TASKS} tasks, tasks/min --ray (local instance) / threads, -j 8",
            "value": per_minute["ray"] / per_minute["local"],
            "target": "(report)",
            "ok": None,
            "detail": f"--ray: {per_minute['ray']:.0f} tasks/min ({on_ray:.1f} s; "
            f"{steady:.0f} tasks/min without the fixed cost); -j 8 here: "
            f"{per_minute['local']:.0f} tasks/min ({local:.1f} s); 3 calls of "
            f"{RAY_DELAY:g} s per task",
        },
        {
            "figure": "ray: fixed cost of --ray (s), local instance",
            "value": fixed,
            "target": "(report)",
            "ok": None,
            "detail": f"a 1-task batch: {one_ray:.1f} s with --ray, {one_local:.1f} s without "
            "(Ray's start and stop, a worker's start and imports)",
        },
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), "
        f"Python {platform.python_version()}"
    )


def engines() -> str:
    """The engines compared: xllamacpp's version, and llama-server's if any."""
    from importlib.metadata import version

    found = f"Embedded engine: xllamacpp {version('xllamacpp')} (llama.cpp's server)"
    binary = _llama_server()
    if binary:
        printed = subprocess.run([binary, "--version"], capture_output=True, text=True)
        first = (printed.stdout + printed.stderr).strip().splitlines()[:1]
        found += f"; llama.cpp's llama-server: {first[0] if first else binary}"
    return found


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| figure | value | target | pass | detail |", "|---|---|---|---|---|"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        if r["ok"] is None:
            verdict = "skip" if r["value"] is None else "-"
        else:
            verdict = "pass" if r["ok"] else "FAIL"
        out.append(f"| {r['figure']} | {value} | {r['target']} | {verdict} | {r['detail']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter delays, noisier figures")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks")
    args = parser.parse_args()
    delay = 0.5 if args.quick else 2.0
    for name in [
        k
        for k in os.environ
        if k.startswith(("OPENAI_", "PIPELINE_")) and k != "PIPELINE_CACHE_DIR"
    ]:
        del os.environ[name]  # the embedded model, and the fakes' own endpoints, only
    benches: dict[str, Callable[[], dict[str, Any] | list[dict[str, Any]]]] = {
        "overhead": lambda: bench_overhead(delay),
        "startup": bench_startup,
        "batch": lambda: bench_batch(0.3),
        "scaling": bench_scaling,
        "engine": bench_engine,
        "memory": bench_memory,
        "throughput": bench_throughput,
        "ray": bench_ray,
    }
    rows = []
    for name, bench in benches.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        found = bench()
        rows.extend(found if isinstance(found, list) else [found])
        print(f"{name}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        print(table(rows[-len(found) if isinstance(found, list) else -1 :]), file=sys.stderr)
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(
            f"# Benchmark results\n\nMachine: {machine()}\n\n{engines()}\n\n"
            f"Command: `python bench/run.py`\n\n{text}\n"
        )


if __name__ == "__main__":
    main()

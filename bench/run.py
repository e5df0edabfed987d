"""Benchmarks: where the time goes. Run with `python bench/run.py` from the repository root
(in the environment of `pip install -e '.[local,test]'`); it prints a table of figures,
each a ratio measured side by side in this one run, with its target.

  overhead     wall time of `pipeline generate --yes` (20 turns) against a fake server that
               answers after a fixed delay, over the sum of those delays
  startup      `pipeline --help` over `python -c "import click"` (medians of 15 runs)
  batch        a batch of 20 tasks with -j 1 over the same batch with -j 8 (fake server)
  scaling      embedded model: seconds per generated token at turn 12 over turn 2
  engine       embedded server over llama.cpp's llama-server on the same dialogue
               (skipped, with a note, when llama-server is not on PATH)

`--quick` shortens the delays (figures are then noisier); `--markdown FILE` also writes
the table as Markdown with a description of the machine.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import ROLES  # noqa: E402
from tests.fakeserver import FakeServer, Reply  # noqa: E402


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}


def _delayed(delay: float) -> Callable[[dict[str, Any]], Reply]:
    def respond(body: dict[str, Any]) -> Reply:
        if body.get("response_format"):
            return Reply(json.dumps(ROLES), delay=delay)
        n = len(body["messages"])
        return Reply(f"turn {n}: point {n * 7}, detail {n * 13}, step {n * 29}.", delay=delay)

    return respond


def bench_overhead(delay: float) -> dict[str, Any]:
    turns = 20
    with FakeServer(_delayed(delay)) as fake, tempfile.TemporaryDirectory() as runs:
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline",
                "generate",
                "--yes",
                "--turns",
                str(turns),
                "--no-loop-detection",
                "--runs-dir",
                runs,
                "--base-url",
                fake.base_url,
                "--model",
                "m",
                "write a paper",
            ],
            env=_env(),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - started
        calls = len(fake.chat_requests())
    served = calls * delay
    return {
        "figure": "overhead: wall / server time (20 turns)",
        "value": wall / served,
        "target": "<= 1.02",
        "ok": wall / served <= 1.02,
        "detail": f"{wall:.2f} s wall for {calls} calls of {delay:.2f} s",
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
    from pipeline.dialogue import DialogueParameters
    from pipeline.director import DirectorParameters
    from pipeline.models import Models

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


def _dialogue_timings(base_url: str, model: str, turns: int, max_tokens: int) -> list[float]:
    """Seconds per streamed chunk (about one token) for each generated turn."""
    from pipeline.client import ModelClient
    from pipeline.config import Endpoint
    from pipeline.dialogue import messages_for

    client = ModelClient(Endpoint(base_url, model, None))
    roles = ROLES
    lines: list[dict[str, Any]] = [
        {"turn": 1, "role": "Student", "role_index": 0, "content": roles["opening_line"]}
    ]
    per_token = []
    for turn in range(2, turns + 1):
        speaker = (turn - 1) % 2
        request = client.chat_request(
            messages_for(speaker, roles, lines), max_tokens=max_tokens, temperature=0.0, seed=1
        )
        started = time.perf_counter()
        result = client.stream(request)
        per_token.append((time.perf_counter() - started) / max(result.chunks, 1))
        lines.append(
            {
                "turn": turn,
                "role": roles["roles"][speaker]["name"],
                "role_index": speaker,
                "content": result.content,
            }
        )
    return per_token


def bench_scaling() -> dict[str, Any]:
    from pipeline.local import MODEL_NAME, LocalServer

    with LocalServer() as server:
        per_token = _dialogue_timings(server.base_url, MODEL_NAME, turns=12, max_tokens=120)
    ratio = per_token[-1] / per_token[0]
    return {
        "figure": "scaling: s/token at turn 12 / turn 2",
        "value": ratio,
        "target": "<= 1.2",
        "ok": ratio <= 1.2,
        "detail": f"{per_token[0] * 1000:.1f} ms vs {per_token[-1] * 1000:.1f} ms per token",
    }


def bench_engine() -> dict[str, Any]:
    if shutil.which("llama-server") is None:
        return {
            "figure": "engine: embedded / llama-server",
            "value": None,
            "target": "<= 1.1",
            "ok": None,
            "detail": "skipped: llama-server is not on PATH",
        }
    raise NotImplementedError  # pragma: no cover - not reached on this machine


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), "
        f"Python {platform.python_version()}"
    )


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| figure | value | target | pass | detail |", "|---|---|---|---|---|"]
    for r in rows:
        value = "-" if r["value"] is None else f"{r['value']:.3f}"
        verdict = "skip" if r["ok"] is None else ("pass" if r["ok"] else "FAIL")
        out.append(f"| {r['figure']} | {value} | {r['target']} | {verdict} | {r['detail']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter delays, noisier figures")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks")
    args = parser.parse_args()
    delay = 0.25 if args.quick else 1.0
    benches: dict[str, Callable[[], dict[str, Any]]] = {
        "overhead": lambda: bench_overhead(delay),
        "startup": bench_startup,
        "batch": lambda: bench_batch(0.3),
        "scaling": bench_scaling,
        "engine": bench_engine,
    }
    rows = []
    for name, bench in benches.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        rows.append(bench())
        print(f"{name}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(
            f"# Benchmark results\n\nMachine: {machine()}\n\nCommand: `python bench/run.py`\n\n"
            f"{text}\n"
        )


if __name__ == "__main__":
    main()

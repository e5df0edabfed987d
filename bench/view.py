"""pipeline view: how fast it starts and how fast it lists a folder of 500 runs. Run with
`python bench/view.py` from the repository root (in the environment of
`pip install -e '.[local,test]'`); it prints a table of figures, each over its target, in
the format of bench/run.py. Nothing is asserted: these are measurements.

  startup      `pipeline view --port 0` (a subprocess): from its start to its first answer
               (the stylesheet), median of 7 starts; target < 1 s
  list cold    GET / over 500 runs, the first request of a fresh server, sent as soon as it
               answers (every run.json read and each stage's status worked out, the
               pages compiled); target < 300 ms
  list 1 s     the same first request, sent 1 s after the start (as a browser opened by
               hand): the server reads the rows from its start, in the background
  list warm    the same page again, each row kept until one of its files changes (median
               of 15); target < 300 ms
  filtered     GET /?q=...&status=done over the same 500 runs (median of 15)
  run page     GET /runs/ID of one of them: 10 turns, verdict, reflections (median of 15)

The 500 runs are one real run (director, a 10-turn dialogue, judge and reflection against
the fake server) copied under 500 ids; `--runs N` changes the count. `--markdown FILE`
also writes the table, with a description of the machine (bench/VIEW.md).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import _env, machine, table  # noqa: E402
from tests.fakeserver import FakeServer  # noqa: E402
from tests.viewruns import scripted  # noqa: E402


def make_folder(runs_dir: Path, count: int) -> str:
    """``count`` runs in ``runs_dir``: one made against the fake server, then copies of it
    under new ids (a second apart). Returns the first id."""
    from pipeline import stages
    from pipeline.parameters import DialogueParameters
    from tests.viewruns import client

    with FakeServer(scripted) as fake:
        plan = stages.Plan.of(dialogue=DialogueParameters(turns=10, detect_loops=False))
        task = "write a paper on AI ethics"
        made = plan.new_run(runs_dir / "source", task, judge=True, reflect=True)
        ctx = stages.StageContext(made, client(fake), plan)
        with made.locked():
            stages.advance(ctx, include=("judge", "reflect"))
    source = made.folder
    ids = []
    for n in range(count):
        run_id = f"20261126T{n // 3600:02d}{n // 60 % 60:02d}{n % 60:02d}Z-task-{n}"
        target = runs_dir / run_id
        shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
        manifest = json.loads((target / "run.json").read_text())
        manifest.update(run_id=run_id, task=f"task number {n}: write a paper on AI ethics")
        (target / "run.json").write_text(json.dumps(manifest, indent=2))
        ids.append(run_id)
    shutil.rmtree(runs_dir / "source")
    return ids[0]


class View:
    """`pipeline view` on a free port, in a subprocess, for the ``with`` block."""

    def __init__(self, runs_dir: Path) -> None:
        self.started = time.perf_counter()
        script = Path(sys.executable).parent / "pipeline"
        self.proc = subprocess.Popen(
            [str(script), "view", "--port", "0", "--runs-dir", str(runs_dir)],
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if found is None:
            self.proc.kill()
            raise RuntimeError(f"pipeline view said: {line!r}")
        self.url = found.group(1)

    def seconds(self, path: str) -> float:
        started = time.perf_counter()
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            response.read()
        return time.perf_counter() - started

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)


def figure(name: str, seconds: float, target: float, detail: str) -> dict[str, Any]:
    return {
        "figure": f"{name} / target",
        "value": seconds / target,
        "target": "< 1 (figure under its target)",
        "ok": seconds < target,
        "detail": f"{seconds * 1000:.0f} ms against {target * 1000:.0f} ms; {detail}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500, help="runs in the folder")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as top:
        runs_dir = Path(top) / "runs"
        started = time.perf_counter()
        first = make_folder(runs_dir, args.runs)
        print(f"{args.runs} runs made in {time.perf_counter() - started:.1f} s", file=sys.stderr)

        starts = []
        for _ in range(7):
            with View(runs_dir) as view:
                view.seconds("/static/view.css")
                starts.append(time.perf_counter() - view.started)
        rows.append(
            figure("startup", statistics.median(starts), 1.0,
                   f"median of 7 (from {min(starts) * 1000:.0f} to {max(starts) * 1000:.0f} ms)")
        )  # fmt: skip

        with View(runs_dir) as view:
            cold = view.seconds("/")
        with View(runs_dir) as view:
            view.seconds("/static/view.css")
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - view.started)))
            later = view.seconds("/")
            warm = [view.seconds("/") for _ in range(15)]
            filtered = [view.seconds("/?q=number+12&status=done") for _ in range(15)]
            page = [view.seconds(f"/runs/{first}") for _ in range(15)]
        rows.append(
            figure(f"list cold ({args.runs} runs)", cold, 0.3, "the first request, at once")
        )
        rows.append(
            figure("list 1 s after start", later, 0.3, "the first request, the rows read since")
        )
        rows.append(
            figure(f"list warm ({args.runs} runs)", statistics.median(warm), 0.3, "median of 15")
        )
        rows.append(figure("list filtered", statistics.median(filtered), 0.3, "median of 15"))
        rows.append(figure("run page (10 turns)", statistics.median(page), 0.3, "median of 15"))
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(
            f"# pipeline view: start-up and a page over {args.runs} runs\n\n"
            f"Machine: {machine()}\n\nCommand: `python bench/view.py`\n\n{text}\n\n"
            "`list cold` is a first request sent the moment the server answers: the runs of "
            "its page (100) have their run.json read and every stage's status worked out "
            "then, unless the server's background read of that page, started at launch, "
            "got there first. A page asked for a second later (`list 1 s after start`) is "
            "served from the rows kept, as every later one is (`list warm`) until a run's "
            "files change. A filter (`list filtered`, here after the warm pages) reads "
            "every run once.\n"
        )


if __name__ == "__main__":
    main()

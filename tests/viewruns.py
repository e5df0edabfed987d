"""Runs folders for the web view's tests and benchmark: every kind of run it shows, made
by the pipeline itself against the fake server; and a view served on a free port."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from pipeline import stages
from pipeline.client import ModelClient
from pipeline.endpoints import Endpoint
from pipeline.parameters import DialogueParameters

from .conftest import ROLES
from .fakeserver import FakeServer, Reply

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# The generated turns of the judged run, each a line the page must show as it is written
# (markup and the done token included: shown as text, the token left out).
TURNS = [
    "Start with <b>bias</b> & fairness; then privacy.",
    'Outline:\n1. bias\n2. privacy\nDone: "bias", then privacy. <TASK_DONE>',
    "Approved.",
]
VERDICT = {"completed": True, "score": 8, "reasons": "The outline was approved.",
           "deliverable": "An outline on AI ethics."}  # fmt: skip
REFLECTIONS = {
    "reflections": [
        {"role": "Student", "meets_goal": True, "assessment": "Wrote the outline.",
         "improvements": "Cite sources.", "keep": True, "reason": "On task."},
        {"role": "Mentor", "meets_goal": True, "assessment": "Guided well.",
         "improvements": "", "keep": True, "reason": "Clear."},
    ]
}  # fmt: skip


def scripted(body: dict[str, Any]) -> Reply:
    """Roles, a verdict, reflections, or the turn :data:`TURNS` holds for the request."""
    schema = (body.get("response_format") or {}).get("json_schema", {})
    if schema.get("name") == "verdict":
        return Reply(json.dumps(VERDICT))
    if "reflections" in schema.get("schema", {}).get("properties", {}):
        return Reply(json.dumps(REFLECTIONS))
    if body.get("response_format"):
        return Reply(json.dumps(ROLES))
    turn = len(body["messages"])  # system + one message per turn so far: the turn's number
    return Reply(TURNS[(turn - 2) % len(TURNS)])


def client(fake: FakeServer) -> stages.OneClient:
    return stages.OneClient(ModelClient(Endpoint(fake.base_url, "m", None), max_retries=0))


def judged_run(runs_dir: Path, fake: FakeServer, task: str = "write a paper on AI ethics") -> str:
    """A run of 4 turns (the opening line, then :data:`TURNS`: the student declares the
    task done at turn 3), judged and reflected on."""
    plan = stages.Plan.of(dialogue=DialogueParameters(turns=6, detect_loops=False))
    run = plan.new_run(runs_dir, task, judge=True, reflect=True)
    ctx = stages.StageContext(run, client(fake), plan)
    with run.locked():
        stages.advance(ctx, include=("judge", "reflect"))
    return run.run_id


def imported_run(runs_dir: Path) -> str:
    from pipeline.importing import import_chats

    chat = FIXTURES / "chats" / "whatsapp-android-gb.txt"
    (run,) = import_chats(runs_dir, "whatsapp", chat, me="Bob", zone="UTC")
    return run.run_id


def make_runs(runs_dir: Path) -> dict[str, str]:
    """A runs folder with a judged and reflected run, a tree of delegated runs, an
    imported chat, a run made by version 1 of the manifest, and an unreadable one; the
    ids by kind."""
    from .test_delegate import run_tree, tree

    made = {}
    with FakeServer(scripted) as fake:
        made["judged"] = judged_run(runs_dir, fake)
    with FakeServer(tree) as fake:
        made["tree"] = run_tree(runs_dir, fake).run_id
    made["imported"] = imported_run(runs_dir)
    for old in (FIXTURES / "runs-v1").iterdir():
        shutil.copytree(old, runs_dir / old.name)
        made["v1"] = old.name
    broken = runs_dir / "20261126T000000Z-broken"
    broken.mkdir()
    (broken / "run.json").write_text("{")
    made["broken"] = broken.name
    return made


class Served:
    """``pipeline view`` of ``runs_dir`` on a free port of ``host``, in a thread, for the
    ``with`` block; stopped and joined (its worker threads too) after it."""

    def __init__(self, runs_dir: Path, host: str = "127.0.0.1", token: str | None = None):
        from pipeline import webapp

        self.server = webapp.Server(runs_dir, webapp.listen(host, 0), token)
        self.url = webapp.url(host, self.server.port).rstrip("/")
        self.thread = threading.Thread(target=self.server.run, name="view-server", daemon=True)

    def __enter__(self) -> Served:
        self.before = set(threading.enumerate())
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:  # the socket listens already; this is uvicorn's loop
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the view server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.stop()
        self.thread.join(10)
        for thread in set(threading.enumerate()) - self.before:
            if thread.name.startswith("AnyIO worker thread"):  # told to stop with the loop
                thread.join(10)

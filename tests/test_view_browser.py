"""pipeline view in a real headless browser: Debian's chromium, driven by Playwright's
Python API (never a browser of Playwright's own). The runs list, a run page's turns, a
turn that appears while the dialogue runs, a traversal URL; a screenshot of the run page
is kept outside git ($PIPELINE_ARTIFACTS, else .ci/artifacts/).

Skipped when chromium is not installed, except in CI (CI=true), where .ci/run installs it
and its absence fails the test."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline import stages
from pipeline.parameters import DialogueParameters
from pipeline.runs import open_run
from pipeline.termination import strip_token
from pipeline.viewer import count_lines

from .conftest import ROLES
from .fakeserver import FakeServer, Reply
from .viewruns import TURNS, Served, client, make_runs

CHROMIUM = os.environ.get("PIPELINE_CHROMIUM", "/usr/bin/chromium")
HEADLESS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parent.parent


def artifacts() -> Path:
    """Where the screenshots go: ``$PIPELINE_ARTIFACTS``, else ``.ci/artifacts/`` (which
    git ignores)."""
    folder = Path(os.environ.get("PIPELINE_ARTIFACTS") or ROOT / ".ci" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def keep(page: Any, name: str) -> None:
    """A screenshot of ``page``, written here (Playwright would write it from a thread
    pool of its own, left running until the browser closes)."""
    (artifacts() / name).write_bytes(page.screenshot(full_page=True))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    pytest.importorskip("starlette")
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI has no chromium at {CHROMIUM}: .ci/run installs Debian's package")
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium (CI installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=HEADLESS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    top = tmp_path_factory.mktemp("view-browser")
    (top / "secret.txt").write_text("not for the web")
    return top / "runs", make_runs(top / "runs")


def test_the_runs_list_shows_the_runs_of_the_folder_and_filters_them(page, folder):
    runs_dir, _ = folder
    with Served(runs_dir) as server:
        page.goto(server.url + "/")
        shown = page.locator("tr.run").evaluate_all("rows => rows.map(r => r.dataset.run)")
        assert shown == sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
        page.fill("input[name=q]", "child")
        page.select_option("select[name=status]", "done")
        page.click("form.filter button")
        page.wait_for_url("**/?q=child&status=done")
        tasks = page.locator("tr.run td.task").all_inner_texts()
        assert tasks == ["child one", "grandchild", "child two"]


def test_a_run_page_shows_the_exact_turns_in_order_with_their_speakers(page, folder):
    runs_dir, made = folder
    run = open_run(runs_dir, made["judged"])
    turns = run.read_transcript()
    with Served(runs_dir) as server:
        page.goto(f"{server.url}/runs/{run.run_id}")
        speakers = page.locator("#transcript .turn .speaker").all_inner_texts()
        contents = page.locator("#transcript .turn .content").all_inner_texts()
        assert speakers == [t.role for t in turns] == ["Student", "Mentor", "Student", "Mentor"]
        assert contents == [strip_token(t.content, "<TASK_DONE>") for t in turns]
        assert contents[1:] == [TURNS[0], TURNS[1].replace(" <TASK_DONE>", ""), TURNS[2]]
        # each speaker has a colour of its own
        colours = page.locator("#transcript .turn .speaker").evaluate_all(
            "els => els.map(e => getComputedStyle(e).color)"
        )
        assert colours[0] == colours[2] != colours[1] == colours[3]
        # the recorded request and response of a turn, when asked for
        page.click("#turn-2 details.calls summary")
        loaded = page.locator("#turn-2 .call-record")
        loaded.wait_for()
        assert TURNS[0] in loaded.inner_text()
        keep(page, "view-run-page.png")


def test_a_new_turn_appears_on_the_open_page_within_2_s_of_being_written(page, tmp_path):
    gate = threading.Event()

    def respond(body: dict[str, Any]) -> Reply:
        if body.get("response_format"):
            return Reply(json.dumps(ROLES))
        turn = len(body["messages"])
        return Reply(f"live turn {turn}", gate=gate if turn == 4 else None)

    runs_dir = tmp_path / "runs"
    failed: list[BaseException] = []
    with FakeServer(respond) as fake, Served(runs_dir) as server:
        plan = stages.Plan.of(dialogue=DialogueParameters(turns=5, detect_loops=False))
        run = plan.new_run(runs_dir, "a dialogue watched as it happens")
        transcript = run.path(run.transcript)

        def converse() -> None:
            try:
                with run.locked():
                    stages.advance(stages.StageContext(run, client(fake), plan))
            except BaseException as e:
                failed.append(e)

        talking = threading.Thread(target=converse, name="dialogue")
        talking.start()
        try:
            wait_until(lambda: count_lines(transcript) == 3)  # turn 4 is held by the gate
            page.goto(f"{server.url}/runs/{run.run_id}")
            assert page.locator("#transcript .turn").count() == 3
            page.locator("#transcript[data-connected]").wait_for()  # the stream is open
            gate.set()
            wait_until(lambda: count_lines(transcript) >= 4)
            written = time.monotonic()
            page.locator("#turn-4").wait_for(timeout=2000)
            assert time.monotonic() - written < 2.0
            assert page.locator("#turn-4 .content").inner_text() == "live turn 4"
            keep(page, "view-live.png")
            page.locator("#transcript[data-ended]").wait_for(timeout=10_000)
            assert page.locator("#run-status").inner_text() == "done"
            assert page.locator(".badge[data-stage=dialogue]").inner_text() == "done"
            assert page.locator("#transcript .turn .content").all_inner_texts() == [
                ROLES["opening_line"],
                *(f"live turn {n}" for n in range(2, 6)),
            ]
            assert page.url.endswith(run.run_id)  # never reloaded
        finally:
            gate.set()
            talking.join(30)
    assert not failed, failed


def wait_until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_traversal_url_gets_a_404(page, folder):
    runs_dir, made = folder
    with Served(runs_dir) as server:
        for path in (
            f"/runs/{made['judged']}/files/..%2f..%2fsecret.txt",
            f"/runs/{made['judged']}/files/%252e%252e%252fsecret.txt",
            "/runs/..%2f..%2fsecret.txt",
            f"/runs/{made['judged']}/files/..%5c..%5csecret.txt",
        ):
            response = page.goto(server.url + path)
            assert response is not None and response.status == 404, path
            assert "not for the web" not in page.content()
            assert page.locator("h1").inner_text() == "Not here"

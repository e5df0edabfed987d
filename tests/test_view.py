"""pipeline view over HTTP: the pages, the live stream, the token, and paths kept inside
the runs folder (a real server on a free port, spoken to with http.client, which sends
a path exactly as written)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from pipeline import viewer, webapp
from pipeline.records import Turn
from pipeline.runs import create_run, open_run

from .viewruns import TURNS, VERDICT, Served, make_runs

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A runs folder of every kind of run (:func:`tests.viewruns.make_runs`), beside a
    secret file no request may reach."""
    top = tmp_path_factory.mktemp("view")
    (top / "secret.txt").write_text("not for the web")
    return top / "runs", make_runs(top / "runs")


@pytest.fixture
def served(folder: tuple[Path, dict[str, str]]):  # type: ignore[no-untyped-def]
    with Served(folder[0]) as server:
        yield server


def get(
    base: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], str]:
    """Status, headers (lower-case names) and text of GET ``path``, sent as written."""
    where = urlsplit(base)
    connection = http.client.HTTPConnection(where.hostname or "", where.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        body = response.read().decode()
        found = {k.lower(): v for k, v in response.getheaders()}
        return response.status, found, body
    finally:
        connection.close()


def texts(html: str, cls: str) -> list[str]:
    """The text of each element of class ``cls`` holding no other element."""
    return re.findall(rf'<[a-z0-9]+ class="{cls}"[^>]*>([^<]*)</', html)


def transcript(page: str) -> str:
    """The transcript's part of a run's page."""
    return page.split('<div id="transcript"')[1].split("</section>")[0]


def test_the_runs_list_shows_every_run_and_filters_by_text_and_status(served, folder):
    runs_dir, made = folder
    status, headers, page = get(served.url, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    ids = re.findall(r'<tr class="run[^"]*" data-run="([^"]+)"', page)
    assert ids == sorted(p.name for p in runs_dir.iterdir() if p.is_dir())
    assert "unreadable: the manifest of run 20261126T000000Z-broken is unreadable" in page
    judged = page.split(f'data-run="{made["judged"]}"')[1].split("</tr>")[0]
    assert texts(judged, "num turns") == ["4"] and texts(judged, "num score") == ["8"]
    assert texts(judged, "reason") == ["done_token"]
    assert 'class="badge status-done"' in judged
    child = page.split(f'data-run="{made["tree"]}-t2-1"')[1].split("</tr>")[0]
    assert f'<a href="/runs/{made["tree"]}">{made["tree"]}</a>' in child  # its parent

    _, _, some = get(served.url, "/?q=CHILD")  # child one, grandchild, child two
    assert re.findall(r'data-run="([^"]+)"', some) == [
        f"{made['tree']}-t2-1",
        f"{made['tree']}-t2-1-t2-1",
        f"{made['tree']}-t2-2",
    ]
    assert "3 of 8 runs" in some
    _, _, imported = get(served.url, "/?q=whatsapp&status=done")
    assert re.findall(r'data-run="([^"]+)"', imported) == [made["imported"]]
    _, _, none = get(served.url, "/?status=running")
    assert "No run matches." in none


def test_a_run_page_shows_roles_turns_calls_verdict_and_reflections_as_text(served, folder):
    _, made = folder
    status, headers, page = get(served.url, f"/runs/{made['judged']}")
    assert status == 200
    assert "script-src 'self'" in headers["content-security-policy"]
    shown = transcript(page)
    assert texts(shown, "speaker") == ["Student", "Mentor", "Student", "Mentor"]
    # user text is escaped, never markup; the done token is left out of what is shown
    contents = re.findall(r'<div class="content">(.*?)</div>', shown, re.DOTALL)
    assert contents == [
        "Could you suggest some topics for a paper on AI ethics?",
        "Start with &lt;b&gt;bias&lt;/b&gt; &amp; fairness; then privacy.",
        "Outline:\n1. bias\n2. privacy\nDone: &#34;bias&#34;, then privacy.",
        "Approved.",
    ]
    assert "<b>bias</b>" not in page
    assert "When the paper is done, end your message with &lt;TASK_DONE&gt;." in page
    assert VERDICT["reasons"] in page and "score <strong>8</strong>/10" in page
    assert "Student: goal met; keep" in page and "To improve: Cite sources." in page
    # each generated turn's calls are there on demand, and every stage's
    assert page.count('class="calls" data-src="/runs/') == 3 + 4
    assert "data-live" not in page  # a finished run is not followed


def test_the_calls_of_a_turn_and_of_a_stage_are_served_on_demand(served, folder):
    _, made = folder
    run = made["judged"]
    status, headers, body = get(served.url, f"/runs/{run}/calls/dialogue?turn=2")
    assert status == 200 and headers["content-type"] == "application/json"
    (call,) = json.loads(body)
    assert call["number"] == "0001" and "".join(call["stream"]["pieces"]) == TURNS[0]
    assert call["request"]["messages"][-1]["content"].startswith("Could you suggest")
    assert json.loads(get(served.url, f"/runs/{run}/calls/dialogue?turn=1")[2]) == []  # opening
    (judge,) = json.loads(get(served.url, f"/runs/{run}/calls/judge")[2])
    assert json.loads(judge["response"]["choices"][0]["message"]["content"]) == VERDICT
    for path in (
        f"/runs/{run}/calls/dialogue?turn=9",
        f"/runs/{run}/calls/judge?turn=2",
        f"/runs/{run}/calls/import",
        f"/runs/{run}/calls/..%2f..%2f",
    ):
        assert get(served.url, path)[0] == 404, path


def test_imported_chats_old_runs_and_trees_render(served, folder):
    runs_dir, made = folder
    status, _, page = get(served.url, f"/runs/{made['imported']}")
    chat = open_run(runs_dir, made["imported"]).read_transcript()
    assert status == 200 and "<h2>Speakers</h2>" in page
    assert texts(transcript(page), "speaker") == [t.role for t in chat]
    assert "request and response" not in page  # nobody was asked: no calls
    assert get(served.url, f"/runs/{made['v1']}")[0] == 200
    # a child run: the tree from the root, its place marked, and its own delegation linked
    child = f"{made['tree']}-t2-1"
    _, _, page = get(served.url, f"/runs/{child}")
    tree = page.split('<section class="tree">')[1].split("</section>")[0]
    assert re.findall(r'class="id"[^>]*>([^<]+)<', tree) == [
        made["tree"],
        child,
        f"{child}-t2-1",
        f"{made['tree']}-t2-2",
    ]
    assert f'<strong class="id">{child}</strong>' in tree
    assert f'delegated to <a href="/runs/{child}-t2-1">{child}-t2-1</a>' in page


TRAVERSALS = [
    "/runs/{run}/files/../../secret.txt",
    "/runs/{run}/files/..%2f..%2fsecret.txt",
    "/runs/{run}/files/%2e%2e/%2e%2e/secret.txt",
    "/runs/{run}/files/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/runs/{run}/files/%252e%252e%252f%252e%252e%252fsecret.txt",  # encoded twice
    "/runs/{run}/files/..%5c..%5csecret.txt",  # backslashes
    "/runs/{run}/files/..\\..\\secret.txt",
    "/runs/{run}/files//etc/passwd",
    "/runs/{run}/files/%2fetc%2fpasswd",
    "/runs/{run}/files/director/../../../secret.txt",
    "/runs/{run}/files/.lock",
    "/runs/{run}/files/director",  # a folder
    "/runs/{run}/files/out",  # a link out of the run
    "/runs/..%2f..%2fsecret.txt",
    "/runs/%2e%2e/files/secret.txt",
    "/runs/..%2f/files/secret.txt",
    "/runs/{run}%2f..%2f..%2f/files/secret.txt",
    "/static/..%2fview%2fview.css",
    "/static/%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/../secret.txt",
    "/%2e%2e/secret.txt",
]


def test_only_files_inside_the_run_are_served_and_traversal_is_404(served, folder):
    runs_dir, made = folder
    run = made["judged"]
    link = runs_dir / run / "out"
    link.symlink_to(runs_dir.parent / "secret.txt")
    try:
        status, headers, body = get(served.url, f"/runs/{run}/files/run.json")
        assert status == 200 and json.loads(body)["run_id"] == run
        assert headers["x-content-type-options"] == "nosniff"
        status, _, body = get(served.url, f"/runs/{run}/files/dialogue/transcript.md")
        assert status == 200 and "Approved." in body
        for path in TRAVERSALS:
            status, _, body = get(served.url, path.format(run=run))
            assert status == 404 and "not for the web" not in body, path
    finally:
        link.unlink()
    assert viewer.resolve(runs_dir, run, "run.json") == (runs_dir / run / "run.json").resolve()
    assert viewer.resolve(runs_dir, "../x", "run.json") is None


def test_without_a_token_only_requests_to_a_local_host_name_are_answered(served):
    assert get(served.url, "/", {"Host": f"localhost:{served.server.port}"})[0] == 200
    assert get(served.url, "/", {"Host": f"[::1]:{served.server.port}"})[0] == 200
    status, _, body = get(served.url, "/", {"Host": "attacker.example"})  # DNS rebinding
    assert status == 403 and "local host name" in body


def test_off_loopback_every_request_needs_the_token(folder):
    runs_dir, made = folder
    with Served(runs_dir, host="127.0.0.2", token="s3cret-token") as server:
        for path in ("/", f"/runs/{made['judged']}", "/static/view.js", "/nope"):
            status, headers, _ = get(server.url, path)
            assert status == 401 and headers["www-authenticate"].startswith("Bearer"), path
        assert get(server.url, "/?token=wrong")[0] == 403
        assert get(server.url, "/", {"Authorization": "Bearer wrong"})[0] == 403
        assert get(server.url, "/", {"Cookie": "pipeline_view_token=wrong"})[0] == 403
        status, headers, _ = get(server.url, "/?token=s3cret-token")
        assert status == 200
        assert headers["set-cookie"].startswith("pipeline_view_token=s3cret-token;")
        assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
        assert get(server.url, "/", {"Cookie": "pipeline_view_token=s3cret-token"})[0] == 200
        assert get(server.url, "/", {"Authorization": "Bearer s3cret-token"})[0] == 200
        bearer = {"Host": "attacker.example", "Authorization": "Bearer s3cret-token"}
        assert get(server.url, "/", bearer)[0] == 200


def test_diff_memory_and_lineage_pages(served, folder):
    from pipeline import memory

    runs_dir, made = folder
    status, _, page = get(served.url, f"/diff?a={made['v1']}&b={made['judged']}")
    assert status == 200
    assert '<span class="removed">-reply 2</span>' in page
    added = "+Start with &lt;b&gt;bias&lt;/b&gt; &amp; fairness; then privacy."
    assert f'<span class="added">{added}</span>' in page
    status, _, page = get(served.url, f"/diff?a={made['judged']}&b=20260101T000000Z-none")
    assert status == 404 and "no run 20260101T000000Z-none" in page
    assert "No differences." in get(served.url, f"/diff?a={made['v1']}&b={made['v1']}")[2]

    status, _, page = get(served.url, "/memory?q=privacy")
    assert status == 200 and "pipeline memory sync" in page
    memory.sync(runs_dir)
    try:
        status, _, page = get(served.url, "/memory?q=privacy&role=Student")
        assert status == 200
        assert re.findall(r'href="/runs/([^"#]+)#turn-(\d+)"', page) == [(made["judged"], "3")]
        status, _, page = get(served.url, "/memory?q=%22unclosed")
        assert status == 400 and "cannot search for" in page
    finally:
        for name in ("memory.db", "memory.db-wal", "memory.db-shm"):
            (runs_dir / name).unlink(missing_ok=True)

    _, _, page = get(served.url, f"/lineage?target={made['judged']}")
    assert "went into no fine-tuned model yet" in page
    status, _, page = get(served.url, "/lineage?target=ft:nothing")
    assert status == 404 and "is no model a fine-tune job here made" in page


def read_event(response: http.client.HTTPResponse) -> tuple[str, dict[str, Any]]:
    """The next event of a stream: its name and data, with its id as ``"id"`` when it has
    one (comments and retry skipped)."""
    name, data, number = "message", "", None
    while True:
        line = response.fp.readline().decode()
        if line in ("\n", "") and data:
            return name, {**json.loads(data), **({"id": number} if number else {})}
        if line.startswith("event: "):
            name = line[7:].strip()
        elif line.startswith("data: "):
            data = line[6:].strip()
        elif line.startswith("id: "):
            number = int(line[4:])


def stream(base: str, path: str, headers: dict[str, str] | None = None) -> Any:
    """An open connection to the stream at ``path``, and its response."""
    where = urlsplit(base)
    connection = http.client.HTTPConnection(where.hostname or "", where.port, timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    assert response.getheader("content-type", "").startswith("text/event-stream")
    return connection, response


def test_a_running_dialogue_is_streamed_turn_by_turn_until_it_stops(runs_dir):
    run = running_run(runs_dir)
    with Served(runs_dir) as server:
        _, _, page = get(server.url, f"/runs/{run.run_id}")
        assert f'data-count="2" data-live="/runs/{run.run_id}/live"' in page
        connection, response = stream(server.url, f"/runs/{run.run_id}/live?after=1")
        try:
            name, data = read_event(response)  # what was there after the first line
            assert (name, data["turn"], data["id"]) == ("turn", 2, 2)
            run.append_transcript(Turn(3, "A", 0, "a <new> turn", kind="human"))
            name, data = read_event(response)
            assert (name, data["turn"], data["id"]) == ("turn", 3, 3)
            assert '<span class="speaker">A</span>' in data["html"]
            assert '<div class="content">a &lt;new&gt; turn</div>' in data["html"]
            run.finish_stage("dialogue")
            ended = {"status": "pending", "stages": {"director": "pending", "dialogue": "done"}}
            assert read_event(response) == ("end", {**ended, "turns": 3})
            assert response.fp.readline() in (b"", b"\r\n", b"0\r\n")  # the stream ends
        finally:
            connection.close()
        # an EventSource that reconnects says the last line it got, which wins over ?after
        path = f"/runs/{run.run_id}/live?after=0"
        connection, response = stream(server.url, path, {"Last-Event-ID": "2"})
        try:
            assert [read_event(response)[0] for _ in range(2)] == ["turn", "end"]
        finally:
            connection.close()


def test_the_runs_list_rereads_only_runs_whose_files_changed(folder, tmp_path):
    runs_dir, made = folder
    listing = viewer.Listing(runs_dir)
    first = {row.run_id: row for row in listing.rows()}
    again = {row.run_id: row for row in listing.rows()}
    assert all(again[k] is first[k] for k in first)  # read from stats alone
    verdict = runs_dir / made["judged"] / "judge" / "verdict.json"
    saved = verdict.read_text()
    try:
        verdict.write_text(json.dumps({**VERDICT, "score": 3}))
        changed = {row.run_id: row for row in listing.rows()}
        assert changed[made["judged"]].score == 3 and changed[made["v1"]] is first[made["v1"]]
    finally:
        verdict.write_text(saved)


def running_run(runs_dir: Path, task: str = "a live task") -> Any:
    """A run whose dialogue is recorded running in this process, with two turns."""
    run = create_run(runs_dir, task)
    entry = run.stage("dialogue")
    entry.status, entry.pid = "running", os.getpid()
    run.save()
    for n in (1, 2):
        run.append_transcript(Turn(n, "A" if n == 1 else "B", n - 1, f"turn {n}", kind="human"))
    return run


def test_the_cli_serves_with_a_token_off_loopback_and_stops_on_ctrl_c(runs_dir):
    run = running_run(runs_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
    started = time.monotonic()
    connection = None
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "view", "--host", "127.0.0.2", "--port", "0",
         "--runs-dir", str(runs_dir)],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        found = re.match(r"viewing .* at (http://127\.0\.0\.2:\d+/)\?token=(\S+) \(Ctrl-C", first)
        assert found, first
        address, token = found.groups()
        assert proc.stderr.readline().startswith(f"token: {token} (every request must carry it")
        assert len(token) >= 32
        assert get(address, "/")[0] == 401
        assert get(address, f"/?token={token}")[0] == 200
        assert time.monotonic() - started < 10
        # a page following the running dialogue does not hold up the stop
        path = f"/runs/{run.run_id}/live"
        connection, response = stream(address, path, {"Authorization": f"Bearer {token}"})
        assert read_event(response)[0] == "turn"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        rest = proc.stderr.read() if proc.stderr else ""
        if connection is not None:
            connection.close()
    assert code == 0 and rest == ""


def test_the_web_framework_is_imported_only_by_pipeline_view():
    code = "import sys, pipeline.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    for name in ("starlette", "uvicorn", "jinja2", "anyio"):
        assert f"'{name}'" not in loaded


def test_without_the_view_extra_the_command_says_what_to_install(monkeypatch, runs_dir):
    from pipeline.cli import cli

    monkeypatch.delitem(sys.modules, "pipeline.webapp", raising=False)
    for name in [m for m in sys.modules if m == "starlette" or m.startswith("starlette.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "starlette.applications", None)
    result = CliRunner().invoke(cli, ["view", "--runs-dir", str(runs_dir)])
    assert result.exit_code == 1
    assert result.output == (
        "Error: pipeline view needs the view extra (starlette is not installed): "
        "pip install 'converse-pipeline[view]'\n"
    )


def test_the_runs_list_is_paged_and_reads_only_the_page_s_runs(tmp_path):
    from pipeline.runs import create_run

    runs_dir = tmp_path / "runs"
    for n in range(webapp.PAGE_SIZE + 20):
        create_run(runs_dir, f"task {n:03d}", run_id=f"20260101T{n // 60:02d}{n % 60:02d}00Z-task")
    with Served(runs_dir) as server:
        status, _, first = get(server.url, "/")
        assert status == 200
        assert f"{webapp.PAGE_SIZE} of {webapp.PAGE_SIZE + 20} runs, page 1 of 2" in first
        assert len(server.server.view.listing._rows) == webapp.PAGE_SIZE  # only the page read
        _, _, second = get(server.url, "/?page=2")
        assert "20 of 120 runs, page 2 of 2" in second
        assert "20260101T0159" in second and "20260101T0000" not in second
        _, _, found = get(server.url, "/?q=task+119")
        assert "1 of 120 runs" in found and 'rel="next"' not in found

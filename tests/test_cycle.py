"""The whole loop against the fake server: batches with judge and reflection, memory,
curation, the cycle (a fine-tune job on the persona's memories, its model written into
pipeline.toml), the next batch on the tuned model, lineage and the metrics report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config

from .conftest import ROLES
from .fakeserver import FakeServer, Reply

ANA = "I want you to act as Ana, my mentor. I am your student."
BASE = "gpt-4o-mini-2024-07-18"
COUNTER = itertools.count()


def model(body: dict[str, Any]) -> Reply:
    """Roles casting Ana, a verdict of 8, reflections that keep Ana's turns, and turns
    that differ from each other (so that none is a near-duplicate)."""
    kind = (body.get("response_format") or {}).get("json_schema", {}).get("name")
    if kind == "roles":
        ana = {"name": "Ana", "system_prompt": "You mentor."}
        return Reply(json.dumps({**ROLES, "roles": [ROLES["roles"][0], ana]}))
    if kind == "verdict":
        return Reply(
            json.dumps({"completed": True, "score": 8, "reasons": "ok", "deliverable": ""})
        )
    if kind == "reflection":
        return Reply(json.dumps({"reflections": [
            {"role": name, "meets_goal": True, "assessment": "Fine.", "improvements": "",
             "keep": name == "Ana", "reason": "useful" if name == "Ana" else "filler"}
            for name in ("Student", "Ana")
        ]}))  # fmt: skip
    n = next(COUNTER)  # every turn its own words: no two are near-duplicates
    return Reply(f"{body['model']} makes point{n} with word{n} and idea{n}")


@pytest.fixture
def fake():  # type: ignore[no-untyped-def]
    with FakeServer(model) as server:
        yield server


def config(tmp_path: Path, base_url: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(
        "# the fake endpoint for everything\n"
        f'[endpoints.fake]\nbase_url = "{base_url}"\nmodel = "m"\n\n'
        '[assign]\ndefault = "fake"\n\n'
        f'[personas.Ana]\nsystem_prompt = "{ANA}"\n',
        encoding="utf-8",
    )
    return path


def test_the_whole_loop(tmp_path, runs_dir, invoke, fake, monkeypatch, tiktoken_offline):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
    cfg = config(tmp_path, fake.base_url)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("".join(f"write essay number {n}\n" for n in range(6)), encoding="utf-8")
    common = ("--config", str(cfg), "--runs-dir", str(runs_dir))

    # 1. batches with --judge --reflect, Ana cast in every run
    made = invoke("batch", str(tasks), *common[:2], "--judge", "--reflect", "--persona", "Ana",
                  "--turns", "5", "-j", "2")  # fmt: skip
    assert made.exit_code == 0, made.output
    assert made.stdout.count("done") >= 6

    # 2. memory: runs were remembered as they finished; sync finds nothing new; search
    synced = invoke("memory", "sync")
    assert synced.exit_code == 0, synced.output
    assert synced.stdout.startswith("0 runs added, 0 updated, 0 removed, 6 unchanged")
    found = json.loads(invoke("memory", "search", "makes", "--role", "Ana", "--json").stdout)
    assert found and {m["role"] for m in found} == {"Ana"}
    assert all(m["score"] == 8 and m["keep"] is True for m in found)

    # 3. curate with dedupe and an outside file mixed in
    outside = tmp_path / "outside.jsonl"
    outside.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"q{n}"},
                        {"role": "assistant", "content": f"a{n}"},
                    ]
                }
            )
            + "\n"
            for n in range(10)
        )
    )
    curated = invoke("curate", "--role", "Ana", "--min-score", "7", "--keep-only", "--dedupe",
                     "0.9", "--mix", str(outside), "--mix-ratio", "0.2", "-o",
                     str(tmp_path / "ana.jsonl"))  # fmt: skip
    assert curated.exit_code == 0, curated.output
    sidecar = json.loads((tmp_path / "ana.jsonl.manifest.json").read_text())
    assert len(sidecar["examples"]["train"]) == 12  # 6 runs x Ana's 2 turns
    assert len(sidecar["mixed"]["lines"]) == 3  # 3 / (12 + 3) = 0.2

    # 4. the cycle: without --yes nothing is sent; with it a job; then the model is assigned
    cycle = ("cycle", "--role", "Ana", "--base-model", BASE, "--every", "10")
    dry = invoke(*cycle, *common[:2])
    assert dry.exit_code == 0 and "cycle 1 would fine-tune" in dry.stdout
    assert fake.fine_tuning.jobs == {}
    short = tmp_path / "short.jsonl"  # a curation error is said, not taken for "nothing yet"
    short.write_text(outside.read_text().splitlines()[0] + "\n")
    refused = invoke(*cycle, *common[:2], "--mix", str(short), "--mix-ratio", "0.5")
    assert refused.exit_code == 1
    assert refused.stderr.startswith(f"Error: {short} has 1 examples")
    submitted = invoke(*cycle, *common[:2], "--yes")
    assert submitted.exit_code == 0, submitted.output
    assert submitted.stdout.startswith("cycle 1: job ")
    assert len(fake.fine_tuning.jobs) == 1
    outputs = []
    for _ in range(10):  # each call asks the server once; the fake job moves a step a call
        step = invoke(*cycle, *common[:2], "--assign")
        assert step.exit_code == 0, step.output
        outputs.append(step.stdout)
        if "is ready" in step.stdout:
            break
    ledger = json.loads(next((runs_dir / "finetunes").glob("*.json")).read_text())
    tuned = ledger["fine_tuned_model"]
    assert tuned and outputs[-1] == f"cycle 1: {tuned} is ready; {cfg} now gives it to Ana\n"
    assert cfg.read_text().startswith("# the fake endpoint for everything\n")  # comments kept
    assert (tmp_path / "pipeline.toml.bak").is_file()
    loaded = load_config(cfg)
    assert loaded is not None and loaded.assign["roles"] == {"Ana": "ana"}
    nothing = invoke(*cycle, *common[:2])
    assert "nothing to do" in nothing.stdout  # no new memories since

    # 5. the next batch: Ana speaks through the tuned model
    before = len(fake.chat_requests())
    again = tmp_path / "again.txt"
    again.write_text("write essay number 9\n", encoding="utf-8")
    assert (
        invoke("batch", str(again), *common[:2], "--persona", "Ana", "--turns", "3").exit_code == 0
    )
    asked = fake.chat_requests()[before:]
    speakers = [r for r in asked if not r.get("response_format")]
    assert {r["model"] for r in speakers if ANA in r["messages"][0]["content"]} == {tuned}
    assert {r["model"] for r in speakers if ANA not in r["messages"][0]["content"]} == {"m"}
    newest = sorted(p for p in runs_dir.iterdir() if p.name.endswith("number-9"))[-1]
    assert (
        json.loads((newest / "run.json").read_text())["fine_tuned_models"][tuned]["job_id"]
        == (ledger["job_id"])
    )

    # 6. lineage of the model: the runs it came from, the memories, the run made with it
    shown = invoke("lineage", tuned, "--json")
    (link,) = json.loads(shown.stdout)
    assert sorted(link["source_runs"]) == sorted(
        p.name for p in runs_dir.iterdir() if "essay-number" in p.name and p != newest
    )
    assert len(link["memories"]) == 12 and link["made"] == [newest.name]
    a_source = link["source_runs"][0]
    (from_run,) = json.loads(invoke("lineage", a_source, "--json").stdout)
    assert from_run["model"] == tuned  # a run's turns went into the model
    text = invoke("lineage", tuned).stdout
    assert text.splitlines()[-2:] == [f"model:    {tuned}", f"made:     {newest.name}"]

    # 7. the report: before and after the tuned model
    report = invoke("cycle", "--role", "Ana", "--report", "--runs-dir", str(runs_dir))
    assert report.exit_code == 0, report.output
    rows = report.stdout.splitlines()
    assert rows[0].split()[:3] == ["CYCLE", "SIDE", "RUNS"]
    assert [r.split()[:3] for r in rows[1:]] == [["1", "before", "6"], ["1", "after", "1"]]


def test_an_overlapping_cycle_exits_at_once_and_assign_needs_a_config(runs_dir, invoke):
    from pipeline import cycle

    with cycle.locked(runs_dir, "Ana"):
        busy = invoke("cycle", "--role", "Ana", "--base-model", BASE, "--every", "5",
                      "--base-url", "http://127.0.0.1:9/v1")  # fmt: skip
    assert (busy.exit_code, busy.stdout) == (0, "")
    assert busy.stderr == "another cycle of Ana is running; nothing was done\n"
    lonely = invoke("cycle", "--role", "Ana", "--base-model", BASE, "--every", "5", "--assign")
    assert lonely.exit_code == 2
    assert "--assign needs --config FILE" in lonely.stderr
    nothing = invoke("cycle", "--role", "Ana", "--base-model", BASE, "--every", "5",
                     "--base-url", "http://127.0.0.1:9/v1")  # fmt: skip
    assert (nothing.exit_code, nothing.stdout) == (
        0,
        "0 new curated example(s) of Ana, 5 needed; nothing to do\n",
    )

"""``pipeline batch --batch-api``: the director's, judge's and reflection's first requests
through a provider's Batch API (the fake server's ``/v1/files`` and ``/v1/batches``),
repairs and dialogues through the ordinary API; ``--dry-run``'s requests and costs."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline import schemas
from pipeline.cli import cli
from pipeline.parameters import JudgeParameters
from pipeline.records import CallRecord
from pipeline.runs import open_run

from .conftest import ROLES, read_jsonl, run_files, run_folders
from .fakeserver import Answer, BatchProgress, FakeServer, Reply, Status
from .test_telemetry import spans_of

VERDICT = {"completed": True, "score": 7, "reasons": "Fine.", "deliverable": "A draft."}


def reflections(names: list[str]) -> dict[str, Any]:
    return {
        "reflections": [
            {"role": name, "meets_goal": True, "assessment": "Fine.", "improvements": "",
             "keep": True, "reason": "useful"}
            for name in names
        ]
    }  # fmt: skip


def answer(body: dict[str, Any]) -> Reply:
    """Roles, a verdict or reflections by the schema asked for; a turn that names the
    task's number and the turn's."""
    kind = (body.get("response_format") or {}).get("json_schema", {}).get("name")
    if kind == "roles":
        return Reply(json.dumps(ROLES))
    if kind == "verdict":
        return Reply(json.dumps(VERDICT))
    if kind == "reflection":
        return Reply(json.dumps(reflections(["Student", "Mentor"])))
    system = body["messages"][0]["content"]
    return Reply(f"turn {len(body['messages'])} of {len(system)}")


def tasks_file(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "tasks.txt"
    path.write_text("".join(f"write paper number {i}\n" for i in range(count)))
    return path


def endpoint(fake: FakeServer) -> list[str]:
    return ["--base-url", fake.base_url, "--model", "m", "--turns", "2"]


def ledgers(runs_dir: Path) -> dict[str, dict[str, Any]]:
    folder = runs_dir / "batches" / "tasks.batch-api"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*-*.json"))}


def calls(run: Path, stage: str) -> list[CallRecord]:
    return [
        CallRecord.from_json(json.loads(p.read_text()))
        for p in sorted((run / stage / "calls").glob("*.json"))
    ]


def structured_chat_requests(fake: FakeServer) -> list[dict[str, Any]]:
    """The structured requests that came through the ordinary API (not in a batch)."""
    return [body for body in fake.chat_requests() if body.get("response_format")]


def test_director_and_judge_go_through_the_batch_api_then_the_dialogues(invoke, runs_dir, tmp_path):
    path = tasks_file(tmp_path, 5)
    with FakeServer(answer) as fake:
        args = [*endpoint(fake), "--judge", "--reflect", "--poll-interval", "0"]
        result = invoke("batch", str(path), "--batch-api", *args)
        assert result.exit_code == 0, result.output
        batches = fake.batches
        assert batches is not None
        received = [r.path for r in fake.received]
        assert structured_chat_requests(fake) == []  # no structured request outside a batch
    runs = run_folders(runs_dir)
    assert len(runs) == 5
    ids = sorted(run.name for run in runs)
    # one batch per stage, each with one line per run, in the order of the graph
    lines = {b["metadata"]["ledger"]: batches.lines[b["id"]] for b in batches.batches.values()}
    assert sorted(lines) == ["director-1", "judge-1", "reflect-1"]
    for stage in ("director", "judge", "reflect"):
        assert sorted(line["custom_id"] for line in lines[f"{stage}-1"]) == [
            f"{run_id}:{stage}" for run_id in ids
        ]
        assert {line["url"] for line in lines[f"{stage}-1"]} == {"/v1/chat/completions"}
    creates = [i for i, p in enumerate(received) if p == "/v1/batches"]
    chats = [i for i, p in enumerate(received) if p.endswith("/chat/completions")]
    assert len(creates) == 3 and len(chats) == 5  # 2 turns a run: the opening line, then one
    assert creates[0] < min(chats) and max(chats) < creates[1] < creates[2]
    # every run complete, each answer recorded with the batch that gave it
    for run in runs:
        manifest = json.loads((run / "run.json").read_text())
        assert {s: manifest["stages"][s]["status"] for s in manifest["stages"]} == {
            "director": "done", "dialogue": "done", "judge": "done", "reflect": "done",
        }  # fmt: skip
        assert json.loads((run / "judge" / "verdict.json").read_text()) == VERDICT
        for stage in ("director", "judge", "reflect"):
            (call,) = calls(run, stage)
            assert call.batch is not None and call.batch["custom_id"] == f"{run.name}:{stage}"
            assert call.batch["id"] in batches.batches
    # the ledgers: valid, ended, their files kept
    found = ledgers(runs_dir)
    assert sorted(found) == ["director-1", "judge-1", "reflect-1"]
    for local_id, ledger in found.items():
        assert schemas.errors(ledger, "batch-api-ledger.schema.json") == []
        assert (ledger["status"], ledger["downloaded"], len(ledger["requests"])) == (
            "completed", True, 5,
        )  # fmt: skip
        folder = runs_dir / "batches" / "tasks.batch-api"
        assert len(read_jsonl(folder / f"{local_id}.input.jsonl")) == 5
        assert len(read_jsonl(folder / f"{local_id}.output.jsonl")) == 5
    assert "director: 5 of 5 answered by the Batch API" in result.stderr
    # a trace says which calls a batch answered
    spans = spans_of(open_run(runs_dir, runs[0].name))
    chats = [s for s in spans if s.name == "chat m"]
    assert sorted(str(s.attributes.get("pipeline.batch.id")) for s in chats) == [  # type: ignore[union-attr]
        "None", "batch_fake001", "batch_fake002", "batch_fake003",
    ]  # fmt: skip
    table = result.stdout.splitlines()
    assert sorted(line.split()[0] for line in table[1:]) == ["done"] * 5


def products(run: Path) -> dict[str, Any]:
    """What a run made: its roles and verdict, its transcript but for each turn's time
    and server."""
    lines = read_jsonl(run / "dialogue" / "transcript.jsonl")
    return {
        "roles": (run / "director" / "roles.json").read_bytes(),
        "verdict": (run / "judge" / "verdict.json").read_bytes(),
        "transcript": [
            {k: v for k, v in line.items() if k not in ("time", "base_url")} for line in lines
        ],
    }


def test_the_runs_are_those_of_an_ordinary_batch_and_replay_byte_for_byte(tmp_path):
    path = tasks_file(tmp_path, 3)
    made: dict[str, dict[str, Any]] = {}
    for way, flags in (("api", ["--batch-api", "--poll-interval", "0"]), ("plain", [])):
        runs_dir = tmp_path / way
        with FakeServer(answer) as fake:
            args = ["--runs-dir", str(runs_dir), *endpoint(fake), "--judge", *flags]
            assert CliRunner().invoke(cli, ["batch", str(path), *args]).exit_code == 0
        made[way] = {run.name.split("-", 1)[1]: products(run) for run in run_folders(runs_dir)}
    assert made["api"] == made["plain"]  # the same roles, transcripts and verdicts
    runs_dir = tmp_path / "api"
    source = run_folders(runs_dir)[0]
    replayed = CliRunner().invoke(
        cli,
        ["replay", source.name, "--into", "20261126T000000Z-again", "--runs-dir", str(runs_dir)],
    )
    assert replayed.exit_code == 0, replayed.output
    assert run_files(runs_dir / "20261126T000000Z-again") == run_files(source)


def test_a_repair_goes_through_the_ordinary_api(invoke, runs_dir, tmp_path):
    def unusable_first(body: dict[str, Any]) -> Reply:
        if body.get("response_format") and len(body["messages"]) == 1:
            return Reply("these are not roles")
        return answer(body)

    path = tasks_file(tmp_path, 2)
    with FakeServer(unusable_first) as fake:
        result = invoke("batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake))
        assert result.exit_code == 0, result.output
        repairs = structured_chat_requests(fake)
        assert fake.batches is not None and len(fake.batches.batches) == 1
    assert len(repairs) == 2 and all(len(body["messages"]) == 3 for body in repairs)
    for run in run_folders(runs_dir):
        first, repair = calls(run, "director")
        assert first.batch is not None and repair.batch is None
        assert repair.request["messages"][1]["content"] == "these are not roles"


def test_requests_an_expired_batch_left_unanswered_go_through_the_ordinary_api(
    invoke, runs_dir, tmp_path
):
    path = tasks_file(tmp_path, 4)
    with FakeServer(answer) as fake:
        assert fake.batches is not None
        fake.batches.progress = BatchProgress(("validating", "in_progress", "expired"), answered=1)
        result = invoke("batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake))
        assert result.exit_code == 0, result.output
        assert len(structured_chat_requests(fake)) == 3
    assert "director: 1 of 4 answered by the Batch API; 3 go through the ordinary API" in (
        result.stderr
    )
    batched = [run for run in run_folders(runs_dir) if calls(run, "director")[0].batch]
    assert len(batched) == 1
    (ledger,) = ledgers(runs_dir).values()
    assert (ledger["status"], ledger["request_counts"]) == (
        "expired", {"total": 4, "completed": 1, "failed": 3},
    )  # fmt: skip


def test_a_failed_batch_stops_with_one_line_and_the_next_run_submits_again(
    invoke, runs_dir, tmp_path
):
    path = tasks_file(tmp_path, 2)
    error = {"code": "invalid_request", "message": "model m is not supported", "line": 1}
    with FakeServer(answer) as fake:
        assert fake.batches is not None
        fake.batches.progress = BatchProgress(("validating", "failed"), errors=(error,))
        args = ["batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake)]
        failed = invoke(*args)
        assert failed.exit_code == 1
        assert failed.stderr.splitlines()[-1] == (
            f"Error: batch batch_fake001 of the director stage failed at {fake.base_url}: "
            "model m is not supported (line 1); run the same command again to submit a new "
            "batch; or run the batch without --batch-api"
        )
        for run in run_folders(runs_dir):  # the runs are kept, waiting for their director
            assert json.loads((run / "run.json").read_text())["stages"]["director"]["status"] == (
                "pending"
            )
        fake.batches.progress = BatchProgress()
        again = invoke(*args)
        assert again.exit_code == 0, again.output
        assert len(fake.batches.batches) == 2
    assert sorted(ledgers(runs_dir)) == ["director-1", "director-2"]
    assert len(run_folders(runs_dir)) == 2


def test_a_server_without_a_batch_api_is_named_and_the_runs_finish_without_it(
    invoke, runs_dir, tmp_path
):
    path = tasks_file(tmp_path, 2)
    with FakeServer(answer, batch_api=False) as fake:
        result = invoke("batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake))
        assert result.exit_code == 1
        assert result.stderr.splitlines()[-1] == (
            f"Error: {fake.base_url} refused the creation of the director batch (HTTP 404): "
            "no route POST /v1/batches; check that --base-url is the API root of a server "
            "with a Batch API (often ending in /v1); or run the batch without --batch-api, "
            "through the ordinary API"
        )
        plain = invoke("batch", str(path), *endpoint(fake))
        assert plain.exit_code == 0, plain.output
    assert len(run_folders(runs_dir)) == 2


def test_a_batch_already_submitted_is_waited_for_not_submitted_again(invoke, runs_dir, tmp_path):
    """A driver stopped while a batch runs (here: a look at it refused): the next run
    waits for the same batch and takes its answers."""
    path = tasks_file(tmp_path, 3)
    with FakeServer(answer) as fake:
        batches = fake.batches
        assert batches is not None
        args = ["batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake)]
        fake.fine_tuning.add("retrieve_batch", Status(403, "no access right now"))
        stopped = invoke(*args)
        assert stopped.exit_code == 1
        assert "refused a look at batch batch_fake001 (HTTP 403)" in stopped.stderr
        assert invoke(*args).exit_code == 0
        assert len(batches.batches) == 1
        assert structured_chat_requests(fake) == []
    director = [calls(run, "director")[0].batch for run in run_folders(runs_dir)]
    assert [batch and batch["id"] for batch in director] == ["batch_fake001"] * 3


def test_a_batch_made_but_not_recorded_is_found_by_its_input_file(
    invoke, runs_dir, tmp_path, sigint_raises
):
    """Creating a batch is not idempotent: after a lost answer the batch is looked for
    before another is made, in the same command or, stopped then, in the next one."""
    path = tasks_file(tmp_path, 2)
    with FakeServer(answer) as fake:
        batches = fake.batches
        assert batches is not None
        args = ["batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake)]
        ctrl_c = Answer(before=lambda: signal.raise_signal(signal.SIGINT))
        fake.fine_tuning.add("create_batch", Answer(lose=True))  # made, its answer lost
        fake.fine_tuning.add("list_batches", ctrl_c)  # stopped while looking for it
        assert invoke(*args).exit_code == 130
        ledger = ledgers(runs_dir)["director-1"]
        assert (ledger["input_file_id"], ledger["batch_id"]) == ("file-fake001", None)
        again = invoke(*args)
        assert again.exit_code == 0, again.output
        assert list(batches.batches) == ["batch_fake001"]

        more = tmp_path / "more.txt"  # the same, found within one command
        more.write_text("another paper\n")
        fake.fine_tuning.add("create_batch", Answer(lose=True))
        args = ["batch", str(more), "--batch-api", "--poll-interval", "0", *endpoint(fake)]
        assert invoke(*args).exit_code == 0
        assert len(batches.batches) == 2
    assert ledgers(runs_dir)["director-1"]["batch_id"] == "batch_fake001"
    ledger = json.loads((runs_dir / "batches" / "more.batch-api" / "director-1.json").read_text())
    assert ledger["batch_id"] == "batch_fake002"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-api", "--ray"], "Error: --batch-api cannot be used with --ray"),
        (["--poll-interval", "5"], "Error: --poll-interval needs --batch-api"),
    ],
)
def test_batch_api_usage_errors(invoke, tmp_path, args, message):
    path = tasks_file(tmp_path, 1)
    result = invoke("batch", str(path), *args, "--base-url", "http://127.0.0.1:9/v1")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == message


def test_the_embedded_model_has_no_batch_api(invoke, runs_dir, tmp_path):
    result = invoke("batch", str(tasks_file(tmp_path, 1)), "--batch-api")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: the director stage runs on the embedded model, which has no Batch API; name a "
        "hosted endpoint with --base-url; or run the batch without --batch-api\n"
    )
    assert not runs_dir.exists() or run_folders(runs_dir) == []


def test_dry_run_counts_the_requests_and_prices_them(invoke, runs_dir, tmp_path):
    from pipeline.dataset import CHARS_PER_TOKEN

    path = tasks_file(tmp_path, 3)
    prices = tmp_path / "prices.toml"
    prices.write_text(
        "[chat_input]\nm = 2.0\n[chat_output]\nm = 8.0\n"
        "[batch_input]\nm = 1.0\n[batch_output]\nm = 4.0\n"
    )
    with FakeServer(answer) as fake:
        args = [*endpoint(fake), "--judge", "--director-max-tokens", "1000", "--max-tokens", "100"]
        result = invoke(
            "batch", str(path), "--batch-api", "--dry-run", "--prices", str(prices), *args
        )
        assert result.exit_code == 0, result.output
        assert [r.path for r in fake.received if r.method != "GET"] == []  # nothing sent
    assert not runs_dir.exists() or run_folders(runs_dir) == []
    lines = result.stdout.splitlines()
    assert lines[0] == "3 tasks, 3 to run; requests through the Batch API (--batch-api):"
    assert lines[1].split() == [
        "STAGE", "MODEL", "REQUESTS", "INPUT", "TOKENS", "OUTPUT", "TOKENS", "BATCH", "API",
        "ORDINARY",
    ]  # fmt: skip
    director, judge, total = (line.split() for line in lines[2:5])
    assert director[:3] == ["director", "m", "3"] and director[4:6] == ["<=", "3,000"]
    tokens = int(director[3].replace(",", ""))
    assert tokens > 3 * 100  # the director's prompt, counted
    assert director[6:] == [
        f"${(tokens * 1.0 + 3000 * 4.0) / 1e6:,.4f}",
        f"${(tokens * 2.0 + 3000 * 8.0) / 1e6:,.4f}",
    ]
    # the judge's input at most: the roles at 1000 tokens and 2 turns of 100 (+8) per run
    assert judge[:4] == ["judge", "m", "3", "<="]
    assert int(judge[4].replace(",", "")) > 3 * (1000 + 2 * 108)
    assert judge[5:7] == ["<=", f"{3 * JudgeParameters().max_tokens:,}"]
    assert total[:2] == ["total", "6"]
    assert lines[5:] == [
        "costs are upper estimates: every answer at its token limit, every conversation at "
        "its longest",
        "dialogue: 3 runs, at most 6 turns, through the ordinary API (not priced here)",
        "tokens counted with estimate; prices from https://platform.openai.com/docs/pricing "
        "(2025-06)",
    ]
    assert CHARS_PER_TOKEN == 4  # "estimate": a token per 4 characters, for model "m"

    bound = int(judge[4].replace(",", ""))
    with FakeServer(answer) as fake:  # the dialogues done: the judges' prompts are known
        assert invoke("batch", str(path), *endpoint(fake), "--max-tokens", "100").exit_code == 0
        known = invoke("batch", str(path), "--batch-api", "--dry-run", *args)
    assert known.stdout.splitlines()[0] == (
        "3 tasks, 3 to run; requests through the Batch API (--batch-api):"
    )
    (row,) = (line.split() for line in known.stdout.splitlines()[2:3])
    assert row[:3] == ["judge", "m", "3"] and 0 < int(row[3].replace(",", "")) < bound

    unpriced = invoke("batch", str(path), "--dry-run", "--judge", *endpoint(fake))
    assert unpriced.exit_code == 0
    assert (
        unpriced.stdout.splitlines()[0] == "3 tasks, 3 to run; requests through the ordinary API:"
    )
    assert unpriced.stdout.splitlines()[-2] == (
        "no price for m: give one with --prices FILE ([chat_input], [chat_output], "
        "[batch_input], [batch_output], USD per 1M tokens)"
    )


@pytest.mark.parametrize(("stage", "after"), [("director", None), ("judge", "dialogue"),
                                          ("reflect", "dialogue")])  # fmt: skip
def test_a_stage_s_first_request_is_known_ahead_without_writing_anything(runs_dir, stage, after):
    from pipeline import stages
    from pipeline.client import ModelClient, canonical
    from pipeline.endpoints import Endpoint

    with FakeServer(answer) as fake:
        client = ModelClient(Endpoint(fake.base_url, "m", api_key_env=None))
        plan = stages.Plan.of()
        run = plan.new_run(runs_dir, "write a paper", judge=True, reflect=True)
        ctx = stages.StageContext(run, stages.OneClient(client), plan)
        if after is not None:
            stages.advance(ctx, until=after)
        sent, files = len(fake.chat_requests()), run_files(run.folder)
        manifest = (run.folder / "run.json").read_bytes()
        endpoint, body = stages.first_request(ctx, stage)
        assert len(fake.chat_requests()) == sent
        assert (run_files(run.folder), (run.folder / "run.json").read_bytes()) == (files, manifest)
        with pytest.raises(ValueError, match="the dialogue stage converses"):
            stages.first_request(ctx, "dialogue")
        stages.execute(ctx, stage)
    first = calls(run.folder, stage)[0]
    assert (first.request_sha256, first.batch) == (canonical(endpoint, body)[1], None)


def test_ctrl_c_while_waiting_leaves_the_batch_to_the_next_run(
    invoke, runs_dir, tmp_path, sigint_raises
):
    path = tasks_file(tmp_path, 2)
    with FakeServer(answer) as fake:
        assert fake.batches is not None
        ctrl_c = Answer(before=lambda: signal.raise_signal(signal.SIGINT))
        fake.fine_tuning.add("retrieve_batch", Answer(), ctrl_c)  # at the second look
        args = ["batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake)]
        stopped = invoke(*args)
        assert stopped.exit_code == 130
        folder = runs_dir / "batches" / "tasks.batch-api"
        assert stopped.stderr.splitlines()[-1] == (
            f"interrupted; the batches submitted go on at the provider (see {folder}); to wait "
            "for them and finish the runs, run the same command again"
        )
        assert ledgers(runs_dir)["director-1"]["batch_id"] == "batch_fake001"
        again = invoke(*args)
        assert again.exit_code == 0, again.output
        assert list(fake.batches.batches) == ["batch_fake001"]
    assert sorted(line.split()[0] for line in again.stdout.splitlines()[1:]) == ["done"] * 2


def test_a_stage_that_failed_with_a_batch_answer_asks_again_next_time(invoke, runs_dir, tmp_path):
    unusable = [True]

    def roles_once_unusable(body: dict[str, Any]) -> Reply:
        if body.get("response_format") and unusable[0]:
            return Reply("these are not roles")
        return answer(body)

    path = tasks_file(tmp_path, 2)
    with FakeServer(roles_once_unusable) as fake:
        args = ["batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake)]
        failed = invoke(*args, "--repair-attempts", "0")
        assert failed.exit_code == 1
        assert sorted(line.split()[0] for line in failed.stdout.splitlines()[1:]) == ["failed"] * 2
        unusable[0] = False
        again = invoke(*args, "--repair-attempts", "0")
        assert again.exit_code == 0, again.output
        assert structured_chat_requests(fake) == []
    found = ledgers(runs_dir)
    ids = sorted(f"{run.name}:director" for run in run_folders(runs_dir))
    assert found["director-1"]["spent"] == ids
    assert sorted(found["director-2"]["requests"]) == ids
    for run in run_folders(runs_dir):
        (call,) = calls(run, "director")
        assert call.batch is not None and call.batch["id"] == "batch_fake002"


def test_a_changed_request_is_not_answered_by_an_older_batch(
    invoke, runs_dir, tmp_path, sigint_raises
):
    path = tasks_file(tmp_path, 2)
    with FakeServer(answer) as fake:
        args = ["batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake)]
        ctrl_c = Answer(before=lambda: signal.raise_signal(signal.SIGINT))
        fake.fine_tuning.add("retrieve_batch", ctrl_c)
        assert invoke(*args).exit_code == 130
        changed = invoke(*args, "--director-max-tokens", "1500")
        assert changed.exit_code == 0, changed.output
    assert sorted(ledgers(runs_dir)) == ["director-1", "director-2"]
    for run in run_folders(runs_dir):
        (call,) = calls(run, "director")
        assert call.batch is not None and call.batch["id"] == "batch_fake002"
        assert call.request["max_tokens"] == 1500


def test_the_batched_transport_answers_only_its_request_and_only_once():
    from pipeline.batchapi import Answer as BatchAnswer
    from pipeline.batchapi import BatchedTransport

    sent: list[str] = []

    class Inner:
        def send(self, request, digest, *, stream, on_delta):  # type: ignore[no-untyped-def]
            sent.append(digest)
            return CallRecord(request, digest, response={"inner": True})

    batch = {"id": "batch_x", "custom_id": "r:director"}
    transport = BatchedTransport(Inner(), BatchAnswer("d1", {"batch": True}, batch, None, None))
    assert transport.send({}, "d2", stream=False, on_delta=None).response == {"inner": True}
    assert transport.send({}, "d1", stream=True, on_delta=None).response == {"inner": True}
    first = transport.send({}, "d1", stream=False, on_delta=None)
    assert (first.response, first.batch) == ({"batch": True}, batch)
    assert transport.send({}, "d1", stream=False, on_delta=None).response == {"inner": True}
    assert sent == ["d2", "d1", "d1"]


def test_a_ledger_cut_short_before_its_upload_is_uploaded_by_the_next_run(
    invoke, runs_dir, tmp_path, sigint_raises
):
    path = tasks_file(tmp_path, 2)
    with FakeServer(answer) as fake:
        args = ["batch", str(path), "--batch-api", "--poll-interval", "0", *endpoint(fake)]
        fake.fine_tuning.add("upload", Answer(before=lambda: signal.raise_signal(signal.SIGINT)))
        assert invoke(*args).exit_code == 130
        ledger = ledgers(runs_dir)["director-1"]
        assert (ledger["input_file_id"], ledger["batch_id"]) == (None, None)
        again = invoke(*args)
        assert again.exit_code == 0, again.output
        assert fake.batches is not None and len(fake.batches.batches) == 1
        (made,) = fake.batches.batches.values()
        uploaded = fake.fine_tuning.files[made["input_file_id"]]["content"]
    folder = runs_dir / "batches" / "tasks.batch-api"
    assert uploaded == (folder / "director-1.input.jsonl").read_bytes()
    assert ledgers(runs_dir)["director-1"]["input_file_id"] == made["input_file_id"]


def test_a_second_command_on_the_same_tasks_file_stops_at_once(invoke, runs_dir, tmp_path):
    from pipeline.batchapi import BatchApi

    path = tasks_file(tmp_path, 1)
    folder = runs_dir / "batches" / "tasks.batch-api"
    with FakeServer(answer) as fake, BatchApi(folder).held():
        result = invoke("batch", str(path), "--batch-api", *endpoint(fake))
        assert fake.batches is not None and fake.batches.batches == {}
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: the provider batches in {folder} are in use by another pipeline process; "
        "wait for it to finish, or stop it"
    )

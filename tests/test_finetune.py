"""Fine-tune jobs (issue 14, parts 3 and 4): the ledger, the finetune commands and their
faults, against the fake server's /v1/files and /v1/fine_tuning/jobs through the real
openai client (its retries included)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pexpect
import pytest

from pipeline import schemas
from pipeline.config import load_config
from pipeline.endpoints import EmbeddedModel, Endpoint, Resolver
from pipeline.finetune import (
    LEDGER_SCHEMA,
    FinetuneLedger,
    LedgerFile,
    StatusChange,
    job_for_model,
)

from .conftest import only_ledger, timeless, write_dataset
from .fakeserver import FAILS, Answer, FakeServer, Status

KEY = "sk-SENTINEL-never-in-a-file"
BASE = "gpt-4o-mini-2024-07-18"


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


@pytest.fixture
def train(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "train.jsonl", 12)


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "valid.jsonl", 3)


def ft(invoke: Any, fake: FakeServer, *args: str, **kwargs: Any) -> Any:
    """``pipeline finetune ARGS`` against the fake server, with quick polls."""
    extra = ["--poll-interval", "0.01"] if args[0] == "status" and "--follow" in args else []
    return invoke("finetune", *args, *extra, "--base-url", fake.base_url, **kwargs)


def ledger_file(path: Path, examples: int, file_id: str | None, deleted: bool = False) -> dict:
    import hashlib

    data = path.read_bytes()
    return {
        "path": str(path),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "examples": examples,
        "file_id": file_id,
        "deleted": "<time>" if deleted else None,
    }


# -- the record and its schema -------------------------------------------------------------


def test_the_ledger_records_and_the_schema_name_the_same_fields():
    schema = schemas.load(LEDGER_SCHEMA)
    fields = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
    assert fields(FinetuneLedger) == set(schema["properties"])
    assert fields(LedgerFile) == set(schema["$defs"]["file"]["properties"])
    assert fields(StatusChange) == set(schema["properties"]["history"]["items"]["properties"])


# -- the path: create, follow to succeeded, cleanup ----------------------------------------


def test_create_follow_and_clean_up_with_the_ledger_at_each_step(
    fake, invoke, runs_dir, train, valid, key
):
    created = ft(
        invoke, fake, "create", str(train), "--base-model", BASE,
        "--validation", str(valid), "--suffix", "ana", "--yes",
    )  # fmt: skip
    path, ledger = only_ledger(runs_dir)
    local_id = path.stem
    assert created.exit_code == 0, created.output
    assert created.stderr == f"fine-tune {local_id}: uploading to {fake.base_url}...\n"
    assert created.stdout == (
        f"created job ftjob-fake001 (validating_files) for fine-tune {local_id}\n"
        f"follow it with: pipeline finetune status {local_id} --follow --runs-dir {runs_dir}\n"
    )
    assert schemas.errors(ledger, LEDGER_SCHEMA) == []
    expected = {
        "version": 1,
        "local_id": local_id,
        "created": "<time>",
        "base_url": fake.base_url,
        "base_model": BASE,
        "suffix": "ana",
        "training": ledger_file(train, 12, "file-fake001"),
        "validation": ledger_file(valid, 3, "file-fake002"),
        "source_runs": [],
        "job_id": "ftjob-fake001",
        "status": "validating_files",
        "fine_tuned_model": None,
        "error": None,
        "history": ["pending", "uploaded", "validating_files"],
    }
    assert timeless(ledger) == expected
    assert local_id.endswith("Z-train")
    uploads = [r for r in fake.received if r.path == "/v1/files"]
    assert [r.body for r in uploads] == [
        {"purpose": "fine-tune", "file": train.stat().st_size, "filename": "train.jsonl"},
        {"purpose": "fine-tune", "file": valid.stat().st_size, "filename": "valid.jsonl"},
    ]
    assert fake.fine_tuning.files["file-fake001"]["content"] == train.read_bytes()
    job_request = next(r.body for r in fake.received if r.path == "/v1/fine_tuning/jobs")
    assert job_request == {
        "model": BASE,
        "training_file": "file-fake001",
        "suffix": "ana",
        "validation_file": "file-fake002",
    }

    followed = ft(invoke, fake, "status", local_id, "--follow")
    model = f"ft:{BASE}:fake-org:ana:001abc"
    assert followed.exit_code == 0, followed.output
    assert followed.stderr == (
        f"following job ftjob-fake001 of fine-tune {local_id} (Ctrl-C stops following; the "
        "job goes on)\n"
        "  22:13:24  Created fine-tuning job: ftjob-fake001\n"
        "  22:13:25  Validating training file: file-fake001\n"
        "  22:13:26  Files validated, moving job to queued state\n"
        "status: queued\n"
        "  22:13:27  Fine-tuning job started\n"
        "status: running\n"
        f"  22:13:28  New fine-tuned model created: {model}\n"
        "  22:13:30  The job has successfully completed\n"
        "status: succeeded\n"
    )
    assert followed.stdout == (
        f"fine-tune {local_id}: succeeded\n"
        f"  endpoint    {fake.base_url}\n"
        "  job         ftjob-fake001\n"
        f"  base model  {BASE}\n"
        "  suffix      ana\n"
        f"  training    {train} (1,923 bytes, 12 examples), uploaded as file-fake001\n"
        f"  validation  {valid} (480 bytes, 3 examples), uploaded as file-fake002\n"
        f"  model       {model}\n"
        f"\nto use {model}, add to pipeline.toml:\n\n"
        "[endpoints.ana]\n"
        f'base_url = "{fake.base_url}"\n'
        f'model = "{model}"\n'
        'api_key_env = "OPENAI_API_KEY"\n'
        f"\nor pass: --base-url {fake.base_url} --model {model} --api-key-env OPENAI_API_KEY\n"
    )
    _, ledger = only_ledger(runs_dir)
    assert timeless(ledger) == {
        **expected,
        "status": "succeeded",
        "fine_tuned_model": model,
        "history": ["pending", "uploaded", "validating_files", "queued", "running", "succeeded"],
    }
    assert job_for_model(runs_dir, model) == FinetuneLedger.from_json(ledger)
    assert job_for_model(runs_dir, BASE) is None

    cleaned = ft(invoke, fake, "cleanup", "ftjob-fake001")  # the job id works too
    assert cleaned.exit_code == 0, cleaned.output
    assert cleaned.stdout == (
        f"deleted file-fake001 ({train}) at {fake.base_url}\n"
        f"deleted file-fake002 ({valid}) at {fake.base_url}\n"
    )
    assert (
        cleaned.stderr == f"the model {model} stays at {fake.base_url} until you delete it there\n"
    )
    assert fake.fine_tuning.files == {}
    _, ledger = only_ledger(runs_dir)
    assert timeless(ledger) == {
        **expected,
        "status": "succeeded",
        "fine_tuned_model": model,
        "training": ledger_file(train, 12, "file-fake001", deleted=True),
        "validation": ledger_file(valid, 3, "file-fake002", deleted=True),
        "history": ["pending", "uploaded", "validating_files", "queued", "running", "succeeded"],
    }
    again = ft(invoke, fake, "cleanup", local_id)
    assert again.stdout == (
        f"fine-tune {local_id}: no uploaded file left to delete at {fake.base_url}\n"
    )

    # the key went to the server, and nowhere under runs/
    assert {r.headers["authorization"] for r in fake.received} == {f"Bearer {key}"}
    for file in runs_dir.rglob("*"):
        assert not file.is_file() or key.encode() not in file.read_bytes(), file


@pytest.mark.parametrize("answer", ["y", "n"])
def test_create_asks_naming_the_files_their_sizes_examples_and_the_endpoint(
    fake, runs_dir, train, answer
):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pipeline", "finetune", "create", str(train), "--base-model", BASE,
         "--base-url", fake.base_url, "--runs-dir", str(runs_dir)],
        env={**env, "NO_COLOR": "1"},
        encoding="utf-8",
        timeout=60,
    )  # fmt: skip
    child.expect_exact("Upload them? [y/N]: ")
    assert child.before.replace("\r\n", "\n") == (
        f"upload to {fake.base_url}:\n"
        f"  training  {train} (1,923 bytes, 12 examples)\n"
        f"to fine-tune {BASE}\n"
        f"These files may hold personal data (chat histories): {fake.base_url} keeps them "
        "until they are deleted (pipeline finetune cleanup JOB).\n"
    )
    child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    if answer == "n":
        assert "not uploaded" in child.before
        assert fake.received == []
        assert not (runs_dir / "finetunes").exists()
    else:
        _, ledger = only_ledger(runs_dir)
        assert "created job ftjob-fake001 (validating_files)" in child.before
        assert ledger["status"] == "validating_files"


def test_create_without_a_terminal_or_yes_is_refused(fake, invoke, runs_dir, train):
    result = ft(invoke, fake, "create", str(train), "--base-model", BASE)
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: standard input is not a terminal, so the upload of {train} to "
        f"{fake.base_url} cannot be confirmed; pass --yes to upload it\n"
    )
    assert fake.received == []
    assert not (runs_dir / "finetunes").exists()


def test_a_dry_run_prints_the_upload_and_its_cost_and_sends_nothing(
    fake, invoke, runs_dir, train, valid, tiktoken_offline
):
    result = ft(
        invoke, fake, "create", str(train), "--base-model", BASE,
        "--validation", str(valid), "--suffix", "ana", "--dry-run",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"upload to {fake.base_url}:\n"
        f"  training    {train} (1,923 bytes, 12 examples)\n"
        f"  validation  {valid} (480 bytes, 3 examples)\n"
        f"to fine-tune {BASE} (suffix ana)\n"
        "estimated training cost: less than $0.01 for 348 tokens x 8 epochs (tokens counted "
        "with estimate)\n"
        "dry run: nothing was uploaded\n"
    )
    assert fake.received == []
    assert not (runs_dir / "finetunes").exists()


def test_a_dataset_line_that_is_not_a_json_object_stops_before_anything_is_sent(
    fake, invoke, runs_dir, tmp_path
):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n\n[1, 2]\n')
    result = ft(invoke, fake, "create", str(bad), "--base-model", BASE, "--yes")
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {bad}: line 3: a JSON list, not an object; a fine-tuning dataset has one JSON "
        "object per line\n"
    )
    assert fake.received == []
    assert not (runs_dir / "finetunes").exists()


# -- the endpoint --------------------------------------------------------------------------

HOSTED_FIX = (
    "point at a hosted fine-tuning API: pass --base-url URL and --api-key-env NAME (or set "
    'OPENAI_API_KEY for OpenAI\'s), or name one in pipeline.toml: [assign] finetune = "NAME"'
)


def test_the_embedded_model_is_refused_with_how_to_point_at_a_hosted_api(
    invoke, runs_dir, train, tmp_path
):
    result = invoke("finetune", "create", str(train), "--base-model", BASE, "--dry-run")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: no endpoint for fine-tuning is set (flags, [assign] finetune in the config "
        "file, OPENAI_API_KEY or OPENAI_BASE_URL), which leaves the embedded model; it has no "
        f"files or fine-tuning API, so it cannot fine-tune; {HOSTED_FIX}\n"
    )
    config = tmp_path / "pipeline.toml"
    config.write_text('[endpoints.offline]\nembedded = true\n[assign]\ndefault = "offline"\n')
    result = invoke("finetune", "list", "--config", str(config))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {config}: assign.default gives fine-tuning to 'offline', the embedded model; "
        f"it has no files or fine-tuning API, so it cannot fine-tune; {HOSTED_FIX}\n"
    )


def test_assign_finetune_takes_precedence_over_the_default(fake, invoke, train, tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text(
        '[endpoints.chat]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
        f'[endpoints.tuning]\nbase_url = "{fake.base_url}"\nmodel = "unused"\n'
        '[assign]\ndefault = "chat"\nfinetune = "tuning"\n'
    )
    resolver = Resolver(config=load_config(config), environ={})
    assert resolver.finetune() == Endpoint(fake.base_url, "unused", None)
    assert Resolver(config=load_config(config), environ={}).director().base_url.endswith(":9/v1")
    assert Resolver(environ={}).finetune() == EmbeddedModel()
    result = invoke(
        "finetune", "create", str(train), "--base-model", BASE, "--dry-run", "--config", str(config)
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"upload to {fake.base_url}:\n")


def test_a_base_url_alone_is_enough_for_fine_tuning():
    resolver = Resolver.for_command(base_url="http://x/v1", environ={}, model_required=False)
    assert resolver.finetune() == Endpoint("http://x/v1", "", None)


# -- faults --------------------------------------------------------------------------------


def test_an_upload_the_server_rejects_leaves_a_ledger_with_no_job(
    fake, invoke, runs_dir, train, key
):
    fake.fine_tuning.add("upload", Status(400, "Invalid file format for Fine-Tuning API."))
    result = ft(invoke, fake, "create", str(train), "--base-model", BASE, "--yes")
    path, ledger = only_ledger(runs_dir)
    assert result.exit_code == 1
    problem = (
        f"{fake.base_url} refused the upload of {train} (HTTP 400): Invalid file format for "
        "Fine-Tuning API."
    )
    assert result.stderr.splitlines()[-1] == f"Error: fine-tune {path.stem} stopped: {problem}"
    assert timeless(ledger) == {
        "version": 1,
        "local_id": path.stem,
        "created": "<time>",
        "base_url": fake.base_url,
        "base_model": BASE,
        "suffix": None,
        "training": ledger_file(train, 12, None),
        "validation": None,
        "source_runs": [],
        "job_id": None,
        "status": "upload_failed",
        "fine_tuned_model": None,
        "error": problem,
        "history": ["pending", "upload_failed"],
    }
    cleaned = ft(invoke, fake, "cleanup", path.stem)
    assert cleaned.exit_code == 0
    assert cleaned.stdout == (
        f"fine-tune {path.stem}: no uploaded file left to delete at {fake.base_url}\n"
    )
    shown = ft(invoke, fake, "status", path.stem)
    assert shown.stdout.splitlines()[0] == f"fine-tune {path.stem}: upload_failed"
    assert [r.method for r in fake.received] == ["POST"]  # the upload, nothing since


def test_a_job_the_server_refuses_leaves_its_uploaded_files_to_clean_up(
    fake, invoke, runs_dir, train, valid
):
    fake.fine_tuning.add("create", Status(400, "Training file has 12 examples; 20 are needed."))
    result = ft(
        invoke,
        fake,
        "create",
        str(train),
        "--base-model",
        BASE,
        "--validation",
        str(valid),
        "--yes",
    )
    path, ledger = only_ledger(runs_dir)
    local_id = path.stem
    assert result.exit_code == 1
    problem = (
        f"{fake.base_url} refused creating a job to fine-tune {BASE} (HTTP 400): Training file "
        "has 12 examples; 20 are needed."
    )
    assert result.stderr.splitlines()[-1] == (
        f"Error: fine-tune {local_id} stopped: {problem}; delete what was uploaded with: "
        f"pipeline finetune cleanup {local_id} --runs-dir {runs_dir}"
    )
    assert (ledger["status"], ledger["job_id"], ledger["error"]) == ("create_failed", None, problem)
    assert [h["status"] for h in ledger["history"]] == ["pending", "uploaded", "create_failed"]
    assert (ledger["training"]["file_id"], ledger["validation"]["file_id"]) == (
        "file-fake001",
        "file-fake002",
    )
    cleaned = ft(invoke, fake, "cleanup", local_id)
    assert cleaned.exit_code == 0, cleaned.output
    assert cleaned.stdout == (
        f"deleted file-fake001 ({train}) at {fake.base_url}\n"
        f"deleted file-fake002 ({valid}) at {fake.base_url}\n"
    )
    assert fake.fine_tuning.files == {}
    _, ledger = only_ledger(runs_dir)
    assert ledger["training"]["deleted"] and ledger["validation"]["deleted"]
    assert ledger["status"] == "create_failed"


def test_a_failed_job_ends_following_with_its_reason(fake, invoke, runs_dir, train):
    fake.fine_tuning.progress = FAILS
    ft(invoke, fake, "create", str(train), "--base-model", BASE, "--yes")
    path, _ = only_ledger(runs_dir)
    local_id = path.stem
    result = ft(invoke, fake, "status", local_id, "--follow")
    reason = FAILS.error["message"]  # type: ignore[index]
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-3:] == [
        f"  22:13:26  error: {reason}",
        "status: failed",
        f"Error: job ftjob-fake001 failed: {reason}; delete its uploaded files with: "
        f"pipeline finetune cleanup {local_id} --runs-dir {runs_dir}",
    ]
    assert result.stdout.splitlines()[0] == f"fine-tune {local_id}: failed"
    assert result.stdout.splitlines()[-1] == f"  error       {reason}"
    _, ledger = only_ledger(runs_dir)
    assert (ledger["status"], ledger["error"], ledger["fine_tuned_model"]) == (
        "failed",
        reason,
        None,
    )
    assert [h["status"] for h in ledger["history"]] == [
        "pending",
        "uploaded",
        "validating_files",
        "failed",
    ]


def test_a_429_during_a_poll_is_retried_then_reported_with_the_ledger_intact(
    fake, invoke, runs_dir, train
):
    ft(invoke, fake, "create", str(train), "--base-model", BASE, "--yes")
    path, _ = only_ledger(runs_dir)
    local_id = path.stem
    before = path.read_bytes()
    limited = Status(429, "Rate limit reached for requests", {"retry-after-ms": "10"})
    fake.fine_tuning.add("retrieve", limited, limited, limited)
    result = ft(invoke, fake, "status", local_id, "--follow", "--max-retries", "2")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: checking job ftjob-fake001 failed: {fake.base_url} kept answering 429 (rate "
        "limited) after 3 attempt(s): Rate limit reached for requests; wait and try again, or "
        "raise --max-retries; the job goes on at the server; see it again with: pipeline "
        f"finetune status {local_id} --runs-dir {runs_dir}"
    )
    assert path.read_bytes() == before
    retrieves = lambda: [r for r in fake.received if r.path.endswith("/ftjob-fake001")]  # noqa: E731
    assert len(retrieves()) == 3

    fake.fine_tuning.add("retrieve", limited)  # one 429: the SDK's retry gets past it
    result = ft(invoke, fake, "status", local_id, "--follow", "--max-retries", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == "status: succeeded"
    assert only_ledger(runs_dir)[1]["status"] == "succeeded"


def test_ctrl_c_while_following_leaves_the_job_running_and_status_picks_it_up(
    fake, invoke, runs_dir, train, sigint_raises
):
    ft(invoke, fake, "create", str(train), "--base-model", BASE, "--yes")
    path, _ = only_ledger(runs_dir)
    local_id = path.stem
    ctrl_c = Answer(before=lambda: signal.raise_signal(signal.SIGINT))
    fake.fine_tuning.add("retrieve", Answer(), ctrl_c)  # Ctrl-C at the second poll
    result = ft(invoke, fake, "status", local_id, "--follow")
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-2:] == [
        "",
        f"stopped following; job ftjob-fake001 goes on at {fake.base_url} and fine-tune "
        f"{local_id} is queued in its ledger; pick it up again with: pipeline finetune status "
        f"{local_id} --follow --runs-dir {runs_dir}",
    ]
    assert result.stdout == ""
    _, ledger = only_ledger(runs_dir)
    assert schemas.errors(ledger, LEDGER_SCHEMA) == []
    assert [h["status"] for h in ledger["history"]] == [
        "pending",
        "uploaded",
        "validating_files",
        "queued",
    ]
    assert fake.fine_tuning.jobs["ftjob-fake001"]["status"] == "running"  # it went on

    result = ft(invoke, fake, "status", local_id, "--follow")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[-1] == "status: succeeded"
    _, ledger = only_ledger(runs_dir)
    assert [h["status"] for h in ledger["history"]][-2:] == ["queued", "succeeded"]
    assert ledger["fine_tuned_model"] == f"ft:{BASE}:fake-org::001abc"


# -- list, cancel, lookups -----------------------------------------------------------------


def test_list_joins_the_server_s_jobs_with_the_ledgers_and_cancel_cancels(
    fake, invoke, runs_dir, train, tmp_path
):
    import openai

    ft(invoke, fake, "create", str(train), "--base-model", BASE, "--yes", "--suffix", "a")
    (path, _) = only_ledger(runs_dir)
    local_id = path.stem
    sdk = openai.OpenAI(base_url=fake.base_url, api_key="k")  # a job made elsewhere
    sdk.fine_tuning.jobs.create(training_file="file-fake001", model="gpt-4.1-mini")
    fake.fine_tuning.add("upload", Status(400, "Invalid file."))
    refused = write_dataset(tmp_path / "other.jsonl", 2)
    ft(invoke, fake, "create", str(refused), "--base-model", BASE, "--yes")
    refused_id = next(p.stem for p in (runs_dir / "finetunes").glob("*other.json"))

    listed = ft(invoke, fake, "list")
    assert listed.exit_code == 0, listed.output
    width = len(local_id)
    assert listed.stdout == (
        f"{'LOCAL ID'.ljust(width)}  JOB            STATUS            BASE MODEL              "
        "FINE-TUNED MODEL\n"
        f"{'-'.ljust(width)}  ftjob-fake002  validating_files  gpt-4.1-mini            -\n"
        f"{local_id}  ftjob-fake001  validating_files  {BASE}  -\n"
        f"{refused_id.ljust(width)}  -              upload_failed     {BASE}  -\n"
    )

    cancelled = ft(invoke, fake, "cancel", local_id)
    assert cancelled.exit_code == 0, cancelled.output
    assert cancelled.stdout == (
        f"job ftjob-fake001 of fine-tune {local_id}: cancelled\n"
        f"delete its uploaded files with: pipeline finetune cleanup {local_id} "
        f"--runs-dir {runs_dir}\n"
    )
    ledger = json.loads(path.read_text())
    assert [h["status"] for h in ledger["history"]][-2:] == ["validating_files", "cancelled"]
    again = ft(invoke, fake, "cancel", "ftjob-fake001")
    assert again.exit_code == 1
    assert again.stderr == (
        f"Error: {fake.base_url} refused cancelling job ftjob-fake001 (HTTP 400): Job "
        "ftjob-fake001 has already cancelled.\n"
    )
    following = ft(invoke, fake, "status", local_id, "--follow")
    assert following.exit_code == 1
    assert following.stderr.splitlines()[-1] == (
        f"Error: job ftjob-fake001 was cancelled; delete its uploaded files with: pipeline "
        f"finetune cleanup {local_id} --runs-dir {runs_dir}"
    )

    unknown = ft(invoke, fake, "status", "ftjob-nope")
    assert unknown.exit_code == 1
    assert unknown.stderr == (
        f"Error: no fine-tune 'ftjob-nope' in {runs_dir / 'finetunes'}: give a local id (a "
        "ledger's name) or a job id that one of its ledgers records; list them with: pipeline "
        f"finetune list --runs-dir {runs_dir}\n"
    )

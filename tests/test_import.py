"""pipeline import: a chat history becomes a run whose only stage is import, which the
other commands (runs, show, export, diff, rerun RUN judge, rm) read like any run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import schemas, stages
from pipeline.runs import open_run

from .conftest import read_jsonl
from .fakeserver import FakeServer, Reply

CHATS = Path(__file__).parent / "fixtures" / "chats"
VERDICT = {"completed": True, "score": 8, "reasons": "They agreed.", "deliverable": "Saturday"}


def imported(invoke, *args: str) -> list[str]:
    result = invoke("import", *args)
    assert result.exit_code == 0, result.output
    return result.stdout.split()


def test_a_whatsapp_chat_becomes_a_run_the_other_commands_read(runs_dir, invoke):
    (run_id,) = imported(
        invoke, "whatsapp", str(CHATS / "whatsapp-android-gb.txt"), "--me", "Bob",
        "--timezone", "Europe/London",
    )  # fmt: skip
    run = open_run(runs_dir, run_id)
    assert run.imported and stages.statuses(run) == {
        "import": "done",
        "judge": "pending",
        "reflect": "pending",
    }
    lines = read_jsonl(runs_dir / run_id / "import/transcript.jsonl")
    assert [(x["role"], x["kind"]) for x in lines[:2]] == [
        ("Alice", "imported"),
        ("Bob", "imported"),
    ]
    assert lines[0]["content"] == "Are we still on for Saturday?\nI can bring the tent"
    assert lines[0]["time"] == "2024-03-12T21:02:00Z"  # GMT in March: London is UTC
    assert all(schemas.errors(x, schemas.TRANSCRIPT_LINE) == [] for x in lines)
    roles = json.loads((runs_dir / run_id / "import/roles.json").read_text())
    assert [r["name"] for r in roles["roles"]] == ["Alice", "Bob", "+44 7700 900123"]
    assert run.stage("import").parameters["me"] == "Bob"
    assert run.task.startswith("A WhatsApp chat between Alice, Bob, +44 7700 900123 (")
    # runs, show, export and diff read it as they read any run
    (row,) = json.loads(invoke("runs", "--json").stdout)
    assert (row["stages"], row["turns"], row["termination_reason"]) == (
        {"import": "done", "judge": "pending", "reflect": "pending"},
        len(lines),
        "imported",
    )
    shown = invoke("show", run_id)
    assert shown.exit_code == 0, shown.output
    assert "Import: done; from whatsapp-android-gb.txt (whatsapp): " in shown.stdout
    assert "; me: Bob" in shown.stdout and "Alice" in shown.stdout
    exported = invoke("export", run_id, "--format", "jsonl")
    assert exported.stdout.splitlines() == [json.dumps(x, ensure_ascii=False) for x in lines]
    assert invoke("export", run_id, "--format", "md").exit_code == 0
    (other,) = imported(invoke, "whatsapp", str(CHATS / "whatsapp-android-us.txt"))
    assert invoke("diff", run_id, other).exit_code == 0
    # it has no dialogue to redo
    redo = invoke("rerun", run_id, "dialogue", "--base-url", "http://127.0.0.1:9/v1")
    assert redo.exit_code == 1
    assert f"run {run_id} has no dialogue stage (its stages: import, judge, reflect)" in redo.stderr


def test_an_imported_chat_is_judged_as_a_chat_between_people(runs_dir, invoke):
    (run_id,) = imported(invoke, "telegram", str(CHATS / "telegram-result.json"),
                         "--task", "plan the Saturday hike")  # fmt: skip

    def judge(body: dict[str, Any]) -> Reply:
        return Reply(json.dumps(VERDICT))

    with FakeServer(judge) as fake:
        result = invoke("rerun", run_id, "judge", "--base-url", fake.base_url, "--model", "m")
        (request,) = fake.chat_requests()
    assert result.exit_code == 0, result.output
    prompt = request["messages"][-1]["content"]
    assert prompt.startswith("You read a chat between people and judge what came of it.")
    assert "plan the Saturday hike" in prompt
    assert "[4] user444: hello from a deleted account" in prompt
    assert json.loads((runs_dir / run_id / "judge/verdict.json").read_text()) == VERDICT
    assert stages.statuses(open_run(runs_dir, run_id))["judge"] == "done"


def test_each_chatgpt_conversation_is_a_run_unless_one_is_chosen(runs_dir, invoke):
    every = imported(invoke, "chatgpt", str(CHATS / "chatgpt-conversations.json"))
    assert len(every) == 2
    tasks = sorted(open_run(runs_dir, r).task for r in every)
    assert tasks[0].startswith("A ChatGPT chat 'Greeting' between ")
    assert tasks[1].startswith("A ChatGPT chat 'Packing list' between User, ChatGPT (6 turns")
    (one,) = imported(invoke, "chatgpt", str(CHATS / "chatgpt-conversations.json"),
                      "--conversation", "Packing list", "--me", "User")  # fmt: skip
    assert len(read_jsonl(runs_dir / one / "import/transcript.jsonl")) == 6


@pytest.mark.parametrize(
    ("fmt", "text", "args", "message"),
    [
        (
            "whatsapp",
            "hello there\n12/03/24, 21:02 - Alice: hi\n",
            (),
            "line 1: expected a message line",
        ),
        ("telegram", '{"messages": [', (), "line 1 column 15: "),
        (
            "whatsapp",
            "12/03/24, 21:02 - Alice: hi\n12/03/24, 21:03 - Bob: yo\n",
            ("--me", "Carol"),
            "no speaker named 'Carol' in the WhatsApp chat (speakers: Alice, Bob); "
            "pass one of them as --me",
        ),
        (
            "whatsapp",
            "12/03/24, 21:02 - Alice: hi\n",
            ("--timezone", "Mars/Olympus"),
            "'Mars/Olympus' is not a time zone (use an IANA name such as Europe/Paris or UTC)",
        ),
    ],
)
def test_bad_input_is_a_one_line_error_and_makes_no_run(
    tmp_path, runs_dir, invoke, fmt, text, args, message
):
    export = tmp_path / "export.txt"
    export.write_text(text, encoding="utf-8")
    result = invoke("import", fmt, str(export), *args)
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: ") and message in line, line
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_rm_deletes_an_imported_chat(runs_dir, invoke):
    (run_id,) = imported(invoke, "whatsapp", str(CHATS / "whatsapp-ios-gb.txt"))
    result = invoke("rm", run_id)
    assert (result.exit_code, result.stdout) == (0, f"deleted run {run_id}\n")
    assert not (runs_dir / run_id).exists()


def whatsapp_chat(path: Path, exchanges: int) -> Path:
    """A WhatsApp export: Ana asks and Ben answers, ``exchanges`` times, with a second
    line on every third answer."""
    lines = ["01/02/24, 09:00 - Messages and calls are end-to-end encrypted."]
    for n in range(exchanges):
        lines.append(f"01/02/24, 10:{n:02d} - Ana: question {n}?")
        lines.append(f"01/02/24, 10:{n:02d} - Ben: answer {n}")
        if n % 3 == 0:
            lines.append("and more")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_from_a_chat_history_to_a_fine_tuned_model_and_a_run_made_with_it(
    tmp_path, runs_dir, invoke, fake, tiktoken_offline
):
    chat = whatsapp_chat(tmp_path / "chat.txt", 15)
    (run_id,) = imported(invoke, "whatsapp", str(chat), "--me", "Ben", "--timezone", "UTC")
    dataset = tmp_path / "ben.jsonl"
    built = invoke("dataset", "build", run_id, "-o", str(dataset), "--context", "2",
                   "--validation", "0.2", "--base-model", "gpt-4o-mini-2024-07-18")  # fmt: skip
    assert built.exit_code == 0, built.output
    held = tmp_path / "ben.validation.jsonl"
    sidecar = tmp_path / "ben.jsonl.manifest.json"
    assert built.stdout == f"{dataset}\n{held}\n{sidecar}\n"
    assert built.stderr.splitlines()[0] == (
        "12 training examples from 1 runs, speaker Ben; 3 for validation"
    )
    assert "counted with estimate (tiktoken could not load o200k_base" in built.stderr
    assert "estimated training cost: $" in built.stderr
    lines = [*dataset.read_text().splitlines(), *held.read_text().splitlines()]
    (first,) = [
        json.loads(x)
        for x in lines
        if json.loads(x)["messages"][-1]["content"].startswith("answer 0")
    ]
    assert first == {
        "messages": [
            {"role": "user", "content": "question 0?"},
            {"role": "assistant", "content": "answer 0\nand more"},
        ]
    }
    assert json.loads(sidecar.read_text())["runs"] == [run_id]

    created = invoke("finetune", "create", str(dataset), "--base-model", "gpt-4o-mini-2024-07-18",
                     "--validation", str(held), "--suffix", "ben", "--yes",
                     "--base-url", fake.base_url)  # fmt: skip
    assert created.exit_code == 0, created.output
    (ledger_path,) = (runs_dir / "finetunes").glob("*.json")
    ledger = json.loads(ledger_path.read_text())
    assert ledger["source_runs"] == [run_id]
    followed = invoke("finetune", "status", ledger["local_id"], "--follow", "--poll-interval",
                      "0.01", "--base-url", fake.base_url)  # fmt: skip
    assert followed.exit_code == 0, followed.output
    ledger = json.loads(ledger_path.read_text())
    assert ledger["status"] == "succeeded"
    model = ledger["fine_tuned_model"]
    assert f'model = "{model}"' in followed.stdout
    # the imported chat is needed by the ledger now
    assert "fine-tuning ledger" in invoke("rm", run_id).stderr
    cleaned = invoke("finetune", "cleanup", ledger["local_id"], "--base-url", fake.base_url)
    assert cleaned.exit_code == 0, cleaned.output
    assert all(part["deleted"] for part in (json.loads(ledger_path.read_text())["training"],))

    made = invoke("generate", "say hi", "--base-url", fake.base_url, "--model", model,
                  "--yes", "--turns", "2")  # fmt: skip
    assert made.exit_code == 0, made.output
    (new,) = [p for p in runs_dir.iterdir() if p.name.endswith("-say-hi")]
    manifest = json.loads((new / "run.json").read_text())
    assert manifest["fine_tuned_models"] == {
        model: {"job_id": ledger["job_id"], "ledger": ledger["local_id"]}
    }
    assert schemas.errors(manifest, "run.schema.json") == []


@pytest.mark.parametrize(
    ("exchanges", "args", "message"),
    [
        (
            4,
            (),
            "Error: not written: 4 examples; fine-tuning needs at least 10; add runs, or "
            "change --speaker or --context",
        ),
        (
            12,
            ("--speaker", "Cleo"),
            "Error: 'Cleo' says nothing in the conversations given; their speakers are Ana, "
            "Ben; name one of them with --speaker\n",
        ),
        (12, ("--all",), "\nError: give RUN_IDs or --all\n"),
    ],
)
def test_a_dataset_that_would_not_train_is_not_written(
    tmp_path, invoke, tiktoken_offline, exchanges, args, message
):
    chat = whatsapp_chat(tmp_path / "chat.txt", exchanges)
    (run_id,) = imported(invoke, "whatsapp", str(chat), "--me", "Ben", "--timezone", "UTC")
    out = tmp_path / "out.jsonl"
    result = invoke("dataset", "build", run_id, "-o", str(out), *args)
    assert result.exit_code in (1, 2)
    assert message in result.stderr, result.stderr
    assert not out.exists() and not out.with_name("out.jsonl.manifest.json").exists()

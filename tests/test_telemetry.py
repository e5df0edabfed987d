"""A run's OpenTelemetry spans (pipeline.telemetry): the tree, its attributes and times,
message contents on opt-in only, and no cost (no import) when nobody asked for traces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pipeline import telemetry
from pipeline.cli import cli
from pipeline.endpoints import Endpoint
from pipeline.errors import TelemetryError
from pipeline.parameters import ToolParameters
from pipeline.recorder import read_calls
from pipeline.records import CallRecord
from pipeline.runs import Run, create_run, open_run

from .conftest import ROLES, conversation, only_run
from .fakeserver import FakeServer, Status
from .test_tools import run_dialogue_with_tools, tool_turns

INTERNAL, CLIENT = SpanKind.INTERNAL, SpanKind.CLIENT
CONTENT_KEYS = {
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
}


@pytest.fixture(autouse=True)
def no_otel_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's OpenTelemetry settings."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs folder of a two-role, four-turn run against the fake server (made once;
    the tests only read it)."""
    runs_dir = tmp_path_factory.mktemp("telemetry") / "runs"
    with pytest.MonkeyPatch.context() as env, FakeServer(conversation) as fake:
        for name in [n for n in os.environ if n.startswith("OTEL_")]:
            env.delenv(name)
        result = pipeline(
            "generate", "Write a paper", "--base-url", fake.base_url, "--model", "m", "--yes",
            "--turns", "4", "--runs-dir", str(runs_dir),
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    return runs_dir


@pytest.fixture
def run(made: Path) -> Run:
    return open_run(made, only_run(made).name)


def pipeline(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def spans_of(run: Run, **options: Any) -> list[ReadableSpan]:
    finished = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(finished))
    made = telemetry.build_spans(run, provider, **options)
    spans = list(finished.get_finished_spans())
    assert made == len(spans)
    return spans


def tree(spans: list[ReadableSpan]) -> tuple[Any, ...]:
    """The spans as nested (name, kind, children), siblings in the order they started."""
    ordered = sorted(spans, key=lambda s: s.start_time or 0)  # stable: ties in end order

    def node(span: ReadableSpan) -> tuple[Any, ...]:
        children = [
            s for s in ordered if s.parent is not None and s.parent.span_id == span.context.span_id
        ]
        return (span.name, span.kind, [node(c) for c in children])

    (root,) = [s for s in spans if s.parent is None]
    return node(root)


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_time or 0)


def ns(moment: str | None) -> int:
    from datetime import datetime, timezone

    assert moment is not None
    parsed = datetime.fromisoformat(moment.replace("Z", "+00:00"))
    return (
        round((parsed - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds() * 1000) * 10**6
    )


def check_times(spans: list[ReadableSpan]) -> None:
    """Every span ends after it starts, inside its parent, all in one trace."""
    by_id = {s.context.span_id: s for s in spans}
    assert len({s.context.trace_id for s in spans}) == 1
    for span in spans:
        assert span.start_time is not None and span.end_time is not None
        assert span.start_time <= span.end_time, span.name
        if span.parent is not None:
            parent = by_id[span.parent.span_id]
            assert parent.start_time <= span.start_time, (parent.name, span.name)  # type: ignore[operator]
            assert span.end_time <= parent.end_time, (parent.name, span.name)  # type: ignore[operator]


# -- the span tree and its attributes ------------------------------------------------------


def test_a_two_role_four_turn_run_makes_this_span_tree(run):
    spans = spans_of(run)
    chat = ("chat m", CLIENT, [])
    assert tree(spans) == (
        "invoke_workflow converse-pipeline", INTERNAL, [
            ("invoke_agent director", INTERNAL, [chat]),
            ("invoke_agent Student", INTERNAL, []),  # the opening line: no model call
            ("invoke_agent Mentor", INTERNAL, [chat]),
            ("invoke_agent Student", INTERNAL, [chat]),
            ("invoke_agent Mentor", INTERNAL, [chat]),
        ],
    )  # fmt: skip
    check_times(spans)
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)
    # each model call spans from when it was sent to when it was answered, as recorded
    calls = read_calls(run, "director") + read_calls(run, "dialogue")
    assert [(s.start_time, s.end_time) for s in named(spans, "chat m")] == [
        (ns(c.started), ns(c.time)) for c in calls
    ]
    turns = run.read_transcript()
    agents = named(spans, "invoke_agent Student") + named(spans, "invoke_agent Mentor")
    agents.sort(key=lambda s: s.attributes["pipeline.turn"])  # type: ignore[index]
    assert [s.end_time for s in agents[1:]] == [ns(t.time) for t in turns[1:]]
    opening = agents[0]
    assert opening.start_time == opening.end_time == ns(run.stage("dialogue").started)
    (workflow,) = named(spans, "invoke_workflow converse-pipeline")
    assert workflow.start_time == ns(run.stage("director").started)
    assert workflow.end_time == ns(run.stage("dialogue").ended)


def test_the_spans_carry_the_conventions_attributes(run):
    spans = spans_of(run)
    endpoint = run.stage("director").endpoint
    assert endpoint is not None
    port = int(endpoint.base_url.split(":")[2].split("/")[0])
    common = {"gen_ai.conversation.id": run.run_id}
    (workflow,) = named(spans, "invoke_workflow converse-pipeline")
    assert dict(workflow.attributes or {}) == {
        **common,
        "gen_ai.operation.name": "invoke_workflow",
        "gen_ai.agent.name": "converse-pipeline",
        "pipeline.termination_reason": "max_turns",
        "pipeline.turns": 4,
    }
    model = {"gen_ai.provider.name": "openai_compatible", "gen_ai.request.model": "m"}
    usage = {"gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 7}
    (director,) = named(spans, "invoke_agent director")
    assert dict(director.attributes or {}) == {
        **common, **model, **usage,
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "director",
        "pipeline.stage": "director",
    }  # fmt: skip
    turns = {
        s.attributes["pipeline.turn"]: dict(s.attributes)  # type: ignore[index, arg-type]
        for s in spans
        if s.name.startswith("invoke_agent ") and "pipeline.turn" in (s.attributes or {})
    }
    assert turns[1] == {
        **common,
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "Student",
        "pipeline.turn": 1,
        "pipeline.turn.kind": "opening",
        "pipeline.floor": "opening",
    }
    for number, role in ((2, "Mentor"), (3, "Student"), (4, "Mentor")):
        assert turns[number] == {
            **common, **model, **usage,
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": role,
            "gen_ai.response.finish_reasons": ("stop",),
            "pipeline.turn": number,
            "pipeline.turn.kind": "generated",
            "pipeline.floor": "round-robin",
        }  # fmt: skip
    chats = named(spans, "chat m")
    request = {
        **common, **model, **usage,
        "gen_ai.operation.name": "chat",
        "gen_ai.response.model": "m",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.request.temperature": 0.7,
        "server.address": "127.0.0.1",
        "server.port": port,
    }  # fmt: skip
    assert dict(chats[0].attributes or {}) == {
        **request,
        "gen_ai.request.max_tokens": 2048,
        "gen_ai.output.type": "json",  # the director's structured answer
        "gen_ai.response.id": "chatcmpl-fake",
    }
    for chat in chats[1:]:  # the turns, streamed: no response id
        assert dict(chat.attributes or {}) == {**request, "gen_ai.request.max_tokens": 512}


def test_message_contents_only_on_opt_in(run, monkeypatch):
    for value in (None, "false", "NO_CONTENT", "EVENT_ONLY"):
        if value is not None:
            monkeypatch.setenv(telemetry.CAPTURE_ENV, value)
        for span in spans_of(run):
            assert not CONTENT_KEYS & set(span.attributes or {}), (value, span.name)
    for value in ("true", "True", "SPAN_ONLY", "span_and_event"):
        monkeypatch.setenv(telemetry.CAPTURE_ENV, value)
        spans = spans_of(run)
        (workflow,) = named(spans, "invoke_workflow converse-pipeline")
        assert json.loads(workflow.attributes["gen_ai.input.messages"]) == [  # type: ignore[index, arg-type]
            {"role": "user", "parts": [{"type": "text", "content": "Write a paper"}]}
        ]
        call = read_calls(run, "dialogue")[0]  # turn 2: the mentor answers the opening line
        chat = dict(named(spans, "chat m")[1].attributes or {})
        assert json.loads(chat["gen_ai.system_instructions"]) == [  # type: ignore[arg-type]
            {"type": "text", "content": call.body["messages"][0]["content"]}
        ]
        assert json.loads(chat["gen_ai.input.messages"]) == [  # type: ignore[arg-type]
            {"role": "user", "parts": [{"type": "text", "content": ROLES["opening_line"]}]}
        ]
        assert json.loads(chat["gen_ai.output.messages"]) == [  # type: ignore[arg-type]
            {
                "role": "assistant",
                "parts": [{"type": "text", "content": "reply 2"}],
                "finish_reason": "stop",
            }
        ]
        (turn,) = named(spans, "invoke_agent Mentor")[:1]
        assert json.loads(turn.attributes["gen_ai.output.messages"]) == [  # type: ignore[index, arg-type]
            {
                "role": "assistant",
                "name": "Mentor",
                "parts": [{"type": "text", "content": "reply 2"}],
                "finish_reason": "stop",
            }
        ]
    assert telemetry.capture_content()
    for span in spans_of(run, capture=False):  # a library caller's choice comes first
        assert not CONTENT_KEYS & set(span.attributes or {}), span.name


@pytest.mark.parametrize("dialect", ["tools", "prompt"])
def test_tool_calls_are_execute_tool_spans_between_the_calls(tmp_path, dialect):
    with FakeServer(lambda body: tool_turns(body, dialect=dialect)) as fake:
        run = run_dialogue_with_tools(tmp_path, fake, ToolParameters(tool_calls=dialect))
    spans = spans_of(run)
    chat = ("chat m", CLIENT, [])
    assert tree(spans)[2][2] == (  # turn 2: a round of tool calls, then the answer
        "invoke_agent Mentor", INTERNAL, [chat, ("execute_tool add", INTERNAL, []), chat],
    )  # fmt: skip
    check_times(spans)
    (tool,) = named(spans, "execute_tool add")
    call_id = "c1" if dialect == "tools" else "call-2-1-1"
    assert dict(tool.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.conversation.id": run.run_id,
        "gen_ai.tool.name": "add",
        "gen_ai.tool.call.id": call_id,
        "gen_ai.tool.type": "function",
    }
    asked, answered = read_calls(run, "dialogue")[:2]
    assert (tool.start_time, tool.end_time) == (ns(asked.time), ns(answered.started))
    (with_content,) = named(spans_of(run, capture=True), "execute_tool add")
    assert with_content.attributes["gen_ai.tool.call.result"] == "5"  # type: ignore[index]
    assert "a" in with_content.attributes["gen_ai.tool.call.arguments"]  # type: ignore[index, operator]


def test_a_failed_call_fails_its_turn_and_the_workflow(invoke, runs_dir):
    def fails_at_turn_3(body: dict[str, Any]) -> Any:
        if not body.get("response_format") and len(body["messages"]) == 3:
            return Status(400, "the context is full")
        return conversation(body)

    with FakeServer(fails_at_turn_3) as fake:
        result = invoke(
            "generate", "t", "--base-url", fake.base_url, "--model", "m", "--yes", "--turns", "4"
        )
    assert result.exit_code == 1
    run = open_run(runs_dir, only_run(runs_dir).name)
    spans = spans_of(run)
    tree_ = tree(spans)
    assert [name for name, _, _ in tree_[2]] == [
        "invoke_agent director",
        "invoke_agent Student",
        "invoke_agent Mentor",
        "invoke_agent",  # turn 3, which never ended
    ]
    check_times(spans)
    (cut,) = named(spans, "invoke_agent")
    assert cut.status.status_code is StatusCode.ERROR
    assert cut.attributes["pipeline.turn"] == 3  # type: ignore[index]
    (failed,) = [
        s for s in spans if s.status.status_code is StatusCode.ERROR and s.name == "chat m"
    ]
    assert failed.parent is not None and failed.parent.span_id == cut.context.span_id
    assert failed.attributes["error.type"] == "400"  # type: ignore[index]
    (workflow,) = named(spans, "invoke_workflow converse-pipeline")
    assert workflow.status.status_code is StatusCode.ERROR
    assert "the dialogue stage failed" in (workflow.status.description or "")


def test_a_replayed_run_shows_its_source_timing(made, invoke, runs_dir):
    shutil.copytree(made, runs_dir)
    source = open_run(runs_dir, only_run(made).name)
    result = invoke("replay", source.run_id, "--into", "20990101T000000Z-replayed")
    assert result.exit_code == 0, result.output
    replayed = open_run(runs_dir, "20990101T000000Z-replayed")
    before, after = spans_of(source), spans_of(replayed)
    assert tree(after) == tree(before)
    check_times(after)
    chats = [(s.start_time, s.end_time) for s in named(after, "chat m")]
    assert chats == [(s.start_time, s.end_time) for s in named(before, "chat m")]
    (workflow,) = named(after, "invoke_workflow converse-pipeline")
    assert workflow.attributes["pipeline.replay_of"] == source.run_id  # type: ignore[index]
    assert workflow.end_time < ns(replayed.stage("dialogue").started)  # type: ignore[operator]


def test_an_old_run_without_call_start_times_is_exported(tmp_path):
    fixture = next((Path(__file__).parent / "fixtures" / "runs-v1").iterdir())
    shutil.copytree(fixture, tmp_path / fixture.name)
    run = open_run(tmp_path, fixture.name)
    assert all(c.started is None for c in read_calls(run, "dialogue"))
    spans = spans_of(run)
    names = [name for name, _, _ in tree(spans)[2]]
    turns = run.read_transcript()
    assert names == [
        "invoke_agent director",
        *(f"invoke_agent {t.role}" for t in turns),
        "invoke_agent judge",
    ]
    check_times(spans)
    # nothing in it says when a call or a turn happened: they are instants at the start of
    # their stage, the one time recorded
    dialogue = ns(run.stage("dialogue").started)
    for span in spans:
        if span.attributes.get("pipeline.turn"):  # type: ignore[union-attr]
            assert span.start_time == span.end_time == dialogue, span.name
    (judge,) = named(spans, "invoke_agent judge")
    assert (judge.start_time, judge.end_time) == (
        ns(run.stage("judge").started),
        ns(run.stage("judge").ended),
    )


# -- the provider ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "provider"),
    [
        (Endpoint("https://api.openai.com/v1", "gpt-4o-mini"), "openai"),
        (Endpoint("https://api.groq.com/openai/v1", "llama"), "groq"),
        (Endpoint("https://x.openai.azure.com/openai/v1", "gpt"), "azure.ai.openai"),
        (Endpoint("http://127.0.0.1:9/v1", "m", embedded=True, server="llama.cpp"), "llama.cpp"),
        (Endpoint("http://gpu:8080/v1", "m", server="llama.cpp"), "llama.cpp"),
        (Endpoint("http://localhost:11434/v1", "llama3.2"), "openai_compatible"),
    ],
)
def test_the_provider_is_the_host_s_else_the_server_kind(endpoint, provider):
    assert telemetry.provider_name(endpoint) == provider


def test_a_call_to_the_embedded_engine_is_internal_with_no_server_address(tmp_path):
    embedded = Endpoint("http://127.0.0.1:5555/v1", "smol", embedded=True, server="llama.cpp")
    run = create_run(tmp_path, "t")
    run.stage("judge").endpoint = embedded
    run.stage("judge").status = "done"
    run.save()
    request = {"base_url": embedded.base_url, "model": "smol", "messages": []}
    record = CallRecord(
        request, "0" * 64, response={"choices": []}, time="2026-01-01T00:00:01.000Z"
    )
    run.write_json("judge/calls/0001.json", {**record.to_json(), "stage": "judge"})
    node = telemetry.span_tree(run)
    (chat,) = [n for n in node.walk() if n.name == "chat smol"]
    assert chat.kind == "internal"
    assert chat.attributes["gen_ai.provider.name"] == "llama.cpp"
    assert not {"server.address", "server.port"} & set(chat.attributes)


# -- no cost unless asked for; sending ----------------------------------------------------------

NO_IMPORT = """
import sys
from pipeline import telemetry
from pipeline.runs import open_run
{block}
from pathlib import Path
run = open_run(Path(sys.argv[1]), sys.argv[2])
print(telemetry.export_run(run), [m for m in sys.modules if m.startswith("opentelemetry")])
"""
BLOCK_OTEL = """
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
"""


@pytest.mark.parametrize(
    ("env", "block"),
    [({}, ""), ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, BLOCK_OTEL)],
    ids=["no endpoint", "no extra"],
)
def test_export_run_is_0_and_imports_nothing_unless_asked_and_installed(made, run, env, block):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    child = subprocess.run(
        [sys.executable, "-c", NO_IMPORT.format(block=block), str(made), run.run_id],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["0", "[]"]


def test_the_cli_imports_no_opentelemetry_at_start_up():
    child = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import pipeline.cli"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert "pipeline.cli" in child.stderr
    assert "opentelemetry" not in child.stderr


class Collector:
    """An OTLP/HTTP collector on 127.0.0.1 that keeps what it is sent, or answers
    ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                collector.received.append((self.path, headers, body))
                self.send_response(collector.status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


def test_export_run_sends_the_spans_over_otlp_http(made, run, collector, monkeypatch):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    assert telemetry.export_run(run) == 10
    ((path, headers, body),) = collector.received
    assert path == "/v1/traces"
    assert headers["content-type"] == "application/x-protobuf"
    sent = ExportTraceServiceRequest.FromString(body)
    (resource,) = sent.resource_spans
    service = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert service["service.name"] == "converse-pipeline"
    names = [s.name for scope in resource.scope_spans for s in scope.spans]
    assert sorted(names) == sorted(s.name for s in spans_of(run))
    # the command sends any run again; OTEL_SERVICE_NAME names the service
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-agents")
    result = pipeline("trace", run.run_id, "--runs-dir", str(made))
    assert result.exit_code == 0, result.output
    assert result.output == f"run {run.run_id}: 10 spans sent to {collector.url}\n"
    again = ExportTraceServiceRequest.FromString(collector.received[1][2])
    resource_attributes = again.resource_spans[0].resource.attributes
    assert {a.key: a.value.string_value for a in resource_attributes}["service.name"] == "my-agents"


def test_trace_says_what_is_missing_and_when_the_collector_refuses(made, run, monkeypatch):
    result = pipeline("trace", run.run_id, "--runs-dir", str(made))
    assert result.exit_code == 1
    assert "no OpenTelemetry endpoint is set; export OTEL_EXPORTER_OTLP_ENDPOINT=" in result.output
    with Collector(status=400) as refusing:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", refusing.url)
        result = pipeline("trace", run.run_id, "--runs-dir", str(made))
        assert result.exit_code == 1
        assert f"the OpenTelemetry collector at {refusing.url} did not take the spans" in (
            result.output
        )
        with pytest.raises(TelemetryError):
            telemetry.export_run(run)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    result = pipeline("trace", run.run_id, "--runs-dir", str(made))
    assert result.exit_code == 1
    assert "OTEL_EXPORTER_OTLP_PROTOCOL is 'grpc'" in result.output


def test_a_run_s_spans_go_out_as_it_finishes_when_a_collector_is_named(
    tmp_path, collector, monkeypatch
):
    from .conftest import conversation
    from .fakeserver import FakeServer

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
    with FakeServer(conversation) as fake:
        runs = str(tmp_path / "runs")
        result = pipeline("generate", "write a paper", "--base-url", fake.base_url, "--model",
                          "m", "--yes", "--turns", "2", "--runs-dir", runs)  # fmt: skip
    assert result.exit_code == 0, result.output
    ((path, _, _),) = collector.received  # one export, as the run finished
    assert path == "/v1/traces"

"""Reproducing a run exactly, without a model.

Every model call is recorded in its stage's ``calls/`` folder (:mod:`pipeline.recorder`).
:func:`replay_run` runs the stage graph again, for the same task with the same parameters
and endpoints, on clients whose transport (:class:`ReplayTransport`) answers each request
from that recording by the sha256 of the canonical request. Given the same code,
templates and schemas, every request matches and every artifact comes out byte for byte
the same; anything else is a clear error that names the stage. Only the manifest holds
what differs by nature: run id, times, pids. What a person said in the dialogue (turns,
notes) is answered from the source's transcript, never from a keyboard.
"""

from __future__ import annotations

import collections
from pathlib import Path

from . import stages
from .client import DeltaSink, ModelClient
from .delegate import Delegation
from .endpoints import Endpoint
from .errors import ReplayError, RunError
from .human import HumanQuit, Recorded
from .recorder import read_calls
from .records import CallRecord, JSONObject, RolesDocument
from .runs import Run, create_run


class Recording:
    """The calls one stage of a run recorded, answered by request hash in the order they
    were made.

    Args:
        records: the stage's call records.
        source: the run they come from, for error messages.
        stage: the stage that made them.
    """

    def __init__(self, records: list[CallRecord], source: str, stage: str) -> None:
        self.source = source
        self.stage = stage
        self._by_hash: dict[str, collections.deque[CallRecord]] = {}
        for record in records:
            self._by_hash.setdefault(record.request_sha256, collections.deque()).append(record)
        self.answered = 0

    def take(self, digest: str) -> CallRecord:
        """The record answering the request whose sha256 is ``digest``.

        Raises:
            ReplayError: the recording holds no (further) answer to it.
        """
        queue = self._by_hash.get(digest)
        if not queue:
            raise ReplayError(
                f"the {self.stage} stage asked for a call that run {self.source} never made "
                f"(request sha256 {digest[:16]}...): the code, a template, a schema or a "
                "parameter changed since, so the run cannot be replayed as it was",
                stage=self.stage,
            )
        self.answered += 1
        return queue.popleft()


class ReplayTransport:
    """A transport (:class:`pipeline.client.Transport`) that answers from a
    :class:`Recording` and never touches the network: the same requests get the same
    answers, errors included, and a stream's pieces are passed on as they were."""

    def __init__(self, recording: Recording) -> None:
        self.recording = recording

    def send(
        self, request: JSONObject, digest: str, *, stream: bool, on_delta: DeltaSink | None
    ) -> CallRecord:
        record = self.recording.take(digest)
        if record.stream is not None and on_delta:
            for piece in record.stream.pieces:
                on_delta(piece)
        return record


class RecordedModels:
    """The clients a run's stages used, as its manifest recorded their endpoints, each
    answering from that stage's recording (a :class:`pipeline.stages.ClientSource`)."""

    def __init__(self, source: Run, replayed: str = "") -> None:
        self.source = source
        self.replayed = replayed  # the id of the run that replays it
        self._recordings: dict[str, Recording] = {}

    def _client(self, stage: str, described: Endpoint | None) -> ModelClient:
        if described is None:
            raise RunError(
                f"run {self.source.run_id} recorded no endpoint for its {stage} stage, so it "
                "cannot be replayed",
                run_id=self.source.run_id,
                stage=stage,
            )
        if stage not in self._recordings:
            records = read_calls(self.source, stage)
            self._recordings[stage] = Recording(records, self.source.run_id, stage)
        return ModelClient(described, ReplayTransport(self._recordings[stage]))

    def director(self) -> ModelClient:
        return self._client("director", self.source.stage("director").endpoint)

    def judge(self) -> ModelClient:
        return self._client("judge", self.source.stage("judge").endpoint)

    def reflector(self) -> ModelClient:
        return self._client("reflect", self.source.stage("reflect").endpoint)

    def moderator(self) -> ModelClient:
        return self._client("dialogue", self.source.stage("dialogue").moderator_endpoint)

    def roles(self, roles: RolesDocument) -> list[ModelClient]:
        recorded = self.source.stage("dialogue").role_endpoints
        if not recorded:
            raise RunError(
                f"run {self.source.run_id} recorded no endpoints for its roles, so its "
                "dialogue cannot be replayed",
                run_id=self.source.run_id,
                stage="dialogue",
            )
        return [self._client("dialogue", endpoint) for endpoint in recorded]

    def child(self, run_id: str) -> RecordedModels:
        """The clients of the child run that replays the source's child at the same place
        (the same suffix after the parent's id)."""
        from .runs import open_run

        suffix = run_id.removeprefix(self.replayed)
        source = open_run(self.source.folder.parent, self.source.run_id + suffix)
        return RecordedModels(source, run_id)


def replayable(source: Run, name: str) -> bool:
    """True when ``source`` recorded enough of stage ``name`` to replay it: the stage ran
    on a recorded endpoint, and finished unless it can stop part-way (the dialogue)."""
    entry = source.stage(name)
    if entry.status == "pending" or entry.endpoint is None:
        return False
    return stages.stage(name).resumable or entry.status == "done"


def replay_run(
    source: Run,
    runs_dir: Path,
    *,
    into: str | None = None,
    listener: stages.Listener | None = None,
) -> Run:
    """Replay ``source`` into a new run (id ``into``, or a fresh one) from its recording:
    every stage it ran, in the order of the stage graph, and its hand edits of the roles.
    A person's turns and notes come from its transcript (:class:`pipeline.human.Recorded`);
    a dialogue its person stopped (``human_quit``) stops at the same turn, and the replay
    with it.

    Raises:
        RunError: ``source``'s director stage never finished, or ``into`` is taken.
        ReplayError: a stage asked for a call the recording does not hold (the code, a
            template, a schema or a parameter changed).
    """
    if not replayable(source, "director"):
        raise RunError(
            f"the director stage of run {source.run_id} is "
            f"{stages.status(source, 'director')}; only a run whose director finished can "
            "be replayed",
            run_id=source.run_id,
        )
    planned = {name: source.stage(name).parameters for name in stages.STAGE_NAMES}
    run = create_run(runs_dir, source.task, planned, run_id=into)
    run.manifest.replay_of = source.run_id
    run.save()
    tools = _recorded_tools(source, run.run_id)
    ctx = stages.StageContext(
        run,
        RecordedModels(source, run.run_id),
        stages.Plan.recorded(source),
        listener or stages.Silent(),
        dialects={n: source.stage(n).dialect_plan or [] for n in stages.STAGE_NAMES},
        tools=tools,
        human=Recorded(source),
    )
    with run.locked():
        for node in stages.GRAPH:
            if not replayable(source, node.name):
                if node.optional:  # a judge it never had, a reflection it had
                    continue
                break
            try:
                stages.execute(ctx, node.name)
            except HumanQuit:  # the source's person stopped there: so does the replay
                break
            if node.name == "director":
                from .director import replay_edits

                replay_edits(source, run)
    return run


def _recorded_tools(source: Run, replayed: str) -> stages.ToolSource | None:
    """The tools ``source``'s roles were offered: ``delegate`` (run again, on the recording
    of each child), and MCP tools answered from the recording."""
    from .mcptools import RecordedMcpTools
    from .tools import OFFERED, Combined

    sources: list[stages.ToolSource] = []
    if (source.stage("dialogue").tools or {}).get("delegate"):
        sources.append(Delegation())
    if source.path(OFFERED).is_file():
        sources.append(RecordedMcpTools(source, replayed))
    return Combined(sources) if sources else None

"""The one recorder of model calls: each exchange stored once, the readable files derived.

Every call a stage makes reaches :class:`StageCalls` (the client is handed it explicitly)
and is stored once, as ``<stage>/calls/NNNN.json`` (a :class:`~pipeline.records.CallRecord`,
numbered in the order the calls were made). The files people read are derived from that
record as it is written:

- a structured-output attempt: ``<stage>/[<prefix>]attempt-N.request.json`` (the body
  sent, written as it is sent, so a call cut short still shows it) and
  ``attempt-N.response.json`` (the raw answer; none when the call failed), and its
  outcome in the stage's ``attempts`` in ``run.json``;
- the director's final exchange: ``director/request.json`` and ``response.json``.

A replay (:mod:`pipeline.replay`) answers from these records.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

from .records import Attempt, CallRecord, JSONObject

if TYPE_CHECKING:
    from .runs import Run


class StageCalls:
    """The recorder of one stage of one run; call it with each :class:`CallRecord`."""

    def __init__(self, run: Run, stage: str) -> None:
        self.run = run
        self.stage = stage
        self._made: int | None = None  # counted from disk on the first call

    def __call__(self, record: CallRecord) -> None:
        folder = self.run.path(f"{self.stage}/calls")
        if self._made is None:
            folder.mkdir(parents=True, exist_ok=True)
            self._made = len(list(folder.glob("*.json")))
        self._made += 1
        stored = dataclasses.replace(record, stage=self.stage)
        self.run.write_json(f"{self.stage}/calls/{self._made:04d}.json", stored.to_json())

    def attempts(self, prefix: str | None = None) -> AttemptFiles:
        """The log of a structured answer's attempts (:class:`pipeline.structured.AttemptLog`):
        files named ``<prefix>attempt-N.*``; without a ``prefix``, each outcome also goes to
        the stage's ``attempts`` in the manifest."""
        return AttemptFiles(self, prefix)

    def derive(self, record: CallRecord, request_file: str, response_file: str) -> None:
        """Write ``record``'s body and response as the readable files named (relative to
        the run folder)."""
        self.run.write_json(request_file, record.body)
        if record.response is not None:
            self.run.write_json(response_file, record.response)


class AttemptFiles:
    """See :meth:`StageCalls.attempts`."""

    def __init__(self, calls: StageCalls, prefix: str | None) -> None:
        self.calls = calls
        self.prefix = prefix

    def _name(self, number: int) -> str:
        return f"{self.calls.stage}/{self.prefix or ''}attempt-{number}"

    def sending(self, number: int, body: JSONObject) -> None:
        """The request file is written before the call, so that a call cut short by
        Ctrl-C or a crash still shows what was asked."""
        self.calls.run.write_json(f"{self._name(number)}.request.json", body)

    def call(self, number: int, record: CallRecord) -> None:
        self.calls(record)
        name = self._name(number)
        self.calls.derive(record, f"{name}.request.json", f"{name}.response.json")

    def outcome(self, attempt: Attempt) -> None:
        if self.prefix is None:
            entry = self.calls.run.stage(self.calls.stage)
            entry.attempts = [*(entry.attempts or []), attempt]
            self.calls.run.save()


def read_calls(run: Run, stage: str) -> list[CallRecord]:
    """The calls recorded by the current attempt at ``stage``, in order."""
    folder = run.path(f"{stage}/calls")
    return [
        CallRecord.from_json(json.loads(p.read_text(encoding="utf-8")))
        for p in sorted(folder.glob("*.json"))
    ]

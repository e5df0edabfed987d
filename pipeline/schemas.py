"""JSON Schemas in ``schemas/`` and validation against them.

Schemas are JSON Schema Draft 2020-12 (https://json-schema.org/draft/2020-12)
and are checked with :mod:`jsonschema`. Error messages are flattened to
``"<json path>: <message>"`` strings so they can be shown to a user or sent
back to a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from .errors import PipelineError
from .resources import data_dir

ROLES = "roles.schema.json"
RUN_MANIFEST = "run.schema.json"
TRANSCRIPT_LINE = "transcript-line.schema.json"


def schema_path(name: str) -> Path:
    """Path of the schema file ``name`` (e.g. ``"roles.schema.json"``)."""
    return data_dir("schemas") / name


@cache
def load(name: str) -> dict[str, Any]:
    """The parsed schema ``name``.

    Raises:
        PipelineError: the file is missing or is not JSON.
    """
    path = schema_path(name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(
            f"cannot read schema {path}: {e}; reinstall converse-pipeline", path=path
        ) from e


@cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load(name))


def errors(instance: Any, name: str) -> list[str]:
    """Every way ``instance`` violates schema ``name``, as ``"<path>: <message>"`` strings,
    sorted by path; an empty list means valid. The path is a JSONPath such as ``$.roles[0].name``.
    """
    return _messages(_validator(name), instance)


def _messages(validator: Draft202012Validator, instance: Any) -> list[str]:
    found = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.path)))
    return [f"{e.json_path}: {e.message}" for e in found]


@dataclass(frozen=True)
class Schema:
    """A schema to ask a model to fill: the file it comes from and its document, which a
    stage may narrow for one request (a fixed number of roles, a fixed token).

    Attributes:
        name: the file name in ``schemas/``, e.g. ``roles.schema.json``.
        document: the JSON Schema itself.
    """

    name: str
    document: dict[str, Any] = field(hash=False, compare=False)

    @classmethod
    def file(cls, name: str) -> Schema:
        """The schema exactly as the file says."""
        return cls(name, load(name))

    def errors(self, instance: Any) -> list[str]:
        """As :func:`errors`, against this document."""
        return _messages(Draft202012Validator(self.document), instance)


def is_valid(instance: Any, name: str) -> bool:
    """True when ``instance`` satisfies schema ``name``."""
    return _validator(name).is_valid(instance)

"""JSON Schemas in ``schemas/`` and validation against them.

Schemas are JSON Schema Draft 2020-12 (https://json-schema.org/draft/2020-12)
and are checked with :mod:`jsonschema`. Error messages are flattened to
``"<json path>: <message>"`` strings so they can be shown to a user or sent
back to a model.

The run-folder schemas are versioned (:data:`VERSIONED`): the files at the top of
``schemas/`` are the current version (:data:`CURRENT_VERSION`), and ``schemas/v1/``
keeps version 1, which runs written before version 2 follow. Every function takes a
``version`` (default: the current one); the other schemas (config, verdict,
next-speaker, finetune) have one version, the top-level file, whatever is asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from .errors import PipelineError
from .records import JSONObject
from .resources import data_dir

ROLES = "roles.schema.json"
RUN_MANIFEST = "run.schema.json"
TRANSCRIPT_LINE = "transcript-line.schema.json"

CURRENT_VERSION = 2
"""The version new runs are written in: the files at the top of ``schemas/``."""
VERSIONS = (1, 2)
"""Every version of the run-folder format, oldest first."""
VERSIONED = (ROLES, RUN_MANIFEST, TRANSCRIPT_LINE)
"""The schemas that have a file per version; ``schemas/v<N>/`` holds the old ones."""


def schema_path(name: str, version: int = CURRENT_VERSION) -> Path:
    """Path of the schema file ``name`` (e.g. ``"roles.schema.json"``) in ``version``:
    ``schemas/<name>`` for the current version and for the unversioned schemas,
    ``schemas/v<version>/<name>`` for an older version of one of :data:`VERSIONED`.

    Raises:
        PipelineError: ``version`` is not one of :data:`VERSIONS`.
    """
    if version not in VERSIONS:
        raise PipelineError(
            f"schema version {version!r} is unknown (known: "
            f"{', '.join(map(str, VERSIONS))}); upgrade converse-pipeline to read it"
        )
    base = data_dir("schemas")
    if version != CURRENT_VERSION and name in VERSIONED:
        return base / f"v{version}" / name
    return base / name


def load(name: str, version: int = CURRENT_VERSION) -> JSONObject:
    """The parsed schema ``name`` in ``version`` (see :func:`schema_path`), a JSON object.
    The same dictionary is returned on every call for the same file: copy it before
    changing it.

    Raises:
        PipelineError: ``version`` is unknown, or the file is missing or is not JSON.
    """
    return _read(schema_path(name, version))


@cache
def _read(path: Path) -> JSONObject:
    try:
        document: JSONObject = json.loads(path.read_text(encoding="utf-8"))
        return document
    except (OSError, json.JSONDecodeError) as e:
        raise PipelineError(
            f"cannot read schema {path}: {e}; reinstall converse-pipeline", path=path
        ) from e


@cache
def _validator(name: str, version: int) -> Draft202012Validator:
    return Draft202012Validator(load(name, version))


def errors(instance: Any, name: str, version: int = CURRENT_VERSION) -> list[str]:
    """Every way ``instance`` violates schema ``name`` in ``version``, as
    ``"<path>: <message>"`` strings, sorted by path; an empty list means valid. The path
    is a JSONPath such as ``$.roles[0].name``.

    Raises:
        PipelineError: as :func:`load`.
    """
    return _messages(_validator(name, version), instance)


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
    document: JSONObject = field(hash=False, compare=False)

    @classmethod
    def file(cls, name: str, version: int = CURRENT_VERSION) -> Schema:
        """The schema exactly as the file of ``version`` says.

        Raises:
            PipelineError: as :func:`load`.
        """
        return cls(name, load(name, version))

    def errors(self, instance: Any) -> list[str]:
        """As :func:`errors`, against this document."""
        return _messages(Draft202012Validator(self.document), instance)


def is_valid(instance: Any, name: str, version: int = CURRENT_VERSION) -> bool:
    """True when ``instance`` satisfies schema ``name`` in ``version``.

    Raises:
        PipelineError: as :func:`load`.
    """
    return bool(_validator(name, version).is_valid(instance))

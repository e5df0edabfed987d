"""What each slot of a command is assigned (pipeline.endpoints.Resolver), and endpoints as
dicts (describe / from_description)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config
from pipeline.endpoints import OPENAI_BASE_URL, EmbeddedModel, Endpoint, Resolver
from pipeline.errors import ConfigError
from pipeline.models import Models
from pipeline.records import Role, RolesDocument, Termination

# -- describe / from_description -------------------------------------------------------

FULL = Endpoint(
    "http://127.0.0.1:8080/v1",
    "SmolLM2-135M-Instruct",
    "LOCAL_KEY",
    structured_output="json_schema",
    embedded=True,
    params={"top_p": 0.5, "stop": ["\n\n"]},
    server="llama.cpp",
    gguf="/models/smol.gguf",
    gguf_sha256="ab" * 32,
)


@pytest.mark.parametrize(
    "endpoint",
    [
        Endpoint("http://h/v1", "m"),
        Endpoint("http://h/v1", "m", None),
        Endpoint("http://h/v1", "m", "KEY", structured_output="prompt", params={"seed": 7}),
        Endpoint("http://h/v1", "m", None, params={"temperature": 0.2, "top_p": 0.9}),
        Endpoint("http://h/v1", "m", None, server="llama.cpp"),
        Endpoint("http://h/v1", "m", None, embedded=True, server="llama.cpp", gguf="/a.gguf"),
        FULL,
    ],
)
def test_describe_and_from_description_round_trip(endpoint):
    described = json.loads(json.dumps(endpoint.describe()))  # as a manifest holds it
    assert Endpoint.from_description(described) == endpoint
    assert Endpoint.from_description(described).describe() == described


def test_every_attribute_is_described_and_compared():
    """Clients are kept per endpoint (Models): two endpoints differing in anything must
    differ as keys, and in their manifest entries."""
    names = [f.name for f in dataclasses.fields(Endpoint)]
    assert sorted(FULL.describe()) == sorted(names)
    assert [f.name for f in dataclasses.fields(Endpoint) if not f.compare] == []
    assert Endpoint("http://h/v1", "m", params={"top_p": 0.5}) != Endpoint("http://h/v1", "m")
    assert hash(Endpoint("http://h/v1", "m", params={"top_p": 0.5})) == hash(
        Endpoint("http://h/v1", "m", params={"top_p": 0.5})
    )


# -- the order of resolution -----------------------------------------------------------

FLAGS = Endpoint("http://flags/v1", "f", None)
RECORDED = Endpoint("http://recorded/v1", "r", "RUN_KEY", server="llama.cpp")
RECORDED_EMBEDDED = FULL  # a run made on the embedded model
ENV_URL = {"OPENAI_BASE_URL": "http://env/v1"}
ENV_KEY = {"OPENAI_API_KEY": "sk-test"}  # a key alone: OpenAI's own API

NAMED = {name: Endpoint(f"http://{name}/v1", name, None) for name in ("all", "d", "m", "j", "r")}
ASSIGNMENTS: dict[str, dict[str, Any]] = {
    "default": {"default": "all"},
    "stages": {"director": "d", "moderator": "m", "judge": "j", "roles": {"Mentor": "r"}},
    "director only": {"director": "d"},
    "roles only": {"roles": ["all", "r"]},
    "role by position": {"roles": {"2": "r"}, "default": "all"},
}


def expected(outcome: str) -> Endpoint | EmbeddedModel | str:
    """An endpoint, the embedded model, or the message of the ConfigError raised."""
    if outcome == "flags":
        return FLAGS
    if outcome == "recorded":
        return RECORDED
    if outcome == "embedded":
        return EmbeddedModel()
    if outcome.startswith("env "):  # the environment names a server, no flag a model
        return (
            f"no model given for {outcome[4:]}; pass the model setting NAME (or set PIPELINE_MODEL)"
        )
    return NAMED[outcome]


ALL = lambda outcome: (outcome,) * 4  # noqa: E731


@pytest.mark.parametrize(
    ("flags", "config", "environ", "recorded", "outcomes"),
    [
        # each layer alone, then with every layer below it: the highest present wins
        (FLAGS, "default", ENV_URL, RECORDED, ALL("flags")),
        (FLAGS, None, {}, None, ALL("flags")),
        (FLAGS, "stages", {}, None, ALL("flags")),
        (None, "default", ENV_URL, RECORDED, ALL("all")),  # the environment not even read
        (None, "default", {}, None, ALL("all")),
        (None, None, ENV_URL, RECORDED, ALL("env http://env/v1")),
        (None, None, ENV_URL, None, ALL("env http://env/v1")),
        (None, None, ENV_KEY, RECORDED, ALL(f"env {OPENAI_BASE_URL}")),
        (None, None, {}, RECORDED, ALL("recorded")),
        (None, None, {}, RECORDED_EMBEDDED, ALL("embedded")),
        (None, None, {}, None, ALL("embedded")),
        # the config file, slot by slot; what it leaves out goes on down the order
        (None, "stages", ENV_URL, RECORDED, ("d", "m", "j", "r")),
        (None, "director only", {}, RECORDED, ("d", "d", "d", "recorded")),
        (None, "director only", ENV_URL, None, ("d", "d", "d", "env http://env/v1")),
        (None, "roles only", {}, None, ("embedded", "embedded", "embedded", "r")),
        (None, "roles only", {}, RECORDED, ("recorded", "recorded", "recorded", "r")),
        (None, "role by position", {}, None, ("all", "all", "all", "r")),
    ],
)
def test_resolution_order(flags, config, environ, recorded, outcomes):
    resolver = Resolver(
        flags=flags,
        config=Config(Path("pipeline.toml"), NAMED, ASSIGNMENTS[config]) if config else None,
        recorded=recorded,
        environ=environ,
    )
    slots = {
        "director": resolver.director,
        "moderator": resolver.moderator,
        "judge": resolver.judge,
        "role 2, the Mentor": lambda: resolver.role(1, "Mentor"),
    }
    for (slot, assigned), outcome in zip(slots.items(), outcomes, strict=True):
        wanted = expected(outcome)
        if isinstance(wanted, str):
            with pytest.raises(ConfigError) as caught:
                assigned()
            assert caught.value.message == wanted, slot
        else:
            assert assigned() == wanted, slot


def test_roles_are_resolved_in_order():
    config = Config(Path("pipeline.toml"), NAMED, {"roles": {"Critic": "r", "1": "d"}})
    roles_doc = RolesDocument(
        tuple(Role(name, "a prompt") for name in ("Student", "Mentor", "Critic")),
        Termination("<TASK_DONE>", "Student", "done"),
        "Hello",
    )
    assert Resolver(config=config, environ={}).roles(roles_doc) == [
        NAMED["d"],
        EmbeddedModel(),
        NAMED["r"],
    ]


def test_a_model_flag_takes_its_server_from_the_environment():
    resolver = Resolver.for_command(
        model="m", structured_output="json_object", environ={"OPENAI_BASE_URL": "http://env/v1/"}
    )
    assert resolver.director() == Endpoint("http://env/v1", "m", None, "json_object")


# -- the resolver of a command ---------------------------------------------------------


def test_with_flags_the_config_file_is_not_read(tmp_path):
    resolver = Resolver.for_command(
        base_url="http://flags/v1/",
        model="f",
        config_path=tmp_path / "missing.toml",
        environ={},
    )
    assert resolver.config is None
    assert resolver.flags == FLAGS
    assert resolver.judge() == FLAGS


def test_without_flags_the_config_file_of_the_working_directory_is_read(tmp_path):
    (tmp_path / "pipeline.toml").write_text(
        '[endpoints.a]\nbase_url = "http://a/v1/"\nmodel = "m"\nparams = { top_p = 0.5 }\n'
        '[assign]\nmoderator = "a"\n'
    )
    resolver = Resolver.for_command(environ={}, cwd=tmp_path, recorded=RECORDED)
    assert resolver.config is not None and resolver.config.path == tmp_path / "pipeline.toml"
    assert resolver.moderator() == Endpoint("http://a/v1", "m", None, params={"top_p": 0.5})
    assert resolver.director() == RECORDED


def test_an_explicit_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError) as caught:
        Resolver.for_command(config_path=tmp_path / "missing.toml", environ={})
    assert caught.value.message == f"{tmp_path / 'missing.toml'}: no such config file"


def test_models_take_a_resolver_or_its_arguments():
    resolver = Resolver(flags=FLAGS)
    models = Models(resolver=resolver)
    assert (models.resolver, models.flags, models.config) == (resolver, FLAGS, None)
    assert Models(flags=FLAGS, structured_output="prompt").resolver.structured_output == "prompt"
    with pytest.raises(TypeError):
        Models(resolver=resolver, flags=FLAGS)

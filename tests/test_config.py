"""Endpoint resolution: flags, then the SDK's environment variables, then the embedded model."""

from __future__ import annotations

import pytest

from pipeline.config import OPENAI_BASE_URL, Endpoint, resolve_endpoint
from pipeline.errors import ConfigError

LOCAL = "http://127.0.0.1:8000/v1"


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        ({}, {}, None),
        ({"base_url": LOCAL, "model": "m"}, {}, Endpoint(LOCAL, "m", None)),
        ({"base_url": LOCAL + "/", "model": "m"}, {}, Endpoint(LOCAL, "m", None)),
        ({"model": "m"}, {"OPENAI_BASE_URL": LOCAL}, Endpoint(LOCAL, "m", None)),
        ({"model": "m"}, {"OPENAI_API_KEY": "k"}, Endpoint(OPENAI_BASE_URL, "m", "OPENAI_API_KEY")),
        (
            {"base_url": LOCAL, "model": "m"},
            {"OPENAI_BASE_URL": "http://other/v1", "OPENAI_API_KEY": "k"},
            Endpoint(LOCAL, "m", "OPENAI_API_KEY"),
        ),
        (
            {"model": "m", "api_key_env": "OR_KEY"},
            {"OR_KEY": "k", "OPENAI_BASE_URL": LOCAL},
            Endpoint(LOCAL, "m", "OR_KEY"),
        ),
        (
            {"model": "m", "api_key_env": "OR_KEY"},
            {"OR_KEY": "k"},
            Endpoint(OPENAI_BASE_URL, "m", "OR_KEY"),
        ),
    ],
)
def test_resolution_order(flags, environ, expected):
    assert resolve_endpoint(**flags, environ=environ) == expected


@pytest.mark.parametrize(
    ("flags", "environ", "message"),
    [
        ({"base_url": LOCAL}, {}, f"no model given for {LOCAL}; pass the model setting NAME"),
        ({"model": "m"}, {}, "model m was given but no server; pass the base url setting URL"),
        ({"api_key_env": "NOPE", "model": "m"}, {}, "the API key variable NOPE is not set"),
        ({"base_url": "localhost:8000", "model": "m"}, {}, "must start with http:// or https://"),
    ],
)
def test_resolution_errors(flags, environ, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_endpoint(**flags, environ=environ)


def test_key_is_read_from_the_named_variable_and_never_described():
    endpoint = Endpoint(LOCAL, "m", "MY_KEY")
    assert endpoint.api_key({"MY_KEY": "secret"}) == "secret"
    assert "secret" not in repr(endpoint.describe())
    assert endpoint.describe()["api_key_env"] == "MY_KEY"
    assert Endpoint(LOCAL, "m", None).api_key({}) == "no-key"

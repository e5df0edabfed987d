"""Which model endpoint a stage talks to.

Resolution, highest first:

1. command-line flags: ``--base-url``, ``--model``, ``--api-key-env NAME``;
2. the environment variables the ``openai`` SDK reads: ``OPENAI_BASE_URL`` and
   ``OPENAI_API_KEY`` (a key alone means OpenAI's own API);
3. the embedded offline model (see :mod:`pipeline.local`).

API keys are read from the environment at call time and are never part of an
:class:`Endpoint`'s description, so they cannot reach ``runs/`` or logs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
# How structured (JSON) answers are asked for; see pipeline.structured.
STRUCTURED_OUTPUT_CHOICES = ("auto", "json_schema", "json_object", "prompt")


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint and the model to ask there.

    Attributes:
        base_url: the API root, e.g. ``http://127.0.0.1:11434/v1``.
        model: the model name sent in each request.
        api_key_env: the environment variable holding the key, or None for servers
            that need none.
        structured_output: how structured answers are asked for: ``auto`` or a dialect of
            :mod:`pipeline.structured`.
        embedded: True for the embedded offline model.
    """

    base_url: str
    model: str
    api_key_env: str | None = DEFAULT_KEY_ENV
    structured_output: str = "auto"
    embedded: bool = False

    def api_key(self, environ: Mapping[str, str] | None = None) -> str:
        """The key to send: the value of ``api_key_env``, or a placeholder for servers that
        need no key (the SDK refuses an empty one)."""
        env = os.environ if environ is None else environ
        return (env.get(self.api_key_env) if self.api_key_env else None) or "no-key"

    def describe(self) -> dict[str, Any]:
        """The endpoint as recorded in a manifest: never the key itself."""
        return {
            "base_url": self.base_url,
            "model": self.model,
            "embedded": self.embedded,
            "structured_output": self.structured_output,
            "api_key_env": self.api_key_env,
        }


def resolve_endpoint(
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key_env: str | None = None,
    structured_output: str = "auto",
    environ: Mapping[str, str] | None = None,
) -> Endpoint | None:
    """Resolve the endpoint from flags and environment; None means "use the embedded model".

    Args:
        base_url, model, api_key_env: the command-line flags (None when not given).
        structured_output: the ``--structured-output`` choice for this endpoint.
        environ: the environment to read (default ``os.environ``).

    Raises:
        ConfigError: ``--api-key-env`` names a variable that is not set, or a server is
            configured but no model is named.
    """
    env = os.environ if environ is None else environ
    key_env = api_key_env or DEFAULT_KEY_ENV
    if api_key_env and not env.get(api_key_env):
        raise ConfigError(
            f"--api-key-env names {api_key_env}, which is not set; "
            f"export {api_key_env}=<your key> or drop the flag"
        )
    url = base_url or env.get("OPENAI_BASE_URL") or None
    if url is None and (env.get(key_env) or api_key_env):
        url = OPENAI_BASE_URL
    if url is None:
        if model:
            raise ConfigError(
                f"--model {model} was given but no server: pass --base-url URL "
                "(or set OPENAI_BASE_URL or OPENAI_API_KEY)"
            )
        return None
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"base URL {url!r} must start with http:// or https://")
    if not model:
        raise ConfigError(f"no model given for {url}: pass --model NAME (or set PIPELINE_MODEL)")
    return Endpoint(
        base_url=url.rstrip("/"),
        model=model,
        api_key_env=key_env if env.get(key_env) else None,
        structured_output=structured_output,
    )

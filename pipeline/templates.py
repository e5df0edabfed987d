"""The Jinja environments: the prompts' over ``templates/``, and the web view's.

One :class:`jinja2.Environment` with ``StrictUndefined`` renders the prompts: a
template that uses a variable the caller did not pass fails loudly instead of
rendering an empty string. User text (the task, role prompts) is only ever passed as
*data*; it is never compiled as template source, so ``{{ 7*7 }}`` in a task reaches
the model literally.

``pipeline view``'s HTML pages (``web/templates/``) have an environment of their own
(:func:`web_environment`), with the same ``StrictUndefined`` and data-only rule, and
HTML autoescaping always on. It is a second environment, not a second loader on the
first, because the prompt templates are inputs of every run (their sha256 is recorded
in ``run.json``, and ``PIPELINE_TEMPLATES_DIR`` replaces the whole folder), which the
pages must not be; and because escaping chosen by file name in a shared environment
would leave a page misnamed ``.j2`` unescaped, where here every page is escaped.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from .errors import PipelineError
from .resources import data_dir


@cache
def environment() -> jinja2.Environment:
    """The shared environment (created once per process)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # plain-text prompts, not HTML
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@cache
def web_environment() -> jinja2.Environment:
    """The environment of ``pipeline view``'s pages (``web/templates/``): HTML, every
    value autoescaped (created once per process)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(data_dir("web") / "templates")),
        undefined=jinja2.StrictUndefined,
        autoescape=True,  # user text (tasks, prompts, turns, chats) is data in HTML
        trim_blocks=True,
        lstrip_blocks=True,
    )


def template_path(name: str) -> Path:
    """Path of the template file ``name`` (e.g. ``"director.j2"``)."""
    return data_dir("templates") / name


def render(name: str, **data: Any) -> str:
    """Render template ``name`` with ``data`` as its variables.

    Raises:
        PipelineError: the template is missing or uses a variable not in ``data``.
    """
    try:
        return environment().get_template(name).render(**data)
    except jinja2.TemplateNotFound as e:
        raise PipelineError(
            f"template {name!r} not found in {data_dir('templates')}; reinstall converse-pipeline",
            path=template_path(name),
        ) from e
    except jinja2.UndefinedError as e:
        raise PipelineError(
            f"template {name!r} needs a value that was not given: {e.message}",
            path=template_path(name),
        ) from e

"""How often the embedded director returns usable roles: 20 varied tasks, one try each.

A task counts as a success when the director stage finishes: its answer is valid against
``schemas/roles.schema.json`` and has no problem of ``pipeline.lint.roles_problems``
(duplicate names, a declaring role that is no role, an opening line addressed to its own
speaker), after at most the default repairs. The tasks cover code, text in other
languages, template syntax, and a long multi-paragraph task.

Usage: python bench/director.py [--markdown bench/DIRECTOR.md] [--max-tokens 2048]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from pipeline import stages
from pipeline.client import ModelClient
from pipeline.errors import PipelineError
from pipeline.local import LocalServer, resolve_model
from pipeline.parameters import DirectorParameters
from pipeline.runs import create_run

LONG_TASK = """Our team maintains a small open-source library for parsing invoices.

Users report three problems. First, PDF invoices from one large supplier put the total
on the second page, and we miss it. Second, dates are written as 03/04/2025 in some
countries and 2025-04-03 in others, and we guess wrong about half of the time. Third,
the README does not say which currencies are supported.

Plan the next release: decide which problem to fix first, sketch the fix for each, and
write the release notes. Keep the plan short enough to fit on one page."""

TASKS = [
    "write a short paper on the ethics of AI",
    "write a Python function that returns the n-th Fibonacci number, with tests",
    "écris un court essai en français sur l'importance de la lecture",
    "schreibe eine kurze Geschichte über einen Leuchtturmwärter",
    "escribe un poema sobre el mar en español",
    "日本の四季について短い文章を書いてください",
    "用中文写一段关于长城的介绍",
    "explain the Jinja expression {{ user.name | upper }} and the tag {% for x in items %}",
    "fix this bug: for i in range(len(xs)): if xs[i] == x: return i  returns None sometimes",
    "design a REST API for a library: books, members, loans",
    "write a SQL query that finds the top 3 customers by revenue per month",
    "plan a three-day trip to Rome on a small budget",
    "draft a polite email asking a landlord to repair the heating",
    "prepare a job interview for a junior data analyst",
    "write a bash script that backs up a folder every night and keeps 7 copies",
    "debate whether remote work is better than office work",
    "summarise the causes of the French Revolution for a high-school class",
    "create a weekly meal plan for a vegetarian athlete",
    "write a regular expression that validates e-mail addresses, and explain it",
    LONG_TASK,
]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", type=Path, help="write the results table here")
    parser.add_argument("--max-tokens", type=int, default=DirectorParameters.max_tokens)
    args = parser.parse_args()
    params = DirectorParameters(max_tokens=args.max_tokens)
    rows = []
    model = resolve_model()
    with LocalServer(model) as server, tempfile.TemporaryDirectory() as folder:
        client = ModelClient(server.endpoint())
        for task in TASKS:
            run = create_run(Path(folder), task)
            started = time.monotonic()
            try:
                plan = stages.Plan.of(params)
                stages.run_stage(run, "director", stages.OneClient(client), plan)
                outcome = "ok"
            except PipelineError as e:
                outcome = f"failed: {e.message.split(': ', 2)[-1][:120]}"
            seconds = time.monotonic() - started
            attempts = [a.outcome for a in run.stage("director").attempts or []]
            rows.append((task, outcome, attempts, seconds))
            print(f"{outcome[:6]:6} {seconds:6.1f}s {attempts} {task[:60]!r}", file=sys.stderr)
    successes = sum(1 for _, outcome, _, _ in rows if outcome == "ok")
    lines = [
        "# Embedded director: usable roles on 20 varied tasks",
        "",
        f"Model: {model.name} ({Path(model.path).name}); director max tokens {args.max_tokens}; "
        "one try per task, the default repairs included.",
        "",
        f"**{successes} of {len(rows)} tasks returned schema-valid, duplicate-free roles.**",
        "",
        "| task | outcome | attempts | seconds |",
        "|---|---|---|---|",
    ]
    for task, outcome, attempts, seconds in rows:
        shown = " ".join(task.split())[:70].replace("|", "\\|")
        lines.append(f"| {shown} | {outcome} | {', '.join(attempts)} | {seconds:.1f} |")
    text = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    sys.stdout.write(text)
    return 0 if successes >= 19 else 1


if __name__ == "__main__":
    sys.exit(main())

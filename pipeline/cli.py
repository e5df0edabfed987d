"""The ``pipeline`` command: a thin layer over the library.

Commands parse options, call library functions, and print: results to stdout,
diagnostics to stderr. :class:`PipelineError` becomes a one-line ``Error: ...``
and exit code 1 in one place (:class:`_Group`); ``--debug`` shows the traceback
instead. Heavy libraries (openai, jsonschema, jinja2) are imported inside the
commands that need them, so ``pipeline --help`` starts fast.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .choices import DATASET_FORMATS, EXPORT_FORMATS, IMPORT_FORMATS
from .errors import PipelineError, RunError
from .options import (
    RUNS_DIR_KEY,
    EndpointFlags,
    PathType,
    StageChoice,
    endpoint_options,
    flag,
    runs_dir_option,
    stage_options,
)

if TYPE_CHECKING:
    from pathlib import Path

    from .batch import Outcome
    from .models import Models
    from .parameters import DialogueParameters, DirectorParameters, Persona, ToolParameters
    from .records import RolesDocument, Turn
    from .runs import Run
    from .stages import Plan, StageContext
    from .terminal import Terminal

REVIEW_QUESTION = "Run the dialogue? [y/N/e]"
PERSONA_OPTION = click.option(
    "--persona",
    metavar="NAME",
    help="Cast this persona of pipeline.toml ([personas.NAME]) as one of the roles, under its "
    "name and with its system prompt.",
)


def poll_interval_option(default: float, help: str) -> Callable[..., Any]:
    """``--poll-interval SECONDS``: how often a command looks at a job or batch it waits for."""
    return click.option(
        "--poll-interval",
        type=click.FloatRange(min=0),
        default=default,
        show_default=True,
        metavar="SECONDS",
        help=help,
    )


PRICES_OPTION = click.option(
    "--prices",
    type=PathType(exists=True, dir_okay=False),
    help="A TOML or JSON price table laid over the shipped one.",
)


def human_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--human and --interject: a person at this terminal in the dialogue (the command
    receives them as ``human`` and ``interject``)."""
    f = click.option(
        "--interject",
        is_flag=True,
        help="Before each model's turn, ask for a one-line note to that model (Enter for "
        "none); it is recorded with the turn and shown to that model.",
    )(f)
    return click.option(
        "--human",
        metavar="ROLE",
        multiple=True,
        help="Play ROLE yourself: when its turn comes, type it (end with a line holding only "
        "'.'; /edit, /done, /quit). Repeatable.",
    )(f)


def _views() -> Any:
    """The rendering module, imported when a command first prints (keeps --help fast)."""
    from . import views

    return views


class _Group(click.Group):
    """Turns every :class:`PipelineError` into a one-line error and exit code 1, its fixes
    worded as command lines and flags."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            if ctx.meta.get("pipeline.debug"):
                raise
            raise click.ClickException(_explain(e, ctx)) from e


def _explain(e: PipelineError, ctx: click.Context) -> str:
    """``e``'s message with its fixes worded as flags and command lines; a command that
    takes ``--runs-dir`` gets the one this command was given, unless it is the default."""

    def command_line(words: tuple[str, ...]) -> str:
        command: click.Command = cli
        for word in words:
            if not isinstance(command, click.Group) or word not in command.commands:
                break
            command = command.commands[word]
        runs_dir = ctx.meta.get(RUNS_DIR_KEY)
        line = "pipeline " + " ".join(words)
        if runs_dir is not None and any(p.name == "runs_dir" for p in command.params):
            line += _runs_dir_flag(runs_dir)
        return line

    return e.render(flag, command_line)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="converse-pipeline")
@click.option(
    "--debug",
    is_flag=True,
    envvar="PIPELINE_DEBUG",
    help="Show a traceback on errors instead of a one-line message.",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Make language models talk to each other to get a task done.

    A director model writes the roles and the opening line for a task; you review
    them; then the roles converse. Every stage is saved under the runs folder.
    """
    ctx.meta["pipeline.debug"] = debug


def _nonempty_task(ctx: click.Context, param: click.Parameter, value: str) -> str:
    task = value.strip()
    if not task:
        raise click.BadParameter(
            "the task is empty: say what the conversation should accomplish, "
            'e.g. pipeline generate "write a short paper on the ethics of AI"'
        )
    return task


@cli.command()
@click.argument("task", callback=_nonempty_task)
@runs_dir_option
@endpoint_options
@stage_options(director=True, dialogue=True, tools=True)
@click.option("--yes", "-y", is_flag=True, help="Run the dialogue without asking.")
@click.option("--judge", "judge", is_flag=True, help="Then ask a model to judge the result.")
@click.option(
    "--reflect",
    is_flag=True,
    help="Then ask a model (the judge's) to reflect on each role: goal met, what to improve, "
    "keep or discard.",
)
@PERSONA_OPTION
@human_options
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the limits of the run (and of the runs it may delegate to) and the most "
    "model calls they can make, then stop without calling anything.",
)
def generate(
    task: str,
    runs_dir: Path,
    flags: EndpointFlags,
    director_params: DirectorParameters,
    dialogue_params: DialogueParameters,
    tool_params: ToolParameters,
    yes: bool,
    judge: bool,
    reflect: bool,
    persona: str | None,
    human: tuple[str, ...],
    interject: bool,
    dry_run: bool,
) -> None:
    """Write roles for TASK, let you review them, then run the dialogue.

    Without --yes, you are asked before the dialogue starts: y runs it, e opens
    $EDITOR on the roles, N stops (continue later with `pipeline converse RUN_ID`).
    When standard input is not a terminal and --yes is absent, it stops after the
    director stage and prints the command that continues. With --human ROLE you speak
    ROLE's turns yourself (see README, "A person in the conversation").
    """
    from . import stages
    from .director import load_roles

    plan = stages.Plan.of(
        director_params, dialogue_params, tools=tool_params, persona=_persona(flags, persona)
    )
    if dry_run:
        from .config import load_config

        config = load_config(flags.config)
        mcp = config is not None and config.mcp is not None and bool(config.mcp.roles)
        click.echo(_views().worst_case_text(plan, judge=judge, mcp=mcp))
        return
    with flags.models() as models:
        client = models.director()
        run = plan.new_run(runs_dir, task, judge=judge, reflect=reflect)
        person = _person(human, interject)
        ctx = _context(run, models, plan, person)
        with _writing(run):
            click.echo(
                f"run {run.run_id}: asking the director ({client.endpoint.model})...", err=True
            )
            stages.execute(ctx, "director")
            roles = load_roles(run)
            _show_roles(run, roles)
            person.check(roles, run)
            if not yes:
                next_command = (
                    f"pipeline converse {run.run_id}{_runs_dir_flag(runs_dir)}"
                    f"{_person_flags(human, interject)}"
                )
                if not sys.stdin.isatty():
                    click.echo(
                        f"\nreview the roles in {run.path('director/roles.json')}, then run:"
                    )
                    click.echo(next_command)
                    return
                models.prepare(roles)  # the embedded servers load while the user reads
                if not _review(run, roles):
                    click.echo(f"\nnot run; to run the dialogue later: {next_command}")
                    return
            _converse(ctx, models)
            if judge:
                _judge(ctx, models)
            if reflect:
                _reflect(ctx, models)
            _remember(run)


@cli.command()
@click.argument("run_id")
@runs_dir_option
@endpoint_options
@stage_options(director=False, dialogue=True, tools=True)
@human_options
def converse(
    run_id: str,
    runs_dir: Path,
    flags: EndpointFlags,
    dialogue_params: DialogueParameters,
    tool_params: ToolParameters,
    human: tuple[str, ...],
    interject: bool,
) -> None:
    """Run the dialogue stage of RUN_ID, whose director stage is done.

    The endpoint is chosen as for generate; with no flag or environment variable set,
    the endpoint that ran the director is used again. A dialogue already done with the
    same roles, endpoint and parameters is not redone (rerun does that).
    """
    from . import stages
    from .director import load_roles

    run = _open(runs_dir, run_id)
    with _writing(run):
        load_roles(run)  # fail before starting a server when the run is not ready
        with flags.models(run) as models:
            plan = stages.Plan.of(dialogue=dialogue_params, tools=tool_params)
            ctx = _context(run, models, plan, _person(human, interject))
            if stages.is_current(ctx, "dialogue"):
                click.echo(
                    f"the dialogue of run {run.run_id} is already done with these inputs; "
                    f"to redo it: pipeline rerun {run.run_id} dialogue{_runs_dir_flag(runs_dir)}"
                )
                return
            _converse(ctx, models)
            _remember(run)


@cli.command()
@click.argument("run_id")
@click.argument("stage", type=StageChoice())
@runs_dir_option
@endpoint_options
@stage_options(director=True, dialogue=True, tools=True)
def rerun(
    run_id: str,
    stage: str,
    runs_dir: Path,
    flags: EndpointFlags,
    director_params: DirectorParameters,
    dialogue_params: DialogueParameters,
    tool_params: ToolParameters,
) -> None:
    """Regenerate STAGE of RUN_ID from the run's saved inputs.

    The stage's previous files are kept in <stage>/previous-N/. Rerunning the
    director makes a dialogue that already ran stale (its roles changed), and a new
    dialogue makes the verdict of the judge stale.
    """
    from . import stages
    from .director import load_roles

    run = _open(runs_dir, run_id)
    stages.require(run, stage)
    with _writing(run):
        if stage == "dialogue":
            load_roles(run)
        with flags.models(run) as models:
            plan = stages.Plan.of(director_params, dialogue_params, tools=tool_params)
            ctx = stages.StageContext(
                run, models, plan, _Printer(), tools=models.tools(tool_params)
            )
            if stage == "director":
                _redo_director(ctx, models, runs_dir)
            elif stage == "dialogue":
                _converse(ctx, models)
            elif stage == "judge":
                _judge(ctx, models)
            elif stage == "reflect":
                _reflect(ctx, models)
            else:  # a stage with nothing of its own to print
                stages.execute(ctx, stage)
                click.echo(f"run {run.run_id}: the {stage} stage is done: {run.path(stage)}")
            if stage != "director":
                _remember(run)


@cli.command()
@click.argument("run_id")
@runs_dir_option
@endpoint_options
@human_options
def resume(
    run_id: str, runs_dir: Path, flags: EndpointFlags, human: tuple[str, ...], interject: bool
) -> None:
    """Continue RUN_ID where it stopped (Ctrl-C, a crash, a failed call).

    A director stage that did not finish is done again; an unfinished dialogue goes on
    from its last complete turn, with the parameters it was started with. A stale
    dialogue (its roles were edited or regenerated) starts over. A run made with --judge,
    or judged before, is judged at the end; runs it delegated to are finished first. A
    role a person played is the model's from here unless --human names it again.
    """
    from . import stages

    run = _open(runs_dir, run_id)
    with _writing(run):
        include = stages.planned_stages(run)
        todo = stages.pending(run, include=include)
        if not todo:
            click.echo(f"run {run.run_id} is complete; nothing to resume")
            return
        plan = stages.Plan.recorded(run)
        statuses = stages.statuses(run)
        if "director" in todo:
            click.echo(
                f"run {run.run_id}: the director stage is {statuses['director']}; "
                "asking the director again...",
                err=True,
            )
        elif statuses.get("dialogue") in ("interrupted", "failed"):
            lines = run.read_transcript()
            at = len(lines) + 1
            if at <= plan.dialogue.turns:
                click.echo(
                    f"run {run.run_id}: resuming the dialogue at turn {at} of "
                    f"{plan.dialogue.turns}",
                    err=True,
                )
            played = sorted({line.role for line in lines if line.kind == "human"} - set(human))
            if played:
                them = "it" if len(played) == 1 else "them"
                click.echo(
                    f"note: a person played {', '.join(played)}; the model plays {them} from "
                    f"here, unless --human names {them}",
                    err=True,
                )
        person = _person(human, interject)
        with flags.models(run) as models:
            ctx = _context(run, models, plan, person)
            stages.advance(ctx, include=include)
        _remember(run)
        click.echo(
            f"\nrun {run.run_id} done ({_views().ending(run.stage('dialogue'))}): {run.folder}"
        )


MAX_LOCAL_JOBS = 64  # a batch's threads on one machine
MAX_RAY_JOBS = 4096  # a batch's tasks at once on a Ray cluster


@cli.command()
@click.argument("tasks_file", type=PathType(dir_okay=False))
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, MAX_RAY_JOBS),
    default=4,
    show_default=True,
    help=f"Tasks run at the same time (at most {MAX_LOCAL_JOBS} on this machine; with --ray, "
    "on the whole cluster).",
)
@runs_dir_option
@endpoint_options
@stage_options(director=True, dialogue=True, tools=True)
@click.option("--judge", is_flag=True, help="Judge each run when its dialogue ends.")
@click.option("--reflect", is_flag=True, help="Reflect on each role when its dialogue ends.")
@PERSONA_OPTION
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Run each task as a Ray task: on the cluster at --ray-address, else on a local Ray "
    "instance of JOBS CPUs (needs the ray extra).",
)
@click.option(
    "--ray-address",
    metavar="ADDRESS",
    envvar="RAY_ADDRESS",
    show_envvar=True,
    help="The Ray cluster that --ray joins (its head's HOST:PORT) [default: a local instance].",
)
@click.option(
    "--batch-api",
    is_flag=True,
    help="Send the first request of every director, judge and reflection through the "
    "provider's Batch API (OpenAI's: half price, answered within 24 hours), waiting for it "
    "between the stages; repairs and dialogues go through the ordinary API.",
)
@poll_interval_option(30.0, "With --batch-api, seconds between two looks at a provider batch.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the director, judge and reflection requests the batch would send, with their "
    "tokens and cost, then stop without calling anything.",
)
@PRICES_OPTION
def batch(
    tasks_file: Path,
    jobs: int,
    runs_dir: Path,
    flags: EndpointFlags,
    director_params: DirectorParameters,
    dialogue_params: DialogueParameters,
    tool_params: ToolParameters,
    judge: bool,
    reflect: bool,
    persona: str | None,
    use_ray: bool,
    ray_address: str | None,
    batch_api: bool,
    poll_interval: float,
    dry_run: bool,
    prices: Path | None,
) -> None:
    """Run every task of TASKS_FILE, JOBS at a time, each as a normal run.

    One task per line, or a JSON object per line with options of its own, e.g.
    {"task": "...", "turns": 6, "roles": 3, "judge": true}. Running the same command
    again skips the runs that are complete and finishes the others. Rate limits (429)
    are waited out with the SDK's retries (--max-retries, at least 8 here).

    With --ray, each task runs on a Ray worker, which sends its run's files back: this
    process alone writes the runs folder. A task whose worker dies is run again by Ray.

    With --batch-api, the batch goes stage by stage: the directors' requests go in
    provider batches, which are waited for (a second run of the command waits for those
    already submitted), then the dialogues run, then the judges' and reflections'
    requests go in batches. See README, "Scaling out".
    """
    from dataclasses import replace

    from .batch import Batch

    context = click.get_current_context()
    given = click.core.ParameterSource.COMMANDLINE
    if use_ray and batch_api:
        raise click.UsageError("--batch-api cannot be used with --ray")
    if not batch_api and context.get_parameter_source("poll_interval") == given:
        raise click.UsageError("--poll-interval needs --batch-api")
    if not use_ray:
        if context.get_parameter_source("ray_address") == given:
            raise click.UsageError("--ray-address needs --ray")
        if jobs > MAX_LOCAL_JOBS:
            raise click.BadParameter(
                f"{jobs} is more than {MAX_LOCAL_JOBS} on one machine (use --ray to go further)",
                param_hint="'-j' / '--jobs'",
            )
    # The embedded server gets slots and KV cache for `jobs` dialogues at once.
    with flags.models(min_retries=8, sessions=jobs) as models:
        work = Batch(
            tasks_file,
            runs_dir,
            models,
            director_params,
            dialogue_params,
            judge=judge,
            tools=tool_params,
            reflect=reflect,
            persona=persona,
        )
        if dry_run:
            from .batchapi import estimate

            if batch_api:
                work.check_hosted()
            click.echo(_views().batch_estimate_text(estimate(work, prices), batch_api=batch_api))
            return
        api = None

        def bar_break() -> str:
            return "\n" if sys.stderr.isatty() else ""

        if batch_api:
            from .batchapi import BatchApi

            api = BatchApi(
                runs_dir / "batches" / f"{tasks_file.stem}.batch-api",
                poll_interval=poll_interval,
                timeout=models.timeout,
                max_retries=models.max_retries,
                # on a terminal, the progress bar's line is ended first
                on_status=lambda line: click.echo(f"{bar_break()}{line}", err=True),
            )
            work.check_hosted()
        counts = {"done": 0, "skipped": 0, "failed": 0}

        def status() -> str:
            running = min(jobs, len(work.tasks) - sum(counts.values()))
            rate = work.turns_done / max(time.monotonic() - started, 1e-9)
            return (
                f"done {counts['done']}, skipped {counts['skipped']}, failed "
                f"{counts['failed']}, running {running}, {rate:.1f} turns/s"
            )

        started = time.monotonic()
        progress: Any = click.progressbar(
            length=len(work.tasks),
            label="tasks",
            file=sys.stderr,
            show_pos=True,
            item_show_func=lambda _: status(),
        )
        with progress as bar:

            def done(outcome: Outcome) -> None:
                counts[outcome.status] += 1
                bar.update(1)

            if use_ray:
                from .raybatch import run_batch

                outcomes = run_batch(work, jobs, done, address=ray_address)
            elif api is None:
                outcomes = work.run(jobs, done)
            else:
                try:
                    outcomes = work.run(jobs, done, api=api)
                except KeyboardInterrupt:
                    click.echo(
                        f"\ninterrupted; the batches submitted go on at the provider (see "
                        f"{api.folder}); to wait for them and finish the runs, run the same "
                        "command again",
                        err=True,
                    )
                    context.exit(130)
    outcomes = [
        replace(o, error=_explain(o.exception, context)) if o.exception else o for o in outcomes
    ]
    click.echo(_views().batch_table(outcomes))
    if counts["failed"]:
        raise click.ClickException(
            f"{counts['failed']} of {len(outcomes)} tasks failed; run the same command again "
            "to retry them"
        )


@cli.command()
@click.argument("run_id")
@runs_dir_option
def edit(run_id: str, runs_dir: Path) -> None:
    """Edit the roles of RUN_ID in $EDITOR.

    The edit is checked against the schema: an invalid one is refused and the file is
    left as it was. A valid one is saved (the previous file is kept as
    roles.before-edit-N.json) and a dialogue that already ran becomes stale.
    """
    run = _open(runs_dir, run_id)
    with _writing(run):
        from . import stages
        from .director import ROLES, load_roles

        if run.stage("director").status != "done":
            raise RunError(
                f"the director stage of run {run.run_id} is {stages.status(run, 'director')}, "
                f"so there are no roles to edit; finish it with: pipeline resume {run.run_id}",
                run_id=run.run_id,
            )
        if _edit_roles(run, load_roles(run)) is None:
            click.echo("no change saved; the roles are as they were", err=True)
            return
        click.echo(f"saved {run.path(ROLES)}")
        if stages.status(run, "dialogue") == "stale":
            click.echo(
                f"the dialogue ran on the old roles and is now stale; rerun it with: "
                f"pipeline rerun {run.run_id} dialogue{_runs_dir_flag(runs_dir)}"
            )


@cli.command()
@click.argument("run_id")
@click.option("--into", metavar="NEW_RUN_ID", help="Id of the replayed run [default: a new id].")
@runs_dir_option
def replay(run_id: str, into: str | None, runs_dir: Path) -> None:
    """Re-execute RUN_ID from its recorded model calls, with no model and no network.

    Every request must match one the run made (by sha256); the replayed run's artifacts
    are then byte for byte the original's, except run.json's ids and times. A request
    that does not match (changed code, template, schema or parameter) is an error that
    names the stage.
    """
    from .replay import replay_run

    source = _open(runs_dir, run_id)
    with _writing(source):
        click.echo(f"replaying run {source.run_id} from its recording...", err=True)
        run = replay_run(source, runs_dir, into=into, listener=_Printer())
    click.echo(f"\nreplayed run {source.run_id} as {run.run_id}: {run.folder}")


@cli.command()
@click.argument("run_a")
@click.argument("run_b")
@runs_dir_option
def diff(run_a: str, run_b: str, runs_dir: Path) -> None:
    """Show what differs between RUN_A and RUN_B: inputs, roles, transcript."""
    from .views import diff_runs

    text = diff_runs(_open(runs_dir, run_a), _open(runs_dir, run_b))
    click.echo(text or "no differences")


@cli.command()
@click.argument("run_id", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(EXPORT_FORMATS),
    default="md",
    show_default=True,
    help="What to write.",
)
@click.option(
    "--role",
    metavar="NAME",
    help="finetune: the role whose point of view to take [default: every role].",
)
@click.option("--all", "all_runs", is_flag=True, help="Export every run with a finished dialogue.")
@click.option(
    "--min-score",
    type=click.IntRange(1, 10),
    help="With --all: only runs the judge scored at least this.",
)
@click.option(
    "-o",
    "--output",
    type=PathType(dir_okay=False),
    help="Write to this file [default: standard output].",
)
@runs_dir_option
def export(
    run_id: str | None,
    fmt: str,
    role: str | None,
    all_runs: bool,
    min_score: int | None,
    output: Path | None,
    runs_dir: Path,
) -> None:
    """Export RUN_ID's conversation (or, with --all, every run's) as Markdown, plain text,
    JSON lines, or an OpenAI chat fine-tuning dataset."""
    from .export import export_many, export_run
    from .runs import atomic_write_text, list_runs

    if all_runs == (run_id is not None):
        raise click.UsageError("give either a RUN_ID or --all")
    if min_score is not None and not all_runs:
        raise click.UsageError("--min-score goes with --all")
    if all_runs:
        runs = [item for item in list_runs(runs_dir) if not isinstance(item, RunError)]
        text = export_many(runs, fmt, role=role, min_score=min_score)
    else:
        text = export_run(_open(runs_dir, str(run_id)), fmt, role=role)
    if output is None:
        click.echo(text, nl=False)
    else:
        atomic_write_text(output, text)
        click.echo(f"wrote {output}", err=True)


@cli.command(name="runs")
@runs_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
def runs_command(runs_dir: Path, as_json: bool) -> None:
    """List the runs: id, created, each stage's status, turns, how the dialogue ended, task.

    A stage whose process died while it ran shows as interrupted (pipeline resume RUN_ID
    continues it); a run whose manifest cannot be read is listed as unreadable.
    """
    import json

    from .runs import list_runs

    rows = [
        _views().unreadable(item) if isinstance(item, RunError) else _views().summary(item)
        for item in list_runs(runs_dir)
    ]
    if as_json:
        click.echo(json.dumps([row.as_json() for row in rows], indent=2, ensure_ascii=False))
    elif rows:
        click.echo(_views().runs_table(rows))
    else:
        click.echo(f"no runs in {runs_dir}", err=True)


@cli.command()
@click.argument("run_id")
@click.option("--stage", type=StageChoice(), help="Show only this stage.")
@click.option("--json", "as_json", is_flag=True, help="Print the artifact itself as JSON.")
@runs_dir_option
def show(run_id: str, stage: str | None, as_json: bool, runs_dir: Path) -> None:
    """Show RUN_ID: its stages, the role prompts and opening line, the transcript and the
    judge's verdict.

    With --json: the manifest, or with --stage the stage's artifact (roles.json, the
    transcript as JSON lines, verdict.json).
    """
    import json

    from .director import ROLES
    from .judge import VERDICT, load_verdict
    from .records import RolesDocument
    from .reflect import REFLECTIONS, load_reflections

    run = _open(runs_dir, run_id)
    if run.imported:
        from .importing import ROLES
    has_roles = run.path(ROLES).exists()
    has_verdict = run.path(VERDICT).exists()
    if as_json:
        if stage == "director":
            click.echo(json.dumps(run.read_json(ROLES), indent=2, ensure_ascii=False))
        elif stage == "dialogue":
            for line in run.read_transcript():
                click.echo(json.dumps(line.to_json(), ensure_ascii=False))
        elif stage == "judge":
            click.echo(json.dumps(run.read_json(VERDICT), indent=2, ensure_ascii=False))
        elif stage == "reflect":
            click.echo(json.dumps(run.read_json(REFLECTIONS), indent=2, ensure_ascii=False))
        else:
            click.echo(json.dumps(run.manifest.to_json(), indent=2, ensure_ascii=False))
        return
    roles = RolesDocument.from_json(run.read_json(ROLES)) if has_roles else None
    if stage is None:
        click.echo(_views().run_header(run))
    if stage in (None, "director") and roles is not None:
        click.echo(("\n" if stage is None else "") + _views().roles_text(roles))
    if stage in (None, "dialogue"):
        token = roles.done_token if roles is not None else ""
        text = _views().transcript_text(run.read_transcript(), token)
        click.echo(text.removeprefix("\n") if stage else text)
    if stage == "judge" or (stage is None and has_verdict):
        click.echo(("\n" if stage is None else "") + _views().verdict_text(load_verdict(run)))
    if stage == "reflect" or (stage is None and run.path(REFLECTIONS).exists()):
        text = _views().reflections_text(load_reflections(run))
        click.echo(("\n" if stage is None else "") + text)


@cli.command(name="import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(IMPORT_FORMATS))
@click.argument("file", type=PathType(exists=True, dir_okay=False))
@click.option("--me", metavar="NAME", help="The speaker who is you (for datasets and personas).")
@click.option("--task", metavar="TEXT", help="What the chat was for [default: a description].")
@click.option(
    "--conversation",
    metavar="ID|TITLE",
    help="chatgpt, telegram: import only this conversation [default: each, as its own run].",
)
@click.option(
    "--timezone",
    "zone",
    metavar="ZONE",
    help="whatsapp: the IANA time zone of the export's times [default: this computer's].",
)
@click.option(
    "--persona",
    "personas",
    metavar="SPEAKER=NAME",
    multiple=True,
    help="Import SPEAKER as the persona NAME (its role is named NAME); repeatable.",
)
@runs_dir_option
def import_command(
    fmt: str,
    file: Path,
    me: str | None,
    task: str | None,
    conversation: str | None,
    zone: str | None,
    personas: tuple[str, ...],
    runs_dir: Path,
) -> None:
    """Import a chat history, FILE, as a run: WhatsApp's .txt export, Telegram Desktop's
    result.json, or ChatGPT's conversations.json.

    Each speaker becomes a role, in order of first appearance, and a speaker's consecutive
    messages one turn. show, export, diff and `rerun RUN judge` work on the run. Media and
    system notices are left out and counted. A file that cannot be read creates no run.
    """
    from .importing import import_chats

    mapped = {}
    for pair in personas:
        speaker, _, name = pair.partition("=")
        if not speaker.strip() or not name.strip():
            raise click.BadParameter(f"{pair!r} is not SPEAKER=NAME", param_hint="--persona")
        mapped[speaker.strip()] = name.strip()
    for run in import_chats(
        runs_dir,
        fmt,
        file,
        me=me,
        task=task,
        conversation=conversation,
        zone=zone,
        personas=mapped,
    ):
        click.echo(f"run {run.run_id}: {_views().imported_text(run.stage('import'))}", err=True)
        _remember(run)
        click.echo(run.run_id)


@cli.command()
@click.argument("run_ids", metavar="RUN_ID...", nargs=-1, required=True)
@click.option(
    "--force", is_flag=True, help="Delete even a run that another run or a ledger refers to."
)
@runs_dir_option
def rm(run_ids: tuple[str, ...], force: bool, runs_dir: Path) -> None:
    """Delete runs, with all their files (an imported chat is personal data).

    A run that another run depends on (the runs it delegated to, the run that delegated
    it) or that a fine-tuning ledger names is kept unless --force is given.
    """
    from .remove import remove_runs

    for run_id in remove_runs(runs_dir, run_ids, force=force):
        click.echo(f"deleted run {run_id}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--model-file",
    type=PathType(dir_okay=False),
    help="GGUF file to serve [default: SmolLM2-135M-Instruct, downloaded on first use].",
)
def serve(host: str, port: int, model_file: Path | None) -> None:
    """Serve the embedded model as an OpenAI-compatible API, in the foreground.

    Point any OpenAI client (or another pipeline) at http://HOST:PORT/v1. Ctrl-C stops it.
    """
    from .local import resolve_model
    from .local import serve as serve_embedded

    model = resolve_model(model_file, notify=lambda message: click.echo(message, err=True))
    click.echo(f"serving {model.name} at http://{host}:{port}/v1 (Ctrl-C to stop)", err=True)
    code = serve_embedded(host, port, model)
    if code not in (0, -signal.SIGTERM, -signal.SIGINT):
        raise click.ClickException(f"the embedded model server exited with code {code}")


# -- helpers --------------------------------------------------------------------------


def _context(run: Run, models: Models, plan: Plan, person: Terminal) -> StageContext:
    """The context a command runs ``run``'s stages in: its printer (which shows a person
    the turns they have not seen), the tools ``plan`` gives the roles, the person."""
    from . import stages

    return stages.StageContext(
        run,
        models,
        plan,
        person.watching(_Printer()),
        tools=models.tools(plan.tools),
        human=person,
    )


def _remember(run: Run) -> None:
    """Add ``run`` to the memory store if it is finished; a store that cannot take it is
    a warning, not a failure of the run (``pipeline memory sync`` catches up later)."""
    from . import memory

    try:
        memory.remember(run)
    except PipelineError as e:
        click.echo(f"warning: run {run.run_id} is not in the memory yet: {e.message}", err=True)
    _trace(run)


def _trace(run: Run) -> None:
    """Send ``run``'s spans (and those of the runs it delegated to) when
    OTEL_EXPORTER_OTLP_ENDPOINT is set (:func:`pipeline.telemetry.export_run`; nothing is
    imported otherwise); a collector that refuses them is a warning."""
    from . import telemetry

    for warning in telemetry.export_tree(run):
        click.echo(f"warning: {warning}", err=True)


def _persona(flags: EndpointFlags, name: str | None) -> Persona | None:
    """The persona ``name`` of the config these flags read (``pipeline.toml`` or
    ``--config``); None for no name."""
    if name is None:
        return None
    from .config import load_config, persona_of

    return persona_of(load_config(flags.config), name)


def _runs_dir_flag(runs_dir: Path) -> str:
    from pathlib import Path

    if runs_dir == Path("runs") and "PIPELINE_RUNS_DIR" not in os.environ:
        return ""
    return f" --runs-dir {click.format_filename(runs_dir)}"


def _open(runs_dir: Path, run_id: str) -> Run:
    from .runs import open_run

    return open_run(runs_dir, run_id)


@contextlib.contextmanager
def _writing(run: Run) -> Iterator[Run]:
    """Hold the run's lock; on Ctrl-C, say where the run is kept; when a person stopped
    the dialogue (/quit), say how to go on, and end the command there without an error."""
    from .human import HumanQuit

    try:
        with run.locked():
            yield run
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; run {run.run_id} is kept in {run.folder}", err=True)
        raise
    except HumanQuit as e:
        runs_dir = run.folder.parent
        click.echo(
            f"\nstopped before turn {e.turn}; run {e.run_id} is kept; go on with: pipeline "
            f"resume {e.run_id}{_runs_dir_flag(runs_dir)}{_person_flags(e.plays, e.notes)}",
            err=True,
        )


def _person(plays: tuple[str, ...], interject: bool) -> Terminal:
    """The person at this terminal, playing the roles ``plays`` (--human), adding notes
    with ``interject`` (--interject)."""
    from .terminal import Terminal

    return Terminal(plays, interject=interject)


def _person_flags(plays: tuple[str, ...], interject: bool) -> str:
    """The flags that bring the same person back into a dialogue."""
    import shlex

    words = "".join(f" --human {shlex.quote(name)}" for name in plays)
    return words + (" --interject" if interject else "")


def _edit_roles(run: Run, roles: RolesDocument) -> RolesDocument | None:
    """Open $EDITOR on ``roles``; save a valid edit and return it, or None when the editor
    was closed without saving.

    Raises:
        PipelineError: the edit is not JSON, or breaks the schema; nothing was saved.
    """
    import json

    from .director import replace_roles
    from .records import RolesDocument

    text = json.dumps(roles.to_json(), indent=2, ensure_ascii=False) + "\n"
    edited = click.edit(text, extension=".json")
    if edited is None:
        return None
    try:
        candidate = json.loads(edited)
    except json.JSONDecodeError as e:
        raise PipelineError(f"not saved: the edit is not valid JSON ({e})") from e
    try:
        replace_roles(run, candidate)
    except PipelineError as e:
        raise PipelineError(f"not saved: {e.message}") from e
    return RolesDocument.from_json(candidate)


def _review(run: Run, roles: RolesDocument) -> bool:
    """Ask until the user runs (True) or declines (False); 'e' edits the roles."""
    while True:
        answer = click.prompt(
            REVIEW_QUESTION,
            type=click.Choice(["y", "n", "e"], case_sensitive=False),
            default="n",
            show_choices=False,
            show_default=False,
            err=True,
        ).lower()
        if answer != "e":
            return answer == "y"
        try:
            edited = _edit_roles(run, roles)
        except PipelineError as e:
            click.echo(f"{e.message}; try again", err=True)
            continue
        if edited is None:
            click.echo("no change saved; the roles are as they were", err=True)
            continue
        roles = edited
        _show_roles(run, roles)


def _redo_director(ctx: StageContext, models: Models, runs_dir: Path) -> None:
    """Run the director stage again (its old files go to director/previous-N/)."""
    from . import stages
    from .director import load_roles

    run = ctx.run
    model = models.director().endpoint.model
    click.echo(f"run {run.run_id}: asking the director ({model})...", err=True)
    stages.execute(ctx, "director")
    _show_roles(run, load_roles(run))
    if stages.status(run, "dialogue") == "stale":
        click.echo(
            f"\nthe dialogue ran on the old roles and is now stale; rerun it with: "
            f"pipeline rerun {run.run_id} dialogue{_runs_dir_flag(runs_dir)}"
        )


class _Printer:
    """Streams the conversation to stdout as it happens; a delegated run's, indented."""

    def __init__(self, indent: str = "") -> None:
        self.indent = indent

    def turn_started(self, turn: int, role: str) -> None:
        click.echo("\n" + self.indent + _views().turn_header(turn, role))
        click.echo(self.indent, nl=False)

    def delta(self, text: str) -> None:
        click.echo(text.replace("\n", "\n" + self.indent), nl=False)

    def turn_finished(self, turn: Turn) -> None:
        click.echo()

    def nested(self, run_id: str, task: str) -> _Printer:
        click.echo(f"\n{self.indent}> delegated to run {run_id}: {_views().one_line(task)}")
        return _Printer(self.indent + "    ")


def _converse(ctx: StageContext, models: Models) -> None:
    from . import stages
    from .director import load_roles

    run = ctx.run
    config = models.config
    if config is not None:
        for name in config.unknown_roles(load_roles(run).names):
            click.echo(
                f"warning: {config.path}: assign.roles.{name}: no role is called {name}", err=True
            )
    stages.execute(ctx, "dialogue")
    click.echo(f"\nrun {run.run_id} done ({_views().ending(run.stage('dialogue'))}): {run.folder}")


def _judge(ctx: StageContext, models: Models) -> None:
    from . import stages
    from .judge import load_verdict

    run = ctx.run
    click.echo(f"run {run.run_id}: asking the judge ({models.judge().endpoint.model})...", err=True)
    stages.execute(ctx, "judge")
    click.echo(_views().verdict_text(load_verdict(run)))


def _reflect(ctx: StageContext, models: Models) -> None:
    from . import stages
    from .reflect import load_reflections

    run = ctx.run
    model = models.reflector().endpoint.model
    click.echo(f"run {run.run_id}: asking for reflections ({model})...", err=True)
    stages.execute(ctx, "reflect")
    click.echo(_views().reflections_text(load_reflections(run)))


def _show_roles(run: Run, roles: RolesDocument) -> None:
    """Print the roles, then, on stderr, what the lint step found in them."""
    click.echo(_views().roles_text(roles))
    for problem in run.stage("director").lint or []:
        click.echo(f"check: {problem}", err=True)


# -- dataset: fine-tuning datasets from runs ------------------------------------------


def example_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of how examples are written, shared by dataset build and curate."""
    f = click.option(
        "--context",
        type=click.IntRange(0),
        default=10,
        show_default=True,
        help="Turns before each answer given as its context.",
    )(f)
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(DATASET_FORMATS),
        default="chat",
        show_default=True,
        help="chat: OpenAI chat fine-tuning lines; completion: legacy prompt/completion pairs.",
    )(f)


@cli.group(name="dataset")
def dataset_group() -> None:
    """Fine-tuning datasets made from runs and imported chats."""


@dataset_group.command(name="build")
@click.argument("run_ids", metavar="[RUN_ID]...", nargs=-1)
@click.option("--all", "all_runs", is_flag=True, help="Every run with a finished conversation.")
@click.option(
    "--min-score",
    type=click.FloatRange(1, 10),
    help="Only runs the judge scored at least this (unjudged runs are left out).",
)
@click.option(
    "--speaker",
    metavar="NAME",
    help="The role or person whose turns are the answers [default: the imported chats' --me].",
)
@click.option(
    "-o", "--output", type=PathType(dir_okay=False), required=True, help="The JSONL file."
)
@example_options
@click.option(
    "--validation",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.0,
    help="Share of examples held out for validation, written beside the file.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
@click.option("--base-model", metavar="MODEL", help="The model to tune: its limits and price.")
@click.option("--epochs", type=click.IntRange(1), help="Epochs, for the cost [default: OpenAI's].")
@PRICES_OPTION
@click.option("--token-limit", type=click.IntRange(1), help="Most tokens per example.")
@runs_dir_option
def dataset_build(
    run_ids: tuple[str, ...],
    all_runs: bool,
    min_score: float | None,
    speaker: str | None,
    output: Path,
    fmt: str,
    context: int,
    validation: float,
    seed: int,
    base_model: str | None,
    epochs: int | None,
    prices: Path | None,
    token_limit: int | None,
    runs_dir: Path,
) -> None:
    """Write training examples from one speaker's side of the given runs (or --all).

    Each turn of the speaker becomes an example whose context is the turns before it.
    The examples are checked as providers check them (at least 10, each ending with the
    speaker, each within the token limit) before anything is written, and the count, the
    tokens and an estimated training cost are printed. A sidecar FILE.manifest.json lists
    the runs and turns the dataset holds.
    """
    from . import dataset_build
    from .runs import Run, list_runs

    if all_runs == bool(run_ids):
        raise click.UsageError("give RUN_IDs or --all")
    runs = (
        [r for r in list_runs(runs_dir) if isinstance(r, Run)]
        if all_runs
        else [_open(runs_dir, r) for r in run_ids]
    )
    built = dataset_build.build(
        runs,
        speaker=speaker or dataset_build.default_speaker(runs),
        fmt=fmt,
        context=context,
        min_score=min_score,
        validation=validation,
        seed=seed,
        base_model=base_model,
        epochs=epochs,
        prices=prices,
        token_limit=token_limit,
    )
    click.echo(_views().dataset_text(built), err=True)
    for path in dataset_build.write(built, output):
        click.echo(click.format_filename(path))


# -- memory: every turn of every finished run, searchable; curation into datasets ----------


@cli.group(name="memory")
def memory_group() -> None:
    """The memory store: every turn of every finished run, in RUNS_DIR/memory.db.

    The runs folder stays the source of truth: `memory rebuild` makes the database again
    from it, and what `memory forget` removes is recorded there too.
    """


@memory_group.command(name="search")
@click.argument("query")
@click.option("--role", metavar="NAME", help="Only this role's (or persona's) turns.")
@click.option(
    "--min-score",
    type=click.FloatRange(1, 10),
    help="Only runs the judge scored at least this (unjudged runs are left out).",
)
@click.option(
    "--limit", type=click.IntRange(1), default=20, show_default=True, help="Most results."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
@runs_dir_option
def memory_search(
    query: str,
    role: str | None,
    min_score: float | None,
    limit: int,
    as_json: bool,
    runs_dir: Path,
) -> None:
    """Search the memories for QUERY, best match first.

    QUERY is an SQLite FTS5 query: words (all must be there), "a phrase", prefix*, OR, NOT,
    NEAR(a b). Put a word holding other characters than letters and digits in double
    quotes: '"gpt-4o"'. Run `memory sync` first to take in the newest runs.
    """
    import json

    from . import memory

    found = memory.search(runs_dir, query, role=role, min_score=min_score, limit=limit)
    if as_json:
        click.echo(json.dumps([m.to_json() for m in found], indent=2, ensure_ascii=False))
    elif found:
        click.echo(_views().search_text(found))
    else:
        click.echo("no memory matches", err=True)


def _synced(report: Any, runs_dir: Path) -> None:
    """Print what a sync or rebuild did; the runs it could not read go to stderr."""
    from .memory import database

    for run_id, why in report.skipped:
        click.echo(f"skipped {run_id}: {why}", err=True)
    click.echo(_views().sync_text(report, click.format_filename(database(runs_dir))))


@memory_group.command(name="sync")
@runs_dir_option
def memory_sync(runs_dir: Path) -> None:
    """Index the finished runs that are new or changed since the last sync (a new verdict
    or reflection), and take out the runs deleted or no longer finished."""
    from . import memory

    _synced(memory.sync(runs_dir), runs_dir)


@memory_group.command(name="rebuild")
@runs_dir_option
def memory_rebuild(runs_dir: Path) -> None:
    """Make the memory database again from the runs folder (forgotten memories stay out)."""
    from . import memory

    _synced(memory.rebuild(runs_dir), runs_dir)


@memory_group.command(name="forget")
@click.argument("run_id", metavar="[RUN_ID]", required=False)
@click.option("--role", metavar="NAME", help="Forget this role's turns (in RUN_ID only, if given).")
@runs_dir_option
def memory_forget(run_id: str | None, role: str | None, runs_dir: Path) -> None:
    """Forget the memories of RUN_ID, or of a role in every run made until now.

    The rule is kept in RUNS_DIR/memory-forgotten.jsonl, so `memory rebuild` and later
    syncs keep them out, and curation never sees them; runs made later are remembered.
    """
    from . import memory

    if run_id is None and role is None:
        raise click.UsageError("give a RUN_ID or --role")
    removed = memory.forget(runs_dir, run_id=run_id, role=role)
    click.echo(f"forgot {removed} memories")


def curation_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options of what curation keeps, shared by curate and cycle."""
    for option in reversed(
        [
            click.option(
                "--keep-only", is_flag=True, help="Only turns whose reflection says keep."
            ),
            click.option(
                "--dedupe",
                metavar="THRESHOLD",
                type=click.FloatRange(0, 1, min_open=True),
                help="Drop a turn whose similarity (Jaccard, word 3-grams) to one taken is "
                "this or more.",
            ),
            click.option(
                "--max-per-task", type=click.IntRange(1), help="At most this many per task."
            ),
            click.option(
                "--mix",
                type=PathType(exists=True, dir_okay=False),
                help="Outside examples (JSONL, the same format) to mix in.",
            ),
            click.option(
                "--mix-ratio",
                type=click.FloatRange(0, 1, max_open=True),
                help="The share of outside examples in the dataset (with --mix).",
            ),
        ]
    ):
        f = option(f)
    return f


@cli.command()
@click.option("--role", metavar="NAME", required=True, help="The role (persona) to train.")
@click.option(
    "--min-score",
    type=click.FloatRange(1, 10),
    required=True,
    help="Only runs the judge scored at least this.",
)
@curation_options
@example_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the mix.")
@click.option(
    "-o",
    "--output",
    metavar="DATASET",
    type=PathType(dir_okay=False),
    required=True,
    help="The JSONL file.",
)
@runs_dir_option
def curate(
    role: str,
    min_score: float,
    keep_only: bool,
    dedupe: float | None,
    max_per_task: int | None,
    mix: Path | None,
    mix_ratio: float | None,
    fmt: str,
    context: int,
    seed: int,
    output: Path,
    runs_dir: Path,
) -> None:
    """Select memories into a fine-tuning dataset, DATASET: the --role's turns in runs
    judged at least --min-score, near-duplicates dropped, at most --max-per-task per task,
    outside examples mixed in at --mix-ratio.

    The memory is synced first; forgotten memories are left out. A sidecar
    DATASET.manifest.json lists every memory in the dataset and every line mixed in.
    """
    from . import curate as curation

    if (mix is None) != (mix_ratio is None):
        raise click.UsageError("--mix and --mix-ratio go together")
    curated = curation.curate(
        runs_dir,
        role=role,
        min_score=min_score,
        keep_only=keep_only,
        dedupe=dedupe,
        max_per_task=max_per_task,
        mix=mix,
        mix_ratio=mix_ratio,
        fmt=fmt,
        context=context,
        seed=seed,
    )
    click.echo(_views().curated_text(curated), err=True)
    for path in curation.write(curated, output):
        click.echo(click.format_filename(path))


# -- the cycle: memories → a persona's model, and where a model came from ---------------


@cli.command()
@click.option("--role", "persona", metavar="PERSONA", required=True, help="The persona to tune.")
@click.option("--base-model", metavar="MODEL", help="The model to fine-tune (not --model).")
@click.option(
    "--every",
    type=click.IntRange(1),
    metavar="N",
    help="Submit a job once N curated examples exist that no earlier cycle used.",
)
@click.option("--yes", "-y", is_flag=True, help="Build the dataset and submit the job.")
@click.option(
    "--assign",
    is_flag=True,
    help="When a job has succeeded, write the model for the persona into the --config file.",
)
@click.option("--report", is_flag=True, help="Print the metrics of each cycle, then stop.")
@click.option(
    "--min-score",
    type=click.FloatRange(1, 10),
    help="Only runs the judge scored at least this.",
)
@curation_options
@runs_dir_option
@endpoint_options
def cycle(
    persona: str,
    base_model: str | None,
    every: int | None,
    yes: bool,
    assign: bool,
    report: bool,
    min_score: float | None,
    keep_only: bool,
    dedupe: float | None,
    max_per_task: int | None,
    mix: Path | None,
    mix_ratio: float | None,
    runs_dir: Path,
    flags: EndpointFlags,
) -> None:
    """Fine-tune a persona on its curated memories, a cycle at a time; safe from cron.

    Each call does one thing: while the last cycle's job runs, it says so; when the job has
    succeeded, it prints the pipeline.toml entry that gives the persona the new model (with
    --assign, it writes it into the --config file, keeping a .bak); otherwise, once --every
    new curated examples exist, it builds the dataset and, with --yes, submits the job.
    Without --yes nothing costly is done. Overlapping calls exit at once. --report prints
    the metrics of the runs before and after each model.
    """
    from . import cycle as cycles

    if report:
        click.echo(_views().metrics_table(cycles.report(runs_dir, persona)))
        return
    if base_model is None or every is None:
        raise click.UsageError("--base-model and --every are needed (or --report)")
    if assign and flags.config is None:
        raise click.UsageError("--assign needs --config FILE: the file to write the model into")
    if (mix is None) != (mix_ratio is None):
        raise click.UsageError("--mix and --mix-ratio go together")
    curation = {
        "min_score": min_score,
        "keep_only": keep_only,
        "dedupe": dedupe,
        "max_per_task": max_per_task,
        "mix": mix,
        "mix_ratio": mix_ratio,
    }
    try:
        outcome = cycles.step(
            runs_dir,
            _finetune_jobs(runs_dir, flags),
            persona=persona,
            base_model=base_model,
            every=every,
            submit=yes,
            assign_to=flags.config if assign else None,
            curation=curation,
        )
    except cycles.CycleBusy as e:
        click.echo(e.message, err=True)
        return
    click.echo(outcome.message)
    if outcome.entry and not assign:
        click.echo(f"to give it to {persona}, add to pipeline.toml:\n{outcome.entry}")
    if outcome.action == "failed":
        raise click.ClickException(outcome.message)


@cli.command()
@click.argument("target", metavar="MODEL|RUN_ID")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
@runs_dir_option
def lineage(target: str, as_json: bool, runs_dir: Path) -> None:
    """Show where a fine-tuned model came from and what was made with it: runs, then
    memories, then dataset, then job, then model, then the runs made with the model.

    Given a run, the chains it belongs to: the model it was made with, and the models its
    turns went into.
    """
    import json

    from .lineage import lineage as chains
    from .lineage import lineage_text

    links = chains(runs_dir, target)
    if as_json:
        click.echo(json.dumps([link.to_json() for link in links], indent=2))
    elif links:
        click.echo(lineage_text(links))
    else:
        click.echo(f"{target} went into no fine-tuned model yet", err=True)


@cli.command()
@click.argument("run_id")
@runs_dir_option
def trace(run_id: str, runs_dir: Path) -> None:
    """Send RUN_ID's OpenTelemetry spans (GenAI semantic conventions) to the OTLP/HTTP
    collector named by OTEL_EXPORTER_OTLP_ENDPOINT: any run, old or replayed, again.

    Needs the otel extra. Message contents are sent only with
    OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true.
    """
    from . import telemetry

    run = _open(runs_dir, run_id)
    sent = telemetry.export_run(run, required=True)
    click.echo(f"run {run.run_id}: {sent} spans sent to {telemetry.destination()}")


# -- view: a local web app over the runs folder -----------------------------------------


@cli.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Any other than 127.0.0.1, localhost or ::1 makes every "
    "request need the token printed at start.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on (0: any free one).",
)
@runs_dir_option
def view(host: str, port: int, runs_dir: Path) -> None:
    """Serve a web page over the runs folder: the runs, each run's roles, transcript,
    tool calls, tree, verdict and recorded calls, diffs, memory search and lineage.

    A running dialogue's turns appear as they are written. Nothing is fetched from the
    network. Ctrl-C stops it. Needs the view extra: pip install 'converse-pipeline[view]'.
    """
    try:
        from .webapp import serve
    except ImportError as e:
        raise click.ClickException(
            f"pipeline view needs the view extra ({(e.name or '?').split('.')[0]} is not "
            "installed): "
            "pip install 'converse-pipeline[view]'"
        ) from e
    with contextlib.suppress(KeyboardInterrupt):
        serve(runs_dir, host, port, notify=lambda message: click.echo(message, err=True))


# -- models: GGUF files from the Hugging Face Hub ---------------------------------------


@cli.group(name="models")
def models_group() -> None:
    """Download GGUF model files from the Hugging Face Hub and list the ones at hand.

    Files are kept in the user's cache folder (PIPELINE_CACHE_DIR overrides it).
    """


@models_group.command(name="pull")
@click.argument("repo")
@click.argument("file")
@click.option("--revision", metavar="REV", help="Branch, tag or commit [default: main].")
def models_pull(repo: str, file: str, revision: str | None) -> None:
    """Download a GGUF file from the Hub and print its path.

    FILE is a .gguf file of the Hub model repository REPO (owner/name). It goes into the
    cache, unless it is there already, and its local path is printed on standard output,
    so "$(pipeline models pull REPO FILE)" gives a script the path. HF_TOKEN gives access
    to private and gated repositories; HF_ENDPOINT points at a mirror.
    """
    from .hub import pull

    click.echo(f"pulling {file} from {repo}...", err=True)
    click.echo(str(pull(repo, file, revision=revision)))


@models_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
def models_list(as_json: bool) -> None:
    """List the GGUF files at hand.

    Every file pulled into the cache (its repository, file, size in MB, path), and the
    embedded default model, downloaded or not.
    """
    import json

    from .hub import list_models, table

    entries = list_models()
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in entries], indent=2, ensure_ascii=False))
    else:
        click.echo(table(entries))


# -- finetune: jobs on a hosted fine-tuning API ----------------------------------------


@cli.group(name="finetune")
def finetune_group() -> None:
    """Fine-tune a model on a dataset through a hosted fine-tuning API, and follow the job.

    The endpoint is chosen by the endpoint flags, else by [assign] finetune (or default) in
    pipeline.toml, else by OPENAI_BASE_URL / OPENAI_API_KEY; never the embedded model.
    Each job has a ledger, <runs folder>/finetunes/<local id>.json, made before anything
    is uploaded; JOB is its local id or the server's job id. Chat data is personal: delete
    the uploaded files when done (pipeline finetune cleanup JOB).
    """


def _finetune_jobs(runs_dir: Path, flags: EndpointFlags) -> Any:
    """The fine-tune jobs at the endpoint these flags choose (a FinetuneJobs)."""
    from .finetune import FinetuneJobs, finetune_endpoint

    endpoint = finetune_endpoint(flags.resolver(model_required=False))
    return FinetuneJobs(runs_dir, endpoint, timeout=flags.timeout, max_retries=flags.max_retries)


@finetune_group.command(name="create")
@click.argument("dataset", type=PathType(dir_okay=False))
@click.option(
    "--base-model",
    required=True,
    metavar="BASE",
    help="The model to fine-tune, e.g. gpt-4o-mini-2024-07-18 (--model names the endpoint's "
    "model, which is not used here).",
)
@click.option(
    "--validation",
    type=PathType(dir_okay=False),
    metavar="FILE",
    help="A validation dataset, uploaded with the training one.",
)
@click.option("--suffix", metavar="NAME", help="Up to 64 characters for the new model's name.")
@click.option("--yes", "-y", is_flag=True, help="Upload without asking.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print what would be uploaded, where, and the estimated cost, then stop without "
    "any request.",
)
@runs_dir_option
@endpoint_options
def finetune_create(
    dataset: Path,
    base_model: str,
    validation: Path | None,
    suffix: str | None,
    yes: bool,
    dry_run: bool,
    runs_dir: Path,
    flags: EndpointFlags,
) -> None:
    """Upload DATASET (JSON lines) and start a job fine-tuning --base-model on it.

    You are asked first, with the files, their sizes and example counts and the endpoint
    they go to; --yes skips the question, and without it a standard input that is not a
    terminal is refused. The ledger is made before the upload, so that what a refused
    upload left at the server can still be deleted with pipeline finetune cleanup.
    """
    from .dataset_build import source_runs
    from .finetune import estimate, inspect_file, ledger_path

    jobs = _finetune_jobs(runs_dir, flags)
    url = jobs.endpoint.base_url
    files = [("training", inspect_file(dataset))]
    if validation is not None:
        files.append(("validation", inspect_file(validation)))
    summary = _views().upload_text(files, url, base_model, suffix)
    if dry_run:
        cost = estimate(files[0][1].path, base_model)
        if cost.cost is None:
            price = f"unknown (no price known for {base_model})"
        else:
            price = f"about ${cost.cost:,.2f}" if cost.cost >= 0.01 else "less than $0.01"
        click.echo(summary)
        click.echo(
            f"estimated training cost: {price} for {cost.tokens:,} tokens x {cost.epochs} "
            f"epochs (tokens counted with {cost.counter})"
        )
        click.echo("dry run: nothing was uploaded")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise click.ClickException(
                f"standard input is not a terminal, so the upload of {files[0][1].path} to "
                f"{url} cannot be confirmed; pass --yes to upload it"
            )
        click.echo(summary, err=True)
        click.echo(
            f"These files may hold personal data (chat histories): {url} keeps them until "
            "they are deleted (pipeline finetune cleanup JOB).",
            err=True,
        )
        if not click.confirm("Upload them?", default=False, err=True):
            click.echo("not uploaded", err=True)
            return
    ledger = jobs.start(
        files[0][1],
        base_model=base_model,
        validation=files[1][1] if validation is not None else None,
        suffix=suffix,
        source_runs=source_runs(dataset),
    )
    path = ledger_path(runs_dir, ledger.local_id)
    click.echo(f"fine-tune {ledger.local_id}: uploading to {url}...", err=True)
    try:
        jobs.create(ledger)
    except KeyboardInterrupt:
        click.echo(
            f"\ninterrupted; fine-tune {ledger.local_id} is kept in {path}; see where it "
            f"stands with: pipeline finetune status {ledger.local_id}{_runs_dir_flag(runs_dir)}",
            err=True,
        )
        click.get_current_context().exit(130)
    click.echo(f"created job {ledger.job_id} ({ledger.status}) for fine-tune {ledger.local_id}")
    click.echo(
        f"follow it with: pipeline finetune status {ledger.local_id} --follow"
        + _runs_dir_flag(runs_dir)
    )


@finetune_group.command(name="status")
@click.argument("job")
@click.option(
    "--follow",
    is_flag=True,
    help="Show the job's events and status changes until it ends (Ctrl-C stops following; "
    "the job goes on).",
)
@poll_interval_option(10.0, "Seconds between two polls while following.")
@runs_dir_option
@endpoint_options
def finetune_status(
    job: str, follow: bool, poll_interval: float, runs_dir: Path, flags: EndpointFlags
) -> None:
    """Show the status of JOB (a local id or a job id), refreshed from the server.

    With --follow, its events and status changes are shown on stderr as they come, until
    it succeeds, fails or is cancelled. When it has succeeded, the pipeline.toml entry (and
    the flags) that use the new model are printed.
    """
    from .finetune import find

    ledger = find(runs_dir, job)
    jobs = _finetune_jobs(runs_dir, flags)
    if not follow:
        jobs.status(ledger)
        _finished(ledger, jobs.endpoint, fail=False)
        return
    click.echo(
        f"following job {ledger.job_id} of fine-tune {ledger.local_id} (Ctrl-C stops "
        "following; the job goes on)",
        err=True,
    )
    try:
        for update in jobs.follow(ledger, poll_interval=poll_interval):
            click.echo(_views().job_update(update), err=True)
    except KeyboardInterrupt:
        click.echo(
            f"\nstopped following; job {ledger.job_id} goes on at {ledger.base_url} and "
            f"fine-tune {ledger.local_id} is {ledger.status} in its ledger; pick it up again "
            f"with: pipeline finetune status {ledger.local_id} --follow" + _runs_dir_flag(runs_dir),
            err=True,
        )
        click.get_current_context().exit(130)
    _finished(ledger, jobs.endpoint, fail=True)


def _finished(ledger: Any, endpoint: Any, *, fail: bool) -> None:
    """Print the ledger; for a job that succeeded, how to use its model; with ``fail``,
    a job that ended without one is an error."""
    from .finetune import endpoint_entry, failure

    click.echo(_views().ledger_text(ledger))
    if ledger.status == "succeeded" and ledger.fine_tuned_model:
        click.echo(f"\nto use {ledger.fine_tuned_model}, add to pipeline.toml:\n")
        click.echo(endpoint_entry(ledger, endpoint))
        key = f" --api-key-env {endpoint.api_key_env}" if endpoint.api_key_env else ""
        click.echo(
            f"\nor pass: --base-url {endpoint.base_url} --model {ledger.fine_tuned_model}{key}"
        )
    error = failure(ledger) if fail else None
    if error is not None:
        raise error


@finetune_group.command(name="list")
@runs_dir_option
@endpoint_options
def finetune_list(runs_dir: Path, flags: EndpointFlags) -> None:
    """List the fine-tuning jobs at the endpoint, each with its local id when it has a
    ledger here, then the ledgers of jobs the server did not list (never created, older)."""
    jobs = _finetune_jobs(runs_dir, flags)
    rows = jobs.list_jobs()
    if rows:
        click.echo(_views().finetune_table(rows))
    else:
        click.echo(f"no fine-tuning jobs at {jobs.endpoint.base_url}", err=True)


@finetune_group.command(name="cancel")
@click.argument("job")
@runs_dir_option
@endpoint_options
def finetune_cancel(job: str, runs_dir: Path, flags: EndpointFlags) -> None:
    """Cancel JOB (a local id or a job id) at the server."""
    from .finetune import find

    ledger = find(runs_dir, job)
    jobs = _finetune_jobs(runs_dir, flags)
    jobs.cancel(ledger)
    click.echo(f"job {ledger.job_id} of fine-tune {ledger.local_id}: {ledger.status}")
    click.echo(
        f"delete its uploaded files with: pipeline finetune cleanup {ledger.local_id}"
        + _runs_dir_flag(runs_dir)
    )


@finetune_group.command(name="cleanup")
@click.argument("job")
@runs_dir_option
@endpoint_options
def finetune_cleanup(job: str, runs_dir: Path, flags: EndpointFlags) -> None:
    """Delete the files JOB (a local id or a job id) uploaded, once the job has ended.

    Each deletion is recorded in the ledger. The fine-tuned model itself stays at the
    server; the provider's models API deletes it.
    """
    from .finetune import find

    ledger = find(runs_dir, job)
    jobs = _finetune_jobs(runs_dir, flags)
    deleted = jobs.cleanup(ledger)
    url = jobs.endpoint.base_url
    for entry, existed in deleted:
        what = "deleted" if existed else "already gone:"
        click.echo(f"{what} {entry.file_id} ({entry.path}) at {url}")
    if not deleted:
        click.echo(f"fine-tune {ledger.local_id}: no uploaded file left to delete at {url}")
    if ledger.fine_tuned_model:
        click.echo(
            f"the model {ledger.fine_tuned_model} stays at {url} until you delete it there",
            err=True,
        )


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # run the same clean-up as Ctrl-C: stop servers, record the stage


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli()
    finally:
        # The command is over: its files are closed and its servers stopped. Freezing the
        # heap spares the interpreter's exit a last garbage collection over the SDK's
        # objects (0.1 s to 0.2 s of every command that talked to a model; bench/run.py).
        # Not after Ctrl-C left a request thread running: exiting then with a frozen heap
        # crashed the interpreter in about one try in thirty.
        if threading.active_count() == 1:
            gc.freeze()

"""The built wheel (not the editable checkout) ships templates/, schemas/ and web/ and works."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline.resources import data_dir

from .conftest import only_run
from .fakeserver import FakeServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("converse_pipeline-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=300,
    )
    return target


def run_installed(target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "PIPELINE_"))}
    env["PYTHONPATH"] = str(target)
    return subprocess.run(
        [sys.executable, str(target / "bin" / "pipeline"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=target,
    )


def test_wheel_contains_every_template_schema_and_web_asset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("templates", "schemas", "web"):
        base = data_dir(folder)
        for path in base.rglob("*"):
            if path.is_file():
                assert f"pipeline/{folder}/{path.relative_to(base).as_posix()}" in names
    assert "pipeline/schemas/v1/run.schema.json" in names  # subfolders ship too
    assert "pipeline/prices.toml" in names  # pipeline.dataset's price table
    # pipeline view's pages and the assets it serves itself (no CDN)
    assert {"pipeline/web/templates/run.html", "pipeline/web/static/view.js"} <= names


def test_installed_wheel_reads_both_schema_versions(installed):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    env.pop("PIPELINE_SCHEMAS_DIR", None)
    code = (
        "from pipeline import schemas\n"
        "for version in (1, 2):\n"
        "    print(schemas.schema_path(schemas.RUN_MANIFEST, version))\n"
        "    print(schemas.load(schemas.RUN_MANIFEST, version)['$id'])\n"
    )
    printed = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=installed
    )
    assert printed.returncode == 0, printed.stderr
    shipped = installed / "pipeline" / "schemas"
    assert printed.stdout.splitlines() == [
        str(shipped / "v1" / "run.schema.json"),
        "https://converse-pipeline.dev/schemas/run.schema.json",
        str(shipped / "run.schema.json"),
        "https://converse-pipeline.dev/schemas/v2/run.schema.json",
    ]


def test_installed_wheel_runs_generate_help(installed):
    proc = run_installed(installed, "generate", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: pipeline generate [OPTIONS] TASK")


def test_installed_wheel_uses_its_own_data_and_runs(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pipeline.resources import data_dir; print(data_dir('templates'));"
            "print(data_dir('web'))",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=installed,
        check=True,
    ).stdout.split()
    assert [Path(p) for p in where] == [installed / "pipeline" / f for f in ("templates", "web")]

    from .conftest import conversation

    with FakeServer(conversation) as fake:
        proc = run_installed(
            installed,
            "generate",
            "--base-url",
            fake.base_url,
            "--model",
            "m",
            "--yes",
            "--turns",
            "2",
            "--runs-dir",
            str(tmp_path),
            "x",
        )
    assert proc.returncode == 0, proc.stderr
    assert (only_run(tmp_path) / "dialogue" / "transcript.md").exists()

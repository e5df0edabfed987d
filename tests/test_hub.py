"""`pipeline models pull` and `pipeline models list`, with huggingface_hub's real download
code against a fake Hub on 127.0.0.1 (tests/fakehub.py), pointed at with HF_ENDPOINT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import cli
from pipeline.hub import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, default_model_path

from .fakehub import COMMIT, FakeHub, gguf_bytes

REPO = "owner/tiny"
FILE = "tiny.Q4_0.gguf"
DATA = gguf_bytes(4096)
HUB_VARIABLES = ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")


@pytest.fixture(autouse=True)
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache in tmp_path; none of the developer's Hub settings."""
    for name in HUB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    return (tmp_path / "cache" / "models").resolve()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({(REPO, FILE): DATA}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def models(*args: str) -> Result:
    return CliRunner().invoke(cli, ["models", *args])


def pulled_path(models_dir: Path, repo: str = REPO, file: str = FILE) -> Path:
    """Where the Hub's cache layout keeps a file pulled at the fake hub's commit."""
    return models_dir / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT / file


def test_pull_downloads_the_file_and_prints_its_path(hub: FakeHub, models_dir: Path) -> None:
    result = models("pull", REPO, FILE)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{pulled_path(models_dir)}\n"
    assert result.stderr == f"pulling {FILE} from {REPO}...\n"
    assert pulled_path(models_dir).read_bytes() == DATA
    assert hub.count("GET", REPO, FILE) == 1


def test_a_second_pull_uses_the_cache(hub: FakeHub, models_dir: Path) -> None:
    first = models("pull", REPO, FILE)
    second = models("pull", REPO, FILE)
    assert (first.exit_code, second.exit_code) == (0, 0)
    assert second.stdout == first.stdout == f"{pulled_path(models_dir)}\n"
    assert hub.count("GET", REPO, FILE) == 1  # the second pull only asked for the commit (HEAD)
    assert hub.count("HEAD", REPO, FILE) == 2

    asked = len(hub.requests)
    by_commit = models("pull", REPO, FILE, "--revision", COMMIT)
    assert by_commit.exit_code == 0
    assert by_commit.stdout == first.stdout
    assert len(hub.requests) == asked  # a cached commit needs no request at all


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [REPO, "missing.gguf"],
            "missing.gguf was not found in repository owner/tiny at revision main: check the "
            "file name in the list at {url}/owner/tiny/tree/main",
        ),
        (
            ["owner/absent", FILE],
            "repository owner/absent was not found on {url}: check its name, or set HF_TOKEN "
            "if it is private",
        ),
        (
            [REPO, FILE, "--revision", "v9"],
            "revision v9 was not found in repository owner/tiny: give a branch, tag or commit "
            "of the repository",
        ),
    ],
    ids=["missing-file", "missing-repo", "missing-revision"],
)
def test_what_the_hub_does_not_have_is_a_one_line_error(
    hub: FakeHub, models_dir: Path, args: list[str], message: str
) -> None:
    result = models("pull", *args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert (
        result.stderr
        == f"pulling {args[1]} from {args[0]}...\nError: " + message.format(url=hub.url) + "\n"
    )
    assert hub.count("GET", args[0], args[1]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [REPO, "tiny.safetensors"],
            "tiny.safetensors is not a GGUF file (its name does not end in .gguf): choose a "
            ".gguf file from the files of owner/tiny",
        ),
        (
            ["not a repo", FILE],
            "'not a repo' is not a valid repository id: give it as owner/name, with letters, "
            "digits, '-', '_' or '.', e.g. HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    ],
    ids=["not-gguf", "bad-repo-id"],
)
def test_a_bad_request_is_refused_before_asking_the_hub(
    hub: FakeHub, args: list[str], message: str
) -> None:
    result = models("pull", *args)
    assert result.exit_code == 1
    assert result.stderr == f"pulling {args[1]} from {args[0]}...\nError: {message}\n"
    assert hub.requests == []


def test_the_token_comes_from_hf_token_and_is_never_written(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_for_test")
    assert models("pull", REPO, FILE).exit_code == 0
    assert {r.headers.get("authorization") for r in hub.requests} == {
        "Bearer hf_secret_token_for_test"
    }
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert written
    assert not [p for p in written if b"hf_secret_token_for_test" in p.read_bytes()]


def listing_with_the_default_model_to_download() -> str:
    """The first two lines of ``models list`` while the default model is not downloaded."""
    return (
        "MODEL                            FILE                             SIZE            PATH\n"
        "SmolLM2-135M-Instruct (default)  SmolLM2-135M-Instruct.Q4_1.gguf  not downloaded  "
        f"{default_model_path()}\n"
    )


def test_list_shows_the_default_model_and_the_pulled_files(hub: FakeHub, models_dir: Path) -> None:
    assert models("pull", REPO, FILE).exit_code == 0
    result = models("list")
    assert result.exit_code == 0
    assert result.stdout == listing_with_the_default_model_to_download() + (
        "owner/tiny                       tiny.Q4_0.gguf                   0.0 MB          "
        f"{pulled_path(models_dir)}\n"
    )


def test_list_json(hub: FakeHub, models_dir: Path) -> None:
    assert models("pull", REPO, FILE).exit_code == 0
    default = default_model_path()
    default.parent.mkdir(parents=True)
    default.write_bytes(b"GGUF" + bytes(1_499_996))

    result = models("list", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [
        {
            "name": DEFAULT_MODEL_NAME,
            "repo": None,
            "file": DEFAULT_MODEL_FILE,
            "revision": None,
            "size_bytes": 1_500_000,
            "size_mb": 1.5,
            "path": str(default),
            "available": True,
            "default": True,
        },
        {
            "name": REPO,
            "repo": REPO,
            "file": FILE,
            "revision": COMMIT,
            "size_bytes": len(DATA),
            "size_mb": 0.0,
            "path": str(pulled_path(models_dir)),
            "available": True,
            "default": False,
        },
    ]


def test_list_with_nothing_pulled_shows_the_default_model_to_download(models_dir: Path) -> None:
    result = models("list")
    assert result.exit_code == 0
    assert result.stdout == listing_with_the_default_model_to_download()
    assert not models_dir.exists()


def test_without_huggingface_hub_pull_says_what_to_install(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    pulled = models("pull", REPO, FILE)
    assert pulled.exit_code == 1
    assert pulled.stderr == (
        f"pulling {FILE} from {REPO}...\nError: downloading a model needs huggingface_hub, "
        "which is not installed: install it with pip install 'converse-pipeline[local]'\n"
    )
    listed = models("list", "--json")
    assert listed.exit_code == 0
    assert [entry["name"] for entry in json.loads(listed.stdout)] == [DEFAULT_MODEL_NAME]


def _child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HUB_VARIABLES}
    env.update(HF_HOME=str(tmp_path / "hf-home"), PIPELINE_CACHE_DIR=str(tmp_path / "cache"))
    env.update(extra)
    return env


def test_in_a_terminal_pull_shows_a_progress_bar_and_reads_hf_endpoint(
    hub: FakeHub, tmp_path: Path, models_dir: Path
) -> None:
    """A process of its own, so huggingface_hub reads HF_ENDPOINT at import as usual."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "pipeline", "models", "pull", REPO, FILE],
        env=_child_env(tmp_path, HF_ENDPOINT=hub.url),
        encoding="utf-8",
        timeout=30,
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    output = child.before.replace("\r\n", "\n")
    assert f"{FILE}: 100%" in output  # the bar, on the terminal's stderr
    assert output.endswith(f"\n{pulled_path(models_dir)}\n")


def test_an_unreachable_hub_is_a_one_line_error(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 makes huggingface_hub refuse every request, as a network that is down
    would, without the retries that would make this test slow."""
    child = subprocess.run(
        [sys.executable, "-m", "pipeline", "models", "pull", REPO, FILE],
        env=_child_env(tmp_path, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert child.returncode == 1
    assert child.stdout == ""
    assert child.stderr == (
        f"pulling {FILE} from {REPO}...\nError: could not reach the Hub at http://127.0.0.1:9 "
        f"to download {FILE} from {REPO}, and it is not in the cache: check the network "
        "connection (and HF_ENDPOINT, HF_HUB_OFFLINE if set)\n"
    )


@pytest.mark.parametrize("command", ["pull", "list"])
def test_every_models_command_has_help(command: str) -> None:
    result = CliRunner().invoke(cli, ["models", command, "--help"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: cli models {command} [OPTIONS]")

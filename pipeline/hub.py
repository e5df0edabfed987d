"""GGUF model files from the Hugging Face Hub, kept in the user's cache folder.

:func:`pull` downloads one file of a Hub model repository with
:func:`huggingface_hub.hf_hub_download` into :func:`pipeline.cache.models_dir`, which is laid
out as the Hub's own cache: ``models--OWNER--NAME/snapshots/COMMIT/FILE``, a link to
``models--OWNER--NAME/blobs/ETAG``. A file already there is not downloaded again (one HEAD
request asks the Hub which commit the revision is at). :func:`list_models` finds the GGUF
files of that cache with :func:`huggingface_hub.scan_cache_dir`, and adds the embedded
default model, kept at :func:`default_model_path` (another part of the pipeline puts it
there).

huggingface_hub comes with the ``local`` extra and is imported only by the functions that
use it. It reads ``HF_TOKEN`` itself (private and gated repositories); nothing here writes a
token anywhere. ``HF_ENDPOINT`` (a mirror, or a test server) is read at each call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import models_dir
from .errors import ModelFileError, one_line

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FOLDER = "default"  # the default model's folder inside models_dir()
DEFAULT_REVISION = "main"
GGUF_SUFFIX = ".gguf"
INSTALL_HINT = "install it with pip install 'converse-pipeline[local]'"
HUB_FOLDER_PREFIX = "models--"  # how the Hub's cache names a model repository's folder


def default_model_path() -> Path:
    """Where the embedded default model's GGUF file is kept (it may not be there yet):
    ``models_dir()/default/SmolLM2-135M-Instruct.Q4_1.gguf``."""
    return models_dir() / DEFAULT_MODEL_FOLDER / DEFAULT_MODEL_FILE


@dataclass(frozen=True)
class ModelFile:
    """One GGUF file: pulled from the Hub, or the embedded default model.

    Attributes:
        name: the repository a pulled file came from (``"owner/name"``), or the default
            model's name.
        file: the file's name in its repository (``"folder/x.gguf"`` for one in a folder).
        path: where the file is; for a default model not yet downloaded, where it will be.
        size_bytes: the file's size in bytes, or None when it is not downloaded.
        repo: the Hub repository (``"owner/name"``), or None for the default model.
        revision: the commit the file was pulled at (40 hex digits), or None.
    """

    name: str
    file: str
    path: Path
    size_bytes: int | None
    repo: str | None = None
    revision: str | None = None

    @property
    def available(self) -> bool:
        """True when the file is on disk."""
        return self.size_bytes is not None

    @property
    def is_default(self) -> bool:
        """True for the embedded default model's entry."""
        return self.repo is None

    def as_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready data: name, repo, file, revision, size_bytes, size_mb
        (megabytes of 10**6 bytes, one decimal; None when not downloaded), path, available,
        default."""
        size_mb = None if self.size_bytes is None else round(self.size_bytes / 1e6, 1)
        return {
            "name": self.name,
            "repo": self.repo,
            "file": self.file,
            "revision": self.revision,
            "size_bytes": self.size_bytes,
            "size_mb": size_mb,
            "path": str(self.path),
            "available": self.available,
            "default": self.is_default,
        }


def pull(
    repo: str,
    filename: str,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download ``filename`` of the Hub model repository ``repo`` into :func:`models_dir`,
    unless it is there already, and return its local path.

    huggingface_hub shows a progress bar on stderr while it downloads
    (``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it).

    Args:
        repo: the repository, ``"owner/name"``.
        filename: a ``.gguf`` file of the repository, e.g. ``"model.Q4_K_M.gguf"``.
        revision: a branch, tag or commit hash; None means ``main``.
        endpoint: the Hub's URL; None means ``$HF_ENDPOINT``, else https://huggingface.co.

    Returns:
        ``models_dir()/models--OWNER--NAME/snapshots/COMMIT/FILENAME``, an absolute path
        (a symbolic link into the repository's ``blobs/`` where the system has them).

    Raises:
        ModelFileError: the name does not end in ``.gguf``; huggingface_hub is not
            installed; the repository id is malformed; the repository, revision or file
            does not exist (or is private or gated and ``HF_TOKEN`` does not give access);
            the Hub cannot be reached and the file is not in the cache; the Hub answered
            with another HTTP error; the file could not be written.
    """
    if not filename.lower().endswith(GGUF_SUFFIX):
        raise ModelFileError(
            f"{filename} is not a GGUF file (its name does not end in {GGUF_SUFFIX}): "
            f"choose a {GGUF_SUFFIX} file from the files of {repo}",
            repo=repo,
            filename=filename,
        )
    try:
        from huggingface_hub import constants, errors, hf_hub_download
    except ImportError as e:
        raise _not_installed("downloading a model") from e

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    hub = (endpoint or constants.ENDPOINT).rstrip("/")
    at = revision or DEFAULT_REVISION
    try:
        local = hf_hub_download(
            repo, filename, revision=revision, cache_dir=models_dir(), endpoint=endpoint
        )
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as e:
        # huggingface_hub's errors, most specific first, and what each means to the user
        explained = (
            (errors.HFValidationError, f"{repo!r} is not a valid repository id: give it as "
             "owner/name, with letters, digits, '-', '_' or '.', e.g. "
             "HuggingFaceTB/SmolLM2-135M-Instruct"),
            (errors.GatedRepoError, f"{repo} is a gated repository: accept its terms on "
             f"{hub}/{repo}, then set HF_TOKEN to an access token of that account"),
            (errors.RepositoryNotFoundError, f"repository {repo} was not found on {hub}: "
             "check its name, or set HF_TOKEN if it is private"),
            (errors.RevisionNotFoundError, f"revision {at} was not found in repository "
             f"{repo}: give a branch, tag or commit of the repository"),
            (errors.RemoteEntryNotFoundError, f"{filename} was not found in repository "
             f"{repo} at revision {at}: check the file name in the list at "
             f"{hub}/{repo}/tree/{at}"),
            (errors.LocalEntryNotFoundError, f"could not reach the Hub at {hub} to download "
             f"{filename} from {repo}, and it is not in the cache: check the network "
             "connection (and HF_ENDPOINT, HF_HUB_OFFLINE if set)"),
            (errors.HfHubHTTPError, f"the Hub at {hub} refused to send {filename} from "
             f"{repo} ({one_line(e, 160)}): check HF_TOKEN, or try again later"),
            (OSError, f"could not save {filename} from {repo} into {models_dir()} "
             f"({one_line(e, 160)}): free some space there, or set PIPELINE_CACHE_DIR to "
             "another folder"),
        )  # fmt: skip
        kind, message = next((kind, text) for kind, text in explained if isinstance(e, kind))
        path = models_dir() if kind is OSError else None
        raise ModelFileError(message, repo=repo, filename=filename, path=path) from e
    return Path(local)


def list_models() -> list[ModelFile]:
    """The embedded default model's entry, then every GGUF file pulled into
    :func:`models_dir`, sorted by repository, file and commit.

    The default model's entry has ``size_bytes`` None (not downloaded) when
    :func:`default_model_path` is not a file. Without huggingface_hub, only the default
    entry is listed, since nothing can have been pulled.

    Raises:
        ModelFileError: huggingface_hub is not installed but the cache holds pulled files.
    """
    default = default_model_path()
    entries = [
        ModelFile(
            name=DEFAULT_MODEL_NAME,
            file=DEFAULT_MODEL_FILE,
            path=default,
            size_bytes=default.stat().st_size if default.is_file() else None,
        )
    ]
    folder = models_dir()
    if not folder.is_dir():
        return entries
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError as e:
        if any(p.name.startswith(HUB_FOLDER_PREFIX) for p in folder.iterdir()):
            raise _not_installed("listing the pulled models") from e
        return entries
    # Folders that are not Hub repositories (default/) are reported in the scan's
    # warnings, and skipped.
    pulled = [
        ModelFile(
            name=repo.repo_id,
            file=cached.file_path.relative_to(revision.snapshot_path).as_posix(),
            path=cached.file_path,
            size_bytes=cached.size_on_disk,
            repo=repo.repo_id,
            revision=revision.commit_hash,
        )
        for repo in scan_cache_dir(folder).repos
        for revision in repo.revisions
        for cached in revision.files
        if cached.file_name.lower().endswith(GGUF_SUFFIX)
    ]
    return entries + sorted(pulled, key=lambda m: (m.name, m.file, m.revision or ""))


def table(entries: list[ModelFile]) -> str:
    """The entries as an aligned table: MODEL, FILE, SIZE (megabytes, one decimal, or
    ``not downloaded``), PATH; the default model is marked ``(default)``."""
    header = ("MODEL", "FILE", "SIZE")
    rows = [
        (
            f"{m.name} (default)" if m.is_default else m.name,
            m.file,
            "not downloaded" if m.size_bytes is None else f"{m.size_bytes / 1e6:.1f} MB",
        )
        for m in entries
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...], path: str) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + f"  {path}"

    return "\n".join(
        [line(header, "PATH")]
        + [line(row, str(m.path)) for row, m in zip(rows, entries, strict=True)]
    )


def _not_installed(what: str) -> ModelFileError:
    return ModelFileError(f"{what} needs huggingface_hub, which is not installed: {INSTALL_HINT}")

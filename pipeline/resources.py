"""Where the project's data folders (``templates/``, ``schemas/``, ``web/``) are.

In a checkout (and an editable install) they sit at the top of the repository,
beside the ``pipeline`` package; in a built wheel they are shipped inside the
package (see ``[tool.hatch.build.targets.wheel.force-include]``).
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

from .errors import PipelineError

_PACKAGE_DIR = Path(__file__).resolve().parent


@cache
def data_dir(name: str) -> Path:
    """Return the folder ``name`` (``"templates"``, ``"schemas"`` or ``"web"``, the pages
    and assets of ``pipeline view``). The environment variable ``PIPELINE_TEMPLATES_DIR``
    (``PIPELINE_SCHEMAS_DIR``, ``PIPELINE_WEB_DIR``) points at another one,
    for example to try a changed director prompt without editing the installed package.

    Raises:
        PipelineError: the folder named by the variable does not exist, or neither the
            installed nor the checkout location exists (a broken install).
    """
    variable = f"PIPELINE_{name.upper()}_DIR"
    if os.environ.get(variable):
        chosen = Path(os.environ[variable])
        if not chosen.is_dir():
            raise PipelineError(f"{variable} is {chosen}, which is not a folder; fix or unset it")
        return chosen
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise PipelineError(
        f"the '{name}' folder is missing from the installation at {_PACKAGE_DIR}; "
        "reinstall converse-pipeline"
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces (a GGUF can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

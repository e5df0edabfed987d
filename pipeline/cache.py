"""Where downloaded models are kept: the user's cache folder.

``$PIPELINE_CACHE_DIR`` when it is set, else the platform's user cache folder for
``converse-pipeline`` (``platformdirs.user_cache_dir``: ``~/.cache/converse-pipeline`` on
Linux, ``~/Library/Caches/converse-pipeline`` on macOS). GGUF files live in its
``models/`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "converse-pipeline"


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    chosen = os.environ.get("PIPELINE_CACHE_DIR")
    if chosen:
        return Path(chosen).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def models_dir() -> Path:
    """The folder that holds downloaded GGUF files (not created here)."""
    return cache_dir() / "models"

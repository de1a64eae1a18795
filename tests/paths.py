"""Where the shared fixtures are: beside the repository (`../shared`), as laid out for development and CI."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _shared() -> Path:
    override = os.environ.get("IPGUARD_SHARED")
    candidates = [Path(override)] if override else []
    # Beside the repository, or beside one of the folders above it.
    candidates += [parent / "shared" for parent in REPO.parents]
    for candidate in candidates:
        if (candidate / "fixtures" / "apiserver").is_dir():
            return candidate
    raise RuntimeError(f"shared fixtures not found (looked in {', '.join(map(str, candidates))}); set IPGUARD_SHARED")


SHARED = _shared()
FIXTURES = SHARED / "fixtures" / "apiserver"

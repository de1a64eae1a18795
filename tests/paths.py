"""Where the tests' files are: all inside the repository (a fresh clone has everything the suite reads)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "apiserver"

"""CI's confinement (tests/confine/sitecustomize.py): a test run may read only the checkout, its virtualenv and
Python, the temporary folder and the operating system's files; anything else fails the run even where it exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.paths import REPO

CONFINE = REPO / "tests" / "confine"


def run_confined(code: str, log: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IPGUARD_CONFINE_LOG": str(log), "PYTHONPATH": str(CONFINE)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def test_reads_inside_the_checkout_and_the_libraries_pass(tmp_path: Path) -> None:
    log = tmp_path / "outside.log"
    result = run_confined("import aiohttp, boto3, kubernetes_asyncio, webhook.cli\n"
                          "open('tests/fixtures/apiserver/README.md').read()\n"
                          "import os; os.listdir('tests/fixtures/apiserver')", log)
    assert result.returncode == 0, result.stderr
    assert not log.exists()


def test_listing_a_folder_outside_the_checkout_fails_and_is_logged(tmp_path: Path) -> None:
    log = tmp_path / "outside.log"
    result = run_confined("import os\ntry:\n    os.listdir('/')\nexcept OSError:\n    pass  # hides no refusal", log)
    assert result.returncode != 0
    assert "OutsideCheckout" in result.stderr
    assert log.read_text().split()[1:] == ["os.listdir", "/"]


def test_opening_an_existing_file_outside_the_checkout_fails(tmp_path: Path) -> None:
    """A lookup that finds a file beside the checkout on one machine would fail on a bare one."""
    log = tmp_path / "outside.log"
    result = run_confined("open('/bin/sh', 'rb').close()", log)
    assert result.returncode != 0
    assert log.read_text().split()[1:] == ["open", "/bin/sh"]


def test_probing_for_a_missing_file_outside_the_checkout_goes_through(tmp_path: Path) -> None:
    """Libraries look for files that are not there (~/.netrc): that is what a bare machine does too."""
    log = tmp_path / "outside.log"
    result = run_confined("try:\n    open('/ipguard-not-here/x.json')\nexcept FileNotFoundError:\n    pass", log)
    assert result.returncode == 0, result.stderr
    assert not log.exists()

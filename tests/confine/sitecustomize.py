"""Keeps a test run inside the checkout. With IPGUARD_CONFINE_LOG set, every Python process started with this
folder on PYTHONPATH (pytest, and the servers and benchmarks it starts) refuses to open or list an existing path
outside the repository, its virtualenv and Python, the temporary folder and the operating system's own files
(/etc, /dev, /proc, /sys), and writes each refused path to that log. A probe for a file that is not there (a
library looking for ~/.netrc) goes through: it behaves as on a machine with nothing beside the checkout.
`./dev test` sets both when IPGUARD_CONFINE=1 (as `.ci/run` does) and fails on a non-empty log, so a test that
passes only because of something beside the checkout fails CI even where that thing exists.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM = ("/etc", "/dev", "/proc", "/sys", "/usr/share/zoneinfo")
WATCHED = frozenset({"open", "os.listdir", "os.scandir"})


class OutsideCheckout(RuntimeError):
    """A read or write of a path outside the checkout (not an OSError, so no fallback swallows it)."""


def allowed_roots() -> tuple[str, ...]:
    roots = {REPO, tempfile.gettempdir(), *SYSTEM}
    for prefix in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
        roots.add(os.path.abspath(prefix))
    return tuple(sorted(roots))


def inside(path: str, roots: tuple[str, ...]) -> bool:
    absolute = os.path.abspath(path)
    return any(absolute == root or absolute.startswith(root.rstrip("/") + "/") for root in roots)


def install(log: str) -> None:
    roots = allowed_roots()
    busy = False

    def hook(event: str, args: tuple[Any, ...]) -> None:
        nonlocal busy
        if event not in WATCHED or busy or not args:
            return
        path = args[0]
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, str) or inside(path, roots) or not os.path.lexists(path):
            return  # file descriptors, paths inside, and probes for what is not there (as on a bare machine)
        busy = True
        try:
            with open(log, "a", encoding="utf-8") as out:
                out.write(f"{os.getpid()} {event} {os.path.abspath(path)}\n")
        finally:
            busy = False
        raise OutsideCheckout(f"{event} {path!r}: outside the checkout ({REPO})")

    sys.addaudithook(hook)


if os.environ.get("IPGUARD_CONFINE_LOG"):
    install(os.environ["IPGUARD_CONFINE_LOG"])

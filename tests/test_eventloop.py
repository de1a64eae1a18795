"""`ipguard serve` runs on uvloop when it is installed (the image and the development install have it), else on
asyncio's own loop, and says which."""

from __future__ import annotations

import asyncio

from webhook.eventloop import describe, loop_factory, run


async def running_loop() -> str:
    return describe(asyncio.get_running_loop())


def test_auto_picks_uvloop_when_it_is_installed() -> None:
    """The development install has the bench extra (uvloop), as the image has the uvloop extra."""
    name, _ = loop_factory("auto")
    assert name.startswith("uvloop ")
    assert run(running_loop()) == name


def test_asyncio_choice_runs_on_asyncios_own_loop() -> None:
    assert run(running_loop(), "asyncio") == "asyncio"


def test_uvloop_choice_runs_on_uvloop() -> None:
    assert run(running_loop(), "uvloop") == loop_factory("uvloop")[0]

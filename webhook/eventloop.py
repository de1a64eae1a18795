"""Which asyncio event loop ipguard runs on: uvloop when it is installed (the `uvloop` extra, which the image
installs), else asyncio's own selector loop. uvloop's libuv transports take less CPU per TLS request; nothing in
ipguard depends on which loop runs it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from importlib.metadata import version
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopChoice = Literal["auto", "uvloop", "asyncio"]
LOOP_CHOICES: tuple[LoopChoice, ...] = ("auto", "uvloop", "asyncio")


def loop_factory(choice: LoopChoice = "auto") -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop's name (with uvloop's version) and what makes one. `auto`: uvloop if importable, else asyncio;
    `uvloop` raises ImportError when it is not installed."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return f"uvloop {version('uvloop')}", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def describe(loop: asyncio.AbstractEventLoop) -> str:
    """The running loop's name as `loop_factory` gives it: `uvloop <version>` or `asyncio`."""
    module = type(loop).__module__.split(".")[0]
    if module == "uvloop":
        return loop_factory("uvloop")[0]
    return module


def run(main: Coroutine[Any, Any, T], choice: LoopChoice = "auto") -> T:
    """`asyncio.run(main)` on the chosen loop."""
    _, factory = loop_factory(choice)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)

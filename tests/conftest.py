"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live import Moto, start_moto


@pytest.fixture
def moto() -> Iterator[Moto]:
    """An EC2 emulator (moto server) from an empty account."""
    server = start_moto()
    yield server
    server.stop()

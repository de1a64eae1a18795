"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live import Moto, start_moto
from webhook.tls import CertPaths, write_cert_bundle


@pytest.fixture
def moto() -> Iterator[Moto]:
    """An EC2 emulator (moto server) from an empty account."""
    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A CA and a serving certificate for ipguard.ipguard.svc (and 127.0.0.1), one set per test module."""
    return write_cert_bundle(tmp_path_factory.mktemp("certs"), "ipguard", "ipguard", ["127.0.0.1"])

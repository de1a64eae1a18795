"""Fake Kubernetes API server for ipguard tests and benchmarks (see ``server.FakeKube``)."""

from .server import FakeKube, RequestRecord, query_bool
from .store import RESOURCE_TYPES, ApiError, ResourceType, decode_continue, encode_continue

__all__ = [
    "RESOURCE_TYPES",
    "ApiError",
    "FakeKube",
    "RequestRecord",
    "ResourceType",
    "decode_continue",
    "encode_continue",
    "query_bool",
]

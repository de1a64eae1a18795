"""Certificates kept by ipguard itself: a CA and serving certificate in a Secret, the CA bundle in ipguard's
own two webhook configurations, renewed before expiry without a restart.

The Secret is the one source of truth shared by the replicas. Every replica reconciles the same way: read the
Secret, make sure both webhook configurations (only those, by name) carry its CA bundle, take the next step
of the renewal if one is due, and serve the Secret's pair. Writes carry the Secret's resourceVersion, so when
two replicas race exactly one write lands; the loser re-reads and takes the winner's.

Renewal never leaves the apiserver trusting neither certificate (it trusts only ``caBundle``):
  1. at two thirds of the serving certificate's lifetime a next CA and serving certificate are made, and the
     bundle becomes current CA + next CA (still serving the current certificate);
  2. once that bundle is in both webhook configurations and has had ``settle`` seconds to reach every
     apiserver, the next pair is promoted: served by every replica, the old CA still in the bundle;
  3. ``settle`` seconds later (every replica has reloaded by then) the old CA leaves the bundle.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from webhook.tls import generate_ca, generate_serving_cert, service_dns_names, write_serving_pair

log = logging.getLogger("ipguard.certificates")

# Each call to the API server: the client's default is no timeout at all, and a call that never returns would
# stop renewals (and, at start, the listener) for good, with no error to count.
API_TIMEOUT = 15.0

# Secret keys: cert-manager's names for the served pair and its CA, ours for the rest.
TLS_CRT, TLS_KEY, CA_CRT, CA_KEY, BUNDLE = "tls.crt", "tls.key", "ca.crt", "ca.key", "ca-bundle.crt"
NEXT = "next-"
CHANGED_AT = "ipguard.io/ca-bundle-changed-at"
RENEW_AT = 2 / 3


@dataclass(frozen=True, slots=True)
class Pair:
    """A CA and the serving certificate it signed (PEM)."""

    ca_cert: bytes
    ca_key: bytes
    tls_cert: bytes
    tls_key: bytes


@dataclass(frozen=True, slots=True)
class CertState:
    """What the Secret holds: the served pair, a pending next pair, and the CAs the apiserver should trust."""

    current: Pair
    bundle: bytes
    next: Pair | None = None
    changed_at: dt.datetime | None = None  # when the bundle last changed

    @property
    def bundle_b64(self) -> str:
        return base64.b64encode(self.bundle).decode("ascii")


def _leaf(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def renewal_due(cert_pem: bytes, now: dt.datetime) -> bool:
    """True from two thirds of the certificate's lifetime on."""
    cert = _leaf(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= start + (end - start) * RENEW_AT


def _names_covered(cert_pem: bytes, dns_names: Sequence[str]) -> bool:
    try:
        sans = _leaf(cert_pem).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(dns_names) <= set(sans.get_values_for_type(x509.DNSName))


def new_pair(dns_names: Sequence[str], days: int, now: dt.datetime) -> Pair:
    ca_cert, ca_key = generate_ca(days=days, now=now)
    tls_cert, tls_key = generate_serving_cert(ca_cert, ca_key, dns_names, days=days, now=now)
    return Pair(ca_cert, ca_key, tls_cert, tls_key)


def plan(state: CertState | None, now: dt.datetime, *, dns_names: Sequence[str], days: int, settle: float,
         published: bool) -> CertState | None:
    """The next state of the Secret, or None when nothing is due. ``published``: both webhook configurations
    carry ``state.bundle`` now."""
    if state is None or _leaf(state.current.tls_cert).not_valid_after_utc <= now:
        # Nothing usable yet (or already expired: the apiserver trusts nothing we serve anyway).
        pair = new_pair(dns_names, days, now)
        return CertState(pair, pair.ca_cert, None, now)
    settled = state.changed_at is None or (now - state.changed_at).total_seconds() >= settle
    if state.next is None:
        if renewal_due(state.current.tls_cert, now) or not _names_covered(state.current.tls_cert, dns_names):
            upcoming = new_pair(dns_names, days, now)
            return CertState(state.current, state.current.ca_cert + upcoming.ca_cert, upcoming, now)
        if state.bundle != state.current.ca_cert and settled:
            return replace(state, bundle=state.current.ca_cert, changed_at=now)
        return None
    if published and settled:
        return CertState(state.next, state.next.ca_cert + state.current.ca_cert, None, now)
    return None


# ---- the Secret's wire form ---------------------------------------------------------------------------------


def _pair_from(data: dict[str, bytes], prefix: str) -> Pair | None:
    keys = [prefix + k for k in (CA_CRT, CA_KEY, TLS_CRT, TLS_KEY)]
    if not all(data.get(k) for k in keys):
        return None
    return Pair(*(data[k] for k in keys))


def state_from_secret(data: dict[str, str] | None, annotations: dict[str, str] | None) -> CertState | None:
    """The state in a Secret's ``data`` (base64 values); None when it holds no usable pair."""
    try:
        raw = {k: base64.b64decode(v, validate=True) for k, v in (data or {}).items()}
        current = _pair_from(raw, "")
        if current is None:
            return None
        _leaf(current.tls_cert)
        _leaf(current.ca_cert)
    except (binascii.Error, ValueError):
        return None
    changed = (annotations or {}).get(CHANGED_AT)
    try:
        changed_at = dt.datetime.fromisoformat(changed) if changed else None
    except ValueError:
        changed_at = None
    return CertState(current, raw.get(BUNDLE) or current.ca_cert, _pair_from(raw, NEXT), changed_at)


def secret_data(state: CertState) -> dict[str, str]:
    def b64(value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    data = {BUNDLE: b64(state.bundle)}
    pairs = [("", state.current)] + ([(NEXT, state.next)] if state.next else [])
    for prefix, pair in pairs:
        data |= {prefix + CA_CRT: b64(pair.ca_cert), prefix + CA_KEY: b64(pair.ca_key),
                 prefix + TLS_CRT: b64(pair.tls_cert), prefix + TLS_KEY: b64(pair.tls_key)}
    return data


# ---- the keeper ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CertificateKeeper:
    """Keeps the Secret, the two webhook configurations' caBundle and the served files in step."""

    api: k8s.ApiClient
    namespace: str
    cert_file: Path
    key_file: Path
    secret_name: str = "ipguard-tls"
    service: str = "ipguard"
    webhook_configuration: str = "ipguard"
    days: int = 365
    settle: float = 600.0
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    on_served: Callable[[], object] = lambda: None
    state: CertState | None = None
    writes: int = 0
    conflicts: int = 0
    bundle_patches: int = 0
    errors: int = 0
    _served: bytes = b""

    @property
    def dns_names(self) -> list[str]:
        return service_dns_names(self.service, self.namespace)

    async def reconcile(self, attempts: int = 5) -> CertState:
        """One round: read, publish the bundle, take a due step, serve. Returns the state now in the Secret."""
        core = k8s.CoreV1Api(self.api)
        for _ in range(attempts):
            found = await self._read_secret(core)
            state = state_from_secret(found["data"], found["annotations"]) if found else None
            published = state is not None and await self._publish(state)
            upcoming = plan(state, self.now(), dns_names=self.dns_names, days=self.days, settle=self.settle,
                            published=published)
            if upcoming is None:
                assert state is not None
                break
            try:
                await self._write_secret(core, found, upcoming)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # Another replica wrote first (or the Secret was created meanwhile): take what it wrote.
                self.conflicts += 1
                log.info("certificate Secret changed by another writer; reloading it",
                         extra={"fields": {"secret": self.secret_name}})
                continue
            self.writes += 1
            state = upcoming
            log.info("certificate Secret updated", extra={"fields": {
                "secret": self.secret_name, "pending": state.next is not None,
                "cas_trusted": state.bundle.count(b"-----BEGIN CERTIFICATE-----"),
                "expires": _leaf(state.current.tls_cert).not_valid_after_utc.isoformat()}})
            await self._publish(state)
            break
        else:
            raise RuntimeError(f"the Secret {self.namespace}/{self.secret_name} kept changing under {attempts} writes")
        self._serve(state)
        self.state = state
        return state

    async def run(self, period: float) -> None:
        """Reconcile every ``period`` seconds forever (cancel to stop); failures are logged and retried."""
        while True:
            await asyncio.sleep(period)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors += 1
                log.exception("certificate reconcile failed; serving the certificate already loaded")

    # ---- Secret ---------------------------------------------------------------------------------------------

    async def _read_secret(self, core: k8s.CoreV1Api) -> dict[str, Any] | None:
        try:
            secret = await core.read_namespaced_secret(self.secret_name, self.namespace, _request_timeout=API_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        body: dict[str, Any] = self.api.sanitize_for_serialization(secret)
        meta = body.setdefault("metadata", {})
        return {"body": body, "data": body.get("data"), "annotations": meta.get("annotations")}

    async def _write_secret(self, core: k8s.CoreV1Api, found: dict[str, Any] | None, state: CertState) -> None:
        annotations = {CHANGED_AT: state.changed_at.isoformat()} if state.changed_at else {}
        if found is None:
            secret = k8s.V1Secret(
                api_version="v1", kind="Secret", type="Opaque", data=secret_data(state),
                metadata=k8s.V1ObjectMeta(name=self.secret_name, namespace=self.namespace, annotations=annotations,
                                          labels={"app.kubernetes.io/name": "ipguard"}))
            # Created by another replica between our read and our write: 409 AlreadyExists, as a stale update.
            await core.create_namespaced_secret(self.namespace, secret, _request_timeout=API_TIMEOUT)
            return
        body = found["body"]
        # resourceVersion stays in the body: the apiserver refuses the write (409) if the Secret changed since.
        body["metadata"]["annotations"] = {**(body["metadata"].get("annotations") or {}), **annotations}
        body["data"] = secret_data(state)
        await core.replace_namespaced_secret(self.secret_name, self.namespace, body, _request_timeout=API_TIMEOUT)

    # ---- webhook configurations -------------------------------------------------------------------------------

    async def _publish(self, state: CertState) -> bool:
        """Make both webhook configurations carry the bundle; True when both do (or are absent)."""
        admission = k8s.AdmissionregistrationV1Api(self.api)
        kinds = (
            ("mutating", admission.read_mutating_webhook_configuration,
             admission.patch_mutating_webhook_configuration),
            ("validating", admission.read_validating_webhook_configuration,
             admission.patch_validating_webhook_configuration),
        )
        published = True
        for kind, read, patch in kinds:
            try:
                config = await read(self.webhook_configuration, _request_timeout=API_TIMEOUT)
                ops: list[dict[str, Any]] = [
                    {"op": "test", "path": "/metadata/resourceVersion", "value": config.metadata.resource_version}
                ]
                hooks: list[Any] = config.webhooks or []
                for i, hook in enumerate(hooks):
                    if (hook.client_config.ca_bundle or "") != state.bundle_b64:
                        ops += [{"op": "test", "path": f"/webhooks/{i}/name", "value": hook.name},
                                {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle",
                                 "value": state.bundle_b64}]
                if len(ops) > 1:
                    await patch(self.webhook_configuration, ops, _request_timeout=API_TIMEOUT)
                    self.bundle_patches += 1
                    log.info("caBundle published", extra={"fields": {"configuration": kind,
                                                                     "name": self.webhook_configuration}})
            except ApiException as exc:
                if exc.status == 404:
                    continue  # not installed (yet): the apiserver calls nothing that needs the bundle
                published = False
                if exc.status not in (409, 422):  # 409/422: changed while we patched; the next round retries
                    self.errors += 1
                    log.warning("cannot publish the caBundle", extra={"fields": {
                        "configuration": kind, "name": self.webhook_configuration, "status": exc.status,
                        "reason": exc.reason}})
        return published

    # ---- serving ------------------------------------------------------------------------------------------------

    def _serve(self, state: CertState) -> None:
        pair = state.current
        if pair.tls_cert + pair.tls_key == self._served:
            return
        write_serving_pair(self.cert_file, self.key_file, pair.tls_cert, pair.tls_key)
        self._served = pair.tls_cert + pair.tls_key
        self.on_served()

    def ca_expiry(self) -> dt.datetime | None:
        return _leaf(self.state.current.ca_cert).not_valid_after_utc if self.state else None

"""TLS for the admission webhook: a private CA, serving certificates and hot reload.

The kube-apiserver trusts only the webhook configuration's ``caBundle`` and checks the serving certificate's
subjectAltName (never the Common Name), so every serving certificate carries SANs for the Service DNS names
(and any IPs used in a ``url``). ``CertReloader`` serves a cert/key pair from files and picks up rotations
(cert-manager, a re-run of ``ipguard certs``, a Kubernetes Secret update) without restarting the listener.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertLoadError",
    "CertPaths",
    "CertReloader",
    "KeyType",
    "generate_ca",
    "generate_serving_cert",
    "service_dns_names",
    "write_cert_bundle",
    "write_serving_pair",
]

logger = logging.getLogger(__name__)

KeyType = Literal["ecdsa", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Backdate not_before so a node whose clock runs a little behind ours still accepts a fresh certificate.
CLOCK_SKEW = dt.timedelta(minutes=5)
# X.509 caps commonName at 64 characters (ub-common-name); cryptography enforces it.
_MAX_CN_LEN = 64
# RFC 1123 host names; a leading "*." wildcard label is allowed for SANs.
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Kubernetes Service names are DNS-1035 labels (must start with a letter); namespaces are DNS-1123 labels.
_DNS1035_LABEL = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


class CertLoadError(Exception):
    """A certificate/key pair could not be loaded (unreadable, malformed, or key does not match)."""


# --- Generation ------------------------------------------------------------------------------------------


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unsupported key_type {key_type!r}: expected 'ecdsa' or 'rsa'")


def _key_pem(key: PrivateKey) -> bytes:
    # PKCS#8 is what both OpenSSL (ssl module) and Go's crypto/tls accept for either key type.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_private_key(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported CA key type {type(key).__name__}: expected ECDSA or RSA")
    return key


def _validity(days: int, now: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise ValueError(f"certificate validity must be at least 1 day, got {days}")
    now = now or dt.datetime.now(dt.UTC)
    return now - CLOCK_SKEW, now + dt.timedelta(days=days)


def generate_ca(
    common_name: str = "ipguard-ca", days: int = 3650, key_type: KeyType = "ecdsa", *, now: dt.datetime | None = None
) -> tuple[bytes, bytes]:
    """Create a self-signed CA valid from ``now`` (default: the current time); returns ``(cert_pem, key_pem)``.

    path_length=0: this CA signs serving certificates only, never another CA.
    """
    if not 1 <= len(common_name) <= _MAX_CN_LEN:
        raise ValueError(f"CA common name must be 1..{_MAX_CN_LEN} characters, got {len(common_name)}")
    key = _new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days, now)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _check_dns_name(name: str) -> str:
    """Validate a DNS SAN (optionally with one leading ``*.`` wildcard); returns it lower-cased."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid DNS name {name!r}: empty")
    if _is_ip(name):
        raise ValueError(f"invalid DNS name {name!r}: it is an IP address; give it as an IP SAN")
    lowered = name.lower().removesuffix(".")  # a trailing dot (fully qualified) means the same name
    if len(lowered) > 253:
        raise ValueError(f"invalid DNS name {name!r}: longer than 253 characters")
    labels = lowered.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    for label in labels:
        if not _DNS_LABEL.match(label):
            raise ValueError(
                f"invalid DNS name {name!r}: label {label!r} must be 1-63 characters of a-z, 0-9 and '-', "
                "starting and ending with a letter or digit"
            )
    if labels[-1].isdigit():
        # Top-level labels are never all-numeric; this is almost surely a mistyped IP address.
        raise ValueError(f"invalid DNS name {name!r}: looks like an IP address but is not a valid one")
    return lowered


def _check_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise ValueError(f"invalid IP address {address!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError(f"invalid IP address {address!r}: a scoped IPv6 address cannot be a SAN")
    return ip


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def generate_serving_cert(
    ca_cert_pem: bytes,
    ca_key_pem: bytes,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    days: int = 365,
    key_type: KeyType = "ecdsa",
    *,
    now: dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Issue a TLS server certificate signed by the CA, valid from ``now`` (default: the current time); returns
    ``(cert_pem, key_pem)``.

    CN is the first DNS name for humans only: clients (the apiserver, Python with
    ``hostname_checks_common_name=False``) match the SANs.
    """
    if isinstance(dns_names, str) or isinstance(ip_addresses, str):
        raise TypeError("dns_names and ip_addresses must be sequences of strings, not a single string")
    dns = list(dict.fromkeys(_check_dns_name(n) for n in dns_names))
    ips = list(dict.fromkeys(_check_ip(a) for a in ip_addresses))
    if not dns and not ips:
        raise ValueError("a serving certificate needs at least one DNS name or IP address")

    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        ca_key = _load_private_key(ca_key_pem)
    except ValueError as exc:
        raise ValueError(f"cannot load the CA certificate/key: {exc}") from exc
    if ca_cert.public_key() != ca_key.public_key():
        raise ValueError("the CA key does not match the CA certificate")

    key = _new_key(key_type)
    not_before, not_after = _validity(days, now)
    cn = dns[0] if dns else str(ips[0])
    # An empty subject is allowed only with a critical SAN (RFC 5280 4.2.1.6); used when the name is too long.
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if len(cn) <= _MAX_CN_LEN else [])
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    sans += [x509.IPAddress(ip) for ip in ips]
    try:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        )
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=not subject.rdns)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key exchange (TLS 1.2 non-ECDHE suites) encrypts to the key; ECDSA keys never do.
                key_encipherment=key_type == "rsa",
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def service_dns_names(service: str, namespace: str) -> list[str]:
    """The names a Service is reachable by in-cluster; the apiserver dials ``<service>.<namespace>.svc``."""
    if not isinstance(service, str) or not _DNS1035_LABEL.match(service):
        raise ValueError(
            f"invalid Service name {service!r}: must be a DNS-1035 label "
            "(1-63 characters of a-z, 0-9 and '-', starting with a letter, ending with a letter or digit)"
        )
    if not isinstance(namespace, str) or not _DNS_LABEL.match(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: must be a DNS-1123 label "
            "(1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit)"
        )
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    ]


# --- Files -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    tls_cert: Path
    tls_key: Path
    # base64 of the CA certificate PEM: the value of a webhook configuration's clientConfig.caBundle.
    ca_bundle_b64: str


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file in the same directory + os.replace, so readers (and a watching CertReloader)
    see either the old or the new file, never a half-written one; the mode is set before any byte lands."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_cert_bundle(
    out_dir: Path,
    service: str,
    namespace: str,
    extra_sans: Sequence[str] = (),
    *,
    key_type: KeyType = "ecdsa",
    ca_days: int = 3650,
    days: int = 365,
) -> CertPaths:
    """Generate a fresh CA and serving certificate for ``service.namespace`` and write ``ca.crt``, ``ca.key``,
    ``tls.crt``, ``tls.key`` into ``out_dir`` (keys 0600). Extra SANs that parse as IPs become IP SANs."""
    if isinstance(extra_sans, str):
        raise TypeError("extra_sans must be a sequence of strings, not a single string")
    dns = service_dns_names(service, namespace)
    ips: list[str] = []
    for san in extra_sans:
        san = san.strip()
        if _is_ip(san):
            ips.append(str(_check_ip(san)))
        else:
            dns.append(_check_dns_name(san))

    ca_cert, ca_key = generate_ca(days=ca_days, key_type=key_type)
    tls_cert, tls_key = generate_serving_cert(ca_cert, ca_key, dns, ips, days=days, key_type=key_type)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(
        ca_cert=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        tls_cert=out_dir / "tls.crt",
        tls_key=out_dir / "tls.key",
        ca_bundle_b64=base64.b64encode(ca_cert).decode("ascii"),
    )
    _atomic_write(paths.ca_key, ca_key, 0o600)
    _atomic_write(paths.ca_cert, ca_cert, 0o644)
    write_serving_pair(paths.tls_cert, paths.tls_key, tls_cert, tls_key)
    return paths


def write_serving_pair(cert_file: Path, key_file: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Write a serving certificate and its key (0600) for a ``CertReloader`` watching those files."""
    # Key before certificate: a reloader that looks between the two writes sees a mismatched pair and refuses
    # it (retrying on the next change) rather than serving anything inconsistent.
    _atomic_write(key_file, key_pem, 0o600)
    _atomic_write(cert_file, cert_pem, 0o644)


# --- Serving and hot reload ------------------------------------------------------------------------------


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(2, f"TLS {what} file not found", str(path)) from None
    except OSError as exc:
        raise CertLoadError(f"cannot read TLS {what} file {path}: {exc}") from exc


@dataclass(frozen=True)
class _Loaded:
    context: ssl.SSLContext
    fingerprint: str
    not_after: dt.datetime
    serial: int
    loaded_at: float


class _ChangedWhileLoading(Exception):
    """The files changed while OpenSSL was reading them (a rotation in progress)."""


class CertReloader:
    """Serves a certificate/key file pair and reloads it when the files change, without a new listener.

    Pass ``reloader.context`` as the listener's SSL context once. Each reload builds a complete new
    ``SSLContext`` from the files and publishes it by swapping one reference; the listener context's
    ``sni_callback`` (which OpenSSL runs for every ClientHello, with or without SNI) switches each new
    handshake to the current one. Calling ``load_cert_chain`` again on the live context would also reach new
    handshakes, but a failed call (e.g. mismatched key) leaves that context unable to handshake at all; a
    separate context means a bad pair never touches what is serving. Established connections keep the
    certificate they were made with.

    Run ``watch(interval)`` as a background task (e.g. from an aiohttp ``cleanup_ctx``).
    """

    def __init__(self, cert_file: Path | str, key_file: Path | str, *, allow_missing: bool = False) -> None:
        """Load the pair now; a missing file raises FileNotFoundError naming it, a bad pair CertLoadError.

        With ``allow_missing`` a missing pair is tolerated: ``ready`` stays False (handshakes fail) until
        ``maybe_reload``/``watch`` finds the files.
        """
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self._current: _Loaded | None = None
        self._failed_key: str | None = None
        self.last_error: str | None = None
        self.reloads = 0
        self.reload_failures = 0
        try:
            self._current = self._load_settled()
        except FileNotFoundError:
            if not allow_missing:
                raise
            logger.warning("TLS certificate %s / key %s not present yet", self.cert_file, self.key_file)
        # The listener context: fixed for the server's lifetime; its certificate (if any) is the first one.
        self._listener = self._current.context if self._current else self._new_context()
        self._listener.sni_callback = self._select_context

    # -- public state ------------------------------------------------------------------------------------

    @property
    def context(self) -> ssl.SSLContext:
        """The SSLContext to give the listener (stays the same object across reloads)."""
        return self._listener

    @property
    def ready(self) -> bool:
        """A certificate is loaded and new handshakes can succeed."""
        return self._current is not None

    @property
    def loaded_at(self) -> float | None:
        """Unix time the serving certificate was (re)loaded."""
        return self._current.loaded_at if self._current else None

    @property
    def not_after(self) -> dt.datetime | None:
        """Expiry (UTC) of the serving certificate."""
        return self._current.not_after if self._current else None

    @property
    def serial_number(self) -> int | None:
        return self._current.serial if self._current else None

    # -- reload ------------------------------------------------------------------------------------------

    def maybe_reload(self) -> bool:
        """Reload if the files' contents changed. True if a new certificate is now served; False if nothing
        changed or the new pair was refused (then ``last_error`` says why and the old certificate stays)."""
        try:
            _, fingerprint = self._read_pair()
        except (FileNotFoundError, CertLoadError) as exc:
            # Deleted or unreadable (mid-rotation?): keep serving what we have.
            return self._refuse(f"error:{exc}", str(exc))
        if self._current is not None and fingerprint == self._current.fingerprint:
            # Back to (or still at) the pair being served: any earlier refusal no longer applies.
            self._failed_key = None
            self.last_error = None
            return False
        if fingerprint == self._failed_key:
            return False  # already refused exactly these bytes; wait for them to change again
        try:
            loaded = self._load()
        except _ChangedWhileLoading:
            return False  # caught a rotation half-way; the next check sees the settled files
        except (FileNotFoundError, CertLoadError) as exc:
            return self._refuse(fingerprint, str(exc))
        previous = self._current
        self._current = loaded  # one reference swap: the next handshake's sni_callback picks it up
        self._failed_key = None
        self.last_error = None
        self.reloads += 1
        logger.info(
            "TLS certificate reloaded from %s (serial %x, expires %s; previous serial %s)",
            self.cert_file,
            loaded.serial,
            loaded.not_after.isoformat(),
            f"{previous.serial:x}" if previous else "none",
        )
        return True

    async def watch(self, interval: float = 10.0) -> None:
        """Poll for changed files forever (cancel to stop). Polling rather than inotify: Secret volumes
        update by symlink swap, which is awkward to watch reliably, and a few-second delay is harmless."""
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        while True:
            await asyncio.sleep(interval)
            try:
                self.maybe_reload()
            except Exception:  # never let the watcher die: the old certificate is still good
                logger.exception("unexpected error while checking TLS certificate files")

    # -- internals ---------------------------------------------------------------------------------------

    def _refuse(self, failure_key: str, error: str) -> bool:
        # Log and count each distinct failure once, not on every poll.
        if failure_key != self._failed_key:
            self.reload_failures += 1
            logger.error(
                "TLS certificate reload refused (%s): %s",
                "keeping the current certificate" if self._current else "no certificate loaded",
                error,
            )
        self._failed_key = failure_key
        self.last_error = error
        return False

    def _read_pair(self) -> tuple[bytes, str]:
        """Return the certificate bytes and a content hash of both files.

        Content, read through the symlinks, rather than mtime/inode: a Kubernetes Secret volume rotates by
        re-pointing ``..data`` at a new timestamped directory, an in-place same-size rewrite can keep the
        mtime, and the files are a few KiB.
        """
        cert_pem = _read_file(self.cert_file, "certificate")
        key_pem = _read_file(self.key_file, "key")
        digest = hashlib.sha256()
        for data in (cert_pem, key_pem):
            digest.update(len(data).to_bytes(8, "big"))
            digest.update(data)
        return cert_pem, digest.hexdigest()

    @staticmethod
    def _new_context() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # The apiserver speaks HTTP/1.1 to webhooks, and aiohttp serves only HTTP/1.1.
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def _load(self) -> _Loaded:
        cert_pem, fingerprint = self._read_pair()
        try:
            leaf = x509.load_pem_x509_certificates(cert_pem)[0]
        except ValueError as exc:
            raise CertLoadError(f"{self.cert_file}: not a PEM certificate ({exc})") from exc
        ctx = self._new_context()
        try:
            # Also checks the key against the certificate ("key values mismatch").
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except FileNotFoundError as exc:
            missing = self.cert_file if not self.cert_file.exists() else self.key_file
            raise FileNotFoundError(2, "TLS certificate/key file not found", str(missing)) from exc
        except (ssl.SSLError, OSError) as exc:
            raise CertLoadError(
                f"cannot load certificate {self.cert_file} with key {self.key_file}: {exc}"
            ) from exc
        # OpenSSL read the files again: if they changed meanwhile, what it loaded may not be what we hashed.
        if self._read_pair()[1] != fingerprint:
            raise _ChangedWhileLoading
        if leaf.not_valid_after_utc <= dt.datetime.now(dt.UTC):
            logger.warning("TLS certificate %s expired at %s", self.cert_file, leaf.not_valid_after_utc)
        return _Loaded(
            context=ctx,
            fingerprint=fingerprint,
            not_after=leaf.not_valid_after_utc,
            serial=leaf.serial_number,
            loaded_at=time.time(),
        )

    def _load_settled(self, attempts: int = 3) -> _Loaded:
        for _ in range(attempts - 1):
            with contextlib.suppress(_ChangedWhileLoading):
                return self._load()
            time.sleep(0.1)
        try:
            return self._load()
        except _ChangedWhileLoading:
            raise CertLoadError(
                f"{self.cert_file} / {self.key_file} keep changing while being loaded"
            ) from None

    def _select_context(
        self, ssl_obj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, ctx: ssl.SSLContext
    ) -> int | None:
        # Called by OpenSSL for every ClientHello on the listener context (also when no SNI is sent, as
        # when the apiserver dials an IP URL). Must not raise: that would abort the handshake.
        current = self._current
        if current is not None and current.context is not ctx:
            ssl_obj.context = current.context
        return None

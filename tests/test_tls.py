"""webhook.tls over real TLS: a real aiohttp HTTPS listener on 127.0.0.1, clients verifying like the apiserver
(trust only the generated CA, check the service DNS name against SANs, never the Common Name)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import re
import ssl
import stat
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from webhook.tls import (
    CertLoadError,
    CertPaths,
    CertReloader,
    generate_ca,
    generate_serving_cert,
    service_dns_names,
    write_cert_bundle,
)

SERVICE = "ipguard"
NAMESPACE = "ipguard"
SVC_NAME = "ipguard.ipguard.svc"
ALL_NAMES = ["ipguard", "ipguard.ipguard", "ipguard.ipguard.svc", "ipguard.ipguard.svc.cluster.local"]
TIMEOUT = 10


# --- helpers ----------------------------------------------------------------------------------------------


def apiserver_like_client(cafile: Path) -> ssl.SSLContext:
    """Trust only the given CA and match the host name against SANs only, as Go's crypto/tls does."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = True
    ctx.hostname_checks_common_name = False
    return ctx


@asynccontextmanager
async def https_server(ssl_context: ssl.SSLContext) -> AsyncIterator[int]:
    """A real aiohttp HTTPS listener on 127.0.0.1:<ephemeral>; yields the port."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield port
    finally:
        await runner.cleanup()


async def https_get(port: int, client: ssl.SSLContext, server_hostname: str) -> str:
    """GET / over HTTPS to 127.0.0.1, verifying the certificate against server_hostname."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
        session.get(f"https://127.0.0.1:{port}/", ssl=client, server_hostname=server_hostname) as resp,
    ):
        assert resp.status == 200
        return await resp.text()


@asynccontextmanager
async def tls_connection(
    port: int, client: ssl.SSLContext, server_hostname: str | None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=server_hostname
        )
    try:
        yield reader, writer
    finally:
        writer.close()
        # The peer may already have reset the connection; closing is best effort.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(TIMEOUT):
                await writer.wait_closed()


async def served_cert(port: int, client: ssl.SSLContext, server_hostname: str | None) -> x509.Certificate:
    """Handshake (verifying per `client`) and return the certificate the server presented."""
    async with tls_connection(port, client, server_hostname) as (_, writer):
        ssl_obj = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)


async def http_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nHost: ipguard.ipguard.svc\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(2)
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def memory_handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None
) -> None:
    """Run a TLS handshake between two in-memory SSLObjects; the server's own error propagates.

    Over a socket the server side of a refused handshake is only visible to the client as a reset; this
    shows what the server context itself decided.
    """
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, obj, out, peer_in in (("client", client, c_out, s_in), ("server", server, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


@pytest.fixture
def bundle(tmp_path: Path) -> CertPaths:
    return write_cert_bundle(tmp_path / "certs", SERVICE, NAMESPACE, ["127.0.0.1", "ipguard.example.com"])


@pytest.fixture
def other_bundle(tmp_path: Path) -> CertPaths:
    """Same names, a different CA: what a rotation (or a wrong caBundle) looks like."""
    return write_cert_bundle(tmp_path / "other", SERVICE, NAMESPACE, ["127.0.0.1"])


# --- hostname verification ----------------------------------------------------------------------------------


async def test_all_service_names_verify_over_https(bundle: CertPaths) -> None:
    reloader = CertReloader(bundle.tls_cert, bundle.tls_key)
    client = apiserver_like_client(bundle.ca_cert)
    async with https_server(reloader.context) as port:
        for name in [*ALL_NAMES, "ipguard.example.com"]:
            assert await https_get(port, client, name) == "ok", name


async def test_ip_san_verifies_without_sni_and_alpn_is_http11(bundle: CertPaths) -> None:
    # An apiserver `url: https://<ip>/...` sends no SNI; the listener must still present the certificate.
    reloader = CertReloader(bundle.tls_cert, bundle.tls_key)
    client = apiserver_like_client(bundle.ca_cert)
    client.set_alpn_protocols(["h2", "http/1.1"])
    async with https_server(reloader.context) as port, tls_connection(port, client, "127.0.0.1") as (r, w):
        ssl_obj = w.get_extra_info("ssl_object")
        assert ssl_obj.server_hostname == "127.0.0.1"
        assert ssl_obj.selected_alpn_protocol() == "http/1.1"
        assert ssl_obj.version() == "TLSv1.3"
        assert await http_over(r, w) == b"ok"


@pytest.mark.parametrize(
    "name", ["other.ipguard.svc", "ipguard.other.svc", "ipguard.ipguard.svc.evil", "10.0.0.1"]
)
async def test_wrong_name_fails(bundle: CertPaths, name: str) -> None:
    reloader = CertReloader(bundle.tls_cert, bundle.tls_key)
    client = apiserver_like_client(bundle.ca_cert)
    async with https_server(reloader.context) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            await served_cert(port, client, name)
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await https_get(port, client, name)


async def test_cn_only_certificate_fails_hostname_check(bundle: CertPaths, tmp_path: Path) -> None:
    # The apiserver rejects these ("x509: certificate relies on legacy Common Name field"); so must we.
    ca_cert = cert_of(bundle.ca_cert)
    ca_key = serialization.load_pem_private_key(bundle.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cn_only = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SVC_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cn.crt", tmp_path / "cn.key"
    cert_file.write_bytes(cn_only.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    reloader = CertReloader(cert_file, key_file)
    async with https_server(reloader.context) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            await served_cert(port, apiserver_like_client(bundle.ca_cert), SVC_NAME)
        # Control: the chain is fine, only the CN fallback was refused (Python's default would accept it).
        lenient = apiserver_like_client(bundle.ca_cert)
        lenient.hostname_checks_common_name = True
        assert (await served_cert(port, lenient, SVC_NAME)).serial_number == cn_only.serial_number


async def test_client_trusting_another_ca_fails(bundle: CertPaths, other_bundle: CertPaths) -> None:
    reloader = CertReloader(bundle.tls_cert, bundle.tls_key)
    async with https_server(reloader.context) as port:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await served_cert(port, apiserver_like_client(other_bundle.ca_cert), SVC_NAME)
        assert info.value.verify_code == 20  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY


def _tls_client_capped(cafile: Path, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    client = apiserver_like_client(cafile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1/TLSv1_1 enum members are deprecated
        client.minimum_version = ssl.TLSVersion.TLSv1
        client.maximum_version = maximum
    # OpenSSL 3 cannot even offer TLS < 1.2 at the default security level; lower it so the *server* refuses.
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    return client


async def test_tls11_client_is_refused(bundle: CertPaths) -> None:
    reloader = CertReloader(bundle.tls_cert, bundle.tls_key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tls11 = ssl.TLSVersion.TLSv1_1
    assert reloader.context.minimum_version == ssl.TLSVersion.TLSv1_2
    old_client = _tls_client_capped(bundle.ca_cert, tls11)
    async with https_server(reloader.context) as port:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await served_cert(port, old_client, SVC_NAME)
        # Same client settings capped at TLS 1.2 get through: the version is what was refused.
        ok = await served_cert(port, _tls_client_capped(bundle.ca_cert, ssl.TLSVersion.TLSv1_2), SVC_NAME)
        assert ok.serial_number == cert_of(bundle.tls_cert).serial_number
    # The server's own verdict (over a socket the client only sees the connection drop).
    with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL"):
        memory_handshake(reloader.context, _tls_client_capped(bundle.ca_cert, tls11), SVC_NAME)


async def test_rsa_key_type_serves(tmp_path: Path) -> None:
    paths = write_cert_bundle(tmp_path, SERVICE, NAMESPACE, key_type="rsa")
    key = serialization.load_pem_private_key(paths.tls_key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    reloader = CertReloader(paths.tls_cert, paths.tls_key)
    async with https_server(reloader.context) as port:
        assert await https_get(port, apiserver_like_client(paths.ca_cert), SVC_NAME) == "ok"


# --- reload -------------------------------------------------------------------------------------------------


def test_live_load_cert_chain_experiment(bundle: CertPaths, other_bundle: CertPaths) -> None:
    """Why CertReloader swaps whole contexts: re-loading into the live context does reach new handshakes,
    but a failed load (mismatched key) leaves that context unable to handshake at all."""
    live = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    live.load_cert_chain(bundle.tls_cert, bundle.tls_key)
    memory_handshake(live, apiserver_like_client(bundle.ca_cert), SVC_NAME)
    live.load_cert_chain(other_bundle.tls_cert, other_bundle.tls_key)
    memory_handshake(live, apiserver_like_client(other_bundle.ca_cert), SVC_NAME)  # new cert in effect
    with pytest.raises(ssl.SSLError, match="KEY_VALUES_MISMATCH"):
        live.load_cert_chain(bundle.tls_cert, other_bundle.tls_key)
    with pytest.raises(ssl.SSLError):  # neither the old nor the new certificate is served any more
        memory_handshake(live, apiserver_like_client(other_bundle.ca_cert), SVC_NAME)


async def test_rotation_to_new_ca_without_restarting_listener(bundle: CertPaths) -> None:
    reloader = CertReloader(bundle.tls_cert, bundle.tls_key)
    listener_ctx = reloader.context
    first_serial = reloader.serial_number
    old_client = apiserver_like_client(bundle.ca_cert)
    async with https_server(listener_ctx) as port, tls_connection(port, old_client, SVC_NAME) as (r, w):
        assert await http_over(r, w) == b"ok"
        # Rotate: the same paths now hold a certificate from a brand-new CA.
        rotated = write_cert_bundle(bundle.tls_cert.parent, SERVICE, NAMESPACE, ["127.0.0.1"])
        new_ca_file = rotated.ca_cert.parent / "new-ca.crt"
        new_ca_file.write_bytes(rotated.ca_cert.read_bytes())
        new_client = apiserver_like_client(new_ca_file)

        # Not reloaded yet: still the old certificate.
        with pytest.raises(ssl.SSLCertVerificationError):
            await served_cert(port, new_client, SVC_NAME)

        assert reloader.maybe_reload() is True
        assert reloader.maybe_reload() is False  # nothing changed since
        assert reloader.context is listener_ctx
        assert reloader.serial_number != first_serial
        assert reloader.reloads == 1

        # NEW connections on the SAME port get the new certificate.
        served = await served_cert(port, new_client, SVC_NAME)
        assert served == cert_of(rotated.tls_cert)
        assert await https_get(port, new_client, SVC_NAME) == "ok"
        assert await https_get(port, new_client, "127.0.0.1") == "ok"  # and without SNI
        with pytest.raises(ssl.SSLCertVerificationError):
            await served_cert(port, old_client, SVC_NAME)
        # The connection made before the rotation keeps working.
        assert await http_over(r, w) == b"ok"


def _k8s_secret_dir(mount: Path, generation: str, paths: CertPaths) -> None:
    """Lay out / update a directory the way kubelet projects a Secret volume (AtomicWriter)."""
    data_dir = mount / f"..{generation}"
    data_dir.mkdir()
    (data_dir / "tls.crt").write_bytes(paths.tls_cert.read_bytes())
    (data_dir / "tls.key").write_bytes(paths.tls_key.read_bytes())
    tmp_link = mount / "..data_tmp"
    tmp_link.symlink_to(data_dir.name)
    old = (mount / "..data").resolve() if (mount / "..data").is_symlink() else None
    os.replace(tmp_link, mount / "..data")  # the atomic switch
    for name in ("tls.crt", "tls.key"):
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")
    if old is not None:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


async def test_kubernetes_symlink_swap_rotation_detected(
    tmp_path: Path, bundle: CertPaths, other_bundle: CertPaths
) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()
    _k8s_secret_dir(mount, "2024_01_01_00_00_00.000000001", bundle)
    reloader = CertReloader(mount / "tls.crt", mount / "tls.key")
    assert reloader.maybe_reload() is False
    async with https_server(reloader.context) as port:
        assert await served_cert(port, apiserver_like_client(bundle.ca_cert), SVC_NAME) == cert_of(
            bundle.tls_cert
        )
        _k8s_secret_dir(mount, "2024_02_01_00_00_00.000000002", other_bundle)
        assert reloader.maybe_reload() is True
        served = await served_cert(port, apiserver_like_client(other_bundle.ca_cert), SVC_NAME)
        assert served == cert_of(other_bundle.tls_cert)


async def test_watch_task_picks_up_rotation(bundle: CertPaths, other_bundle: CertPaths) -> None:
    reloader = CertReloader(bundle.tls_cert, bundle.tls_key)
    task = asyncio.create_task(reloader.watch(0.02))
    try:
        async with https_server(reloader.context) as port:
            for src, dst in (
                (other_bundle.tls_key, bundle.tls_key),
                (other_bundle.tls_cert, bundle.tls_cert),
            ):
                dst.write_bytes(src.read_bytes())
            for _ in range(TIMEOUT * 100):  # up to TIMEOUT seconds for the watcher's next poll
                if reloader.reloads:
                    break
                await asyncio.sleep(0.01)
            assert reloader.reloads == 1
            served = await served_cert(port, apiserver_like_client(other_bundle.ca_cert), SVC_NAME)
            assert served == cert_of(other_bundle.tls_cert)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_bad_new_pair_is_refused_and_old_cert_keeps_serving(
    bundle: CertPaths, other_bundle: CertPaths, caplog: pytest.LogCaptureFixture
) -> None:
    reloader = CertReloader(bundle.tls_cert, bundle.tls_key)
    original = cert_of(bundle.tls_cert)
    old_client = apiserver_like_client(bundle.ca_cert)
    good_cert, good_key = bundle.tls_cert.read_bytes(), bundle.tls_key.read_bytes()
    async with https_server(reloader.context) as port:
        # 1. Half-written certificate file.
        with caplog.at_level(logging.ERROR, logger="webhook.tls"):
            bundle.tls_cert.write_bytes(good_cert[: len(good_cert) // 2])
            assert reloader.maybe_reload() is False
        assert reloader.last_error is not None and str(bundle.tls_cert) in reloader.last_error
        assert reloader.reload_failures == 1
        assert "reload refused" in caplog.text
        assert await served_cert(port, old_client, SVC_NAME) == original
        assert reloader.maybe_reload() is False and reloader.reload_failures == 1  # logged once, not per poll

        # 2. Key file deleted mid-rotation.
        bundle.tls_cert.write_bytes(good_cert)
        bundle.tls_key.unlink()
        assert reloader.maybe_reload() is False
        assert reloader.last_error is not None and str(bundle.tls_key) in reloader.last_error
        assert reloader.reload_failures == 2
        assert reloader.ready
        assert await https_get(port, old_client, SVC_NAME) == "ok"
        bundle.tls_key.write_bytes(good_key)
        assert reloader.maybe_reload() is False  # the served pair again: nothing to do, no error left
        assert reloader.last_error is None

        # 3. New certificate written before its key: the pair does not match yet.
        bundle.tls_cert.write_bytes(other_bundle.tls_cert.read_bytes())
        assert reloader.maybe_reload() is False
        assert reloader.last_error is not None and "mismatch" in reloader.last_error.lower()
        assert reloader.reload_failures == 3
        assert await served_cert(port, old_client, SVC_NAME) == original

        # The key arrives and completes the rotation: accepted.
        bundle.tls_key.write_bytes(other_bundle.tls_key.read_bytes())
        assert reloader.maybe_reload() is True
        assert reloader.last_error is None
        served = await served_cert(port, apiserver_like_client(other_bundle.ca_cert), SVC_NAME)
        assert served == cert_of(other_bundle.tls_cert)


def test_missing_files_raise_naming_the_path(tmp_path: Path, bundle: CertPaths) -> None:
    missing = tmp_path / "nope" / "tls.crt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        CertReloader(missing, bundle.tls_key)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.key"))):
        CertReloader(bundle.tls_cert, tmp_path / "absent.key")
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"not a certificate")
    with pytest.raises(CertLoadError, match=re.escape(str(garbage))):
        CertReloader(garbage, bundle.tls_key)


async def test_allow_missing_starts_unready_then_serves(tmp_path: Path) -> None:
    out = tmp_path / "late"
    reloader = CertReloader(out / "tls.crt", out / "tls.key", allow_missing=True)
    assert not reloader.ready and reloader.not_after is None and reloader.loaded_at is None
    async with https_server(reloader.context) as port:
        paths = write_cert_bundle(out, SERVICE, NAMESPACE)
        client = apiserver_like_client(paths.ca_cert)
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await served_cert(port, client, SVC_NAME)
        assert reloader.maybe_reload() is True
        assert reloader.ready and reloader.loaded_at is not None
        assert reloader.not_after == cert_of(paths.tls_cert).not_valid_after_utc
        assert await https_get(port, client, SVC_NAME) == "ok"


# --- files and certificate contents -------------------------------------------------------------------------


def test_bundle_files_modes_and_ca_bundle(bundle: CertPaths) -> None:
    for key in (bundle.ca_key, bundle.tls_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for cert in (bundle.ca_cert, bundle.tls_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644, cert
    assert sorted(p.name for p in bundle.tls_cert.parent.iterdir()) == [
        "ca.crt",
        "ca.key",
        "tls.crt",
        "tls.key",
    ]
    assert base64.b64decode(bundle.ca_bundle_b64) == bundle.ca_cert.read_bytes()


def test_rewrite_replaces_files_and_tightens_key_mode(tmp_path: Path) -> None:
    key = tmp_path / "tls.key"
    key.write_bytes(b"old")
    key.chmod(0o644)
    paths = write_cert_bundle(tmp_path, SERVICE, NAMESPACE)
    assert stat.S_IMODE(paths.tls_key.stat().st_mode) == 0o600
    assert paths.tls_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_serving_cert_contents(bundle: CertPaths) -> None:
    ca, leaf = cert_of(bundle.ca_cert), cert_of(bundle.tls_cert)
    leaf.verify_directly_issued_by(ca)

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [*ALL_NAMES, "ipguard.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ipguard"

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment and not ku.key_cert_sign
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    now = dt.datetime.now(dt.UTC)
    assert now - dt.timedelta(minutes=10) < leaf.not_valid_before_utc <= now - dt.timedelta(minutes=4)
    assert dt.timedelta(days=364) < leaf.not_valid_after_utc - now <= dt.timedelta(days=365)


def test_ca_contents() -> None:
    ca_pem, key_pem = generate_ca("test-ca", days=30)
    ca = x509.load_pem_x509_certificate(ca_pem)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test-ca"
    assert isinstance(serialization.load_pem_private_key(key_pem, None), ec.EllipticCurvePrivateKey)


def test_rsa_serving_cert_has_key_encipherment() -> None:
    ca_pem, ca_key = generate_ca(key_type="rsa")
    cert_pem, key_pem = generate_serving_cert(
        ca_pem, ca_key, ["a.b.svc"], ["10.0.0.1", "fd00::1"], key_type="rsa"
    )
    leaf = x509.load_pem_x509_certificate(cert_pem)
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1", "fd00::1"]
    assert isinstance(serialization.load_pem_private_key(key_pem, None), rsa.RSAPrivateKey)


def test_service_dns_names() -> None:
    assert service_dns_names("ipguard", "kube-system") == [
        "ipguard",
        "ipguard.kube-system",
        "ipguard.kube-system.svc",
        "ipguard.kube-system.svc.cluster.local",
    ]


@pytest.mark.parametrize(
    ("service", "namespace", "message"),
    [
        ("Ipguard", "ipguard", "invalid Service name 'Ipguard'"),
        ("ip_guard", "ipguard", "invalid Service name"),
        ("1pguard", "ipguard", "invalid Service name"),
        ("ipguard", "ip.guard", "invalid namespace 'ip.guard'"),
        ("ipguard", "", "invalid namespace"),
        ("x" * 64, "ipguard", "invalid Service name"),
    ],
)
def test_service_dns_names_rejects_invalid(service: str, namespace: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        service_dns_names(service, namespace)


@pytest.mark.parametrize(
    ("san", "message"),
    [
        ("bad name", "invalid DNS name 'bad name'"),
        ("-lead.example.com", "invalid DNS name"),
        ("a..b", "invalid DNS name"),
        ("10.0.0.256", "looks like an IP address"),
        ("x" * 64 + ".example.com", "invalid DNS name"),
    ],
)
def test_invalid_extra_sans_raise(tmp_path: Path, san: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_cert_bundle(tmp_path, SERVICE, NAMESPACE, [san])
    assert not (tmp_path / "tls.key").exists()  # nothing written on bad input


def test_extra_sans_split_into_dns_and_ip(tmp_path: Path) -> None:
    paths = write_cert_bundle(tmp_path, SERVICE, NAMESPACE, ["10.1.2.3", "*.webhooks.example.com", "::1"])
    san = cert_of(paths.tls_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [*ALL_NAMES, "*.webhooks.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "::1"]


def test_generate_serving_cert_rejects_bad_input() -> None:
    ca_pem, ca_key = generate_ca()
    with pytest.raises(ValueError, match="at least one DNS name or IP address"):
        generate_serving_cert(ca_pem, ca_key, [])
    with pytest.raises(ValueError, match=r"invalid IP address '300\.1\.1\.1'"):
        generate_serving_cert(ca_pem, ca_key, ["a.svc"], ["300.1.1.1"])
    with pytest.raises(ValueError, match="it is an IP address"):
        generate_serving_cert(ca_pem, ca_key, ["10.0.0.1"])
    _, other_key = generate_ca()
    with pytest.raises(ValueError, match="CA key does not match"):
        generate_serving_cert(ca_pem, other_key, ["a.svc"])
    with pytest.raises(ValueError, match="unsupported key_type"):
        generate_serving_cert(ca_pem, ca_key, ["a.svc"], key_type="dsa")  # type: ignore[arg-type]

"""The live-cluster entry points: `ipguard report --live`, and a kubeconfig instead of in-cluster credentials."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s

from tests import live
from tests.fakekube import FakeKube
from tests.live import aws_env  # noqa: F401  (autouse fixture)
from webhook.cli import main
from webhook.model.index import HEADROOM_RULE
from webhook.sources.kube import api_client


def test_report_live_reads_the_cluster_and_ec2(moto: live.Moto, capsys: pytest.CaptureFixture[str]) -> None:
    ec2c = live.build_ec2(moto.ec2())
    fk = FakeKube()
    url = fk.start_in_thread()
    try:
        fk.call(live.load_kube(fk, ec2c))
        code = main(["report", "--live", "--kube-host", url, "--ec2-endpoint-url", moto.url, "--region",
                     live.REGION, "--timeout", "20", "--json"])
        captured = capsys.readouterr()
        text_code = main(["report", "--live", "--kube-host", url, "--ec2-endpoint-url", moto.url, "--region",
                          live.REGION, "--timeout", "20"])
        text = capsys.readouterr()
    finally:
        fk.stop_in_thread()
    assert code == 0 and text_code == 0
    assert "TLS" not in captured.err + text.err  # a report serves nothing: no certificate to look for
    # the footnote states the rule the code follows, from the one place it is written
    assert text.out.rstrip().endswith(f"per zone, {HEADROOM_RULE}")
    report = json.loads(captured.out)
    zones = {z["zone"]: z for z in report["zones"]}
    # node A's 18 IPs all used on its 2 ENIs, 7 addresses left in its /27: a third ENI needs 10 (its primary and
    # 9 secondaries, asked for at once), so none of the 7 becomes a pod IP; node B: 9 held, 5 used
    assert zones["us-east-1a"]["headroom"] == 0 and zones["us-east-1a"]["reserve"] == 3
    assert zones["us-east-1b"]["warmFree"] == 4
    assert {s["subnetId"]: s["freeIps"] for s in report["subnets"]}[ec2c.subnet_a] == 7
    assert report["pods"] == 23 and report["nodes"] == 2


def test_report_live_gives_up_clearly_when_the_cluster_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["report", "--live", "--kube-host", "http://127.0.0.1:9", "--no-ec2", "--timeout", "1"])
    assert code == 1
    assert "did not load within 1s" in capsys.readouterr().err


async def test_kubeconfig_and_context(tmp_path: Path) -> None:
    fk = FakeKube()
    url = await fk.start()
    await fk.create("nodes", live.node("ip-10-0-1-10.ec2.internal", "us-east-1a", "i-0123456789abcdef0"))
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "fake", "cluster": {"server": url}},
                     {"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "dev", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "dev"}},
                     {"name": "other", "context": {"cluster": "nowhere", "user": "dev"}}],
    }))
    api = await api_client(str(kubeconfig), "fake")
    try:
        nodes = await k8s.CoreV1Api(api).list_node()
        assert [n.metadata.name for n in nodes.items] == ["ip-10-0-1-10.ec2.internal"]
        assert api.configuration.host == url
    finally:
        await api.close()
        await fk.stop()


async def test_in_cluster_service_account(tmp_path: Path) -> None:
    """In a pod: KUBERNETES_SERVICE_HOST/PORT, the service account's token and the cluster CA, over HTTPS that
    trusts only that CA; the token goes as a bearer token."""
    from webhook.tls import CertReloader, generate_ca, generate_serving_cert

    ca_cert, ca_key = generate_ca("fake-cluster-ca")
    cert, key = generate_serving_cert(ca_cert, ca_key, ["kubernetes.default.svc"], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(ca_cert)
    (account / "token").write_text("not-a-real-token")
    fk = FakeKube(ssl_context=CertReloader(tmp_path / "tls.crt", tmp_path / "tls.key").context)
    await fk.start()
    await fk.create("nodes", live.node("ip-10-0-1-10.ec2.internal", "us-east-1a", "i-0123456789abcdef0"))
    api = await api_client(service_account_dir=account,
                           environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(fk.port)})
    try:
        assert api.configuration.host == f"https://127.0.0.1:{fk.port}"
        nodes = await k8s.CoreV1Api(api).list_node()
        assert [n.metadata.name for n in nodes.items] == ["ip-10-0-1-10.ec2.internal"]
        assert fk.request_log[-1].authorization == "Bearer not-a-real-token"
    finally:
        await api.close()
        await fk.stop()


async def test_in_cluster_without_a_service_account_is_a_clear_error(tmp_path: Path) -> None:
    from kubernetes_asyncio.config import ConfigException

    with pytest.raises(ConfigException, match="host/port"):
        await api_client(service_account_dir=tmp_path, environ={})


def test_check_live_judges_against_the_cluster_and_ec2(
    moto: live.Moto, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`ipguard check --live`: the cluster's and EC2's data loaded first, then the objects judged on it. Node
    A is full and its third ENI would need 10 addresses; its zone has 7, of which a new node takes one for its
    own primary: 6 pod IPs for new nodes, reserve 3: a Deployment pinned there gets 3 replicas."""
    ec2c = live.build_ec2(moto.ec2())
    manifest = tmp_path / "pinned.yaml"
    manifest.write_text(json.dumps({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "pinned", "namespace": "shop"},
        "spec": {"replicas": 6, "selector": {"matchLabels": {"app": "pinned"}}, "template": {
            "metadata": {"labels": {"app": "pinned"}},
            "spec": {"nodeSelector": {"topology.kubernetes.io/zone": "us-east-1a"},
                     "containers": [{"name": "c", "image": "registry.example.com/c:1"}]}}},
    }))
    fk = FakeKube()
    url = fk.start_in_thread()
    try:
        fk.call(live.load_kube(fk, ec2c))
        code = main(["check", "-f", str(manifest), "--live", "--kube-host", url, "--ec2-endpoint-url", moto.url,
                     "--region", live.REGION, "--timeout", "20", "--json"])
    finally:
        fk.stop_in_thread()
    report = json.loads(capsys.readouterr().out)
    [obj] = report["objects"]
    assert code == 1
    assert obj["summary"]["admitted"] == 3 and obj["summary"]["denied"] == 3

"""manifests/monitoring: the alerts and the dashboard name only metrics ipguard serves, and the rule file has
the monitoring.coreos.com/v1 PrometheusRule shape the Prometheus Operator accepts.

"Served" means present on a live /metrics: a real `ipguard serve` (certificates managed, against the
Kubernetes-style API server) scraped over HTTPS.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests import scrape
from tests.fakekube import FakeKube
from tests.paths import REPO
from tests.test_manifests import kustomize, only
from webhook.service import ServeOptions, Service
from webhook.sources.kube import api_client

MONITORING = REPO / "manifests" / "monitoring"
METRIC = re.compile(r"\bipguard_[a-z_]+\b")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
ALERTS = {
    "IpguardZoneHeadroomAtReserve", "IpguardZoneOutOfAddresses", "IpguardPodsWaitingForIP", "IpguardConfigInvalid",
    "IpguardDataStale", "IpguardEc2ErrorsClimbing", "IpguardWatchErrorsClimbing", "IpguardCertificateExpiresSoon",
}


def rule_file() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return doc


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MONITORING / "ipguard-dashboard.json").read_text())
    return doc


def expressions() -> list[str]:
    exprs = [rule["expr"] for group in rule_file()["spec"]["groups"] for rule in group["rules"]]
    exprs += [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]
    return exprs


def test_rule_file_has_the_prometheus_rule_shape() -> None:
    """monitoring.coreos.com/v1 PrometheusRule: named groups of rules, each alert with a string expr, a
    duration `for`, a severity, a summary and a runbook line; the alerts before pods fail name the
    `ipguard doctor` finding."""
    doc = rule_file()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] and doc["metadata"]["namespace"] == "ipguard"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"} and set(doc["spec"]) == {"groups"}
    names = [group["name"] for group in doc["spec"]["groups"]]
    assert len(names) == len(set(names))
    alerts = set()
    for group in doc["spec"]["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].count("(") == rule["expr"].count(")")
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "1m"))
            assert rule["labels"]["severity"] in ("info", "warning", "critical")
            assert rule["annotations"]["summary"] and "\n" not in rule["annotations"]["summary"]
            assert rule["annotations"]["runbook"]
            for code in DOCTOR_FINDINGS.get(rule["alert"], ()):
                assert code in rule["annotations"]["runbook"]
            alerts.add(rule["alert"])
    assert alerts >= ALERTS


# The alerts on pod IPs and the `ipguard doctor` findings that explain them (the others' causes are outside
# what doctor checks: settings, data sources, certificates, callers; their runbooks say where to look).
DOCTOR_FINDINGS = {
    "IpguardZoneHeadroomAtReserve": ("zone-exhausted", "subnet-low"),
    "IpguardZoneOutOfAddresses": ("zone-exhausted", "subnet-low", "pods-schedule-in-some-zones"),
    "IpguardPodsWaitingForIP": ("pods-waiting-for-ip", "failed-create-pod-sandbox", "max-pods-over-ip-capacity"),
    "IpguardEc2ErrorsClimbing": ("warm-ip-target-churn",),
}


def test_runbooks_name_findings_doctor_gives() -> None:
    source = (REPO / "webhook" / "doctor.py").read_text(encoding="utf-8")
    for codes in DOCTOR_FINDINGS.values():
        for code in codes:
            assert f'"{code}"' in source, code


def test_dashboard_shows_headroom_decisions_latency_and_the_alert_figures() -> None:
    """Headroom per zone and subnet over time, decisions by outcome, latency, and every metric the alerts
    use; every panel queries the Prometheus datasource variable."""
    doc = dashboard()
    assert doc["uid"] and doc["title"] and doc["panels"]
    used = {name for panel in doc["panels"] for t in panel["targets"] for name in METRIC.findall(t["expr"])}
    alert_metrics = {name for group in rule_file()["spec"]["groups"] for rule in group["rules"]
                     for name in METRIC.findall(rule["expr"])}
    assert alert_metrics <= used
    assert {"ipguard_zone_headroom_pod_ips", "ipguard_subnet_free_pod_ips", "ipguard_admission_requests_total",
            "ipguard_admission_duration_seconds_bucket"} <= used
    for panel in doc["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"


def test_component_renders_with_the_base(tmp_path: Path) -> None:
    """Base + component: the ServiceMonitor scrapes the Service's named port over HTTPS with ipguard's CA, and
    the dashboard ConfigMap carries the Grafana sidecar's label and valid JSON."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "manifests").symlink_to(REPO / "manifests")
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["manifests/base"], "components": ["manifests/monitoring"]}))
    objects = kustomize(overlay)
    service = only(objects, "Service")
    monitor = only(objects, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["scheme"] == "https" and endpoint["tlsConfig"]["serverName"] == "ipguard.ipguard.svc"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"].get("labels", {}).items()
    board = only(objects, "ConfigMap", "ipguard-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["ipguard-dashboard.json"])["uid"] == dashboard()["uid"]
    only(objects, "PrometheusRule")


@pytest.fixture
async def live_metrics(tmp_path: Path) -> AsyncIterator[str]:
    fk = FakeKube()
    url = await fk.start()
    for config in yaml.safe_load_all((REPO / "manifests" / "base" / "webhooks.yaml").read_text()):
        await fk.create(config["kind"], config)
    options = ServeOptions(host="127.0.0.1", port=0, tls_cert=tmp_path / "tls.crt", tls_key=tmp_path / "tls.key",
                           ec2=False, manage_certificates=True)
    service = Service(await api_client(host=url), options)
    running = await service.start()
    try:
        config = await fk.get("validatingwebhookconfigurations", "ipguard")
        client = ssl.create_default_context(
            cadata=base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"]).decode("ascii"))
        client.hostname_checks_common_name = False
        async with aiohttp.ClientSession() as session, session.get(
            f"{running.url}/metrics", ssl=client, server_hostname="ipguard.ipguard.svc"
        ) as resp:
            assert resp.status == 200
            yield await resp.text()
    finally:
        await service.stop()
        await fk.stop()


async def test_every_metric_the_rules_and_dashboard_name_is_served(live_metrics: str) -> None:
    """Each `ipguard_*` name in an alert or a panel is a metric family on a live /metrics (histogram series
    by their family)."""
    types = scrape.families(live_metrics)
    missing = set()
    for expr in expressions():
        for name in METRIC.findall(expr):
            base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES
                         if name.endswith(s) and types.get(name.removesuffix(s)) == "histogram"), name)
            if base not in types and types.get(base.removesuffix("_total")) != "counter":
                missing.add(name)
    assert not missing, f"named by the monitoring files but not served: {sorted(missing)}"


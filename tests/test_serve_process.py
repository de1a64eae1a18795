"""`ipguard serve` as a real process against the fake API server and a moto EC2 server: it becomes ready,
answers over HTTPS from live data, follows EC2 and the cluster within a bounded time, refuses a bad ConfigMap,
survives its watches being cut, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

from tests import live
from tests.live import aws_env  # noqa: F401  (autouse fixture)
from tests.paths import REPO
from webhook.eventloop import loop_factory

A = "us-east-1a"



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def test_serve_process_end_to_end(moto: live.Moto, tmp_path: Path) -> None:
    fk, url, ec2c = await live.start_cluster(moto, bookmark_interval=0.5)
    paths = live.certs(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | live.FAKE_AWS_ENV
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhook.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--tls-cert", str(paths.tls_cert), "--tls-key", str(paths.tls_key), "--kube-host", url,
        "--ec2-endpoint-url", moto.url, "--region", live.REGION, "--ec2-period", "1", "--shutdown-delay", "2",
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    client = live.Client(f"https://127.0.0.1:{port}", paths.ca_cert)

    async def ready() -> bool:
        try:
            status, _ = await client.get("/readyz")
        except OSError:
            return False
        return status == 200

    async def metrics() -> str:
        return (await client.get("/metrics"))[1]

    async def allowed(name: str) -> bool:
        answer = await client.post("/validate", live.review(live.zone_pod(name, A), name=name))
        return bool(answer["allowed"])

    try:
        await live.eventually(ready, "/readyz 200")
        text = await metrics()
        assert metric(text, "ipguard_index_pods") == 23
        # the help says what is counted: every pod not finished, bound or not (23 here: all are bound)
        assert "# HELP ipguard_index_pods Pods in the capacity index: every pod not Succeeded or Failed" in text
        assert await allowed("web-1")

        # EC2 changes reach decisions within a couple of refresh periods
        live.consume(moto.ec2(), ec2c.subnet_a, 5)
        await live.eventually(lambda: _not(allowed("web-2")), "denial once zone A's subnet is empty")

        # a bad ConfigMap is refused and counted; the good settings stay in force
        await fk.update("configmaps", live.config_map({"mode": "enforce", "zoneReserve": "-4"}), namespace="ipguard")
        await live.eventually(lambda: _metric_is(metrics(), "ipguard_config_errors_total", 1), "config error counted")
        assert not await allowed("web-3")

        # cut the watches; pods created meanwhile arrive all the same
        await fk.close_watches(abort=True)
        await fk.create_many("pods", [live.pod("shop", f"c-{i}", "ip-10-0-2-20.ec2.internal") for i in range(4)],
                             namespace="shop")
        await live.eventually(lambda: _metric_is(metrics(), "ipguard_index_pods", 27), "pods after the watch cut")
        # SIGTERM: not ready at once, still answering until the listener closes after the delay
        process.send_signal(signal.SIGTERM)
        await live.eventually(lambda: _status_is(client.get("/readyz"), 503), "not ready while draining", 1.5)
        assert not await allowed("web-4")
    finally:
        await client.close()
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 15)
        finally:
            if process.returncode is None:
                process.kill()
        await fk.stop()
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    log = output.decode(errors="replace")
    assert '"msg":"serving"' in log and '"msg":"stopping"' in log
    assert f'"msg":"event loop","loop":"{loop_factory("auto")[0]}"' in log  # uvloop, installed with the bench extra
    assert log.rstrip().splitlines()[-1].find('"msg":"stopped"') > 0  # the last line says it is done
    assert "ConfigMap ipguard/ipguard refused" in log


async def _not(value: object) -> bool:
    return not await value  # type: ignore[misc]


async def _metric_is(text: object, name: str, want: float) -> bool:
    return metric(await text, name) == want  # type: ignore[misc]


async def _status_is(response: object, want: int) -> bool:
    status, _ = await response  # type: ignore[misc]
    return bool(status == want)

"""The `ipguard` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from webhook.eventloop import LOOP_CHOICES
from webhook.model.limits import (
    CapacityMode,
    LimitsTable,
    UnknownInstanceType,
    max_pods,
    parse_cni_version,
)

if TYPE_CHECKING:
    from webhook.admission.handler import AdmissionState as AdmissionStateT
    from webhook.service import ServeOptions as ServeOptionsT
    from webhook.service import Service as ServiceT

DEFAULT_SNAPSHOT = Path(__file__).resolve().parent.parent / "examples" / "cluster.yaml"


def _max_pods(args: argparse.Namespace) -> int:
    table = LimitsTable()
    mode = CapacityMode(
        prefix_delegation=args.prefix_delegation,
        custom_networking=args.custom_networking,
        max_eni=args.max_eni,
        pod_eni=args.pod_eni,
    )
    try:
        version = parse_cni_version(args.cni_version) if args.cni_version else None
    except ValueError as exc:
        print(f"ipguard: {exc}", file=sys.stderr)
        return 2
    if args.all:
        # The format of the VPC CNI's eni-max-pods.txt (uncapped unless a ceiling is asked for).
        for name in table.types():
            figure = max_pods(table.get(name), mode, cni_version=version, show_max_allowed=not args.capped)
            print(f"{name} {figure}")
        return 0
    if not args.instance_type:
        print("ipguard: max-pods needs an instance type or --all", file=sys.stderr)
        return 2
    try:
        limits = table.get(args.instance_type)
    except UnknownInstanceType as exc:
        print(f"ipguard: {exc}", file=sys.stderr)
        return 1
    print(max_pods(limits, mode, cni_version=version, show_max_allowed=args.show_max_allowed))
    return 0


def _report(args: argparse.Namespace) -> int:
    from webhook.report import report_json, report_text
    from webhook.sources.snapshot import SnapshotError, load_snapshot

    if args.live:
        return _report_live(args)
    try:
        snapshot = load_snapshot(args.snapshot)
    except SnapshotError as exc:
        print(f"ipguard: {exc}", file=sys.stderr)
        return 1
    from webhook.admission.handler import AdmissionState

    index = snapshot.build_index()
    policies, eni_configs, vpc = snapshot.build_objects(index)
    state = AdmissionState(index, snapshot.settings, policies=policies, eni_configs=eni_configs, vpc=vpc)
    figures = index.snapshot()
    if args.json:
        print(json.dumps(report_json(figures, snapshot.settings, state), indent=2))
    else:
        print(report_text(figures, snapshot.settings, state))
    return 0


def _serve_options(args: argparse.Namespace) -> ServeOptionsT:
    from webhook.service import ServeOptions

    return ServeOptions(
        host=getattr(args, "host", "0.0.0.0"),
        port=getattr(args, "port", 8443),
        tls_cert=Path(getattr(args, "tls_cert", "/tls/tls.crt")),
        tls_key=Path(getattr(args, "tls_key", "/tls/tls.key")),
        config_namespace=args.config_namespace,
        config_name=args.config_name,
        ec2=not args.no_ec2,
        region=args.region,
        vpc_id=args.vpc_id,
        cluster_name=args.cluster_name,
        ec2_endpoint_url=args.ec2_endpoint_url,
        ec2_period=args.ec2_period,
        ec2_fetch_in_process=getattr(args, "ec2_fetch", "thread") == "process",
        vpc_period=args.vpc_period,
        shutdown_delay=getattr(args, "shutdown_delay", 5.0),
        manage_certificates=getattr(args, "manage_certificates", False),
        certificate_secret=getattr(args, "certificate_secret", "ipguard-tls"),
        service_name=getattr(args, "service_name", "ipguard"),
        webhook_configuration=getattr(args, "webhook_configuration", "ipguard"),
        admission_sources=tuple(getattr(args, "admission_source", None) or ()),
        control_plane_callers=not getattr(args, "no_control_plane_callers", False),
    )


def _report_live(args: argparse.Namespace) -> int:
    from webhook.report import report_json, report_text

    def report(state: AdmissionStateT) -> int:
        figures = state.index.snapshot()
        if args.json:
            print(json.dumps(report_json(figures, state.settings, state), indent=2))
        else:
            print(report_text(figures, state.settings, state))
        return 0

    return with_live_cluster(args, report, not_loaded=1)


def with_live_cluster(args: argparse.Namespace, use: Callable[[AdmissionStateT], int], *, not_loaded: int) -> int:
    """Load the live cluster's (and EC2's) data as `serve` does, then hand the admission state to `use`; its
    exit status, or `not_loaded` when the data did not load in time."""

    async def use_state(service: ServiceT) -> int:
        # `use` runs without awaiting: no watch event lands in the index meanwhile.
        return use(service.state)

    return with_live_service(args, use_state, not_loaded=not_loaded)


def with_live_service(args: argparse.Namespace, use: Callable[[ServiceT], Awaitable[int]], *, not_loaded: int) -> int:
    """`with_live_cluster`, handing `use` the loaded service itself (its API client and EC2 poller too)."""
    import asyncio

    from webhook.service import Service
    from webhook.sources.kube import api_client

    async def run() -> int:
        api = await api_client(args.kubeconfig, args.context, args.kube_host)
        options = _serve_options(args)
        options.tls = False  # a report serves nothing
        service = Service(api, options)
        try:
            if not await service.wait_loaded(args.timeout):
                print(f"ipguard: the cluster's data did not load within {args.timeout:.0f}s", file=sys.stderr)
                return not_loaded
            return await use(service)
        finally:
            await service.stop()

    return asyncio.run(run())


def _serve(args: argparse.Namespace) -> int:
    from webhook.callers import parse_networks
    from webhook.eventloop import loop_factory
    from webhook.eventloop import run as run_on_loop
    from webhook.logs import setup_logging
    from webhook.service import serve
    from webhook.sources.kube import api_client

    try:
        parse_networks(args.admission_source or ())
    except ValueError as exc:
        print(f"ipguard: --admission-source: {exc}", file=sys.stderr)
        return 2
    try:
        loop_factory(args.event_loop)
    except ImportError as exc:
        print(f"ipguard: --event-loop {args.event_loop}: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)

    async def run() -> None:
        api = await api_client(args.kubeconfig, args.context, args.kube_host)
        await serve(api, _serve_options(args))

    with contextlib.suppress(KeyboardInterrupt):
        run_on_loop(run(), args.event_loop)  # uvloop when installed (the image has it): less CPU per review
    return 0


def _live_source_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("--kube-host", help="API server URL without credentials (tests, kubectl proxy)")
    parser.add_argument("--config-namespace", default="ipguard", help="namespace of ipguard's ConfigMap")
    parser.add_argument("--config-name", default="ipguard", help="name of ipguard's ConfigMap")
    parser.add_argument("--no-ec2", action="store_true", help="no EC2 data (the warm pool is predicted)")
    parser.add_argument("--region", help="AWS region (default: from the nodes' zones, then the boto3 chain)")
    parser.add_argument("--vpc-id", help="VPC (default: the nodes' instances' VPC)")
    parser.add_argument("--cluster-name", help="EKS cluster name (default: from the nodes' instances' tags)")
    parser.add_argument("--ec2-endpoint-url", help="EC2 endpoint (tests: a moto server)")
    parser.add_argument("--ec2-period", type=float, default=30.0, help="seconds between subnet and ENI refreshes")
    parser.add_argument("--vpc-period", type=float, default=300.0,
                        help="seconds between listings of the VPC's security groups, subnets and quotas")


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from webhook.demo import run_demo
    from webhook.sources.snapshot import SnapshotError, load_snapshot

    if args.replicas < 0 or args.pinned < 0:
        print("ipguard: --replicas and --pinned must not be negative", file=sys.stderr)
        return 2
    try:
        snapshot = load_snapshot(args.snapshot)
    except SnapshotError as exc:
        print(f"ipguard: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_demo(snapshot, replicas=args.replicas, pinned=args.pinned, serve=args.serve, port=args.port,
                             certs_dir=Path(args.certs_dir) if args.certs_dir else None))
    return 0


def _certs(args: argparse.Namespace) -> int:
    from webhook.tls import write_cert_bundle

    try:
        paths = write_cert_bundle(Path(args.out), args.service, args.namespace, args.san,
                                  key_type="rsa" if args.rsa else "ecdsa")
    except (ValueError, OSError) as exc:
        print(f"ipguard: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {paths.ca_cert}, {paths.ca_key}, {paths.tls_cert}, {paths.tls_key}", file=sys.stderr)
    print("caBundle (for the webhook configurations' clientConfig.caBundle):", file=sys.stderr)
    print(paths.ca_bundle_b64)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from webhook.sim.cli import simulate

    return simulate(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipguard",
        description="Admission webhook that keeps pods away from exhausted VPC CNI pod IP capacity on EKS.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    mp = sub.add_parser("max-pods", help="max-pods for an instance type, as the EKS max-pods calculator gives it")
    mp.add_argument("instance_type", nargs="?", help="e.g. m5.large")
    mp.add_argument("--all", action="store_true", help="every known type, in the format of eni-max-pods.txt")
    mp.add_argument("--capped", action="store_true", help="with --all: apply the 110/250 kubelet ceiling")
    mp.add_argument("--prefix-delegation", action="store_true", help="ENABLE_PREFIX_DELEGATION=true")
    mp.add_argument("--custom-networking", action="store_true", help="AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true")
    mp.add_argument("--max-eni", type=int, metavar="N", help="MAX_ENI")
    mp.add_argument("--pod-eni", action="store_true", help="ENABLE_POD_ENI=true (the trunk ENI takes a slot)")
    mp.add_argument("--cni-version", metavar="V", help="VPC CNI version, e.g. 1.18.3 (prefix delegation needs 1.9+)")
    mp.add_argument("--show-max-allowed", action="store_true", help="no 110/250 ceiling")
    mp.set_defaults(func=_max_pods)

    dp = sub.add_parser("demo", help="run the webhook on the embedded demo cluster and scale a Deployment through it")
    dp.add_argument("--snapshot", default=str(DEFAULT_SNAPSHOT), help="cluster snapshot file (YAML)")
    dp.add_argument("--replicas", type=int, default=36, help="replicas of the Deployment to scale up")
    dp.add_argument("--pinned", type=int, default=2, help="replicas of the Deployment pinned to the busiest zone")
    dp.add_argument("--serve", action="store_true", help="keep the server up afterwards")
    dp.add_argument("--port", type=int, default=0, help="port for the server (default: any free port)")
    dp.add_argument("--certs-dir", help="write the demo certificates here instead of a temporary folder")
    dp.set_defaults(func=_demo)

    cp = sub.add_parser("certs", help="write a CA and a serving certificate for the webhook Service")
    cp.add_argument("--service", required=True, help="the webhook Service's name")
    cp.add_argument("--namespace", required=True, help="the Service's namespace")
    cp.add_argument("--out", default="certs", help="output folder (default: certs/)")
    cp.add_argument("--san", action="append", default=[], help="an extra DNS name or IP address (repeatable)")
    cp.add_argument("--rsa", action="store_true", help="RSA 2048 keys instead of ECDSA P-256")
    cp.set_defaults(func=_certs)

    rp = sub.add_parser("report", help="per-zone and per-subnet pod IP headroom")
    rp.add_argument("--snapshot", default=str(DEFAULT_SNAPSHOT), help="cluster snapshot file (YAML)")
    rp.add_argument("--live", action="store_true", help="read the live cluster (and EC2) instead of a snapshot")
    rp.add_argument("--timeout", type=float, default=60.0, help="with --live: seconds to wait for the data")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    _live_source_args(rp)
    rp.set_defaults(func=_report)

    from webhook.check import add_parser as add_check_parser

    add_check_parser(sub, _live_source_args, DEFAULT_SNAPSHOT, with_live_cluster)

    sim = sub.add_parser("simulate", help="replay scenarios on a simulated data plane, with and without ipguard")
    sim.add_argument("scenarios", nargs="+", metavar="SCENARIO", help="scenario file, or a name in examples/scenarios")
    sim.add_argument("--snapshot", help="start every scenario from this cluster snapshot instead of its own")
    sim.add_argument("--mode", choices=["enforce", "warn"], default="enforce", help="ipguard's mode for the replay")
    sim.add_argument("--json", action="store_true", help="machine-readable output")
    sim.set_defaults(func=_simulate)

    from webhook.doctor import add_parser as add_doctor_parser
    from webhook.plan import add_parser as add_plan_parser

    add_doctor_parser(sub, _live_source_args, DEFAULT_SNAPSHOT, with_live_service)

    add_plan_parser(sub)

    sp = sub.add_parser("serve", help="run the webhook in a cluster, fed by Kubernetes watches and EC2")
    sp.add_argument("--host", default="0.0.0.0", help="listen address")
    sp.add_argument("--port", type=int, default=8443, help="listen port")
    sp.add_argument("--tls-cert", default="/tls/tls.crt", help="serving certificate (reloaded when it changes)")
    sp.add_argument("--tls-key", default="/tls/tls.key", help="serving key")
    sp.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sp.add_argument("--ec2-fetch", default="process", choices=["process", "thread"],
                    help="where the nodes' ENIs are fetched and parsed: a worker process (default; botocore's XML "
                         "parsing would otherwise hold the GIL against the request path for seconds per refresh "
                         "on a large cluster) or a thread")
    sp.add_argument("--event-loop", default="auto", choices=LOOP_CHOICES,
                    help="auto: uvloop when installed (the `uvloop` extra), else asyncio's own; logged at start")
    sp.add_argument("--shutdown-delay", type=float, default=5.0,
                    help="seconds to stay up, not ready, after SIGTERM (endpoints catch up)")
    sp.add_argument("--manage-certificates", action="store_true",
                    help="keep the CA and serving certificate in a Secret of --config-namespace, write them to "
                         "--tls-cert/--tls-key, publish the caBundle and renew before expiry")
    sp.add_argument("--certificate-secret", default="ipguard-tls", help="with --manage-certificates: the Secret")
    sp.add_argument("--service-name", default="ipguard", help="the webhook Service (the certificate's DNS names)")
    sp.add_argument("--admission-source", action="append", metavar="CIDR",
                    help="reviews take reservations only from these networks (the control plane's addresses; "
                         "repeatable or comma-separated); others are answered but hold none. Default: any caller")
    sp.add_argument("--no-control-plane-callers", action="store_true",
                    help="do not keep reservations to reviews from the EKS control plane's network interfaces "
                         "(learnt from EC2, `Amazon EKS <cluster>`); --admission-source still applies")
    sp.add_argument("--webhook-configuration", default="ipguard",
                    help="name of ipguard's Mutating- and ValidatingWebhookConfiguration (caBundle patched)")
    _live_source_args(sp)
    sp.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_eni", None) is not None and args.max_eni < 1:
        print("ipguard: --max-eni must be at least 1", file=sys.stderr)
        return 2
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())

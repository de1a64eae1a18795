#!/usr/bin/env python3
"""Generate webhook/model/instance_types.py, ipguard's bundled instance-type network-limits table.

Input: DescribeInstanceTypes-shaped JSON (optionally gzipped) in one of three shapes:
  * raw `aws ec2 describe-instance-types --output json` output: {"InstanceTypes": [ {...}, ... ]}
  * a JSON list of InstanceType objects: [ {...}, ... ]
  * moto's bundled moto/ec2/resources/instance_types.json.gz: {"m5.large": {...}, ...} (the default input)
plus the branch-ENI table scripts/data/branch_enis.json (security groups for pods / ENI trunking) and
scripts/data/ipamd_eni_limits.json (the types whose max ENIs ipamd takes from its own table, where that is
not the default network card's figure in the current EC2 data).

Per instance type the table holds, as the VPC CNI reads them:
  * max ENIs on the default network card (the NetworkCards entry whose NetworkCardIndex equals
    DefaultNetworkCardIndex; NetworkInfo.MaximumNetworkInterfaces when NetworkCards is absent), unless
    ipamd's own table gives the type another figure (ipamd_eni_limits.json): then ipamd's
  * IPv4 addresses per ENI
  * prefix delegation supported: Hypervisor == "nitro" or BareMetal (aws/amazon-vpc-cni-k8s,
    EC2InstanceMetadataCache.IsPrefixDelegationSupported)
  * default vCPUs
  * branch ENIs (0 = the type cannot trunk)

Types without network information are skipped and counted. The output is deterministic (sorted,
no timestamps, no absolute paths), so `--check` can tell whether the committed file is current.

Usage:
  python scripts/gen_instance_limits.py                      # from moto's bundled data
  python scripts/gen_instance_limits.py types.json           # from a real account
  python scripts/gen_instance_limits.py --check              # exit 1 if the committed file is stale
  python scripts/gen_instance_limits.py --compare-eni-max-pods eni-max-pods.txt
"""

from __future__ import annotations

import argparse
import difflib
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "webhook" / "model" / "instance_types.py"
DEFAULT_BRANCH_DATA = REPO_ROOT / "scripts" / "data" / "branch_enis.json"
DEFAULT_IPAMD_DATA = REPO_ROOT / "scripts" / "data" / "ipamd_eni_limits.json"
MOTO_RESOURCE = "moto/ec2/resources/instance_types.json.gz"
COMMAND = "python scripts/gen_instance_limits.py"

Row = tuple[int, int, bool, int, int]


class InputError(ValueError):
    """The input data is not DescribeInstanceTypes-shaped; the message names the problem."""


@dataclass(frozen=True)
class Source:
    data: bytes
    label: str  # how the header names it: stable across machines (no absolute paths)
    argv: tuple[str, ...]  # the arguments that regenerate from it


@dataclass(frozen=True)
class LimitsData:
    """Per-type figures from a table outside DescribeInstanceTypes, with where they come from."""

    source: str
    limits: dict[str, int]
    label: str


@dataclass(frozen=True)
class Table:
    rows: dict[str, Row]
    skipped: dict[str, str]  # instance type (or entry position) -> reason


# --------------------------------------------------------------------------- input


def moto_source() -> Source:
    spec = importlib.util.find_spec("moto")
    if spec is None or spec.origin is None:
        raise InputError("moto is not installed: pass a DescribeInstanceTypes JSON file instead")
    path = Path(spec.origin).parent / "ec2" / "resources" / "instance_types.json.gz"
    if not path.is_file():
        raise InputError(f"moto {moto_version()} has no {MOTO_RESOURCE}")
    return Source(data=path.read_bytes(), label=f"moto {moto_version()}: {MOTO_RESOURCE}", argv=())


def moto_version() -> str:
    try:
        return importlib.metadata.version("moto")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def file_source(path: Path) -> Source:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    digest = hashlib.sha256(data).hexdigest()[:16]
    return Source(data=data, label=f"{path.name} (sha256 {digest})", argv=(path.name,))


def decode_json(data: bytes, what: str) -> object:
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise InputError(f"{what}: not a valid gzip file ({exc})") from exc
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise InputError(f"{what}: not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{what}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def instance_type_entries(doc: object) -> list[tuple[str, dict[str, object]]]:
    """Normalise the three accepted shapes into (position label or "", InstanceType object) pairs."""
    items: list[tuple[str, object]]
    if isinstance(doc, list):
        items = [(f"entry {i}", entry) for i, entry in enumerate(doc)]
    elif isinstance(doc, dict):
        if "InstanceTypes" in doc:
            listed = doc["InstanceTypes"]
            if not isinstance(listed, list):
                raise InputError(f'"InstanceTypes" must be a list, not {type_name(listed)}')
            items = [(f"InstanceTypes[{i}]", entry) for i, entry in enumerate(listed)]
        elif doc and all(isinstance(v, dict) for v in doc.values()):
            items = []
            for key, entry in doc.items():
                assert isinstance(entry, dict)
                named = entry.get("InstanceType", key)
                if named != key:
                    raise InputError(f"entry {key!r} describes InstanceType {named!r}: the key and the type differ")
                items.append(("", {"InstanceType": key, **entry}))
        else:
            keys = ", ".join(sorted(map(str, doc))[:5]) or "none"
            raise InputError(
                'expected {"InstanceTypes": [...]}, a list of InstanceType objects, or an object keyed by '
                f"instance type whose values are InstanceType objects; got an object with keys: {keys}"
            )
    else:
        raise InputError(f"expected a JSON object or list of InstanceType objects, not {type_name(doc)}")
    if not items:
        raise InputError("no instance types in the input")
    out: list[tuple[str, dict[str, object]]] = []
    for where, entry in items:
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected an InstanceType object, not {type_name(entry)}")
        out.append((where, entry))
    return out


def type_name(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def positive_int(value: object, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: {field} must be an integer, not {type_name(value)} {value!r}")
    if value <= 0:
        raise InputError(f"{where}: {field} must be positive, got {value}")
    return value


def optional_int(obj: Mapping[str, object], key: str, where: str, field: str) -> int | None:
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where}: {field} must be an integer, not {type_name(value)} {value!r}")
    return value


def default_card_enis(network_info: Mapping[str, object], where: str) -> int | None:
    """Max ENIs on the default network card, as the VPC CNI counts them; None if unknown."""
    cards = network_info.get("NetworkCards")
    if cards is None:
        total = optional_int(network_info, "MaximumNetworkInterfaces", where, "NetworkInfo.MaximumNetworkInterfaces")
        return None if total is None else positive_int(total, where, "NetworkInfo.MaximumNetworkInterfaces")
    if not isinstance(cards, list):
        raise InputError(f"{where}: NetworkInfo.NetworkCards must be a list, not {type_name(cards)}")
    default_index = optional_int(network_info, "DefaultNetworkCardIndex", where, "NetworkInfo.DefaultNetworkCardIndex")
    if default_index is None:
        default_index = 0  # EC2's default when the field is absent
    for i, card in enumerate(cards):
        card_where = f"{where}: NetworkInfo.NetworkCards[{i}]"
        if not isinstance(card, dict):
            raise InputError(f"{card_where} must be an object, not {type_name(card)}")
        index = optional_int(card, "NetworkCardIndex", card_where, "NetworkCardIndex")
        if index == default_index:
            enis = optional_int(card, "MaximumNetworkInterfaces", card_where, "MaximumNetworkInterfaces")
            if enis is None:
                raise InputError(f"{card_where}: the default network card has no MaximumNetworkInterfaces")
            return positive_int(enis, card_where, "MaximumNetworkInterfaces")
    raise InputError(
        f"{where}: no NetworkInfo.NetworkCards entry has NetworkCardIndex {default_index} (the DefaultNetworkCardIndex)"
    )


def parse_entry(where: str, entry: Mapping[str, object]) -> tuple[str, Row | str]:
    """(instance type, row) or (instance type, reason it is skipped)."""
    name = entry.get("InstanceType")
    if not isinstance(name, str) or not name:
        raise InputError(
            f"{where or 'an entry'}: InstanceType must be a non-empty string, not {type_name(name)} {name!r}"
        )
    where = f"{name} ({where})" if where else name
    network_info = entry.get("NetworkInfo")
    if network_info is None:
        return name, "no NetworkInfo"
    if not isinstance(network_info, dict):
        raise InputError(f"{where}: NetworkInfo must be an object, not {type_name(network_info)}")
    ipv4 = optional_int(network_info, "Ipv4AddressesPerInterface", where, "NetworkInfo.Ipv4AddressesPerInterface")
    if ipv4 is None:
        return name, "no NetworkInfo.Ipv4AddressesPerInterface"
    ipv4 = positive_int(ipv4, where, "NetworkInfo.Ipv4AddressesPerInterface")
    enis = default_card_enis(network_info, where)
    if enis is None:
        return name, "no NetworkInfo.MaximumNetworkInterfaces or NetworkCards"
    vcpu_info = entry.get("VCpuInfo")
    if vcpu_info is None:
        return name, "no VCpuInfo"
    if not isinstance(vcpu_info, dict):
        raise InputError(f"{where}: VCpuInfo must be an object, not {type_name(vcpu_info)}")
    vcpus = optional_int(vcpu_info, "DefaultVCpus", where, "VCpuInfo.DefaultVCpus")
    if vcpus is None:
        return name, "no VCpuInfo.DefaultVCpus"
    vcpus = positive_int(vcpus, where, "VCpuInfo.DefaultVCpus")
    hypervisor = entry.get("Hypervisor")
    if hypervisor is not None and not isinstance(hypervisor, str):
        raise InputError(f"{where}: Hypervisor must be a string, not {type_name(hypervisor)}")
    bare_metal = entry.get("BareMetal", False)
    if not isinstance(bare_metal, bool):
        raise InputError(f"{where}: BareMetal must be true or false, not {type_name(bare_metal)} {bare_metal!r}")
    # The VPC CNI: prefix delegation needs a Nitro instance; bare metal counts as Nitro.
    prefix_delegation = hypervisor == "nitro" or bare_metal
    return name, (enis, ipv4, prefix_delegation, vcpus, 0)


def build_table(doc: object, branch: Mapping[str, int], ipamd_enis: Mapping[str, int] | None = None) -> Table:
    rows: dict[str, Row] = {}
    skipped: dict[str, str] = {}
    for where, entry in instance_type_entries(doc):
        name, parsed = parse_entry(where, entry)
        if isinstance(parsed, str):
            skipped[name] = parsed
            continue
        enis, ipv4, prefix_delegation, vcpus, _ = parsed
        # ipamd sizes a node by its own table when the type is in it (pkg/vpc GetENILimit), not by EC2's cards.
        enis = (ipamd_enis or {}).get(name, enis)
        row: Row = (enis, ipv4, prefix_delegation, vcpus, branch.get(name, 0))
        if name in rows and rows[name] != row:
            raise InputError(f"{name} appears twice with different limits: {rows[name]} and {row}")
        rows[name] = row
    for name in rows:
        skipped.pop(name, None)  # described with limits elsewhere in the input
    if not rows:
        raise InputError(f"none of the {len(skipped)} instance types has network information")
    return Table(rows=dict(sorted(rows.items())), skipped=dict(sorted(skipped.items())))


def load_limits_data(path: Path, what: str = "branch ENI count") -> LimitsData:
    """A `{"source": "...", "limits": {"type": N, ...}}` file (branch ENIs, ipamd's ENI limits)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} data {path}: {exc.strerror}") from exc
    doc = decode_json(raw, str(path.name))
    if not isinstance(doc, dict) or not isinstance(doc.get("source"), str) or not isinstance(doc.get("limits"), dict):
        raise InputError(f'{path.name}: expected {{"source": "...", "limits": {{"m5.large": 9, ...}}}}')
    limits: dict[str, int] = {}
    limits_doc = doc["limits"]
    assert isinstance(limits_doc, dict)
    for name, value in limits_doc.items():
        limits[str(name)] = positive_int(value, f"{path.name}: limits[{name!r}]", what)
    source = doc["source"]
    assert isinstance(source, str)
    try:
        label = str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        label = path.name
    return LimitsData(source=source, limits=dict(sorted(limits.items())), label=label)


# --------------------------------------------------------------------------- output


def render(table: Table, source: Source, branch: LimitsData, ipamd: LimitsData) -> str:
    command = " ".join((COMMAND, *source.argv))
    trunking = sum(1 for row in table.rows.values() if row[4] > 0)
    missing_branch = sorted(set(branch.limits) - set(table.rows))
    lines = [
        '"""Bundled EC2 instance-type network limits. GENERATED FILE: DO NOT EDIT BY HAND.',
        "",
        f"Generated by: {command}",
        f"Source: {source.label}",
        f"Types: {len(table.rows)} written, {len(table.skipped)} skipped for lack of network information.",
        f"Branch ENIs: {branch.label} ({trunking} trunking-capable types here, "
        f"{len(missing_branch)} of its types absent from the source)",
        f"  from {branch.source}",
        "Max ENIs count the default network card only, as the VPC CNI does, except for the types whose",
        f"max ENIs ipamd takes from its own table with another figure: {ipamd.label}",
        f"  from {ipamd.source}",
        'Prefix delegation is supported where Hypervisor == "nitro" or BareMetal (the VPC CNI\'s own test).',
        "See scripts/data/README.md for provenance and how to regenerate from a real account.",
        '"""',
        "",
        "# ruff: noqa: E501",
        "",
        "# (max ENIs on the default network card, IPv4 addresses per ENI, prefix delegation supported"
        " (Nitro or bare metal), default vCPUs, branch ENIs (0 = no trunking))",
        "INSTANCE_TYPES: dict[str, tuple[int, int, bool, int, int]] = {",
    ]
    lines += [f"    {json.dumps(name)}: ({e}, {i}, {pd}, {v}, {b})," for name, (e, i, pd, v, b) in table.rows.items()]
    lines.append("}")
    lines += [
        "",
        "# Max ENIs ipamd uses for these types (its own table) where EC2's default card now says otherwise:",
        "# DescribeInstanceTypes figures for them are read with these (webhook/sources/ec2/instance_types.py).",
        "IPAMD_ENI_LIMITS: dict[str, int] = {",
    ]
    lines += [f"    {json.dumps(name)}: {enis}," for name, enis in ipamd.limits.items()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def generate(
    source: Source, branch_path: Path = DEFAULT_BRANCH_DATA, ipamd_path: Path = DEFAULT_IPAMD_DATA
) -> tuple[str, Table]:
    branch = load_limits_data(branch_path)
    ipamd = load_limits_data(ipamd_path, "ipamd ENI limit")
    table = build_table(decode_json(source.data, source.label), branch.limits, ipamd.limits)
    return render(table, source, branch, ipamd), table


# --------------------------------------------------------------------------- cross-check


def compare_eni_max_pods(table: Table, lines: Iterable[str]) -> list[str]:
    """Compare E x (I - 1) + 2 with the VPC CNI's misc/eni-max-pods.txt ("type max-pods ..." lines)."""
    report: list[str] = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        name, expected = fields[0], int(fields[1])
        row = table.rows.get(name)
        if row is None:
            report.append(f"{name}: not in the table (eni-max-pods says {expected})")
            continue
        ours = row[0] * (row[1] - 1) + 2
        verdict = "match" if ours == expected else "MISMATCH"
        report.append(f"{name}: {verdict} table {ours} (E={row[0]}, I={row[1]}), eni-max-pods {expected}")
    return report


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", type=Path, help="DescribeInstanceTypes JSON (default: moto's bundled data)")
    parser.add_argument("--branch-data", type=Path, default=DEFAULT_BRANCH_DATA, help="branch-ENI JSON")
    parser.add_argument("--ipamd-data", type=Path, default=DEFAULT_IPAMD_DATA, help="ipamd's own ENI limits JSON")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="module to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if --output differs from what would be written")
    parser.add_argument("--compare-eni-max-pods", type=Path, metavar="FILE", help="print a cross-check and exit")
    args = parser.parse_args(argv)

    try:
        source = file_source(args.input) if args.input is not None else moto_source()
        text, table = generate(source, args.branch_data, args.ipamd_data)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.compare_eni_max_pods is not None:
        report = compare_eni_max_pods(table, args.compare_eni_max_pods.read_text().splitlines())
        print("\n".join(report))
        return 1 if any("MISMATCH" in line for line in report) else 0

    summary = f"{len(table.rows)} instance types, {len(table.skipped)} skipped (no network information)"
    if args.check:
        try:
            current = args.output.read_text()
        except OSError:
            current = ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                "committed",
                "generated",
                n=1,
            )
            sys.stderr.writelines(list(diff)[:40])
            print(f"{args.output} is stale: regenerate with `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{args.output.name} is up to date: {summary}")
        return 0

    args.output.write_text(text)
    print(f"wrote {args.output}: {summary}")
    for name, reason in table.skipped.items():
        print(f"  skipped {name}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

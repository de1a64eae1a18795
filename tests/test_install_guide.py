"""The README's EKS install guide works as written: its overlay renders, its settings reference lists every
ConfigMap key with the default ipguard uses, and every alert of the rule file is explained."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import yaml

from tests.paths import REPO
from tests.test_manifests import kustomize, only, webhooks
from tests.test_monitoring import rule_file
from webhook.model.config import KNOWN_KEYS, Settings

README = (REPO / "README.md").read_text()


def guide() -> str:
    start = README.index("## Installing on Amazon EKS")
    return README[start:README.index("\n## ", start + 1)]


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)


def render_overlay(tmp_path: Path, extra_patches: tuple[dict[str, Any], ...] = ()) -> list[dict[str, Any]]:
    """The guide's overlay, placed beside a checkout called ipguard, as the guide lays it out."""
    (tmp_path / "ipguard").symlink_to(REPO)
    overlay = tmp_path / "mine"
    overlay.mkdir()
    doc = yaml.safe_load(textwrap.dedent(yaml_blocks(guide())[0]))
    doc["patches"] += list(extra_patches)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    return kustomize(overlay)


def test_the_guides_overlay_sets_image_role_and_admission_sources(tmp_path: Path) -> None:
    """The overlay of step 3 renders: our image, the IRSA role, and --admission-source on the container."""
    objects = render_overlay(tmp_path)
    container = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(".amazonaws.com/ipguard:0.1.0")
    assert any(a.startswith("--admission-source=10.0.0.0/19") for a in container["args"])
    account = only(objects, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith(":role/ipguard")


def test_the_guides_rollout_patch_limits_both_webhooks_to_the_test_namespace(tmp_path: Path) -> None:
    """Step 5.1's patch, added to the overlay, puts the rollout label on both webhooks' namespaceSelector."""
    (rollout,) = yaml.safe_load(textwrap.dedent(yaml_blocks(guide())[1]))
    objects = render_overlay(tmp_path, (rollout,))
    for hook in webhooks(objects):
        assert {"key": "ipguard.io/rollout", "operator": "In", "values": ["test"]} in (
            hook["namespaceSelector"]["matchExpressions"])


def test_settings_reference_lists_every_key_with_its_default() -> None:
    """Every ConfigMap key ipguard knows is in the README's table, with the default `Settings()` uses."""
    start = README.index("## Settings (ConfigMap `data`)")
    rows = dict(re.findall(r"^\| `(\w+)` \| .* \| (.+) \|$", README[start:README.index("\n## ", start + 1)],
                           re.MULTILINE))
    assert set(rows) == KNOWN_KEYS
    defaults = Settings()
    expected = {
        "mode": defaults.mode.value, "zoneReserve": defaults.zone_reserve, "nodeReserve": defaults.node_reserve,
        "exemptNamespaces": ",".join(sorted(defaults.exempt_namespaces)),
        "reservationTTLSeconds": defaults.reservation_ttl, "reservationConfirmSeconds": defaults.reservation_confirm,
        "maxUnconfirmedReservations": defaults.max_unconfirmed, "stalenessSeconds": defaults.staleness_bound,
        "maxSteeredNodes": defaults.max_steered_nodes,
    }
    for key, value in expected.items():
        text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        assert rows[key] == f"`{text}`", key


def test_every_alert_is_explained_in_the_readme() -> None:
    """Each alert of the rule file has a row in the README's alerts table."""
    alerts = {rule["alert"] for group in rule_file()["spec"]["groups"] for rule in group["rules"]}
    rows = set(re.findall(r"^\| `(Ipguard\w+)` \|", guide(), re.MULTILINE))
    assert rows == alerts

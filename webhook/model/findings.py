"""A finding: one thing a check found about an object, with the text a developer reads.

Checks on objects other than pod placement (SecurityGroupPolicies, ENIConfigs, a branch-ENI pod's groups)
answer with findings: the denying ones make the denial message (enforce) or warnings (warn mode); the others
are warnings in every mode but dry-run. The figures are in the text, so the message, the warning and the
audit annotation say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Finding:
    code: str  # short and stable, for audit annotations and metrics: "unknown-group", "too-many-groups", ...
    deny: bool  # grounds for a denial (in enforce mode); otherwise a warning only
    message: str  # the whole sentence, with names and figures
    warning: str  # the same in one short line (warnings are cut at 120 characters)


def denial_text(findings: tuple[Finding, ...]) -> str:
    """The denial message: every denying finding, most important first, as one paragraph."""
    return "ipguard: " + " ".join(f.message for f in findings if f.deny)

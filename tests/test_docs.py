"""What README states about the rules matches the code's own statement of them."""

from __future__ import annotations

import re

from tests.paths import REPO
from webhook.model.index import HEADROOM_RULE


def words(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", "").replace("*", "")).strip()


def test_readme_states_the_headroom_rule_the_code_follows() -> None:
    assert words(HEADROOM_RULE) in words((REPO / "README.md").read_text(encoding="utf-8"))

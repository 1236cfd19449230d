"""README and CI stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from agent_finetune.training.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_config_reference_matches_field_descriptions() -> None:
    block = re.search(
        r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", README, re.S
    )
    assert block, "README.md lost its config-reference markers"
    assert block.group(1) == reference_markdown(), (
        "README.md's configuration reference is stale: regenerate it with "
        "`python -m agent_finetune.training.config` between the config-reference markers"
    )


def test_ci_runs_the_readme_test_command() -> None:
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    test_cmd = first_block.splitlines()[1].split("#")[0].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "agent-finetune demo" in first_block.splitlines()[0]

"""README and CI stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from agent_finetune.training.config import reference_markdown
from server_plugin.settings import reference_markdown as serving_reference

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_block(marker: str) -> str:
    block = re.search(rf"<!-- {marker}:start -->\n(.*?)\n<!-- {marker}:end -->", README, re.S)
    assert block, f"README.md lost its {marker} markers"
    return block.group(1)


def test_config_reference_matches_field_descriptions() -> None:
    assert readme_block("config-reference") == reference_markdown(), (
        "README.md's configuration reference is stale: regenerate it with "
        "`python -m agent_finetune.training.config` between the config-reference markers"
    )


def test_serving_settings_reference_matches_the_settings() -> None:
    assert readme_block("serving-settings") == serving_reference(), (
        "README.md's serving settings reference is stale: regenerate it with "
        "`python -m server_plugin.settings` between the serving-settings markers"
    )


def test_ci_runs_the_readme_test_command() -> None:
    first_block = README.split("```bash\n", 1)[1].split("```", 1)[0]
    test_cmd = first_block.splitlines()[1].split("#")[0].strip()
    assert test_cmd in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "agent-finetune demo" in first_block.splitlines()[0]

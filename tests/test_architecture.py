"""The house rules that code review alone would let drift: import arrows and the public API."""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
from pathlib import Path

import agent_finetune
import server_plugin

ROOT = Path(__file__).resolve().parents[1]


def test_imports_run_one_way() -> None:
    """The import-linter contracts in pyproject.toml: no cycles, no arrow against the flow."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run(
        [exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_help_imports_nothing_heavy() -> None:
    """`agent-finetune --help` must start fast: no torch, pydantic, prometheus_client, vLLM or
    HTTP client (the server client imports httpx when it is used)."""
    code = (
        "import sys\n"
        "from agent_finetune.cli import build_parser\n"
        "import agent_finetune.registry\n"
        "build_parser().format_help()\n"
        "heavy = ('torch', 'pydantic', 'prometheus_client', 'vllm', 'transformers', 'yaml',\n"
        "         'peft', 'trl', 'httpx', 'openai')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _public(module: object) -> list[str]:
    """Public names, less submodules (importing one anywhere adds it as an attribute)."""
    return sorted(
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and n != "annotations" and not isinstance(v, types.ModuleType)
    )


def test_public_api_is_what_all_says() -> None:
    """Like httpx's test_exported_members: __all__ and the module's real names agree."""
    assert sorted(agent_finetune.__all__) == [
        "FineTuningConfig",
        "__version__",
        "generate_text",
        "load_model_and_tokenizer",
        "run_fine_tuning",
    ]
    for module in (agent_finetune, server_plugin):
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module.__name__}.{name}"
    import agent_finetune.registry as registry

    assert _public(registry) == sorted(registry.__all__)

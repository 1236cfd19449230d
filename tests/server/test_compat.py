"""The vLLM compatibility layer: feature detection on fake vLLM module trees (fast), the
plugin's refusal of several API-server processes, and the real installed vLLM."""

from __future__ import annotations

import ast
import asyncio
import sys
import types
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from agent_finetune.errors import ConfigError, VllmCompatError
from server_plugin import compat

ROOT = Path(__file__).resolve().parents[2]


class LoadRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class LoadRequestOld(BaseModel):  # a vLLM without load_inplace
    lora_name: str
    lora_path: str


class ErrorInfo(BaseModel):
    message: str


class ErrorResponse(BaseModel):
    error: ErrorInfo


class OpenAIServingModels:
    pass


# Module trees as each vLLM line lays them out (None: the module does not exist).
LAYOUT_032 = {
    "vllm.entrypoints.serve.lora.protocol": {"LoadLoRAAdapterRequest": LoadRequest},
    "vllm.entrypoints.serve.engine.protocol": {"ErrorResponse": ErrorResponse},
    "vllm.entrypoints.openai.engine.protocol": None,
    "vllm.entrypoints.openai.models.serving": {"OpenAIServingModels": OpenAIServingModels},
}
LAYOUT_026 = {  # 0.26-0.28: ErrorResponse still under openai/, no serve/engine/protocol.py
    "vllm.entrypoints.serve.lora.protocol": {"LoadLoRAAdapterRequest": LoadRequest},
    "vllm.entrypoints.serve.engine.protocol": None,
    "vllm.entrypoints.openai.engine.protocol": {"ErrorResponse": ErrorResponse},
    "vllm.entrypoints.openai.models.serving": {"OpenAIServingModels": OpenAIServingModels},
}


def fake_vllm(monkeypatch: pytest.MonkeyPatch, layout: dict[str, dict[str, Any] | None]) -> None:
    for name, attrs in layout.items():
        module = None
        if attrs is not None:
            module = types.ModuleType(name)
            for key, value in attrs.items():
                setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)


def test_detects_the_032_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_vllm(monkeypatch, LAYOUT_032)
    found = compat.detect()
    assert found.load_request is LoadRequest and found.error_response is ErrorResponse
    assert found.serving_models is OpenAIServingModels and found.load_inplace


def test_detects_the_026_error_response_location(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_vllm(monkeypatch, LAYOUT_026)
    assert compat.detect().error_response is ErrorResponse


def test_detects_a_load_request_without_load_inplace(monkeypatch: pytest.MonkeyPatch) -> None:
    layout = dict(LAYOUT_032)
    layout["vllm.entrypoints.serve.lora.protocol"] = {"LoadLoRAAdapterRequest": LoadRequestOld}
    fake_vllm(monkeypatch, layout)
    assert compat.detect().load_inplace is False


@pytest.mark.parametrize(
    ("module", "what"),
    [
        ("vllm.entrypoints.serve.lora.protocol", "LoRA load request class"),
        ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels class"),
    ],
)
def test_a_missing_internal_is_named_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, module: str, what: str
) -> None:
    layout = dict(LAYOUT_032)
    layout[module] = {}  # the module exists, the class does not
    fake_vllm(monkeypatch, layout)
    with pytest.raises(VllmCompatError, match=what) as e:
        compat.detect()
    assert module in str(e.value) and "agent-finetune sync" in str(e.value)


def test_no_error_response_anywhere_lists_every_place_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    layout = dict(LAYOUT_026)
    layout["vllm.entrypoints.openai.engine.protocol"] = None
    fake_vllm(monkeypatch, layout)
    with pytest.raises(VllmCompatError) as e:
        compat.detect()
    for module, _ in compat.ERROR_RESPONSE:
        assert module in str(e.value)


@given(
    st.integers(0, 99),
    st.integers(0, 999),
    st.integers(0, 99),
    st.sampled_from(["", "+cpu", "+cu129", ".post2", "rc1"]),
)
def test_parse_version_reads_the_release_line(
    major: int, minor: int, patch: int, tail: str
) -> None:
    assert compat.parse_version(f"{major}.{minor}.{patch}{tail}") == (major, minor)


def test_check_version_refuses_lines_without_endpoint_plugins() -> None:
    with pytest.raises(VllmCompatError, match="endpoint plugins"):
        compat.check_version("0.25.1")
    with pytest.raises(VllmCompatError, match="not installed"):
        compat.check_version(None)
    for ok in ("0.26.0", "0.32.0+cpu", "0.33.1"):
        assert compat.check_version(ok) is None
    assert "newer" in (compat.check_version("0.34.0") or "")


def engine(api_process_count: int | None, lora: bool = True) -> Any:
    parallel = types.SimpleNamespace()
    if api_process_count is not None:
        parallel._api_process_count = api_process_count
    lora_config = types.SimpleNamespace(max_lora_rank=16) if lora else None
    config = types.SimpleNamespace(parallel_config=parallel, lora_config=lora_config)
    return types.SimpleNamespace(vllm_config=config)


def test_api_process_count_prefers_the_engine_config() -> None:
    # `python -m vllm.entrypoints.openai.api_server --api-server-count 2` runs one process.
    assert compat.api_process_count(engine(1), Namespace(api_server_count=2)) == 1
    assert compat.api_process_count(engine(3), Namespace(api_server_count=None)) == 3
    assert compat.api_process_count(engine(None), Namespace(api_server_count=2)) == 2
    assert compat.api_process_count(engine(None), Namespace()) == 1


def test_plugin_refuses_several_api_server_processes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each of N API-server processes would run its own reconciler: refuse, loading nothing."""
    from server_plugin.plugin import EndpointPlugin

    monkeypatch.setenv("AGENT_FINETUNE_REGISTRY", str(tmp_path))
    loads: list[Any] = []

    class Models(FakeServingModels):
        async def load_lora_adapter(self, request: Any) -> Any:
            loads.append(request)
            return await super().load_lora_adapter(request)

    plugin = EndpointPlugin()
    state = types.SimpleNamespace(openai_serving_models=Models())
    asyncio.run(plugin.init_state(engine(2), state, Namespace(model="m", api_server_count=2)))
    assert plugin.reconciler is None and not loads
    assert plugin.error is not None and "--api-server-count 1" in plugin.error
    response = asyncio.run(plugin.adapters(None))  # type: ignore[arg-type]
    assert response.status_code == 503 and b"--api-server-count 1" in response.body


@pytest.mark.parametrize(
    "flag", [["--api-server-count", "2"], ["--api-server-count=4"], ["-asc", "3"]]
)
def test_serve_refuses_several_api_servers(flag: list[str]) -> None:
    from server_plugin.launch import build_command

    with pytest.raises(ConfigError, match="--api-server-count 1"):
        build_command("m", None, extra_args=flag)
    assert build_command("m", None, extra_args=["--api-server-count", "1"])[-1] == "1"


def test_serve_cli_exits_with_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent_finetune.cli import main

    argv = ["serve", "--model", "m", "--registry", str(tmp_path), "--dry-run"]
    assert main([*argv, "--", "--api-server-count", "2"]) == 1
    assert "--api-server-count 1" in capsys.readouterr().err


def test_replace_route_wins_over_the_core_route() -> None:
    """vLLM 0.26-0.31 append plugin routes after the core ones; the core route must go."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    app.add_api_route("/v1/models", lambda: {"who": "core"}, methods=["GET"])
    app.add_api_route("/v1/models", lambda: {"who": "core-post"}, methods=["POST"])
    app.mount("/", lambda scope, receive, send: None)  # a catch-all after the core routes
    compat.replace_route(app, "/v1/models", lambda: {"who": "plugin"}, ["GET"])
    compat.replace_route(app, "/v1/adapters", lambda: {"who": "new"}, ["GET"])
    client = TestClient(app)
    assert client.get("/v1/models").json() == {"who": "plugin"}
    assert client.post("/v1/models").json() == {"who": "core-post"}
    assert [getattr(r, "path", "") for r in app.router.routes][-2:] == ["", "/v1/adapters"]


class FakeServingModels:
    """The members of OpenAIServingModels the plugin uses, with vLLM's behaviour."""

    def __init__(self) -> None:
        self.lora_requests: dict[str, Any] = {}
        self.next_id = 0

    async def load_lora_adapter(self, request: Any) -> Any:
        if "bad" in request.lora_path:
            return ErrorResponse(error=ErrorInfo(message="no adapter_config.json"))
        self.next_id += 1
        self.lora_requests[request.lora_name] = types.SimpleNamespace(
            lora_name=request.lora_name, lora_path=request.lora_path, lora_int_id=self.next_id
        )
        return "Success"

    def is_base_model(self, name: str) -> bool:
        return name == "base"

    async def show_available_models(self) -> Any:
        cards = [types.SimpleNamespace(id="base")] + [
            types.SimpleNamespace(id=r.lora_name) for r in self.lora_requests.values()
        ]

        class ModelList:
            data = cards

            def model_dump(self) -> dict[str, Any]:
                return {"data": [{"id": c.id} for c in cards]}

        return ModelList()


def serving_models(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[FakeServingModels, compat.ServingModels]:
    fake_vllm(monkeypatch, LAYOUT_032)
    fake = FakeServingModels()
    models = compat.ServingModels.from_state(
        types.SimpleNamespace(openai_serving_models=fake), compat.detect()
    )
    return fake, models


def test_serving_models_loads_points_drops_and_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, models = serving_models(monkeypatch)

    async def scenario() -> None:
        assert await models.load("a@v0001", "/c/a/v0001") is None
        assert await models.load("a@v0002", "/c/bad") == "no adapter_config.json"
        assert models.point("a", "a@v0001") and not models.point("a", "a@v0009")
        # One LoRARequest under both names: vLLM keys active adapters by lora_name.
        assert fake.lora_requests["a"] is fake.lora_requests["a@v0001"]
        assert models.table() == {
            "a@v0001": compat.Served("a@v0001", "/c/a/v0001", 1),
            "a": compat.Served("a@v0001", "/c/a/v0001", 1),
        }
        listed = await models.model_list()
        assert [c["id"] for c in listed["data"]] == ["base", "a@v0001", "a"]
        models.drop("a")
        assert models.get("a") is None and models.is_base_model("base")

    asyncio.run(scenario())


def test_a_dropped_name_loaded_again_keeps_its_lora_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's worker collects a batch's adapters in a set of LoRARequests, equal by name:
    a version unloaded while its requests run and loaded again under a new LoRA id put two
    ids of one name in a batch. The same name and path now get their old request back."""
    fake, models = serving_models(monkeypatch)

    async def scenario() -> None:
        assert await models.load("a@v0001", "/c/a/v0001") is None
        first = fake.lora_requests["a@v0001"]
        assert models.point("a", "a@v0001")
        models.drop("a")  # an alias: nothing to remember
        models.drop("a@v0001")
        assert models.get("a@v0001") is None
        assert await models.load("a@v0001", "/c/a/v0001") is None
        assert fake.lora_requests["a@v0001"] is first  # same id, no second load
        assert fake.next_id == 1
        models.drop("a@v0001")
        assert await models.load("a@v0001", "/c/a/v0001-other") is None  # other content
        assert models.get("a@v0001").lora_id != first.lora_int_id  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_serving_models_without_what_the_plugin_uses_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_vllm(monkeypatch, LAYOUT_032)
    with pytest.raises(VllmCompatError, match="load_lora_adapter"):
        compat.ServingModels(types.SimpleNamespace(lora_requests={}), compat.detect())
    with pytest.raises(VllmCompatError, match="openai_serving_models"):
        compat.ServingModels.from_state(types.SimpleNamespace(), compat.detect())


def test_only_compat_imports_vllm() -> None:
    """Every other module reaches vLLM through compat (launch only names its module path)."""
    offenders = []
    for path in sorted([*ROOT.glob("server_plugin/*.py"), *ROOT.glob("agent_finetune/**/*.py")]):
        if path.name == "compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "vllm"]
    assert offenders == []


@pytest.mark.vllm
def test_the_installed_vllm_has_every_internal_the_plugin_uses() -> None:
    """Run in each venv of bench/vllm_matrix.sh: the real modules, not fakes."""
    pytest.importorskip("vllm")
    found = compat.detect()
    assert compat.check_version(found.version) is None
    assert found.load_inplace
    for member in compat.SERVING_MODELS_API:
        if member != "lora_requests":  # an instance attribute, set in __init__
            assert callable(getattr(found.serving_models, member)), member
    import vllm.plugins

    assert vllm.plugins.ENDPOINT_PLUGINS_GROUP == compat.ENDPOINT_PLUGINS_GROUP
    from vllm.plugins.endpoint_plugins.interface import EndpointPlugin as Protocol

    from server_plugin.plugin import EndpointPlugin

    assert isinstance(EndpointPlugin(), Protocol)
    from vllm.config import ParallelConfig

    engine = types.SimpleNamespace(vllm_config=types.SimpleNamespace(parallel_config=None))
    engine.vllm_config.parallel_config = ParallelConfig(_api_process_count=2)
    assert compat.api_process_count(engine, Namespace(api_server_count=None)) == 2

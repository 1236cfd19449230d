"""`agent_finetune.training.tiny_model`: the local random models of tests, benches and demo."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import load_file

from agent_finetune.registry.adapter import load_base_config, validate_adapter
from agent_finetune.training.tiny_model import KNOWN_SHAPES, build_shaped_model, random_adapter


def test_the_tiny_model_speaks_chatml_and_any_language(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    config = json.loads((tiny_model / "config.json").read_text())
    assert config["head_dim"] == 32  # the smallest vLLM's CPU attention supports
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = "您的订单已发货 — an order shipped"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi" in rendered


def test_random_adapters_are_servable_and_differ_by_seed(tiny_model: Path, tmp_path: Path) -> None:
    base_config = load_base_config(tiny_model)
    adapters = [random_adapter(tiny_model, tmp_path / f"a{s}", seed=s, r=4) for s in (1, 2)]
    for folder in adapters:
        report = validate_adapter(folder, max_rank=4, base_config=base_config)
        assert report.ok, report.problems
    one, two = (load_file(str(a / "adapter_model.safetensors")) for a in adapters)
    assert one.keys() == two.keys()
    assert any((one[k] != two[k]).any() for k in one)


def test_a_shaped_model_without_weights_has_the_real_shape(tmp_path: Path) -> None:
    out = build_shaped_model(tmp_path / "m", "qwen2.5-0.5b", weights=False)
    config = json.loads((out / "config.json").read_text())
    shape = KNOWN_SHAPES["qwen2.5-0.5b"]
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size"):
        assert config[key] == shape[key]
    assert not list(out.glob("*.safetensors"))  # for vLLM's --load-format dummy

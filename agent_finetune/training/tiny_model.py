"""Build a tiny Llama-shaped base model locally: random weights, a BPE tokenizer trained on the
spot, and a ChatML chat template. No hub access. Tests and the demo use it; vLLM serves it.

`build_model_from_config` also builds real shapes (e.g. Qwen2.5-7B's) with random weights
for GPU throughput benchmarks, where weight values do not matter.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Text to train the tokenizer on besides the caller's corpus: English and Chinese, so any
# dataset tokenizes into reasonable pieces.
_BASE_CORPUS = [
    "How do I reset my password? Open Settings, choose Account, then Reset password.",
    "The quick brown fox jumps over the lazy dog. Customer support answers questions.",
    "Your order has shipped and will arrive in three to five business days.",
    "Please restart the application and try again. If the problem persists, contact us.",
    "如何重置密码？打开设置，选择账户，然后点击重置密码。",
    "您的订单已发货，预计三到五个工作日送达。",
    "请重新启动应用程序后再试一次。如果问题仍然存在，请联系我们。",
    "你是一名专业的客服助手，请用简洁的语言回答用户的问题。",
    "system user assistant instruction response input output prompt completion",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 v1 v2 version adapter model server",
]

# Shapes of real models, for benchmarks with random weights (no hub here).
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
}


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024) -> Any:
    """A byte-level BPE tokenizer (handles any language) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*_BASE_CORPUS, *corpus], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _corpus_from_files(paths: Iterable[str | Path]) -> list[str]:
    texts: list[str] = []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8-sig")
        texts.extend(line for line in text.splitlines() if line.strip())
    return texts


def build_tiny_model(
    out_dir: str | Path,
    *,
    corpus_files: Iterable[str | Path] = (),
    hidden_size: int = 128,
    num_layers: int = 2,
    vocab_size: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama model + tokenizer to ``out_dir`` and return the path.

    head_dim is 32, the smallest vLLM's CPU attention supports. Takes a few seconds.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_corpus_from_files(corpus_files), vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=max(1, hidden_size // 64),
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Wider than the usual 0.02 so the frozen lm_head can express confident predictions:
        # with 0.02 its logits stay within a few units and the loss cannot fall far.
        initializer_range=0.1,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        "Tiny random Llama model built locally by agent_finetune.training.tiny_model for tests "
        "and the demo. Its answers are meaningless until a LoRA adapter is trained on it.\n",
        encoding="utf-8",
    )
    return out


def build_shaped_model(
    out_dir: str | Path,
    shape: str,
    *,
    weights: bool = True,
    corpus_files: Iterable[str | Path] = (),
    seed: int = 0,
) -> Path:
    """Write a model of a real shape (``KNOWN_SHAPES``) with random bf16 weights and the
    locally trained tokenizer to ``out_dir``; vLLM serves it like the real model.

    The vocabulary is the tokenizer's (1024), not the real one: a random model would
    otherwise emit ids the tokenizer cannot decode. ``weights=False`` writes only the
    config and tokenizer, for vLLM's ``--load-format dummy`` (random weights in place).
    Weights are drawn on the GPU when there is one (seconds even for 7B shapes).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(_corpus_from_files(corpus_files))
    fields = dict(KNOWN_SHAPES[shape])
    model_type = fields.pop("model_type")
    fields.update(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(model_type, **fields)
    config.dtype = torch.bfloat16
    generation = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if weights:
        torch.manual_seed(seed)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.generation_config = generation
        model.save_pretrained(out, safe_serialization=True)
    else:
        config.save_pretrained(out)
        generation.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_model_from_config(
    shape: str | dict[str, Any], *, dtype: Any = None, device: Any = None
) -> Any:
    """Instantiate a model with random weights from a known shape name or a config dict."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(KNOWN_SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    model_type = cfg_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg_dict)
    with torch.device(device or "cpu"):
        return AutoModelForCausalLM.from_config(config, torch_dtype=dtype or torch.bfloat16)


def random_adapter(
    base: Path,
    out: Path,
    *,
    seed: int,
    r: int = 8,
    scale: float = 4.0,
    target_modules: list[str] | None = None,
    **lora_kwargs: Any,
) -> Path:
    """Save a random PEFT LoRA adapter for ``base`` to ``out`` (tests and benchmarks).

    ``init_lora_weights=False`` plus a scaled-up B gives greedy outputs that differ from the
    base model and from each other, with no training.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from agent_finetune.registry.adapter import LINEAR_MODULES

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=target_modules or list(LINEAR_MODULES),
        init_lora_weights=False,
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.mul_(scale)
    peft_model.save_pretrained(str(out))
    return out

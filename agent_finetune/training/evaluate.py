"""Evaluate adapter versions on held-out rows and compare two of them, pairwise.

Per row, three metrics (higher is better for all):

- ``exact``: 1 when the greedy answer equals the reference after whitespace normalisation;
- ``f1``: token F1 between answer and reference (lower-cased, punctuation dropped; CJK
  characters count as one token each, so Chinese answers score sensibly);
- ``loglik``: the mean log-probability per token of the reference answer given the prompt
  (teacher forcing, no generation, deterministic).

Two ways to measure, with the same rendering (the tokenizer's chat template, as vLLM's chat
endpoint renders it):

- ``ServerEvaluator``: through a running server, what will be served. Answers come from
  ``/v1/chat/completions``; the log-likelihood from ``/tokenize`` (chat template) and
  ``/v1/completions`` with ``prompt_logprobs``.
- ``evaluate_offline``: PEFT on the base model, for CI and machines without vLLM.

``compare_scores`` pairs the rows of two versions: mean difference, win rate and a bootstrap
confidence interval. ``gate`` decides a promotion from it and records everything.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent_finetune.errors import EvalError, ModelSourceError, ServerResponseError
from agent_finetune.server_client import ServerClient
from agent_finetune.training.data import Example

Metric = Literal["loglik", "f1", "exact"]
METRICS: tuple[Metric, ...] = ("loglik", "f1", "exact")
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

# -- per-row metrics ---------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+", re.UNICODE)


def _is_cjk(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in {"W", "F"} and ch.isalnum()


def answer_tokens(text: str) -> list[str]:
    """Lower-cased word tokens without punctuation; each CJK character is its own token."""
    out: list[str] = []
    for word in _WORD_RE.findall(unicodedata.normalize("NFKC", text).lower()):
        if any(_is_cjk(c) for c in word):
            buf = ""
            for c in word:
                if _is_cjk(c):
                    if buf:
                        out.append(buf)
                        buf = ""
                    out.append(c)
                else:
                    buf += c
            if buf:
                out.append(buf)
        else:
            out.append(word)
    return out


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both are equal after collapsing whitespace, else 0.0."""
    return float(" ".join(prediction.split()) == " ".join(reference.split()))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall (SQuAD-style, multiset overlap)."""
    pred, ref = answer_tokens(prediction), answer_tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


# -- results and paired comparison -------------------------------------------------------------


@dataclass
class EvalResult:
    """One version's per-row scores on one dataset."""

    model: str
    scores: dict[str, list[float]]
    answers: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.scores["loglik"])

    def means(self) -> dict[str, float]:
        return {m: statistics.fmean(v) for m, v in self.scores.items() if v}


@dataclass(frozen=True)
class Comparison:
    """Candidate minus live, row by row, on one metric."""

    metric: str
    rows: int
    candidate: float
    live: float
    delta: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    confidence: float = CONFIDENCE

    @property
    def win_rate(self) -> float:
        """Share of rows where the candidate scores higher (ties count half)."""
        return (self.wins + 0.5 * self.ties) / self.rows if self.rows else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "win_rate": self.win_rate}


def bootstrap_ci(
    deltas: Sequence[float],
    *,
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``deltas`` (seeded: reproducible)."""
    n = len(deltas)
    if n == 0:
        raise EvalError("no rows to compare")
    if not 0 < confidence < 1:
        raise EvalError(f"confidence {confidence}: must be in (0, 1)")
    rng = random.Random(seed)
    means = sorted(
        math.fsum(deltas[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples)
    )
    alpha = (1 - confidence) / 2
    lo = means[max(0, math.floor(alpha * resamples))]
    hi = means[min(resamples - 1, math.ceil((1 - alpha) * resamples) - 1)]
    return lo, hi


def compare_scores(
    candidate: Sequence[float],
    live: Sequence[float],
    *,
    metric: str = "loglik",
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """Paired comparison of per-row scores (same rows, same order)."""
    if len(candidate) != len(live):
        raise EvalError(f"paired comparison needs the same rows: {len(candidate)} != {len(live)}")
    deltas = [c - v for c, v in zip(candidate, live, strict=True)]
    lo, hi = bootstrap_ci(deltas, confidence=confidence, resamples=resamples, seed=seed)
    return Comparison(
        metric=metric,
        rows=len(deltas),
        candidate=statistics.fmean(candidate),
        live=statistics.fmean(live),
        delta=statistics.fmean(deltas),
        ci_low=lo,
        ci_high=hi,
        wins=sum(d > 0 for d in deltas),
        ties=sum(d == 0 for d in deltas),
        losses=sum(d < 0 for d in deltas),
        confidence=confidence,
    )


def is_better(comparison: Comparison, min_delta: float = 0.0) -> bool:
    """The gate's rule: the whole confidence interval of the mean gain lies above ``min_delta``."""
    return comparison.ci_low > min_delta


# -- through a running server ------------------------------------------------------------------


class ServerEvaluator:
    """Score a served model (``name``, ``name@vNNNN`` or the base model) through the server.

    ``server`` and ``api_key`` follow the rules of ``ServerClient`` (with or without ``/v1``;
    the key from ``--api-key``, $VLLM_API_KEY or $OPENAI_API_KEY).
    """

    def __init__(
        self,
        server: str,
        *,
        api_key: str | None = None,
        max_tokens: int = 128,
        temperature: float = 0.0,
        timeout: float = 120.0,
        transport: Any = None,
    ) -> None:
        self._client = ServerClient(server, api_key=api_key, timeout=timeout, transport=transport)
        self.max_tokens = max_tokens
        self.temperature = temperature

    def close(self) -> None:
        self._client.close()

    def _post(self, route: str, body: dict[str, Any], field: Callable[[Any], Any]) -> Any:
        """POST to the server; ``field`` picks what is needed from the answer, and an answer
        without it is an error that names the route."""
        data = self._client.post_json(route, body)
        try:
            return field(data)
        except (KeyError, IndexError, TypeError, ValueError):
            raise ServerResponseError(
                f"{self._client.url(route)} answered without the expected fields: {str(data)[:300]}"
            ) from None

    def answer(self, model: str, ex: Example) -> str:
        body = {
            "model": model,
            "messages": ex.prompt_messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        return str(
            self._post(
                "/v1/chat/completions", body, lambda d: d["choices"][0]["message"]["content"]
            )
            or ""
        )

    def _tokenize(self, model: str, messages: list[dict[str, str]], gen: bool) -> list[int]:
        body = {"model": model, "messages": messages, "add_generation_prompt": gen}
        tokens: list[int] = self._post("/tokenize", body, lambda d: [int(t) for t in d["tokens"]])
        return tokens

    def loglik(self, model: str, ex: Example) -> float:
        """Mean log-probability of the reference answer's tokens (chat template, served)."""
        prompt = self._tokenize(model, ex.prompt_messages, True)
        full = self._tokenize(model, ex.messages, False)
        return mean_answer_logprob(
            prompt,
            full,
            lambda ids: self._post(
                "/v1/completions",
                {
                    "model": model,
                    "prompt": ids,
                    "max_tokens": 1,
                    "temperature": 0,
                    "prompt_logprobs": 0,
                },
                lambda d: list(d["choices"][0]["prompt_logprobs"]),
            ),
            where=ex.where,
        )

    def evaluate(self, model: str, examples: Sequence[Example]) -> EvalResult:
        scores: dict[str, list[float]] = {m: [] for m in METRICS}
        answers = []
        for ex in examples:
            reply = self.answer(model, ex)
            answers.append(reply)
            scores["exact"].append(exact_match(reply, ex.response))
            scores["f1"].append(token_f1(reply, ex.response))
            scores["loglik"].append(self.loglik(model, ex))
        return EvalResult(model, scores, answers)


def mean_answer_logprob(
    prompt: Sequence[int],
    full: Sequence[int],
    prompt_logprobs: Callable[[list[int]], list[Any]],
    *,
    where: str = "",
) -> float:
    """Mean logprob of ``full[len(prompt):]`` from vLLM's per-position ``prompt_logprobs``."""
    if list(full[: len(prompt)]) != list(prompt) or len(full) <= len(prompt):
        raise EvalError(
            f"{where}: the chat template renders the prompt differently with and without the "
            "answer, so the answer's tokens cannot be found"
        )
    logprobs = prompt_logprobs(list(full))
    values = []
    for pos in range(len(prompt), len(full)):
        entry = (logprobs[pos] if pos < len(logprobs) else None) or {}
        token = (
            entry.get(str(full[pos]), entry.get(full[pos])) if isinstance(entry, dict) else None
        )  # JSON keys are strings
        value = token.get("logprob") if isinstance(token, dict) else token
        if not isinstance(value, int | float):
            raise EvalError(f"{where}: the server returned no logprob for answer token {pos}")
        values.append(float(value))
    return statistics.fmean(values)


# -- offline: PEFT on the base model -----------------------------------------------------------


def evaluate_offline(
    base_model: str,
    adapters: dict[str, Path],
    examples: Sequence[Example],
    *,
    max_tokens: int = 128,
    generate: bool = True,
) -> dict[str, EvalResult]:
    """Score each adapter folder (label -> folder) with PEFT on ``base_model``, greedily.

    The prompt is rendered with the base tokenizer's chat template, as vLLM renders it.
    ``generate=False`` scores ``loglik`` only (one forward pass per row: fast on a CPU).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_finetune.training.backend import check_model_source
    from agent_finetune.training.prompts import render_chat

    try:
        check_model_source(base_model)
    except ModelSourceError as e:
        raise ModelSourceError(
            f"offline evaluation: {e}; or pass --base-model DIR, or evaluate through a "
            "server with --server URL"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model: Any = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    labels = list(adapters)
    for i, label in enumerate(labels):
        if i == 0:
            model = PeftModel.from_pretrained(model, str(adapters[label]), adapter_name=label)
        else:
            model.load_adapter(str(adapters[label]), adapter_name=label)
    model.eval()
    rendered = []
    for ex in examples:
        prompt, response = render_chat(tokenizer, ex)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        rendered.append((list(p_ids), list(r_ids)))
    out = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for label in labels:
        model.set_adapter(label)
        scores: dict[str, list[float]] = {m: [] for m in (METRICS if generate else ("loglik",))}
        answers = []
        with torch.no_grad():
            for ex, (p_ids, r_ids) in zip(examples, rendered, strict=True):
                ids = torch.tensor([p_ids + r_ids])
                logits = model(input_ids=ids).logits[0, len(p_ids) - 1 : -1].float()
                lp = torch.log_softmax(logits, dim=-1)
                token_lp = lp.gather(1, torch.tensor(r_ids).unsqueeze(1)).squeeze(1)
                scores["loglik"].append(float(token_lp.mean()))
                if not generate:
                    continue
                gen = model.generate(
                    input_ids=torch.tensor([p_ids]),
                    attention_mask=torch.ones(1, len(p_ids), dtype=torch.long),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
                reply = str(tokenizer.decode(gen[0, len(p_ids) :], skip_special_tokens=True))
                answers.append(reply)
                scores["exact"].append(exact_match(reply, ex.response))
                scores["f1"].append(token_f1(reply, ex.response))
        out[label] = EvalResult(label, scores, answers)
    return out

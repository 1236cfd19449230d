"""Evaluation: metrics, paired comparison, bootstrap interval, the gate rule, and the two ways
to score a version (through a server, offline with PEFT)."""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_finetune.errors import (
    AgentFinetuneError,
    EvalError,
    ModelSourceError,
    ServerResponseError,
)
from agent_finetune.training.data import Example
from agent_finetune.training.evaluate import (
    ServerEvaluator,
    answer_tokens,
    bootstrap_ci,
    compare_scores,
    evaluate_offline,
    exact_match,
    is_better,
    mean_answer_logprob,
    token_f1,
)

floats = st.floats(min_value=-10, max_value=10, allow_nan=False, allow_infinity=False)


def test_token_f1_known_values() -> None:
    assert token_f1("Open Settings, then Account.", "open settings then account") == 1.0
    # pred 4 tokens, ref 2, overlap 2: p=0.5, r=1 -> f1=2/3
    assert token_f1("reset the password now", "reset password") == pytest.approx(2 / 3)
    assert token_f1("nothing alike", "reset password") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_cjk_characters_are_tokens() -> None:
    assert answer_tokens("打开设置 ok") == ["打", "开", "设", "置", "ok"]
    assert token_f1("打开设置", "打开账户设置") == pytest.approx(2 * (4 / 4 * 4 / 6) / (1 + 4 / 6))


def test_exact_match_normalises_whitespace_only() -> None:
    assert exact_match("  a  b\n", "a b") == 1.0
    assert exact_match("A b", "a b") == 0.0


@given(st.text(max_size=40), st.text(max_size=40))
def test_f1_is_symmetric_and_bounded(a: str, b: str) -> None:
    f = token_f1(a, b)
    assert 0.0 <= f <= 1.0
    assert f == pytest.approx(token_f1(b, a))


@settings(max_examples=50, deadline=None)
@given(st.lists(floats, min_size=1, max_size=40), st.integers(0, 2**16))
def test_bootstrap_ci_contains_the_mean_and_is_seeded(deltas: list[float], seed: int) -> None:
    lo, hi = bootstrap_ci(deltas, resamples=300, seed=seed)
    mean = statistics.fmean(deltas)
    assert min(deltas) - 1e-9 <= lo <= hi <= max(deltas) + 1e-9
    assert lo - 1e-9 <= mean <= hi + 1e-9 or len(set(deltas)) > 1  # percentile CI, skewed ok
    assert (lo, hi) == bootstrap_ci(deltas, resamples=300, seed=seed)


def test_bootstrap_ci_of_constant_deltas_is_a_point() -> None:
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    with pytest.raises(EvalError):
        bootstrap_ci([])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(floats, floats), min_size=1, max_size=30))
def test_compare_counts_and_means(pairs: list[tuple[float, float]]) -> None:
    cand, live = [p[0] for p in pairs], [p[1] for p in pairs]
    c = compare_scores(cand, live, resamples=200)
    assert c.wins + c.ties + c.losses == c.rows == len(pairs)
    assert c.wins == sum(a > b for a, b in pairs)
    assert c.delta == pytest.approx(statistics.fmean(cand) - statistics.fmean(live), abs=1e-9)
    assert 0.0 <= c.win_rate <= 1.0
    # Swapping sides mirrors everything.
    m = compare_scores(live, cand, resamples=200)
    assert (m.wins, m.losses) == (c.losses, c.wins)


def test_gate_rule_needs_the_whole_interval_above_min_delta() -> None:
    better = compare_scores([1.0, 1.2, 0.9, 1.1] * 5, [0.0] * 20)
    assert is_better(better) and is_better(better, 0.5) and not is_better(better, 1.0)
    same = compare_scores([0.3] * 20, [0.3] * 20)
    assert same.win_rate == 0.5 and not is_better(same)  # not better is not promoted
    noisy = compare_scores([1, -1] * 10, [0] * 20)
    assert noisy.ci_low < 0 < noisy.ci_high and not is_better(noisy)
    with pytest.raises(EvalError):
        compare_scores([1.0], [1.0, 2.0])


def test_mean_answer_logprob_reads_the_answer_positions() -> None:
    prompt, full = [1, 2, 3], [1, 2, 3, 7, 8]
    per_pos = [None, {"2": {"logprob": -9}}, {"3": {"logprob": -9}}, {"7": {"logprob": -1.0}},
               {"8": {"logprob": -3.0}, "5": {"logprob": -0.1}}]  # fmt: skip
    assert mean_answer_logprob(prompt, full, lambda ids: per_pos) == -2.0
    with pytest.raises(EvalError, match="renders the prompt differently"):
        mean_answer_logprob([1, 9], full, lambda ids: per_pos)
    with pytest.raises(EvalError, match="no logprob"):
        mean_answer_logprob(prompt, full, lambda ids: [*per_pos[:4], {"5": {"logprob": 0}}])


EXAMPLE = Example(
    [{"role": "user", "content": "hours?"}, {"role": "assistant", "content": "9 to 5"}],
    where="heldout.json:1",
)


def served(answers: dict[str, Any]) -> httpx.MockTransport:
    """A server whose answer to each route is ``answers[route]`` (a callable gets the body)."""

    def handle(request: httpx.Request) -> httpx.Response:
        answer = answers[request.url.path]
        body = json.loads(request.content)
        return httpx.Response(200, json=answer(body) if callable(answer) else answer)

    return httpx.MockTransport(handle)


GOOD = {
    "/v1/chat/completions": {"choices": [{"message": {"content": "9 to 5"}}]},
    "/tokenize": lambda b: {"tokens": [1, 2] if b["add_generation_prompt"] else [1, 2, 7, 8]},
    "/v1/completions": lambda b: {
        "choices": [{"prompt_logprobs": [None, None, {"7": -0.5}, {"8": {"logprob": -1.5}}]}]
    },
}


def test_server_evaluator_scores_every_metric_through_the_server() -> None:
    evaluator = ServerEvaluator("http://h:8000/v1", api_key="k", transport=served(GOOD))
    result = evaluator.evaluate("bot@v0002", [EXAMPLE])
    assert result.means() == {"loglik": -1.0, "f1": 1.0, "exact": 1.0}
    assert result.answers == ["9 to 5"]


@pytest.mark.parametrize(
    ("route", "answer"),
    [
        ("/v1/chat/completions", {"choices": []}),
        ("/v1/chat/completions", {"object": "error"}),
        ("/tokenize", {"tokens": "1 2"}),
        ("/tokenize", {"count": 2}),
        ("/v1/completions", {"choices": [{"text": ""}]}),
    ],
)
def test_an_answer_without_the_expected_fields_names_the_route(
    route: str, answer: dict[str, Any]
) -> None:
    evaluator = ServerEvaluator("http://h:8000", transport=served({**GOOD, route: answer}))
    with pytest.raises(ServerResponseError, match=f"http://h:8000{route} answered without"):
        evaluator.evaluate("bot", [EXAMPLE])


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(route=st.sampled_from(sorted(GOOD)), answer=st.dictionaries(st.sampled_from(
    ["choices", "tokens", "message", "prompt_logprobs"]), json_values, max_size=2))  # fmt: skip
def test_any_server_answer_is_a_score_or_an_agent_finetune_error(
    route: str, answer: dict[str, Any]
) -> None:
    evaluator = ServerEvaluator("http://h:8000", transport=served({**GOOD, route: answer}))
    with contextlib.suppress(AgentFinetuneError):  # any other exception fails the test
        evaluator.evaluate("bot", [EXAMPLE])


def test_offline_evaluation_of_a_missing_base_model_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"--base-model DIR.*--server URL"):
        evaluate_offline(str(tmp_path / "gone"), {}, [EXAMPLE])


def test_the_evaluator_follows_the_api_key_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """`train`'s gate passes no key: the evaluator takes it from the environment (it sent
    none before, so a gate through a server started with --api-key failed)."""
    seen: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200, json=GOOD["/v1/chat/completions"])

    monkeypatch.setenv("VLLM_API_KEY", "k1")
    ServerEvaluator("http://h:8000", transport=httpx.MockTransport(handle)).answer("bot", EXAMPLE)
    assert seen == ["Bearer k1"]

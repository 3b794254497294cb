"""Where OpenAI's rules differ from TGI's, the /v1 routes follow OpenAI's (and vLLM's), over a tiny real engine.

Each expected answer comes from outside the code under test: greedy tokens from plain forwards of the served model
(tests/reference.py), penalised ones from OpenAI's formula applied to plain forwards, and a stop string's cut from
the unstopped answer of /generate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.config.schema import Config
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.types import PreparedRequest
from server.http.app import create_app
from server.http.validation import InputValidationError, validate
from tests.conftest import boot_tiny
from tests.reference import reference_greedy, reference_penalised

PROMPT = "Once upon a time"
N = 12


@pytest.fixture(scope="module")
def tiny(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return boot_tiny(tmp_path_factory.mktemp("semantics"), tiny_base, tiny_adapters["alpha"], max_new_tokens=N)


@pytest.fixture
def client(tiny: tuple[Config, Engine]) -> TestClient:
    return TestClient(create_app(tiny[1], tiny[0]))


def _completion(client: TestClient, **fields: Any) -> Any:
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": N, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def _streamed_texts(client: TestClient, body: dict[str, Any]) -> list[str]:
    """Each streamed completion chunk's text, in order (the usage chunk has no choice and adds none)."""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        datas = [line.removeprefix("data:").strip() for line in r.iter_lines() if line.startswith("data:")]
    return [c["text"] for d in datas if d != "[DONE]" for c in json.loads(d)["choices"]]


def _texts(engine: Engine, ids: list[int]) -> list[str]:
    """Each token's own text, as completions' `logprobs.tokens` lists them (one entry per generated token)."""
    return [str(engine.tokenizer.decode([i], skip_special_tokens=False)) for i in ids]


def test_temperature_zero_is_greedy_whatever_top_p_top_k_and_seed_say(
    client: TestClient, tiny: tuple[Config, Engine]
) -> None:
    engine = tiny[1]
    ids = engine.tokenize(PROMPT)
    greedy = reference_greedy(engine.model, ids, N, engine.eos_ids)
    for extra in ({"top_p": 0.9}, {"top_k": 5}, {"top_p": 0.5, "seed": 3}, {}):
        answer = _completion(client, temperature=0, logprobs=0, **extra)
        assert answer["choices"][0]["logprobs"]["tokens"] == _texts(engine, greedy), extra


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_and_what_follows_it_are_left_out_of_the_text(client: TestClient, stream: bool) -> None:
    free = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": N}}).json()
    text = free["generated_text"]
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), text  # a stop string that can be seen in the text, so the cut is tested
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stop": [stop]}
    expected = text[: text.find(stop)]
    if stream:
        assert "".join(_streamed_texts(client, body)) == expected
    else:
        answer = _completion(client, **{k: v for k, v in body.items() if k not in ("model", "prompt", "max_tokens")})
        assert answer["choices"][0]["text"] == expected and answer["choices"][0]["finish_reason"] == "stop"
    # TGI's route keeps TGI's rule: the text runs to the end of the token that completed the stop string.
    tgi = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": N, "stop": [stop]}})
    assert tgi.json()["generated_text"].startswith(expected + stop)


def _openai_penalised(engine: Engine, frequency: float, presence: float) -> list[int]:
    return reference_penalised(engine.model, engine.tokenize(PROMPT), N, engine.eos_ids, frequency, presence)


def test_frequency_and_presence_penalties_have_openais_meaning(client: TestClient, tiny: tuple[Config, Engine]) -> None:
    engine = tiny[1]
    for frequency, presence in ((1.5, 0.0), (0.0, 1.8)):
        answer = _completion(client, temperature=0, logprobs=0, frequency_penalty=frequency, presence_penalty=presence)
        expected = _openai_penalised(engine, frequency, presence)
        assert answer["choices"][0]["logprobs"]["tokens"] == _texts(engine, expected)
    plain = reference_greedy(engine.model, engine.tokenize(PROMPT), N, engine.eos_ids)
    assert _openai_penalised(engine, 0.0, 1.8) != plain  # the penalty changes the answer: the check above tested it


@pytest.mark.parametrize(
    ("route", "extra", "named"),
    [
        ("/v1/completions", {"presence_penalt": 1.0}, "presence_penalt"),
        ("/v1/completions", {"min_tokens": 2}, "min_tokens"),
        ("/v1/completions", {"logit_bias": {"5": 10.0}}, "logit_bias"),
        (
            "/v1/completions",
            {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
            "continuous_usage_stats",
        ),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
        ("/v1/chat/completions", {"tools": []}, "tools"),
    ],
)
def test_fields_not_served_are_refused_by_name(client: TestClient, route: str, extra: dict[str, Any],
                                               named: str) -> None:  # fmt: skip
    body: dict[str, Any] = {"model": "tiny-llama", "max_tokens": 2, **extra}
    body |= {"prompt": PROMPT} if route.endswith("/completions") and "chat" not in route else {}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in route else {}
    r = client.post(route, json=body)
    assert r.status_code == 400 and named in r.json()["error"]["message"], r.text


def test_neutral_values_of_unserved_fields_are_accepted(client: TestClient) -> None:
    _completion(client, logit_bias={}, top_k=-1, repetition_penalty=1.0, user="u-1", max_tokens=2)


def test_a_prompt_of_no_tokens_is_refused_before_the_engine(tiny: tuple[Config, Engine]) -> None:
    """A tokenizer that drops every character given (the demo's drops U+0004) leaves no token to predict from."""
    config, engine = tiny
    from server.http.tgi_protocol import Parameters

    with pytest.raises(InputValidationError, match="tokenizes to no tokens"):
        validate("\u0004", Parameters(), lambda _text: [], config.limits, "alpha")
    with pytest.raises(ValueError, match="at least one prompt token"):
        engine.submit(PreparedRequest(input_ids=[], params=SamplingParams(), max_new_tokens=1), lambda *_: None)


def test_an_echoed_prompt_opens_the_first_tokens_chunk(client: TestClient) -> None:
    """As vLLM streams it: one chunk per token, the prompt in front of the first one's text."""
    whole = _completion(client, temperature=0, max_tokens=4)["choices"][0]["text"]
    texts = _streamed_texts(client, {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                     "echo": True})  # fmt: skip
    assert len(texts) == 4 and texts[0].startswith(PROMPT)
    assert "".join(texts) == PROMPT + whole

"""The official `openai` client reads log-probabilities from a real server on loopback, and they are the model's.

In-process tests check the JSON; this one checks that OpenAI's own client parses it (its pydantic types would drop
or reject a misnamed field) and that what it reads equals one plain forward of PEFT's merge, on both A/B arms.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tests.live_server import LiveServer
from tests.reference import assert_served_like_reference, peft_merged, reference_greedy, reference_logprobs

TOL = 1e-4
PROMPT = "The capital of France is Paris. The capital of"


@pytest.fixture(scope="module")
def client(peaky: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    path = tmp_path_factory.mktemp("client") / "config.yaml"
    path.write_text(
        f"model: {{path: '{peaky[0]}', id: tiny-llama, dtype: float32}}\n"
        f"adapters: [{{name: alpha, path: '{peaky[1]}'}}]\nmode: ab\n"
        "limits: {max_input_tokens: 64, max_total_tokens: 128, max_new_tokens: 16}\n"
    )
    with LiveServer(path, boot_timeout=180) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(peaky: tuple[Path, Path]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    base = AutoModelForCausalLM.from_pretrained(peaky[0], dtype=torch.float32)
    return peft_merged(base, peaky[1]), AutoTokenizer.from_pretrained(peaky[0])


def _check(ref: tuple[PreTrainedModel, PreTrainedTokenizerBase], prompt_ids: list[int], served: list[tuple[str,
           float, dict[str, float]]]) -> None:  # fmt: skip
    """served: (token text, logprob, alternatives) per token, against the reference's greedy ids and top-2."""
    model, tok = ref
    ids = reference_greedy(model, prompt_ids, 8, {tok.eos_token_id})
    assert [text for text, _, _ in served] == [tok.decode([i]) for i in ids]
    assert_served_like_reference(model, prompt_ids, [(i, lp) for i, (_, lp, _) in zip(ids, served, strict=True)], TOL)
    best = reference_logprobs(model, prompt_ids, ids).topk(2, dim=-1)
    for step, (_, _, top) in enumerate(served):
        want = {tok.decode([int(i)]): float(v) for v, i in zip(best.values[step], best.indices[step], strict=True)}
        assert top.keys() == want.keys() and all(abs(top[t] - want[t]) <= TOL for t in want), (step, top, want)


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_openai_client_reads_completion_logprobs(
    client: openai.OpenAI, reference: tuple[PreTrainedModel, PreTrainedTokenizerBase], arm: str
) -> None:
    r = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2,
                                  extra_headers={"x-merge-mode": arm})  # fmt: skip
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    served = list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True))
    _check(reference, reference[1](PROMPT).input_ids, served)


@pytest.mark.parametrize("arm", ["merged", "unmerged"])
def test_openai_client_reads_streamed_chat_logprobs(
    client: openai.OpenAI, reference: tuple[PreTrainedModel, PreTrainedTokenizerBase], arm: str
) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    chunks = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                            logprobs=True, top_logprobs=2, stream=True,
                                            extra_headers={"x-merge-mode": arm})  # fmt: skip
    content = [c for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
               for c in chunk.choices[0].logprobs.content or []]  # fmt: skip
    served = [(c.token, c.logprob, {a.token: a.logprob for a in c.top_logprobs}) for c in content]
    prompt = str(reference[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    _check(reference, reference[1](prompt, add_special_tokens=False).input_ids, served)


def test_openai_client_gets_a_bad_request_for_too_many_alternatives(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Arr"}],
                                       logprobs=True, top_logprobs=21)  # fmt: skip
    assert caught.value.status_code == 400 and caught.value.param == "top_logprobs"

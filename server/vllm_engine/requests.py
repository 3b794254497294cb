"""A validated request in vLLM's terms: its SamplingParams, as keyword arguments (so this imports no vLLM).

TGI's semantics, kept on vLLM:
- Greedy unless a warper is set or do_sample is; TGI samples with `do_sample: false` too when a warper is given.
- A sampled request without a seed gets one drawn here, so the response can report it (TGI's `details.seed`).
- Logprobs are always asked for (TGI's details carry one per token), `processed` (see settings.py), with the
  request's top_logprobs alternatives.
- Stop rules stay ours (server.engine.stopping, shared with the torch engine): vLLM detokenizes nothing and ignores
  its own EOS handling, but stops at our EOS ids, so it does not run past the token where our rule ends the request.

What vLLM cannot do the TGI way is refused with a 422 before submission, never approximated:
- typical_p (vLLM has no typical sampling);
- TGI's frequency_penalty: TGI subtracts penalty x count / length over prompt and output, vLLM penalty x count over
  the output alone, so the same value gives other tokens. The /v1 routes' OpenAI penalties are vLLM's own and pass
  through.
"""

from __future__ import annotations

import random
from typing import Any

from server.engine.types import PreparedRequest


def unsupported(request: PreparedRequest) -> str | None:
    """Why vLLM cannot serve this request as TGI defines it, or None."""
    p = request.params
    if p.typical_p is not None and p.typical_p < 1.0:
        return "Input validation error: `typical_p` is not supported by engine.kind vllm (use the torch engine)"
    if p.frequency_penalty:
        return (
            "Input validation error: `frequency_penalty` is not supported by engine.kind vllm: vLLM's counts output "
            "tokens only, TGI's divides by the length (use repetition_penalty, or the torch engine)"
        )
    return None


def sampling_kwargs(request: PreparedRequest, eos_ids: frozenset[int]) -> tuple[dict[str, Any], int | None]:
    """(SamplingParams keyword arguments, the seed reported to the client or None when greedy)."""
    p = request.params
    kwargs: dict[str, Any] = {
        "max_tokens": request.max_new_tokens,
        "logprobs": request.top_logprobs,  # 0: the chosen token's logprob only
        "detokenize": False,
        "ignore_eos": True,
        "stop_token_ids": sorted(eos_ids),
        "repetition_penalty": p.repetition_penalty or 1.0,
        # OpenAI's penalties (the /v1 routes) are vLLM's own definition: output tokens, count and presence.
        "frequency_penalty": p.output_frequency_penalty or 0.0,
        "presence_penalty": p.presence_penalty or 0.0,
    }
    if not p.sampling:
        return kwargs | {"temperature": 0.0}, None
    seed = p.seed if p.seed is not None else random.SystemRandom().randrange(2**63)
    kwargs |= {"temperature": p.temperature if p.temperature is not None else 1.0, "seed": seed}
    if p.top_k:
        kwargs["top_k"] = p.top_k
    if p.top_p is not None:
        kwargs["top_p"] = p.top_p
    return kwargs, seed

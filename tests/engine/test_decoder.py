"""The direct decoder stack (server.engine.decoder) against transformers' own forward of the same model.

Per family it serves (Llama, Mistral, Qwen2 with its q/k/v biases, and a PEFT model with unmerged LoRA on every
projection), a chunked prefill and decode steps through the slab must give exactly the logits transformers' forward
gives through the same slab (same modules, same order: bit-identical in float32), and both must match a cache-free
`model(input_ids)` of the whole sequence. Models it cannot run directly (another family, hooks or a replaced
forward on a module it would skip) must be left to transformers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from server.engine.attention import use_slab_attention
from server.engine.decoder import direct_stack
from server.engine.kv_slab import KVSlab, forward
from server.engine.mixed import Chunk, mixed_forward

TOL = 1e-4  # against a cache-free forward: float32 attention sums in another order, ~1e-6 here
SIZES = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip


def _model(config: PretrainedConfig) -> Any:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    for name, param in model.named_parameters():  # above the default init, so a wrong key shows in the logits
        if "norm" not in name:  # norm weights stay ones
            torch.nn.init.normal_(param, std=0.2)
    return model


def _peft_llama() -> Any:
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    return get_peft_model(_model(LlamaConfig(**SIZES)), lora).eval()


FAMILIES = {
    "llama": lambda: _model(LlamaConfig(**SIZES)),
    "mistral": lambda: _model(MistralConfig(**SIZES, sliding_window=None)),
    "qwen2": lambda: _model(Qwen2Config(**SIZES)),
    "peft-lora-llama": _peft_llama,
}


def _served(name: str) -> Any:
    model = FAMILIES[name]()
    assert use_slab_attention(model)
    return model


@torch.inference_mode()
def _run(model: Any, stack: Any, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Prefill in chunks of 5 then greedy decode steps through a slab of 2 rows (the row in slot 1) -> logits (V,)
    after each chunk's end and each step."""
    slab, out, ids = KVSlab(2), [], list(prompt)
    slot = torch.tensor([1])
    for start in range(0, len(prompt), 5):
        chunk = prompt[start : start + 5]
        logits = forward(model, slab, slot, torch.tensor([chunk]), [start], [len(chunk) - 1], stack)
        slab.lengths[1] = start + len(chunk)
        out.append(logits[0])
    for _ in range(steps):
        ids.append(int(out[-1].argmax()))
        logits = forward(model, slab, slot, torch.tensor([[ids[-1]]]), [len(ids) - 1], [0], stack)
        slab.lengths[1] = len(ids)
        out.append(logits[0])
    return out


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_direct_stack_gives_transformers_logits_exactly(name: str) -> None:
    model = _served(name)
    stack = direct_stack(model)
    assert stack is not None
    prompt = torch.randint(2, SIZES["vocab_size"], (13,), generator=torch.Generator().manual_seed(1)).tolist()
    direct, wrapped = _run(model, stack, prompt, 6), _run(model, None, prompt, 6)
    assert len(direct) == 3 + 6
    for i, (a, b) in enumerate(zip(direct, wrapped, strict=True)):
        assert torch.equal(a, b), f"{name}: forward {i} differs by {(a - b).abs().max().item():.2e}"
    ids = prompt + [int(logits.argmax()) for logits in direct[2:-1]]
    with torch.inference_mode():
        reference = model(input_ids=torch.tensor([ids])).logits[0, -1]  # cache-free, transformers' own SDPA
    assert (direct[-1] - reference).abs().max().item() <= TOL
    assert reference.abs().max().item() > 1.0  # logits far from zero: the comparison can tell a wrong key


@torch.inference_mode()
def test_mixed_forward_through_the_direct_stack_matches_transformers() -> None:
    model = _served("qwen2")
    stack = direct_stack(model)
    results = []
    for chosen in (stack, None):
        slab = KVSlab(3)
        for slot, length in ((0, 7), (1, 4)):
            ids = torch.randint(2, 97, (1, length), generator=torch.Generator().manual_seed(slot))
            forward(model, slab, torch.tensor([slot]), ids, [0], [length - 1], chosen)
            slab.lengths[slot] = length
        chunk = Chunk(2, [5, 6, 7], 0)
        results.append(mixed_forward(model, slab, torch.tensor([[3], [4]]), [7, 4], [chunk], chosen))
    assert results[0].shape == (3, 97)
    assert torch.equal(results[0], results[1])


def test_other_families_are_left_to_transformers() -> None:
    qwen3 = _model(Qwen3Config(**SIZES, head_dim=16))  # q/k norms inside attention: not the family's layer
    assert use_slab_attention(qwen3)
    assert direct_stack(qwen3) is None


@pytest.mark.parametrize("how", ["forward hook", "accelerate hook", "replaced forward"])
def test_a_hooked_module_keeps_transformers_forward(how: str) -> None:
    """The direct stack would skip the decoder layer's own forward, and with it whatever is attached there."""
    model = _served("llama")
    layer = model.model.layers[1]
    if how == "forward hook":
        layer.register_forward_hook(lambda module, args, output: output)
    elif how == "accelerate hook":
        add_hook_to_module(layer, ModelHook())
    else:
        layer.self_attn.forward = layer.self_attn.forward  # an instance attribute, as patches and wrappers set
    assert direct_stack(model) is None

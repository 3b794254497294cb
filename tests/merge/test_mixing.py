"""Weighted multi-adapter merges: the exact sum by default; TIES and DARE as explicit, reproducible opt-ins."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import ConfigError
from server.merge.combine import MixSpec, combine
from tests.conftest import build_adapter

Writer = Callable[[dict[str, Any]], Path]
METHODS = ["linear", "ties", "dare_linear", "dare_ties"]


def test_ties_trims_elects_and_takes_the_disjoint_mean() -> None:
    a = torch.tensor([3.0, -1.0, 0.5, 2.0])
    b = torch.tensor([-1.0, -2.0, 4.0, 0.25])
    # density 0.5 keeps two entries of each: a -> [3, 0, 0, 2], b -> [0, -2, 4, 0]
    # elected signs from the sum [3, -2, 4, 2]: all agree with the one survivor per entry, so it is kept whole.
    out = combine([a, b], MixSpec("ties", 0.5), None)
    assert torch.equal(out, torch.tensor([3.0, -2.0, 4.0, 2.0]))
    # Conflicting survivors: the sign with the larger total wins and only its entries are averaged.
    c, d, e = torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([-5.0])
    assert torch.equal(combine([c, d, e], MixSpec("ties", 1.0), None), torch.tensor([3.0]))


def test_dare_drops_with_probability_1_minus_density_and_rescales() -> None:
    tau = torch.ones(200_000)
    spec = MixSpec("dare_linear", 0.25, seed=3)
    out = combine([tau], spec, spec.generator())
    kept = out != 0
    assert torch.all(out[kept] == 4.0)  # survivors scaled by 1 / density
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.02  # expectation preserved
    again = combine([tau], spec, spec.generator())
    other = combine([tau], MixSpec("dare_linear", 0.25, seed=4), MixSpec(seed=4).generator())
    assert torch.equal(out, again) and not torch.equal(out, other)


@pytest.mark.parametrize("method", METHODS)
def test_single_adapter_at_weight_one_reproduces_itself(
    method: str,
    write_config: Writer,
    tiny_config_data: dict[str, Any],
    tiny_base: Path,
    tiny_adapters: dict[str, Path],
) -> None:
    """Every method at density 1 keeps every entry, so one adapter merges exactly as PEFT merges it alone."""
    if method != "linear":
        tiny_config_data["combine"] = {"method": method, "density": 1.0, "seed": 5}
    engine = boot(load_config(write_config(tiny_config_data)))
    theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tiny_adapters["alpha"])
    for key, value in theirs.merge_and_unload().state_dict().items():
        assert torch.allclose(engine.model.state_dict()[key], value, atol=1e-6, rtol=0), key
    assert engine.info.combine["method"] == method


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_merge_reproducibly_and_pass_their_gate(
    method: str, write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path]
) -> None:
    tiny_config_data["adapters"] = [
        {"name": "alpha", "path": str(tiny_adapters["alpha"]), "weight": 0.6},
        {"name": "beta", "path": str(tiny_adapters["beta"]), "weight": 0.8},
    ]
    tiny_config_data["combine"] = {"method": method, "density": 0.4, "seed": 1}
    first = boot(load_config(write_config(tiny_config_data)))
    # The gate compares the merged weights against the same combined deltas applied on the side of the base.
    assert first.info.parity is not None and first.info.parity.passed
    assert first.info.combine == {"method": method, "density": 0.4, "seed": 1}
    second = boot(load_config(write_config(tiny_config_data)))
    linear = dict(tiny_config_data, combine={"method": "linear"})
    exact = boot(load_config(write_config(linear)))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.model.state_dict()[q], second.model.state_dict()[q])  # seeded: same boot, same model
    assert not torch.allclose(first.model.state_dict()[q], exact.model.state_dict()[q], atol=1e-6)
    for engine in (first, second, exact):
        engine.close()


def test_ties_keeps_modules_to_save_in_its_reference(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tmp_path: Path
) -> None:
    """The side-path reference disables only the LoRA layers, so a saved lm_head counts on both sides of the gate."""
    head = build_adapter(tiny_base, tmp_path / "head", seed=3, targets=["q_proj"], modules_to_save=["lm_head"])
    tensors = load_file(str(head / "adapter_model.safetensors"))
    saved = tensors["base_model.model.lm_head.weight"]
    tensors["base_model.model.lm_head.weight"] = saved + 0.05 * torch.randn_like(saved)  # a trained head
    save_file(tensors, str(head / "adapter_model.safetensors"))
    tiny_config_data["adapters"].append({"name": "head", "path": str(head)})
    tiny_config_data["combine"] = {"method": "ties", "density": 0.5}
    engine = boot(load_config(write_config(tiny_config_data)))
    assert engine.info.parity is not None and engine.info.parity.passed
    assert not torch.equal(engine.model.lm_head.weight, engine.model.model.embed_tokens.weight)
    engine.close()


def test_linear_mix_runs_the_same_weights_unmerged(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path]
) -> None:
    tiny_config_data["adapters"] = [
        {"name": "alpha", "path": str(tiny_adapters["alpha"]), "weight": 0.5},
        {"name": "rs", "path": str(tiny_adapters["rs"]), "weight": 0.5},
    ]
    merged = boot(load_config(write_config(tiny_config_data)))
    unmerged = boot(load_config(write_config(dict(tiny_config_data, mode="unmerged"))))
    ids = torch.tensor([merged.tokenize("Arr matey, the capital of France is")])
    with torch.inference_mode():
        diff = (merged.model(input_ids=ids).logits - unmerged.model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4
    assert unmerged.info.combine["method"] == "linear"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mode": "unmerged", "combine": {"method": "ties", "density": 0.5}}, "has no unmerged form"),
        ({"mode": "ab", "combine": {"method": "dare_ties", "density": 0.5}}, "has no unmerged form"),
        ({"combine": {"method": "dare_linear"}}, "needs a density"),
        ({"combine": {"method": "linear", "density": 0.5}}, "density applies to ties/dare only"),
        ({"combine": {"method": "ties", "density": 1.5}}, "combine.density"),
    ],
)
def test_combine_config_is_checked(
    extra: dict[str, Any], message: str, write_config: Writer, tiny_config_data: dict[str, Any]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config({**tiny_config_data, **extra}))
    assert message in str(err.value) and "fix:" in str(err.value)


def test_the_config_accepts_exactly_the_registered_methods(
    write_config: Writer, tiny_config_data: dict[str, Any]
) -> None:
    from server.config.schema import COMBINE_METHODS
    from server.merge.combine import STRATEGIES

    assert sorted(STRATEGIES) == sorted(COMBINE_METHODS) == sorted(METHODS)
    for method in METHODS:
        combine_cfg = {"method": method} if method == "linear" else {"method": method, "density": 0.5}
        assert load_config(write_config({**tiny_config_data, "combine": combine_cfg})).combine.method == method
    with pytest.raises(ConfigError) as err:
        load_config(write_config({**tiny_config_data, "combine": {"method": "slerp", "density": 0.5}}))
    assert "combine.method" in str(err.value)

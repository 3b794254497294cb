"""What cannot be merged exactly is refused at boot with exit code 2 and one line naming the adapter, the module (where
there is one) and the fix. The CLI turns BootError.exit_code into the process exit code (tests/test_cli.py)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from server.boot.boot import boot
from server.config.load import load_config
from server.load.adapters import BootError
from tests.conftest import build_adapter, build_model, build_tokenizer, make_added_token_adapter

Writer = Callable[[dict[str, Any]], Path]
# Each case edits the config data (given the tiny base, the alpha adapter and a scratch folder) and returns the
# substrings the refusal must contain.
Case = Callable[[dict[str, Any], Path, Path, Path], list[str]]


def _copy_adapter(src: Path, dst: Path, edit_config: Callable[[dict[str, Any]], None] | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _use(data: dict[str, Any], name: str, path: Path, weight: float = 1.0) -> None:
    data["adapters"] = [{"name": name, "path": str(path), "weight": weight}]


def not_lora(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model.save_pretrained(tmp / "ia3")
    _use(data, "ia3", tmp / "ia3")
    return ["adapter 'ia3'", "peft_type is IA3", "fix: give a LoRA adapter"]


def unconverted_init(init: str) -> Case:
    def case(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
        _use(data, "svd", _copy_adapter(alpha, tmp / "svd", lambda c: c.update(init_lora_weights=init)))
        return ["adapter 'svd'", f"init_lora_weights is '{init}'", "fix:", "path_initial_model_for_weight_conversion"]

    return case


def quantized_base(mode: str) -> Case:
    def case(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
        shutil.copytree(base, tmp / "gptq-base")
        cfg = json.loads((tmp / "gptq-base" / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
        (tmp / "gptq-base" / "config.json").write_text(json.dumps(cfg))
        data["model"]["path"] = str(tmp / "gptq-base")
        data["mode"] = mode
        return ["adapters 'alpha'", "gptq-quantized", "fix: merge into the float16/bfloat16 base", "mode: unmerged"]

    return case


def missing_target(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    edit = lambda c: c.update(target_modules=[*c["target_modules"], "xq_proj"])  # noqa: E731
    _use(data, "extra", _copy_adapter(alpha, tmp / "extra", edit))
    return ["adapter 'extra'", "target module 'xq_proj' is not in the base", "fix: use the adapter's own base"]


def wrong_arch(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    _use(data, "gpt2ish", _copy_adapter(alpha, tmp / "g", lambda c: c.update(target_modules=["c_attn"])))
    return ["adapter 'gpt2ish'", "c_attn", "fix:"]


def wrong_shape(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    other = tmp / "other-base"
    build_model(other, vocab_size=len(build_tokenizer(other)), hidden=32)
    _use(data, "wrong", build_adapter(other, tmp / "wrong", seed=5))
    return ["adapter 'wrong'", "size mismatch", "q_proj", "fix: use an adapter trained on this base"]


def stray_tensor(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    path = _copy_adapter(alpha, tmp / "stray")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 64)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    _use(data, "stray", path)
    return ["adapter 'stray'", "layers.7.self_attn.q_proj", "matches no module", "fix:"]


def bias_without_base_bias(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    _use(data, "biased", build_adapter(base, tmp / "biased", seed=4, targets=["q_proj"], lora_bias=True))
    return ["adapter 'biased'", "self_attn.q_proj", "lora_bias on a layer without a bias", "fix: retrain"]


def two_saved_heads(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    for name, seed in (("one", 1), ("two", 2)):
        build_adapter(base, tmp / name, seed=seed, targets=["q_proj"], modules_to_save=["lm_head"])
    data["adapters"] = [{"name": n, "path": str(tmp / n)} for n in ("one", "two")]
    return ["adapters 'one' and 'two'", "lm_head", "fix: serve one of them"]


def weighted_saved_head(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    _use(data, "head", build_adapter(base, tmp / "head", seed=1, targets=["q_proj"], modules_to_save=["lm_head"]), 0.5)
    return ["adapter 'head'", "modules_to_save", "fix: use weight 1.0"]


def unsupported_variant(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    _use(data, "rep", _copy_adapter(alpha, tmp / "rep", lambda c: c.update(layer_replication=[[0, 2], [1, 2]])))
    return ["adapter 'rep'", "layer_replication is not supported", "fix:"]


def added_tokens_without_rows(data: dict[str, Any], base: Path, alpha: Path, tmp: Path) -> list[str]:
    _use(data, "tok", make_added_token_adapter(base, tmp / "tok", ship_rows=False))
    return ["'tok'", "adds tokens", "input embedding", "fix: save the adapter with save_embedding_layers=True"]


CASES: dict[str, Case] = {
    "not_lora": not_lora,
    **{f"unconverted_{init}": unconverted_init(init) for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq")},
    "gptq_base_merged": quantized_base("merged"),
    "gptq_base_ab": quantized_base("ab"),
    "missing_target_module": missing_target,
    "adapter_for_another_architecture": wrong_arch,
    "shapes_that_do_not_fit": wrong_shape,
    "tensor_matching_no_module": stray_tensor,
    "lora_bias_on_biasless_layer": bias_without_base_bias,
    "two_adapters_save_one_module": two_saved_heads,
    "modules_to_save_with_weight": weighted_saved_head,
    "unsupported_variant": unsupported_variant,
    "added_tokens_without_rows": added_tokens_without_rows,
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_exit_2_and_one_line_naming_adapter_module_and_fix(
    case: str,
    write_config: Writer,
    tiny_config_data: dict[str, Any],
    tiny_base: Path,
    tiny_adapters: dict[str, Path],
    tmp_path: Path,
) -> None:
    expected = CASES[case](tiny_config_data, tiny_base, tiny_adapters["alpha"], tmp_path)
    with pytest.raises(BootError) as err:
        boot(load_config(write_config(tiny_config_data)))
    message = str(err.value)
    assert err.value.exit_code == 2, message
    assert "\n" not in message and "fix:" in message
    for part in expected:
        assert part in message, (part, message)


def test_lora_needs_no_refusal_for_bias_where_the_base_has_one(tiny_gpt2: Path, tmp_path: Path) -> None:
    """The counterpart of lora_bias_on_biasless_layer: PEFT saves it, and boot accepts it (merged in test_kinds)."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_gpt2), LoraConfig(target_modules=["c_attn"], lora_bias=True)
    )
    assert any(n.endswith("lora_B.default.bias") for n, _ in model.named_parameters())

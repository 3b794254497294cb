"""The merge: exact weighted formula, agreement with PEFT, parity gate, and refusals of adapters that do not fit."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from server.boot import arms as boot_module
from server.boot.boot import boot
from server.config.load import load_config
from server.engine.engine import Engine
from server.load.adapters import BootError
from server.merge import apply as merge_module
from server.merge.apply import (
    MergeError,
    check_clean,
    lora_layers,
    merge_and_unload,
    merge_layer,
)
from server.merge.merged_view import merged_view
from tests.conftest import MISS_PHASES, build_adapter, build_model, build_tokenizer

Writer = Callable[[dict[str, Any]], Path]


def _boot(write_config: Writer, data: dict[str, Any]) -> Engine:
    return boot(load_config(write_config(data)))


def _expected_weights(base_dir: Path, adapters: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    """W0 + sum_i w_i * s_i * B_i @ A_i, computed straight from the files, independent of PEFT and of server code."""
    weights = {k: v.clone() for k, v in load_file(str(base_dir / "model.safetensors")).items()}
    for path, w in adapters:
        cfg = json.loads((path / "adapter_config.json").read_text())
        s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg["use_rslora"] else cfg["r"])
        tensors = load_file(str(path / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            weights[f"{module}.weight"] += w * s * (b @ a)
    return weights


def test_weighted_merge_equals_exact_formula(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    mix = [("alpha", 0.7), ("beta", 1.5), ("rs", -0.4)]
    tiny_config_data["adapters"] = [{"name": n, "path": str(tiny_adapters[n]), "weight": w} for n, w in mix]
    engine = _boot(write_config, tiny_config_data)
    expected = _expected_weights(tiny_base, [(tiny_adapters[n], w) for n, w in mix])
    merged = engine.model.state_dict()
    changed = 0
    for key, want in expected.items():
        assert torch.allclose(merged[key], want, atol=1e-6, rtol=0), key
        changed += int(not torch.equal(want, load_file(str(tiny_base / "model.safetensors"))[key]))
    assert changed == 2 * 7  # 2 layers x 7 targeted projections
    assert engine.info.parity is not None and engine.info.parity.passed


@pytest.mark.parametrize("name", ["alpha", "rs"])
def test_single_adapter_matches_peft_merge_and_unload(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tiny_adapters: dict[str, Path], name: str
) -> None:
    tiny_config_data["adapters"] = [{"name": name, "path": str(tiny_adapters[name])}]
    ours = _boot(write_config, tiny_config_data).model.state_dict()
    theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tiny_adapters[name])
    reference = theirs.merge_and_unload().state_dict()
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert torch.allclose(ours[key], value, atol=1e-6, rtol=0), key


def test_merged_and_unmerged_give_same_logits_and_tokens(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path]
) -> None:
    tiny_config_data["adapters"].append({"name": "beta", "path": str(tiny_adapters["beta"]), "weight": 0.5})
    merged = _boot(write_config, tiny_config_data)
    tiny_config_data["mode"] = "unmerged"
    unmerged = _boot(write_config, tiny_config_data)
    assert isinstance(unmerged.model, PeftModel) and not isinstance(merged.model, PeftModel)
    ids = torch.tensor([merged.tokenize("Arr matey, the capital of France is")])
    with torch.inference_mode():
        a, b = merged.model(input_ids=ids).logits, unmerged.model(input_ids=ids).logits
    assert (a - b).abs().max().item() < 1e-4
    from server.engine.sampling import SamplingParams
    from server.engine.types import PreparedRequest

    request = PreparedRequest(input_ids=ids[0].tolist(), params=SamplingParams(), max_new_tokens=12)
    assert [t.id for t in merged.generate(request).tokens] == [t.id for t in unmerged.generate(request).tokens]


def test_unmerged_weight_zero_is_the_base(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path
) -> None:
    tiny_config_data["adapters"][0]["weight"] = 0.0
    tiny_config_data["mode"] = "unmerged"
    engine = _boot(write_config, tiny_config_data)
    base = LlamaForCausalLM.from_pretrained(tiny_base)
    ids = torch.tensor([engine.tokenize("Once upon a time")])
    with torch.inference_mode():
        assert torch.allclose(engine.model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)


def test_merged_model_is_clean(write_config: Writer, tiny_config_data: dict[str, Any]) -> None:
    model = _boot(write_config, tiny_config_data).model
    assert not any("lora" in name for name, _ in model.named_modules())
    assert all(p.device.type != "meta" for p in model.parameters())
    assert not hasattr(model, "peft_config")


def test_check_clean_catches_leftovers(tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tiny_adapters["alpha"])
    with pytest.raises(MergeError, match="LoRA modules remain"):
        check_clean(peft_model)
    bare = LlamaForCausalLM.from_pretrained(tiny_base)
    bare.model.norm.weight = torch.nn.Parameter(torch.empty(bare.config.hidden_size, device="meta"))
    with pytest.raises(MergeError, match="meta tensors remain"):
        check_clean(bare)


def test_merged_view_answers_as_peft_merged_and_leaves_served_weights_bit_for_bit(
    tiny_base: Path, tiny_adapters: dict[str, Path]
) -> None:
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tiny_adapters["alpha"])
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    side_calls: list[str] = []
    for name, module in peft_model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda m, a, o, name=name: side_calls.append(name))
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        assert side_calls  # the unmerged forward runs the side path
        side_calls.clear()
        with merged_view(peft_model, ["default"]) as view:
            viewed = view(input_ids=ids).logits
        assert side_calls == []  # the view runs merged weights, not the side path
        # The reference: PEFT's own merge, of a separate copy; and the base alone, to show the adapter matters.
        reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tiny_adapters["alpha"])
        with reference.disable_adapter():
            bare = reference(input_ids=ids).logits
        merged = reference.merge_and_unload()(input_ids=ids).logits
    assert (viewed - merged).abs().max() < 1e-5 < 1e-3 < (bare - merged).abs().max()
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not layer.disable_adapters for _, layer in lora_layers(peft_model))  # the side path is back on
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, unmerged)


def test_merged_view_refuses_a_weight_that_is_not_w0_plus_delta(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base), tiny_adapters["alpha"])
    monkeypatch.setattr(
        merge_module, "merged_weight", lambda w0, delta, scratch=None: (w0.float() + 2 * delta).to(w0.dtype)
    )
    wrong = pytest.raises(MergeError, match="targeted weights are wrong after merging")
    with wrong, torch.no_grad(), merged_view(peft_model, ["default"]) as view:
        view(input_ids=torch.tensor([[1, 5, 9]]))


def test_parity_gate_refuses_a_wrong_merge(
    write_config: Writer, tiny_config_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def merge_skipping_one_layer(peft_model: Any, adapters: list[str]) -> Any:
        layers = list(lora_layers(peft_model))
        for _, layer in layers[1:]:  # forgets the first targeted module: the bug the gate exists for
            merge_layer(layer, adapters)
        return peft_model.unload()

    monkeypatch.setattr(boot_module, "merge_and_unload", merge_skipping_one_layer)
    with pytest.raises(BootError) as err:
        _boot(write_config, tiny_config_data)
    assert err.value.exit_code == 3
    assert "parity gate failed" in str(err.value) and "\n" not in str(err.value)


def test_delta_that_rounds_away_is_refused(tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    base = LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
    peft_model = PeftModel.from_pretrained(base, tiny_adapters["alpha"])
    for _, layer in lora_layers(peft_model):
        layer.scaling["default"] = 1e-9  # far below bf16's resolution of |W0|
    with pytest.raises(MergeError, match=r"rounds away entirely in torch\.bfloat16"):
        merge_and_unload(peft_model, ["default"])


def test_adapter_for_another_hidden_size_is_refused(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    other = tmp_path / "other-base"
    build_model(other, vocab_size=len(build_tokenizer(other)), hidden=32)
    tiny_config_data["adapters"] = [{"name": "wrong", "path": str(build_adapter(other, tmp_path / "wrong", seed=5))}]
    with pytest.raises(BootError) as err:
        _boot(write_config, tiny_config_data)
    assert err.value.exit_code == 2
    assert "adapter 'wrong'" in str(err.value) and "fix:" in str(err.value)


def _doctored_adapter(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_adapter_tensor_matching_no_module_is_refused(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    def add_stray(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.ones(4, 64)

    path = _doctored_adapter(tiny_adapters["alpha"], tmp_path / "stray", add_stray)
    tiny_config_data["adapters"] = [{"name": "stray", "path": str(path)}]
    with pytest.raises(BootError, match="matches no module") as err:
        _boot(write_config, tiny_config_data)
    assert err.value.exit_code == 2


def test_adapter_missing_a_tensor_is_refused(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    def drop_one(t: dict[str, torch.Tensor]) -> None:
        del t[next(k for k in t if ".lora_B." in k)]

    path = _doctored_adapter(tiny_adapters["alpha"], tmp_path / "partial", drop_one)
    tiny_config_data["adapters"] = [{"name": "partial", "path": str(path)}]
    with pytest.raises(BootError, match="no stored weights") as err:
        _boot(write_config, tiny_config_data)
    assert err.value.exit_code == 2


def test_boot_phases_are_timed_and_reported(write_config: Writer, tiny_config_data: dict[str, Any]) -> None:
    seen: list[str] = []
    engine = boot(load_config(write_config(tiny_config_data)), on_phase=lambda phase, _s: seen.append(phase))
    assert seen == list(MISS_PHASES)
    assert set(engine.info.boot_seconds) == set(seen)
    assert all(v >= 0 for v in engine.info.boot_seconds.values())
    # Peak RSS per phase: VmHWM only grows, so each phase's figure is at least the one before and at most the peak the
    # test reads itself from /proc after boot; the model's own bytes were resident by the end.
    # Linux caches RSS counts per thread and folds them in every 64 page faults, so a reading may lag by that many
    # pages (more visibly now that prepack gives pages back): a page count's worth of slack, not a fraction.
    slack = 64 * 4096
    peaks = [engine.info.boot_peak_rss_bytes[phase] for phase in seen]
    assert all(later >= earlier - slack for earlier, later in itertools.pairwise(peaks)), peaks
    status = Path("/proc/self/status").read_text()
    hwm = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    assert peaks[-1] <= hwm + slack
    model_bytes = sum(engine.info.device_map.values())
    assert peaks[-1] > model_bytes


def _peft(tiny_base: Path, adapter: Path, dtype: torch.dtype) -> PeftModel:
    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_base, dtype=dtype), adapter)


def _write_largest_element_only(w0: torch.Tensor, delta: torch.Tensor, scratch: Any = None) -> torch.Tensor:
    """A broken merge: writes the delta's largest element (so the weight does change) and forgets the rest."""
    kept = torch.zeros_like(delta)
    at = int(delta.abs().argmax())
    kept.view(-1)[at] = delta.view(-1)[at]
    return (w0.float() + kept.to(w0.device)).to(w0.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_that_writes_one_element_is_refused(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    peft_model = _peft(tiny_base, tiny_adapters["alpha"], dtype)
    monkeypatch.setattr(merge_module, "merged_weight", _write_largest_element_only)
    with pytest.raises(MergeError, match=r"14 targeted weights are wrong after merging.*differ from W0 \+ delta"):
        merge_and_unload(peft_model, ["default"])


@pytest.mark.parametrize("mode", ["merged", "ab"])
def test_boot_refuses_a_merge_that_writes_one_element(
    write_config: Writer, tiny_config_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    tiny_config_data["mode"] = mode
    tiny_config_data["parity"] = {"tolerance": 1e6, "min_top1_agreement": 0.0}  # only the weight check may refuse
    monkeypatch.setattr(merge_module, "merged_weight", _write_largest_element_only)
    with pytest.raises(BootError, match="merge check failed") as err:
        _boot(write_config, tiny_config_data)
    assert err.value.exit_code == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_that_skips_one_module_is_refused(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    honest = merge_module.merged_weight
    calls = iter(range(1_000))

    def skip_the_fourth(w0: torch.Tensor, delta: torch.Tensor, scratch: Any = None) -> torch.Tensor:
        return w0.clone() if next(calls) == 3 else honest(w0, delta, scratch)

    monkeypatch.setattr(merge_module, "merged_weight", skip_the_fourth)
    skipped = re.escape("'base_model.model.model.layers.0.self_attn.o_proj'")
    # Not "rounds away": all but the few elements whose delta is below rounding are off by their whole delta.
    with pytest.raises(MergeError, match=f"1 targeted weights are wrong .*{skipped}\\): 40.. of 4096 elements differ"):
        merge_and_unload(_peft(tiny_base, tiny_adapters["alpha"], dtype), ["default"])


def test_naive_half_precision_merge_is_refused(
    tiny_base: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounding the delta to bf16 before adding (in bf16) rounds twice: off by up to a whole spacing, not half."""
    monkeypatch.setattr(merge_module, "merged_weight", lambda w0, delta, scratch=None: w0 + delta.to(w0.dtype))
    with pytest.raises(MergeError, match=r"differ from W0 \+ delta by more than one rounding to torch\.bfloat16"):
        merge_and_unload(_peft(tiny_base, tiny_adapters["rs"], torch.bfloat16), ["default"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["merged", "ab"])
def test_honest_weighted_merge_passes_the_weight_check(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path], dtype: str, mode: str
) -> None:
    mix = [("alpha", 0.7), ("beta", 1.5), ("rs", -0.4)]
    tiny_config_data["adapters"] = [{"name": n, "path": str(tiny_adapters[n]), "weight": w} for n, w in mix]
    tiny_config_data["model"]["dtype"] = dtype
    tiny_config_data["mode"] = mode
    engine = _boot(write_config, tiny_config_data)
    assert engine.info.parity is not None and engine.info.parity.passed
    engine.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_spacing_is_half_the_gap_to_the_next_value(dtype: torch.dtype) -> None:
    from server.merge.check import half_spacing  # imported here so the other tests also run against older code

    info = torch.finfo(dtype)
    values = torch.tensor([0.0, info.smallest_normal / 3, info.smallest_normal, 1e-3, -0.3, 1.0, -7.5, 1000.0])
    stored = values.to(dtype)
    # torch.nextafter is the independent reference; the gap away from zero is the wider one at a power of two.
    away = torch.nextafter(stored, torch.where(stored < 0, -math.inf, math.inf).to(dtype))
    gap = (away.float() - stored.float()).abs()
    assert torch.equal(half_spacing(stored), gap / 2)

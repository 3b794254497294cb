"""Precision: `dtype: auto` measures before it picks, and half precision is gated against the float32 reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from server.boot import arms as boot_module
from server.boot.boot import boot
from server.config.load import load_config
from server.http.metrics import Metrics
from server.load.adapters import BootError
from server.merge import precision
from server.merge.apply import lora_layers, merge_layer
from server.merge.parity import MAX_SLACK, RMS_SLACK

Writer = Callable[[dict[str, Any]], Path]


@pytest.mark.parametrize(
    ("fp32_ms", "bf16_ms", "chosen"),
    [
        (10.0, 300.0, "float32"),  # AVX2-only CPU: bf16 emulated, tens of times slower
        (10.0, 9.0, "float32"),  # a little faster is not worth bf16's rounding
        (10.0, 4.0, "bfloat16"),  # GPU, or a CPU with AVX512-BF16/AMX
    ],
)
def test_auto_dtype_picks_bf16_only_when_clearly_faster(
    fp32_ms: float, bf16_ms: float, chosen: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = {"float32": fp32_ms / 1e3, "bfloat16": bf16_ms / 1e3}
    monkeypatch.setattr(precision, "_matmul_seconds", lambda dtypes, device, shape, probe: {d: fake[d] for d in dtypes})
    name, reason = precision.pick_dtype(torch.device("cpu"))
    assert name == chosen
    assert reason.startswith("auto: timed") and f"{fp32_ms:.3f} ms" in reason and f"chose {chosen}" in reason


def test_auto_dtype_keeps_float32_when_bf16_decode_steps_are_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(dtypes: list[str], device: torch.device, shape: tuple[int, int, int], probe: Any) -> dict[str, float]:
        decode = shape[0] == 1
        return {"float32": 1.0 if decode else 10.0, "bfloat16": 1.5 if decode else 2.0}

    monkeypatch.setattr(precision, "_matmul_seconds", fake)
    assert precision.pick_dtype(torch.device("cpu"))[0] == "float32"


def test_auto_dtype_measures_for_real() -> None:
    name, reason = precision.pick_dtype(torch.device("cpu"))
    assert name in ("float32", "bfloat16") and "float32" in reason and "bfloat16" in reason


@pytest.mark.parametrize("mode", ["merged", "unmerged", "ab"])
def test_half_precision_is_gated_against_the_float32_reference(
    mode: str, write_config: Writer, tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["model"]["dtype"] = "bfloat16"
    tiny_config_data["mode"] = mode
    engine = boot(load_config(write_config(tiny_config_data)))
    parity = engine.info.parity
    assert parity is not None and parity.passed and parity.reference == "float32" and parity.float32_skipped is None
    assert parity.float32_merged_max_abs_diff is not None and parity.float32_unmerged_max_abs_diff is not None
    # bf16 keeps ~3 significant digits: the served logits (|logit| ~ 1) sit measurably but not wildly off float32.
    assert 0 < parity.float32_merged_max_abs_diff < 0.5 and 0 < parity.float32_unmerged_max_abs_diff < 0.5
    assert parity.float32_merged_top1_agreement is not None and parity.float32_merged_top1_agreement > 0.8
    # The gated figures are the merged model's against float32, bounded by the unmerged model's own.
    assert parity.max_abs_diff == parity.float32_merged_max_abs_diff and parity.rms_diff is not None
    assert parity.rms_tolerance == RMS_SLACK * cast(float, parity.float32_unmerged_rms_diff)
    assert parity.tolerance == MAX_SLACK * parity.float32_unmerged_max_abs_diff
    # Back in the serving dtype after the float32 probes (PEFT itself keeps LoRA A/B in float32).
    served = [p for arm in engine.arms.values() for n, p in arm.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in served)
    metrics = Metrics()
    metrics.engine_ready(engine.info)
    gauge = metrics.registry.get_sample_value(
        "mergeserve_parity_float32_max_abs_logit_diff", {"mode": mode, "arm": "merged"}
    )
    assert gauge == parity.float32_merged_max_abs_diff
    engine.close()


def test_float32_serving_is_its_own_reference(write_config: Writer, tiny_config_data: dict[str, Any]) -> None:
    engine = boot(load_config(write_config(tiny_config_data)))
    parity = engine.info.parity
    assert parity is not None
    assert parity.float32_merged_max_abs_diff == parity.max_abs_diff and parity.float32_unmerged_max_abs_diff == 0
    assert engine.info.dtype_reason == "configured: float32"
    engine.close()


def test_auto_dtype_through_boot_records_choice_and_reason(
    write_config: Writer, tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["model"]["dtype"] = "auto"
    engine = boot(load_config(write_config(tiny_config_data)))
    assert engine.info.dtype in ("float32", "bfloat16")
    assert engine.info.dtype_reason.startswith("auto: timed") and engine.info.dtype in engine.info.dtype_reason
    assert "the torch engine's linear kernels (prepack_linear: auto)" in engine.info.dtype_reason
    engine.close()


def _merge_skipping(module: str) -> Callable[[Any, list[str]], Any]:
    """A broken merge that forgets one module of one layer, and (being hand-rolled) runs no weight check."""

    def merge(peft_model: Any, adapters: list[str]) -> Any:
        for name, layer in lora_layers(peft_model):
            if not name.endswith(module):
                merge_layer(layer, adapters)
        return peft_model.unload()

    return merge


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_gate_refuses_a_merge_that_skips_one_module(
    dtype: str, write_config: Writer, tiny_config_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One MLP projection of the last layer: moves the probe logits (|logit| < 1) by ~0.08 without flipping any
    # argmax, which the former absolute defaults (1.0 in bf16, 0.25 in fp16) let through; its RMS error against
    # float32 is 15x (bf16) and 117x (fp16) the unmerged model's own.
    monkeypatch.setattr(boot_module, "merge_and_unload", _merge_skipping("layers.1.mlp.gate_proj"))
    tiny_config_data["model"]["dtype"] = dtype
    with pytest.raises(BootError, match="parity gate failed") as err:
        boot(load_config(write_config(tiny_config_data)))
    assert err.value.exit_code == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_gate_refuses_a_dropped_adapter(
    dtype: str, write_config: Writer, tiny_config_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge that writes nothing (and, hand-rolled, runs no weight check) serves the bare base."""
    monkeypatch.setattr(boot_module, "merge_and_unload", lambda peft_model, adapters: peft_model.unload())
    tiny_config_data["model"]["dtype"] = dtype
    with pytest.raises(BootError) as err:
        boot(load_config(write_config(tiny_config_data)))
    line = str(err.value)
    assert err.value.exit_code == 3 and "\n" not in line
    # The refusal names the figures: the merged model's errors against float32 and the unmerged model's own.
    assert line.startswith("parity gate failed: merged vs float32 reference: RMS logit error")
    assert "the unmerged model's own: RMS" in line and "fix: serve unmerged or in float32" in line


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("adapter", ["alpha", "beta", "rs"])
def test_honest_half_precision_merge_passes_the_gate_with_margin(
    dtype: str, adapter: str, write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path]
) -> None:
    tiny_config_data["model"]["dtype"] = dtype
    tiny_config_data["adapters"] = [{"name": adapter, "path": str(tiny_adapters[adapter])}]
    engine = boot(load_config(write_config(tiny_config_data)))
    parity = engine.info.parity
    assert parity is not None and parity.passed and parity.reference == "float32"
    # No worse than the unmerged model in half precision, by less than the slack (measured: at most 1.25x).
    assert parity.rms_diff is not None and parity.float32_unmerged_rms_diff is not None
    assert parity.rms_diff <= 1.3 * parity.float32_unmerged_rms_diff and parity.top1_agreement == 1.0
    engine.close()


def test_without_the_float32_reference_half_precision_falls_back_to_the_served_dtype_gate(
    write_config: Writer, tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["model"]["dtype"] = "bfloat16"
    tiny_config_data["parity"] = {"float32_reference": False}
    engine = boot(load_config(write_config(tiny_config_data)))
    parity = engine.info.parity
    assert parity is not None and parity.passed and parity.reference == "unmerged"
    assert parity.float32_skipped == "parity.float32_reference is false" and parity.float32_merged_max_abs_diff is None
    assert parity.min_top1_agreement == 0.95 and parity.tolerance > 0
    engine.close()


def test_offloaded_weights_skip_the_float32_reference_and_info_says_so(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    disk = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    tiny_config_data["model"] |= {"dtype": "bfloat16", "device_map": disk, "offload_folder": str(tmp_path / "off")}
    tiny_config_data["cache"] = {"enabled": False}
    engine = boot(load_config(write_config(tiny_config_data)))
    parity = engine.info.parity
    assert parity is not None and parity.passed and parity.reference == "unmerged"
    assert parity.float32_skipped is not None and "offloaded" in parity.float32_skipped
    engine.close()

"""The torch gate must show the adapter is there, and must compare something (issue 28, item 7).

A merge error that is small against the reference means nothing if the adapter itself barely moves the probes: a
merge that wrote nothing then passes too, and a loose `parity.tolerance` lets it through outright. So every gate also
measures the adapter's own effect on the probes (RMS of merged - base logits) and refuses when its error against the
reference is not small compared with that effect; the ratio is logged and in /info.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.boot import arms as boot_module
from server.boot.boot import boot
from server.config.load import load_config
from server.load.adapters import BootError
from server.merge.parity import MAX_ADAPTER_RATIO

Writer = Callable[[dict[str, Any]], Path]


def _writes_nothing(peft_model: Any, adapters: list[str]) -> Any:
    """A broken merge that drops every adapter (and, hand-rolled, runs no weight check): the bare base."""
    return peft_model.unload()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_merge_that_drops_the_adapter_is_refused_even_under_a_loose_tolerance(
    dtype: str, write_config: Writer, tiny_config_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boot_module, "merge_and_unload", _writes_nothing)
    tiny_config_data["model"]["dtype"] = dtype
    # An operator's loose bound: the error bounds alone then pass the bare base.
    tiny_config_data["parity"] = {"tolerance": 1000.0, "min_top1_agreement": 0.0}
    with pytest.raises(BootError) as err:
        boot(load_config(write_config(tiny_config_data)))
    line = err.value.line()
    assert err.value.exit_code == 3 and "\n" not in line
    assert line.startswith("parity.probes: ") and "the adapters' own effect on the probes" in line


@pytest.mark.parametrize("mode", ["merged", "ab", "unmerged"])
def test_the_adapter_ratio_is_logged_and_in_info(
    mode: str, write_config: Writer, tiny_config_data: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    tiny_config_data["mode"] = mode
    tiny_config_data["cache"] = {"enabled": False}
    with caplog.at_level(logging.INFO, logger="mergeserve"):
        engine = boot(load_config(write_config(tiny_config_data)))
    try:
        parity = engine.info.parity
        assert parity is not None and parity.passed
        assert parity.adapter_effect_rms is not None and parity.adapter_effect_rms > 0
        # float32: the merge's error is summation order (~1e-6), the adapter moves logits by ~1e-1.
        assert parity.adapter_ratio is not None and parity.adapter_ratio < MAX_ADAPTER_RATIO / 100
        assert parity.as_dict()["adapter_ratio"] == parity.adapter_ratio
        assert f"adapter ratio {parity.adapter_ratio:.3g}" in caplog.text
    finally:
        engine.close()


def test_a_cache_hit_gates_the_adapter_too(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    tiny_config_data["cache"] = {"dir": str(tmp_path / "cache")}
    first = boot(load_config(write_config(tiny_config_data)))
    first.close()
    engine = boot(load_config(write_config(tiny_config_data)))
    try:
        assert engine.info.cache is not None and engine.info.cache["status"] == "hit"
        parity = engine.info.parity
        assert parity is not None and parity.adapter_ratio is not None
        assert parity.adapter_ratio < MAX_ADAPTER_RATIO / 100
    finally:
        engine.close()


def test_probes_that_tokenize_to_nothing_are_refused(write_config: Writer, tiny_config_data: dict[str, Any]) -> None:
    """The tiny tokenizer adds no BOS: an empty probe is no token, so nothing would be compared."""
    tiny_config_data["parity"] = {"probes": [""]}
    tiny_config_data["cache"] = {"enabled": False}
    with pytest.raises(BootError) as err:
        boot(load_config(write_config(tiny_config_data)))
    line = err.value.line()
    assert err.value.exit_code == 3 and line.startswith("parity.probes: ") and "no position" in line


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_the_bare_base_at_weight_0_is_served_with_its_effect_reported_not_gated(
    mode: str, write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    """Every adapter at weight 0 is how an operator serves the base to compare with the adapted model: merged = base
    by design, which the adapter check alone would refuse as a merge that wrote nothing."""
    tiny_config_data["mode"] = mode
    tiny_config_data["cache"] = {"dir": str(tmp_path / "cache")}
    for adapter in tiny_config_data["adapters"]:
        adapter["weight"] = 0.0
    for boot_no in range(2 if mode == "merged" else 1):  # merged: a miss, then a hit gated by cached.py
        engine = boot(load_config(write_config(tiny_config_data)))
        try:
            parity = engine.info.parity
            assert parity is not None and parity.passed and parity.adapter_ratio is None
            assert parity.adapter_effect_rms is not None and parity.adapter_effect_rms < 1e-6, boot_no
        finally:
            engine.close()


def test_the_vllm_gate_reports_but_does_not_gate_an_effect_none_is_expected() -> None:
    """The vLLM gate's compare on the bare base: served = base, so the ratio would be infinite and refused."""
    from server.vllm_engine.gate import check, compare

    probe = ([-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5], [-1.0, -2.0, -0.5])  # (reference, served, base)
    gated = compare("merged", [probe], "float32")
    assert not gated.passed and gated.adapter_ratio == float("inf")
    bare = compare("merged", [probe], "float32", expect_effect=False)
    assert bare.passed and bare.adapter_ratio is None and bare.adapter_effect_rms == 0.0
    check([bare])

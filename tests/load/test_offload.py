"""Offload: with some layers on disk (device_map + offload_folder) or capped by max_memory, the merge is still exact.

The merge onloads each offloaded layer, merges it in float32 and writes it back to its offload store, so the served
model's logits equal those of the same adapters merged on a model held wholly in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from server.boot.boot import boot
from server.config.load import load_config
from server.engine.engine import Engine
from server.engine.sampling import SamplingParams
from server.engine.types import PreparedRequest
from server.load.adapters import BootError

Writer = Callable[[dict[str, Any]], Path]
PROMPT = "The capital of France is"
ADAPTED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")  # fmt: skip
DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip


def _logits(engine: Engine, arm: str) -> torch.Tensor:
    model = engine.arms[arm]
    ids = torch.tensor([engine.tokenize(PROMPT)])
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float()  # (T, V)


def _boot(write_config: Writer, data: dict[str, Any], **model: Any) -> Engine:
    data = {**data, "model": {**data["model"], **model}, "cache": {"enabled": False}}
    return boot(load_config(write_config(data)))


def test_disk_offloaded_layer_merges_exactly(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    mode = "merged"
    in_memory = _boot(write_config, tiny_config_data, device_map="cpu")
    offloaded = _boot(write_config, {**tiny_config_data, "mode": mode}, device_map=DISK_MAP,
                      offload_folder=str(tmp_path / "offload"))  # fmt: skip
    try:
        # Disk-offloaded parameters sit on the meta device, loaded by accelerate's hooks at each forward (from the
        # checkpoint's own safetensors, or from offload_folder once the merge has written a layer back).
        assert offloaded.info.device_map.get("meta", 0) > 0
        assert offloaded.info.parity is not None and offloaded.info.parity.passed
        # The merged layers went back to disk (PEFT's onload_layer kept them in memory): their weights are meta
        # again, read from the merged copies in the offload folder.
        merged = tmp_path / "offload" / "merged"
        assert sorted(p.name for p in merged.iterdir()) == sorted(f"model.layers.1.{m}" for m in ADAPTED)
        assert offloaded.arms[mode].model.layers[1].self_attn.q_proj.weight.device.type == "meta"
        # Meta weights have nothing to reorder: the offloaded arm runs unpacked, the in-memory one packed.
        assert offloaded.info.engine["prepack_linear"] is False and in_memory.info.engine["prepack_linear"] is True
        expected = _logits(in_memory, "merged")
        got = _logits(offloaded, mode)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
        request = PreparedRequest(input_ids=in_memory.tokenize(PROMPT), params=SamplingParams(), max_new_tokens=8)
        assert [t.id for t in offloaded.generate(request, mode).tokens] == [
            t.id for t in in_memory.generate(request, "merged").tokens
        ]
    finally:
        in_memory.close()
        offloaded.close()


@pytest.mark.parametrize("mode", ["unmerged", "ab"])
def test_disk_offload_outside_merged_mode_is_refused(
    mode: str, write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(BootError, match=f"offloads layers to disk, which mode {mode} does not support; fix:") as err:
        _boot(write_config, {**tiny_config_data, "mode": mode}, device_map=DISK_MAP,
              offload_folder=str(tmp_path / "offload"))  # fmt: skip
    assert err.value.exit_code == 2


def test_max_memory_spills_layers_and_the_merge_stays_exact(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    """device_map auto with a cpu cap below the model's size: accelerate spills the rest to the offload folder."""
    in_memory = _boot(write_config, tiny_config_data, device_map="cpu")
    capped = _boot(write_config, tiny_config_data, device_map="auto", max_memory={"cpu": "250KB"},
                   offload_folder=str(tmp_path / "offload"))  # fmt: skip
    try:
        assert capped.info.device_map.get("meta", 0) > 0
        assert torch.allclose(_logits(capped, "merged"), _logits(in_memory, "merged"), atol=1e-5)
    finally:
        in_memory.close()
        capped.close()


def test_offloaded_merge_is_served_but_not_cached(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    model = {**tiny_config_data["model"], "device_map": DISK_MAP, "offload_folder": str(tmp_path / "offload")}
    data = {**tiny_config_data, "model": model, "cache": {"enabled": True, "dir": str(tmp_path / "cache")}}
    engine = boot(load_config(write_config(data)))
    try:
        assert engine.info.cache["status"] == "miss" and engine.info.cache["problem"].endswith("offloaded to disk")
        assert not any((tmp_path / "cache" / "entries").iterdir())
    finally:
        engine.close()

"""The `engine:` section and what it becomes for vLLM: refusals that name the key, and the engine arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from server.config.load import load_config
from server.config.schema import Config, ConfigError
from server.vllm_engine.settings import ArmPlan, cpu_binding, engine_args, lora_rank_bucket, memory_shares
from tests.vllm_engine.conftest import vllm_config


def _config(model: dict[str, Path], tmp_path: Path, **overrides: Any) -> Config:
    return load_config(vllm_config(model, tmp_path, **overrides))


@pytest.mark.parametrize(
    ("engine", "extra", "key", "fix"),
    [
        ({"kind": "torch", "tensor_parallel_size": 2}, {}, "engine", "set engine.kind: vllm"),
        ({"kind": "vllm", "tensor_parallel_size": 0}, {}, "engine.tensor_parallel_size", "valid value"),
        ({"kind": "vllm", "max_num_seqs_typo": 4}, {}, "engine.max_num_seqs_typo", "fix its spelling"),
        ({"kind": "vllm"}, {"cache": {"enabled": False}}, "(top level)", "set cache.enabled: true"),
    ],
)
def test_bad_engine_settings_exit_2_naming_the_key(
    vllm_model: dict[str, Path], tmp_path: Path, engine: dict[str, Any], extra: dict[str, Any], key: str, fix: str
) -> None:
    path = vllm_config(vllm_model, tmp_path, **extra)
    data = yaml.safe_load(path.read_text())
    data["engine"] = engine
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert refused.value.key == key and fix in refused.value.line() and str(path) in refused.value.line()


def test_engine_args_follow_the_config(vllm_model: dict[str, Path], tmp_path: Path) -> None:
    config = _config(vllm_model, tmp_path, engine={"kv_cache_gib": 2, "ab_merged_memory_share": 0.25,
                                                   "gpu_memory_utilization": 0.4})  # fmt: skip
    shares = memory_shares(config, ["merged", "unmerged"])
    assert shares == {"merged": 0.25, "unmerged": 0.75}
    merged = engine_args(config, ArmPlan("merged", tmp_path, memory_share=shares["merged"]), "float32")
    lora = engine_args(config, ArmPlan("unmerged", tmp_path, tmp_path / "a", 12, shares["unmerged"]), "float32")
    assert merged["kv_cache_memory_bytes"] + lora["kv_cache_memory_bytes"] == 2 << 30
    assert merged["gpu_memory_utilization"] == pytest.approx(0.1) and lora["gpu_memory_utilization"] == pytest.approx(
        0.3
    )
    assert merged["max_model_len"] == config.limits.max_total_tokens and merged["max_num_seqs"] == 4
    assert "enable_lora" not in merged and lora["enable_lora"] and lora["max_lora_rank"] == 16
    assert merged["logprobs_mode"] == "processed_logprobs"
    assert (
        config.engine.compute_hash() != _config(vllm_model, tmp_path, engine={"kv_cache_gib": 1}).engine.compute_hash()
    )


def test_lora_rank_buckets_and_cpu_binding(vllm_model: dict[str, Path], tmp_path: Path) -> None:
    assert [lora_rank_bucket(r) for r in (1, 2, 8, 9, 320, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ValueError, match="largest LoRA rank"):
        lora_rank_bucket(513)
    pinned = _config(vllm_model, tmp_path, engine={"cpu_threads_bind": "0|1", "tensor_parallel_size": 2})
    assert cpu_binding(pinned) == "0|1"
    two = _config(vllm_model, tmp_path, engine={"tensor_parallel_size": 2})
    assert len(cpu_binding(two).split("|")) == 2  # one core list per TP worker, as vLLM asserts

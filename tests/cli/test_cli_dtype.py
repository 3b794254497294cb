"""`serve --dtype` overrides model.dtype, so the benchmarks serve one config in several dtypes; `serve
--prefix-cache-tokens` overrides engine.prefix_cache_tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from server.cli import _overrides, _parser
from server.config.load import load_config


def _config(tmp_path: Path, tiny_config_data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config_data))
    return path


def test_serve_dtype_flag_overrides_model_dtype(tmp_path: Path, tiny_config_data: dict[str, Any]) -> None:
    path = _config(tmp_path, tiny_config_data)
    args = _parser().parse_args(["serve", "--config", str(path), "--dtype", "bfloat16"])
    assert tiny_config_data["model"]["dtype"] == "float32"
    assert load_config(path, _overrides(args)).model.dtype == "bfloat16"


def test_serve_without_dtype_keeps_the_file_dtype(
    tmp_path: Path, tiny_config_data: dict[str, Any], monkeypatch: Any
) -> None:
    monkeypatch.delenv("MERGESERVE_DTYPE", raising=False)
    path = _config(tmp_path, tiny_config_data)
    args = _parser().parse_args(["serve", "--config", str(path)])
    assert load_config(path, _overrides(args)).model.dtype == "float32"


def test_serve_dtype_from_environment(tmp_path: Path, tiny_config_data: dict[str, Any], monkeypatch: Any) -> None:
    monkeypatch.setenv("MERGESERVE_DTYPE", "float16")
    path = _config(tmp_path, tiny_config_data)
    args = _parser().parse_args(["serve", "--config", str(path)])
    assert load_config(path, _overrides(args)).model.dtype == "float16"


def test_serve_prefix_cache_flag_and_environment_override_the_engine_setting(
    tmp_path: Path, tiny_config_data: dict[str, Any], monkeypatch: Any
) -> None:
    """`--prefix-cache-tokens 0` turns prompt-prefix reuse off, e.g. to time the scheduler alone."""
    monkeypatch.delenv("MERGESERVE_PREFIX_CACHE_TOKENS", raising=False)
    path = _config(tmp_path, tiny_config_data)
    plain = _parser().parse_args(["serve", "--config", str(path)])
    assert load_config(path, _overrides(plain)).engine.prefix_cache_tokens is None  # the engine's default, 2048
    flag = _parser().parse_args(["serve", "--config", str(path), "--prefix-cache-tokens", "0"])
    assert load_config(path, _overrides(flag)).engine.prefix_cache_tokens == 0
    monkeypatch.setenv("MERGESERVE_PREFIX_CACHE_TOKENS", "512")
    env = _parser().parse_args(["serve", "--config", str(path)])
    assert load_config(path, _overrides(env)).engine.prefix_cache_tokens == 512

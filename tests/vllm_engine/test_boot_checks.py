"""What `engine.kind: vllm` checks before it starts vLLM (issue 28, item 8), without starting it.

`start_arms` is replaced by a stand-in that records what vLLM would be given and stops the boot: the merge, the
cache and the checks before vLLM all run for real.
"""

from __future__ import annotations

import logging
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer

from server.boot import vllm as vllm_boot
from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import ConfigError
from tests.vllm_engine.conftest import vllm_config


class Stopped(Exception):
    """Raised by the stand-in for `start_arms`: the boot got as far as starting vLLM."""


def _stop_at_vllm(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def start_arms(config: Any, plans: Any, dtype: str, metrics: Any) -> Any:
        seen.update(dtype=dtype, plans=plans)
        raise Stopped

    monkeypatch.setattr(vllm_boot, "start_arms", start_arms)
    return seen


def _config(model: dict[str, Path], folder: Path, dtype: str = "float32") -> Path:
    path = vllm_config(model, folder, mode="merged")
    data = yaml.safe_load(path.read_text())
    data["model"]["dtype"] = dtype
    path.write_text(yaml.safe_dump(data))
    return path


def test_dtype_checkpoint_gives_vllm_the_checkpoints_own_dtype(
    vllm_model: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM has no `checkpoint` dtype (its ModelConfig raises "Unknown dtype"), and its `auto` serves a float32
    checkpoint in float16 on a GPU: the boot must name the stored dtype (the tiny model is stored in float32)."""
    from vllm.config.model import ModelDType

    seen = _stop_at_vllm(monkeypatch)
    with pytest.raises(Stopped):
        boot(load_config(_config(vllm_model, tmp_path, dtype="checkpoint")))
    assert seen["dtype"] in typing.get_args(ModelDType) and seen["dtype"] == "float32"


class _SplitsDifferently:
    """The entry's tokenizer as another `tokenizers` version might load it: every text gains a leading token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str, **kwargs: Any) -> Any:
        out = self.tokenizer(text, **kwargs)
        out["input_ids"] = [0, *out["input_ids"]]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_a_cached_tokenizer_that_splits_a_probe_differently_is_merged_again(
    vllm_model: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The gate compares vLLM's logprobs of the stored probe ids with the stored reference; a reloaded tokenizer
    that splits the probes otherwise would serve other tokens than the gate checked."""
    _stop_at_vllm(monkeypatch)
    path = _config(vllm_model, tmp_path)
    with pytest.raises(Stopped):
        boot(load_config(path))  # builds the entry
    shifted = SimpleNamespace(from_pretrained=lambda folder: _SplitsDifferently(AutoTokenizer.from_pretrained(folder)))
    monkeypatch.setattr(vllm_boot, "AutoTokenizer", shifted)
    with caplog.at_level(logging.WARNING), pytest.raises(Stopped):
        boot(load_config(path))
    assert "splits probe 0 differently" in caplog.text and "merging again" in caplog.text


def test_max_model_len_below_max_total_tokens_is_refused(vllm_model: dict[str, Path], tmp_path: Path) -> None:
    """Our limits would accept a request of max_total_tokens that vLLM then fails (424, or mid-stream)."""
    path = vllm_config(vllm_model, tmp_path, engine={"max_model_len": 64})  # limits.max_total_tokens: 128
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    line = refused.value.line()
    assert refused.value.exit_code == 2 and str(path) in line and "engine.max_model_len" in line
    assert "fix: raise engine.max_model_len to 128" in line

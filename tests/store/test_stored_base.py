"""When the torch engine reads the base from the merge cache's dequantized copy (server.boot.stored_base), and when
it reads the base as configured. The copy itself is served and checked token by token against the reference in
tests/e2e (test_e2e_demo: stored once, then read; test_e2e_reference: the ab arms)."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.boot.phases import PhaseTimer
from server.boot.stored_base import base_entry, torch_base, vllm_base
from server.config.load import load_config
from server.store.cache import MergeCache

Writer = Callable[[dict[str, Any]], Path]


@pytest.mark.parametrize("mode", ["merged", "unmerged", "ab"])
def test_a_folder_base_is_read_as_configured(mode: str, write_config: Writer, tiny_config_data: dict[str, Any],
                                            merge_cache: Path) -> None:  # fmt: skip
    config = load_config(write_config(tiny_config_data | {"mode": mode}))
    assert torch_base(config, config.model, PhaseTimer(None)) == (config.model, None)
    assert vllm_base(config, MergeCache(merge_cache), PhaseTimer(None)) == config.model.local  # safetensors there
    assert not (merge_cache / "entries").exists() or not any((merge_cache / "entries").iterdir())


def test_a_gguf_base_without_a_copy_in_merged_mode_or_with_the_cache_off_is_read_as_configured(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path, merge_cache: Path
) -> None:
    """Merged mode reads a copy that is there (test_e2e_demo) but never stores one; with the cache off, neither."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never loaded: neither case dequantizes at this step
    tiny_config_data["model"]["path"] = str(gguf)
    for extra in ({"mode": "merged"}, {"mode": "unmerged", "cache": {"enabled": False}}):
        config = load_config(write_config(tiny_config_data | extra))
        assert torch_base(config, config.model, PhaseTimer(None)) == (config.model, None)
    assert not (merge_cache / "entries").exists() or not any((merge_cache / "entries").iterdir())


def test_an_unusable_cache_folder_costs_the_copy_not_the_boot(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gguf, blocked = tmp_path / "model.gguf", tmp_path / "not-a-folder"
    gguf.write_bytes(b"GGUF")
    blocked.write_text("a file where the cache folder should be")
    tiny_config_data["model"]["path"] = str(gguf)
    config = load_config(write_config(tiny_config_data | {"mode": "ab", "cache": {"dir": str(blocked)}}))
    with caplog.at_level(logging.WARNING):
        assert torch_base(config, config.model, PhaseTimer(None)) == (config.model, None)
    assert "cannot keep the dequantized base there" in caplog.text


@pytest.mark.parametrize("library", ["transformers", "gguf", "tokenizers"])
def test_the_stored_base_copy_is_keyed_by_the_libraries_that_derive_it(
    library: str, write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """transformers and gguf dequantize a GGUF base and tokenizers converts its tokenizer: a copy made by other
    versions of them is not this machine's copy, and must be made again rather than read."""
    config = load_config(write_config(tiny_config_data | {"mode": "unmerged"}))
    cache = MergeCache(merge_cache)
    stored = base_entry(config, cache, PhaseTimer(None))
    assert stored is not None and base_entry(config, cache, PhaseTimer(None), create=False) == stored
    real = importlib.metadata.version
    other = real(library) + ".other"
    monkeypatch.setattr(importlib.import_module(library), "__version__", other, raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: other if name == library else real(name))
    assert base_entry(config, cache, PhaseTimer(None), create=False) is None

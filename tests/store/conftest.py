"""The `hub` fixture: an empty Hub cache in HF_HUB_CACHE, with HF_HUB_OFFLINE=1."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # huggingface_hub reads both variables once, at import: its constants are set too, as the environment would
    # have set them in a fresh process (the CLI tests set only the environment).
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache

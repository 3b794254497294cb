"""The torch engine's boot runs on a thread that has ended by the time `boot` returns, and its failures reach the
caller: a thread that ran the boot's forwards and lived on would keep an OpenMP team, which on a machine with few
cores slows every decode step of the model thread (server/boot/boot.py gives the figures)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import server.boot.boot as boot_module
from server.config.load import load_config
from server.load.adapters import BootError


def test_the_torch_boot_runs_on_a_thread_that_ends_before_boot_returns(
    tiny_config_data: dict[str, Any], write_config: Callable[[dict[str, Any]], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[threading.Thread] = []
    original = boot_module._boot_torch

    def recording(*args: Any) -> Any:
        seen.append(threading.current_thread())
        return original(*args)

    monkeypatch.setattr(boot_module, "_boot_torch", recording)
    engine = boot_module.boot(load_config(write_config(tiny_config_data)))
    try:
        assert len(seen) == 1
        assert seen[0] is not threading.current_thread()
        assert not seen[0].is_alive()
        assert engine.scheduler._thread.is_alive()  # the model thread is the one thread left serving
    finally:
        engine.close()


def test_a_boot_failure_on_the_boot_thread_is_raised_in_the_caller(
    tiny_config_data: dict[str, Any], write_config: Callable[[dict[str, Any]], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    refusal = BootError("the adapter does not fit", "train it on this base", "adapters[0].path")

    def refuse(*args: Any) -> Any:
        raise refusal

    monkeypatch.setattr(boot_module, "_boot_torch", refuse)
    with pytest.raises(BootError) as caught:
        boot_module.boot(load_config(write_config(tiny_config_data)))
    assert caught.value is refusal

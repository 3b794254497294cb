"""Hub ids downloaded over HTTP from a stub Hub at HF_ENDPOINT (tests/stub_hub.py), through huggingface_hub.

What is fetched is what `allow_patterns` lets through, decoys included in the repos; off a terminal each file gets
one log line; the commit the Hub named is the one served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from server.boot.boot import boot
from server.config.load import load_config
from server.store.hub import resolve_hub
from tests.hub_cache import BASE, LORA, hub_config
from tests.stub_hub import StubRepos, stub_hub

Writer = Callable[[dict[str, Any]], Path]
DECOYS = {"pytorch_model.bin": b"pickle", "consolidated.safetensors": b"dup", "README.md": b"# card", "x.onnx": b"o"}


@pytest.fixture
def online(hub: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StubRepos]:
    repos = StubRepos()
    with stub_hub(repos) as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        # As HF_ENDPOINT sets them when huggingface_hub is imported (the `hub` fixture's note).
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield repos


def _publish(repos: StubRepos, tiny_base: Path, alpha: Path) -> tuple[str, str]:
    base = {str(p.relative_to(tiny_base)): p.read_bytes() for p in tiny_base.iterdir() if p.is_file()}
    lora = {p.name: p.read_bytes() for p in alpha.iterdir() if p.is_file()}
    return repos.add(BASE, base | DECOYS), repos.add(LORA, lora | {"adapter_model.bin": b"pickle"})


def test_downloads_only_what_is_loaded_one_line_per_file(
    online: StubRepos, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    base_sha, lora_sha = _publish(online, tiny_base, tiny_adapters["alpha"])
    caplog.set_level(logging.INFO, logger="mergeserve.hub")
    engine = boot(load_config(write_config(hub_config(BASE, {"path": LORA}))))
    assert (engine.info.model_sha, engine.info.adapters[0].sha) == (base_sha, lora_sha)
    base_files = {f"{BASE}/{p.name}" for p in tiny_base.iterdir() if p.is_file()}
    lora_files = {f"{LORA}/adapter_config.json", f"{LORA}/adapter_model.safetensors"}  # not PEFT's README.md
    assert sorted(online.fetched) == sorted(base_files | lora_files)  # no decoy, no pickle, each file once
    lines = [r.getMessage() for r in caplog.records if r.name == "mergeserve.hub"]
    for fetched in online.fetched:
        repo, _, name = fetched.rpartition("/")
        assert sum(line.startswith(f"hub: {repo}: {name} (") for line in lines) == 1, lines
    assert f"hub: model.path {BASE} -> commit {base_sha}" in "\n".join(lines)
    # A second boot finds everything in the Hub cache: nothing is fetched again.
    before = len(online.fetched)
    again = boot(load_config(write_config(hub_config(BASE, {"path": LORA}))))
    assert len(online.fetched) == before and again.info.adapters[0].sha == lora_sha


def test_an_offline_boot_finds_the_branch_an_online_boot_fetched(
    online: StubRepos, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Files fetched by commit: the cache must still map the branch to that commit, or offline serve refuses."""
    base_sha, lora_sha = _publish(online, tiny_base, tiny_adapters["alpha"])
    config = load_config(write_config(hub_config(BASE, {"path": LORA})))
    boot(config)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = boot(config)
    assert (offline.info.model_sha, offline.info.adapters[0].sha) == (base_sha, lora_sha)


def test_pickles_only_with_allow_pickle_and_a_moved_branch_is_fetched_anew(
    online: StubRepos, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer
) -> None:
    _, first = _publish(online, tiny_base, tiny_adapters["alpha"])
    resolve_hub(load_config(write_config(hub_config(BASE, {"path": LORA}))))
    assert not any(f.endswith(".bin") for f in online.fetched)
    online.fetched.clear()
    allowed = load_config(write_config(hub_config(BASE, {"path": LORA}, security={"allow_pickle": True})))
    resolved = resolve_hub(allowed)
    assert sorted(online.fetched) == [f"{BASE}/pytorch_model.bin", f"{LORA}/adapter_model.bin"]
    assert resolved.adapters[0].sha == first
    second = online.add_folder(LORA, tiny_adapters["beta"])  # main moves on the Hub
    moved = resolve_hub(load_config(write_config(hub_config(BASE, {"path": LORA}))))
    assert moved.adapters[0].sha == second != first
    assert (moved.adapters[0].local / "adapter_config.json").read_bytes() == (
        tiny_adapters["beta"] / "adapter_config.json"
    ).read_bytes()


def test_a_gguf_is_fetched_only_when_named(
    online: StubRepos, tiny_adapters: dict[str, Path], write_config: Writer
) -> None:
    gguf = {"q4/model.Q4_K_M.gguf": b"GGUF q4", "q8/model.Q8_0.gguf": b"GGUF q8", "config.json": b"{}"}
    sha = online.add("test-org/tiny-gguf", gguf, ref="v1")
    online.add_folder(LORA, tiny_adapters["alpha"])
    config = load_config(write_config(hub_config("test-org/tiny-gguf@v1/q4/model.Q4_K_M.gguf", {"path": LORA})))
    assert config.model.model_id == "test-org/tiny-gguf"
    resolved = resolve_hub(config)
    assert resolved.model.sha == sha and resolved.model.local.read_bytes() == b"GGUF q4"
    assert [f for f in online.fetched if "gguf" in f] == ["test-org/tiny-gguf/q4/model.Q4_K_M.gguf"]


def test_check_names_the_commits_and_downloads_nothing(
    online: StubRepos, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer
) -> None:
    """`mergeserve check` asks the Hub for the commit and the file list only; the boot after it fetches that list."""
    from server.boot.plan import check

    base_sha, lora_sha = _publish(online, tiny_base, tiny_adapters["alpha"])
    config = load_config(write_config(hub_config(BASE, {"path": LORA})))
    plan = check(config, "config.yaml")
    assert plan.refusal is None and online.fetched == []
    assert [(h["commit"], h["cached"]) for h in plan.hub] == [(base_sha, False), (lora_sha, False)]
    boot(config)
    fetched = [sum(f.startswith(f"{repo}/") for f in online.fetched) for repo in (BASE, LORA)]
    expected = [f"not cached: serve would download {n}" for n in fetched]
    assert [h["note"].split(" files")[0] for h in plan.hub] == expected
    again = check(config, "config.yaml")
    assert [(h["commit"], h["cached"]) for h in again.hub] == [(base_sha, True), (lora_sha, True)]

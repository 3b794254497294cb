"""Hub ids, resolved offline from a real Hub cache (tests/hub_cache.py) through huggingface_hub's own code.

HF_HUB_OFFLINE=1 and a temp HF_HUB_CACHE come from the `hub` fixture (tests/store/conftest.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from fastapi.testclient import TestClient
from huggingface_hub import scan_cache_dir, snapshot_download
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from server.boot.boot import boot
from server.config.load import load_config
from server.engine.engine import Engine
from server.http.app import create_app
from tests.hub_cache import BASE, LORA, hub_config, point, publish, repo_folder
from tests.live_server import REPO
from tests.reference import peft_merged

Writer = Callable[[dict[str, Any]], Path]


def _logits(engine: Engine) -> torch.Tensor:
    ids = torch.tensor([engine.tokenize("Arr matey, the capital of France is")])
    with torch.inference_mode():
        return engine.model(input_ids=ids).logits[0]  # type: ignore[no-any-return]


def test_the_builder_writes_what_huggingface_hub_reads(hub: Path, tiny_base: Path) -> None:
    commit = publish(hub, BASE, tiny_base, refs=("main", "v1"))
    assert snapshot_download(BASE, local_files_only=True) == str(repo_folder(hub, BASE) / "snapshots" / commit)
    assert snapshot_download(BASE, revision="v1", local_files_only=True).endswith(commit)
    info = scan_cache_dir(hub)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == BASE and {r.commit_hash for r in repo.revisions} == {commit}
    assert set(next(iter(repo.revisions)).refs) == {"main", "v1"}
    assert repo.nb_files == len([p for p in tiny_base.iterdir() if p.is_file()])


def test_boot_from_hub_ids_serves_peft_merge_and_reports_commits(
    hub: Path, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer
) -> None:
    base_sha = publish(hub, BASE, tiny_base)
    lora_sha = publish(hub, LORA, tiny_adapters["alpha"])
    config = load_config(write_config(hub_config(BASE, {"path": LORA})))
    phases: list[str] = []
    engine = boot(config, on_phase=lambda name, _s: phases.append(name))
    assert phases[0] == "download"
    reference = peft_merged(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), tiny_adapters["alpha"]
    )
    ids = torch.tensor([engine.tokenize("Arr matey, the capital of France is")])
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits[0]
    assert torch.allclose(_logits(engine), expected, atol=1e-5, rtol=0)
    app = create_app(engine, config)
    info = TestClient(app).get("/info").json()
    assert info["model_id"] == BASE and info["model_sha"] == base_sha
    (adapter,) = info["adapters"]
    assert adapter["source"] == LORA and adapter["sha"] == lora_sha
    inputs = json.loads((Path(info["cache"]["dir"]) / "entries" / info["cache"]["key"] / "mergeserve-manifest.json")
                        .read_text())["inputs"]  # fmt: skip
    assert inputs["base_commit"] == base_sha and inputs["adapters"][0]["commit"] == lora_sha
    metrics = TestClient(app).get("/metrics").text
    assert 'mergeserve_boot_phase_duration_seconds{phase="download"}' in metrics


def test_revisions_by_tag_and_commit_and_a_moved_branch_key_their_own_entries(
    hub: Path, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer, merge_cache: Path
) -> None:
    publish(hub, BASE, tiny_base)
    first = publish(hub, LORA, tiny_adapters["alpha"], refs=("main", "v1"))
    second = publish(hub, LORA, tiny_adapters["rs"], refs=("v2",))
    assert first != second
    by_tag = boot(load_config(write_config(hub_config(BASE, {"path": f"{LORA}@v1"}))))
    by_commit = boot(load_config(write_config(hub_config(BASE, {"path": LORA, "revision": second}))))
    assert (by_tag.info.adapters[0].sha, by_commit.info.adapters[0].sha) == (first, second)
    assert by_tag.info.cache["key"] != by_commit.info.cache["key"]
    assert not torch.allclose(_logits(by_tag), _logits(by_commit))
    on_main = boot(load_config(write_config(hub_config(BASE, {"path": LORA}))))
    assert on_main.info.cache["status"] == "hit" and on_main.info.cache["key"] == by_tag.info.cache["key"]
    # main moves to a new commit holding the very same files: a new entry, named after the commit it came from.
    third = publish(hub, LORA, tiny_adapters["alpha"], refs=("main", "v3"))
    assert third not in (first, second)
    moved = boot(load_config(write_config(hub_config(BASE, {"path": LORA}))))
    assert moved.info.adapters[0].sha == third and moved.info.cache["status"] == "miss"
    assert len({by_tag.info.cache["key"], by_commit.info.cache["key"], moved.info.cache["key"]}) == 3
    assert len(list((merge_cache / "entries").iterdir())) == 3
    assert torch.equal(_logits(moved), _logits(by_tag))
    point(hub, LORA, "main", first)  # and back: the first entry again
    assert boot(load_config(write_config(hub_config(BASE, {"path": LORA})))).info.cache["status"] == "hit"


def test_subfolder_and_a_local_path_that_exists_wins(
    hub: Path, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer, tmp_path: Path
) -> None:
    publish(hub, BASE, tiny_base)
    sha = publish(hub, LORA, tiny_adapters["beta"], subfolder="loras/beta")
    config = load_config(write_config(hub_config(BASE, {"path": LORA, "subfolder": "loras/beta"})))
    engine = boot(config, on_phase=None)
    assert engine.info.adapters[0].sha == sha and engine.info.adapters[0].rank == 8
    assert engine.info.adapters[0].path.endswith("loras/beta")
    # A folder beside the config named like an id is a path, however the Hub cache looks.
    local = tmp_path / LORA
    shutil.copytree(tiny_adapters["alpha"], local)
    config = load_config(write_config(hub_config(BASE, {"path": LORA})))
    assert config.adapters[0].hub is None and config.adapters[0].local == local


def test_merge_cli_exports_from_hub_ids_with_their_commits(
    tmp_path: Path, tiny_base: Path, tiny_adapters: dict[str, Path], write_config: Writer
) -> None:
    """`mergeserve merge` in a fresh process, told where the Hub cache is and to stay offline by its environment."""
    cache = tmp_path / "env-cache"
    base_sha = publish(cache, BASE, tiny_base, refs=("main", "v1"))
    lora_sha = publish(cache, LORA, tiny_adapters["alpha"], subfolder="alpha")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}  # fmt: skip
    config = write_config(hub_config(f"{BASE}@v1", {"path": LORA, "subfolder": "alpha", "weight": 0.5}))
    out = tmp_path / "export"
    argv = [sys.executable, "-m", "server", "merge", "--config", str(config), "--out", str(out)]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"model.path {BASE}@v1 -> commit {base_sha}" in proc.stderr
    record = json.loads((out / "mergeserve.json").read_text())
    assert record["base"] == {"hub_id": f"{BASE}@v1", "commit": base_sha}
    (adapter,) = record["adapters"]
    assert (adapter["hub_id"], adapter["commit"], adapter["subfolder"], adapter["weight"]) == (
        LORA,
        lora_sha,
        "alpha",
        0.5,
    )
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tiny_adapters["alpha"]))
    for layer in peft.base_model.model.modules():
        if isinstance(layer, LoraLayer):
            layer.scaling["default"] *= 0.5  # the configured weight scales the delta
    reference = peft.merge_and_unload().state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.allclose(tensor, reference[name], atol=1e-6, rtol=0), name

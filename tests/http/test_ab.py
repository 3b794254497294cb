"""`mode: ab`: both arms in one process over shared base weights, chosen per request, never mixed in a batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from peft import PeftModel

from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import Config
from server.engine.engine import Engine
from server.engine.kernels import PackedLinear
from server.engine.sampling import SamplingParams
from server.engine.types import PreparedRequest
from server.http.app import create_app


def _config(tmp: Path, base: Path, adapters: dict[str, Path], **extra: Any) -> Config:
    data = {
        "model": {"path": str(base), "id": "tiny-llama", "dtype": "float32"},
        "adapters": [
            {"name": "alpha", "path": str(adapters["alpha"]), "weight": 0.9},
            {"name": "beta", "path": str(adapters["beta"]), "weight": 0.6},
        ],
        "mode": "ab",
        "limits": {"max_input_tokens": 32, "max_total_tokens": 96, "max_new_tokens": 8},
        **extra,
    }
    path = tmp / "ab.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


@pytest.fixture(scope="module")
def ab(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = _config(tmp_path_factory.mktemp("ab"), tiny_base, tiny_adapters)
    return config, boot(config)


def _served(model: torch.nn.Module) -> dict[str, object]:
    """name -> what identifies the tensor served under it: a parameter's address, or a packed layer's packed weight
    (prepack replaces each plain linear weight by one packed copy, shared by the arms that share the weight)."""
    served: dict[str, object] = {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            served[f"{name}.weight"] = id(module.packed)
    return {n.replace(".base_layer", ""): key for n, key in served.items()}


def test_arms_share_every_untouched_tensor(ab: tuple[Config, Engine]) -> None:
    engine = ab[1]
    merged, unmerged = engine.arms["merged"], engine.arms["unmerged"]
    assert isinstance(unmerged, PeftModel) and not isinstance(merged, PeftModel)
    ours, theirs = _served(unmerged.get_base_model()), _served(merged)
    assert ours.keys() == theirs.keys()
    shared = [n for n in theirs if theirs[n] == ours[n]]
    own = [n for n in theirs if theirs[n] != ours[n]]
    assert "model.embed_tokens.weight" in shared and "model.norm.weight" in shared and "lm_head.weight" in shared
    assert "model.layers.0.input_layernorm.weight" in shared
    assert sorted(own) == sorted(n for n in ours if n.rsplit(".", 2)[-2].endswith("_proj"))
    assert len(own) == 2 * 7  # adapted projections only (alpha targets all 7, beta a subset)


def test_both_arms_give_the_same_greedy_tokens(ab: tuple[Config, Engine]) -> None:
    engine = ab[1]
    assert engine.info.parity is not None and engine.info.parity.passed
    request = PreparedRequest(engine.tokenize("Arr matey, the treasure"), SamplingParams(), 12)
    merged = [t.id for t in engine.generate(request, "merged").tokens]
    unmerged = [t.id for t in engine.generate(request, "unmerged").tokens]
    assert merged == unmerged
    base = engine.arms["unmerged"]
    with base.disable_adapter(), torch.inference_mode():  # and the adapters do change the answer
        ids = torch.tensor([request.input_ids])
        plain = base(input_ids=ids).logits
        adapted = engine.arms["merged"](input_ids=ids).logits
    assert (plain - adapted).abs().max().item() > 1e-2


def test_header_picks_the_arm(ab: tuple[Config, Engine]) -> None:
    client = TestClient(create_app(ab[1], ab[0]))
    body = {"inputs": "Arr", "parameters": {"max_new_tokens": 3}}
    for arm in ("merged", "unmerged", "Unmerged"):
        r = client.post("/generate", json=body, headers={"X-Merge-Mode": arm})
        assert r.status_code == 200 and r.headers["x-merge-mode"] == arm.lower()
    r = client.post("/generate", json=body, headers={"X-Merge-Mode": "both"})
    assert r.status_code == 422 and "X-Merge-Mode `both` is not served" in r.json()["error"]
    r = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "Arr", "max_tokens": 2},
                    headers={"X-Merge-Mode": "unmerged"})  # fmt: skip
    assert r.status_code == 200 and r.headers["x-merge-mode"] == "unmerged"
    text = client.get("/metrics").text
    assert 'mergeserve_request_duration_seconds_count{adapter="alpha+beta",mode="merged"} 1.0' in text
    assert 'mergeserve_request_duration_seconds_count{adapter="alpha+beta",mode="unmerged"} 3.0' in text


def test_split_is_seeded_and_fair(
    ab: tuple[Config, Engine], tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    def arms(client: TestClient, n: int) -> list[str]:
        body = {"inputs": "Arr", "parameters": {"max_new_tokens": 1}}
        return [client.post("/generate", json=body).headers["x-merge-mode"] for _ in range(n)]

    config, engine = ab
    first, second = arms(TestClient(create_app(engine, config)), 60), arms(TestClient(create_app(engine, config)), 60)
    assert first == second  # same seed, same sequence of arms
    assert 18 <= first.count("merged") <= 42  # 0.5 share: 60 draws stay within ~3 sigma of 30
    skewed = _config(tmp_path, tiny_base, tiny_adapters, ab={"merged": 0.0, "seed": 3})
    assert set(arms(TestClient(create_app(engine, skewed)), 10)) == {"unmerged"}


def test_single_arm_server_refuses_the_other_arm(
    tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(tmp_path, tiny_base, tiny_adapters, mode="unmerged")
    client = TestClient(create_app(boot(config), config))
    r = client.post("/generate", json={"inputs": "Arr"}, headers={"X-Merge-Mode": "merged"})
    assert r.status_code == 422 and "use unmerged" in r.json()["error"]


def test_batches_never_mix_arms_and_arms_take_turns(ab: tuple[Config, Engine]) -> None:
    engine = ab[1]
    steps: list[tuple[str, int]] = []
    request = PreparedRequest(engine.tokenize("Once upon a time"), SamplingParams(), 20)
    outputs: dict[str, list[list[int]]] = {"merged": [], "unmerged": []}
    gate = threading.Event()
    # A one-token request whose callback holds the scheduler until all six requests are queued.
    engine.submit(PreparedRequest(engine.tokenize("Arr"), SamplingParams(), 1), lambda *_: gate.wait(30), "merged")

    def run(arm: str) -> None:
        outputs[arm].append([t.id for t in engine.generate(request, arm).tokens])

    threads = [threading.Thread(target=run, args=(arm,)) for arm in ("merged", "unmerged") * 3]
    engine.scheduler.on_step = lambda lane, batch, _waiting: steps.append((lane, batch))
    try:
        for t in threads:
            t.start()
        # Queued or already admitted next to the held request: 7 counted in all (the scheduler may take some of
        # the six into a prefill before the held one's token blocks it, so "waiting" alone need not reach 6).
        deadline = time.monotonic() + 30
        while sum(engine.scheduler.load) < 7 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        gate.set()
        for t in threads:
            t.join()
    finally:
        engine.scheduler.on_step = None
    assert outputs["merged"] == outputs["unmerged"] and len(outputs["merged"]) == 3
    lanes = [lane for lane, _ in steps]
    assert all(1 <= batch <= 3 for _, batch in steps)  # a step holds one arm's rows only (at most its three)
    assert {"merged", "unmerged"} <= set(lanes)
    for i in range(len(lanes) - 1):  # strict turns: an arm steps twice in a row only once the other is done
        if lanes[i] == lanes[i + 1]:
            assert all(lane == lanes[i] for lane in lanes[i:]), f"arm {lanes[i]} stepped twice at {i}: {lanes}"

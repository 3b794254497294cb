"""The merge cache on the tiny model: hits skip the base, damaged entries are rebuilt, replicas merge once."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.boot import arms as boot_module
from server.boot.boot import boot
from server.config.load import load_config
from server.engine.engine import Engine
from server.http.app import create_app
from server.merge import precision
from server.store import cache as cache_module
from server.store.cache import MANIFEST, PROBES, FileHashes, MergeCache
from server.store.checkpoint import sha256_file
from tests.conftest import make_added_token_adapter

Writer = Callable[[dict[str, Any]], Path]
HIT_PHASES = ["cache_lookup", "cache_hit", "verify", "prepack", "kernels", "warmup"]


def _logits(engine: Engine) -> torch.Tensor:
    ids = torch.tensor([engine.tokenize("Arr matey, the capital of France is")])
    with torch.inference_mode():
        return engine.model(input_ids=ids).logits  # type: ignore[no-any-return]


def _entry(cache_dir: Path) -> Path:
    (entry,) = (cache_dir / "entries").iterdir()
    return entry


def test_second_boot_hits_without_loading_the_base(
    write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tiny_config_data))
    cold = boot(config)
    assert cold.info.cache["status"] == "miss"
    entry = _entry(merge_cache)
    assert entry.name == cold.info.cache["key"]
    assert not any(p.name.startswith("adapter") for p in entry.iterdir())

    def no_base(*_: Any) -> Any:
        raise AssertionError("a hit must not load the base")

    monkeypatch.setattr(boot_module, "load_base", no_base)
    phases: list[str] = []
    hot = boot(config, on_phase=lambda name, _s: phases.append(name))
    assert phases == HIT_PHASES
    assert hot.info.cache["status"] == "hit" and hot.info.cache["reproduced_exactly"] is True
    assert "stored" in hot.info.cache["parity_reference"] and hot.info.parity is not None and hot.info.parity.passed
    assert torch.equal(_logits(cold), _logits(hot))
    info = TestClient(create_app(hot, config)).get("/info").json()
    assert info["cache"]["hit"] is True and info["cache"]["key"] == entry.name
    assert [a["name"] for a in info["adapters"]] == ["alpha"] and info["adapters"][0]["rank"] == 4


def test_a_hit_hashes_nothing_that_is_unchanged(
    write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The entry's files were hashed when stored and the inputs when the key was made; a hit re-reads neither."""
    config = load_config(write_config(tiny_config_data))
    assert boot(config).info.cache["status"] == "miss"
    hashed: list[Path] = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda path: hashed.append(path) or real(path))
    assert boot(config).info.cache["status"] == "hit"
    assert hashed == []


def _flip(entry: Path) -> str:
    shard = sorted(entry.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard.name


def _flip_keeping_mtime(entry: Path) -> str:
    """A hit trusts a file's recorded sha256 while its stamp is unchanged: a flipped byte with the old mtime put
    back (`touch -r`) must still be re-hashed, because the write moved its ctime."""
    shard = sorted(entry.glob("model-*.safetensors"))[-1]
    before = shard.stat()
    name = _flip(entry)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    return name


def _truncate(entry: Path) -> str:
    shard = sorted(entry.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name


def _drop_manifest(entry: Path) -> str:
    (entry / MANIFEST).unlink()
    return "manifest"


def _forge_reference(entry: Path) -> str:
    """Valid hashes, wrong content: stored reference logits that the merged model cannot match."""
    probes = load_file(str(entry / PROBES))
    save_file({k: v + 1.0 if k.startswith("reference.") else v for k, v in probes.items()}, str(entry / PROBES))
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["files"][PROBES] = sha256_file(entry / PROBES)
    (entry / MANIFEST).write_text(json.dumps(manifest))
    return "parity gate"


@pytest.mark.parametrize("damage", [_flip, _flip_keeping_mtime, _truncate, _drop_manifest, _forge_reference])
def test_damaged_entry_is_reported_and_rebuilt(
    write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path, damage: Callable[[Path], str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    config = load_config(write_config(tiny_config_data))
    cold = boot(config)
    clue = damage(_entry(merge_cache))
    rebuilt = boot(config)
    assert rebuilt.info.cache["status"] == "rebuilt" and rebuilt.info.cache["corrupt_entries"] == 1
    assert clue in rebuilt.info.cache["problem"] and "damaged" in caplog.text
    assert torch.equal(_logits(cold), _logits(rebuilt))
    assert MergeCache(merge_cache).check(cold.info.cache["key"])[1] is None  # the new entry is whole
    metrics = TestClient(create_app(rebuilt, config)).get("/metrics").text
    assert "mergeserve_merge_cache_corrupt_entries_total 1.0" in metrics
    assert boot(config).info.cache["status"] == "hit"


def _store_the_base_instead(entry: Path, base: Path) -> None:
    """Valid hashes, wrong weights: the entry's shards hold the base's weights, as if the merge had dropped the
    adapter."""
    original = load_file(str(base / "model.safetensors"))
    manifest = json.loads((entry / MANIFEST).read_text())
    for shard in sorted(entry.glob("model-*.safetensors")):
        tensors = load_file(str(shard))
        save_file({k: original[k].to(v.dtype) if k in original else v for k, v in tensors.items()}, str(shard))
        manifest["files"][shard.name] = sha256_file(shard)
    (entry / MANIFEST).write_text(json.dumps(manifest))


def test_half_precision_hit_is_gated_against_the_stored_float32_reference(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_base: Path, tiny_adapters: dict[str, Path],
    merge_cache: Path,
) -> None:  # fmt: skip
    tiny_config_data["model"]["dtype"] = "bfloat16"
    config = load_config(write_config(tiny_config_data))
    cold = boot(config)
    entry = _entry(merge_cache)
    stored = load_file(str(entry / PROBES))
    # What the entry stores is the unmerged model's float32 function: a separately loaded, upcast copy's forward.
    copy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16).float(), tiny_adapters["alpha"]
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    with torch.inference_mode():
        for i, text in enumerate(config.parity.probes):
            want = copy(input_ids=tokenizer(text, return_tensors="pt").input_ids).logits[0]
            assert torch.allclose(stored[f"float32.{i}"], want, atol=1e-5, rtol=0)
    hot = boot(config)
    assert hot.info.cache["status"] == "hit" and hot.info.cache["reproduced_exactly"] is True
    # The same criterion on the same logits: the hit's verdict is the cold boot's, figure for figure.
    assert hot.info.parity is not None and hot.info.parity.reference == "float32" and hot.info.parity.passed
    assert hot.info.parity == cold.info.parity
    _store_the_base_instead(entry, tiny_base)
    rebuilt = boot(config)
    assert rebuilt.info.cache["status"] == "rebuilt" and "parity gate" in rebuilt.info.cache["problem"]
    assert "merged vs float32 reference" in rebuilt.info.cache["problem"]


def test_replicas_booting_together_merge_once(
    write_config: Writer, tiny_config_data: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(write_config(tiny_config_data))
    merges: list[int] = []
    real_merge = boot_module.merge_and_unload

    def counted(*args: Any) -> Any:
        merges.append(1)
        return real_merge(*args)

    monkeypatch.setattr(boot_module, "merge_and_unload", counted)
    engines: list[Engine] = []
    start = threading.Barrier(2)

    def replica() -> None:
        start.wait()
        engines.append(boot(config))

    threads = [threading.Thread(target=replica) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(engines) == 2 and len(merges) == 1
    assert sorted(e.info.cache["status"] for e in engines) == ["hit", "miss"]
    assert torch.equal(_logits(engines[0]), _logits(engines[1]))


def test_key_follows_content_and_unchanged_files_are_not_rehashed(
    write_config: Writer, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path], merge_cache: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    cache = MergeCache(merge_cache)
    key, _ = cache.key(load_config(write_config(tiny_config_data)))
    hashed: list[Path] = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert cache.key(load_config(write_config(tiny_config_data)))[0] == key and hashed == []  # size+mtime fast path
    changed = {"weight": 0.5}, {"dtype": "bfloat16"}
    assert cache.key(load_config(write_config({**tiny_config_data, "adapters": [
        {**tiny_config_data["adapters"][0], **changed[0]}]})))[0] != key  # fmt: skip
    tiny_config_data["model"] = {**tiny_config_data["model"], **changed[1]}
    assert cache.key(load_config(write_config(tiny_config_data)))[0] != key
    copy = tmp_path / "alpha-copy"
    copy.mkdir()
    for f in tiny_adapters["alpha"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(copy / "adapter_model.safetensors"))
    first = next(iter(tensors))
    tensors[first] = tensors[first] * 1.001
    save_file(tensors, str(copy / "adapter_model.safetensors"))
    tiny_config_data["model"]["dtype"] = "float32"
    tiny_config_data["adapters"][0]["path"] = str(copy)
    assert cache.key(load_config(write_config(tiny_config_data)))[0] != key  # same name, other weights
    assert any(p.name == "adapter_model.safetensors" for p in hashed)
    assert FileHashes(merge_cache).known  # the sidecar index was saved


def test_a_changed_file_with_its_old_size_and_mtime_is_hashed_again(tmp_path: Path) -> None:
    """A retrained adapter of the same shapes, delivered with the old mtime (`cp -p`, `touch -r`, reproducible
    builds), must not be taken for the old one: that was a cache hit on the old merge, whose stored probes then
    passed the gate too."""
    weights = tmp_path / "adapter_model.safetensors"
    save_file({"lora_B": torch.ones(4, 2)}, str(weights))
    before = weights.stat()
    first = FileHashes(tmp_path)
    old = first.digest(weights)
    first.save()  # remembered for the next boot
    save_file({"lora_B": -torch.ones(4, 2)}, str(weights))  # negated in place: same size
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old mtime restored
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    assert FileHashes(tmp_path).digest(weights) == sha256_file(weights) != old


def test_cache_dir_from_config_env_or_home(
    write_config: Writer, tiny_config_data: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGESERVE_CACHE_DIR", str(tmp_path / "from-env"))
    assert load_config(write_config(tiny_config_data)).cache.resolved_dir() == tmp_path / "from-env"
    tiny_config_data["cache"] = {"dir": "relative-cache"}
    assert load_config(write_config(tiny_config_data)).cache.resolved_dir() == tmp_path / "relative-cache"
    monkeypatch.delenv("MERGESERVE_CACHE_DIR")
    del tiny_config_data["cache"]
    assert load_config(write_config(tiny_config_data)).cache.resolved_dir() == Path.home() / ".cache" / "mergeserve"


def test_disabled_cache_merges_every_time(
    write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path
) -> None:
    tiny_config_data["cache"] = {"enabled": False}
    engine = boot(load_config(write_config(tiny_config_data)))
    assert engine.info.cache["status"] == "disabled" and not merge_cache.exists()


def test_cli_cache_dir_flag_overrides_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import _overrides, _parser

    monkeypatch.chdir(tmp_path)
    args = _parser().parse_args(["serve", "--config", "x.yaml", "--cache-dir", "here"])
    assert _overrides(args)["cache.dir"] == str(tmp_path / "here")


def test_a_hit_serves_the_adapters_tokenizer_as_the_cold_boot_did(
    write_config: Writer, tiny_base: Path, tmp_path: Path
) -> None:
    """A folder base and an adapter shipping its own tokenizer (two added tokens, another chat template)."""

    adapter = make_added_token_adapter(tiny_base, tmp_path / "added")
    config = load_config(write_config({
        "model": {"path": str(tiny_base), "dtype": "float32"}, "mode": "merged",
        "adapters": [{"name": "tokens", "path": str(adapter)}],
        "limits": {"max_input_tokens": 32, "max_total_tokens": 64, "max_new_tokens": 4},
    }))  # fmt: skip
    shipped, base_tok = AutoTokenizer.from_pretrained(adapter), AutoTokenizer.from_pretrained(tiny_base)
    assert len(shipped) > len(base_tok) and shipped.chat_template != base_tok.chat_template  # the test can fail
    cold = boot(config)
    hot = boot(config)
    assert (cold.info.cache["status"], hot.info.cache["status"]) == ("miss", "hit")
    text, chat = "Arr <ship> and <parrot>", [{"role": "user", "content": "Ahoy <parrot>"}]
    want_ids = shipped(text).input_ids
    assert max(want_ids) >= len(base_tok)  # the added tokens are in play
    for engine in (cold, hot):
        tok = engine.tokenizer
        assert len(tok) == len(shipped) and tok.get_vocab() == shipped.get_vocab()
        assert tok.get_added_vocab() == shipped.get_added_vocab() and tok.chat_template == shipped.chat_template
        assert tok.apply_chat_template(chat, tokenize=False) == shipped.apply_chat_template(chat, tokenize=False)
        assert engine.tokenize(text) == want_ids
    served = []
    for engine in (cold, hot):
        params = {"max_new_tokens": 4, "details": True}
        r = TestClient(create_app(engine, config)).post("/generate", json={"inputs": text, "parameters": params})
        assert r.status_code == 200, r.text
        served.append((int(r.headers["x-prompt-tokens"]), [t["id"] for t in r.json()["details"]["tokens"]]))
    assert served[0] == served[1] and served[0][0] == len(want_ids)
    ids = torch.tensor([want_ids])
    with torch.inference_mode():
        assert torch.equal(cold.model(input_ids=ids).logits, hot.model(input_ids=ids).logits)


def _bf16_timings(faster: bool) -> Callable[..., dict[str, float]]:
    """Matmul timings of a CPU with native bf16 (faster) or an AVX2-only one, where bf16 is emulated and slow."""
    seconds = {"float32": 1e-3, "bfloat16": 0.2e-3 if faster else 30e-3}
    return lambda dtypes, device, shape, probe: {d: seconds[d] for d in dtypes}


def test_auto_dtype_is_keyed_by_the_dtype_it_resolves_to(
    write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two machines where `auto` resolves differently build two entries, each served in its own dtype."""
    tiny_config_data["model"]["dtype"] = "auto"
    auto = load_config(write_config(tiny_config_data))
    served: dict[str, Engine] = {}
    for name, faster in (("float32", False), ("bfloat16", True)):
        monkeypatch.setattr(precision, "_matmul_seconds", _bf16_timings(faster))
        served[name] = boot(auto)
        assert served[name].info.cache["status"] == "miss", name  # not the other machine's entry
        assert served[name].info.dtype == name and {p.dtype for p in served[name].model.parameters()} == {
            getattr(torch, name)
        }
    keys = {name: engine.info.cache["key"] for name, engine in served.items()}
    with pytest.raises(ValueError, match=r"resolve model\.dtype auto"):
        MergeCache(merge_cache).key(auto)  # "auto" names no dtype, so it cannot be a key
    assert keys["float32"] != keys["bfloat16"]
    assert sorted(p.name for p in (merge_cache / "entries").iterdir()) == sorted(keys.values())
    # Auto resolving to float32 and an explicit float32 build the same merge: they share the entry.
    tiny_config_data["model"]["dtype"] = "float32"
    explicit = boot(load_config(write_config(tiny_config_data)))
    assert explicit.info.cache["status"] == "hit" and explicit.info.cache["key"] == keys["float32"]
    assert torch.equal(_logits(explicit), _logits(served["float32"]))
    monkeypatch.setattr(precision, "_matmul_seconds", _bf16_timings(True))
    again = boot(auto)  # a second bf16 machine reuses the bf16 entry, and serves it in bf16
    assert again.info.cache["status"] == "hit" and again.info.cache["key"] == keys["bfloat16"]
    assert again.info.dtype == "bfloat16" and torch.equal(_logits(again), _logits(served["bfloat16"]))


def test_merge_identity_holds_what_the_merge_depends_on_and_nothing_else(
    write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path
) -> None:
    cache = MergeCache(merge_cache)
    config = load_config(write_config(tiny_config_data))
    key, _ = cache.key(config)
    # Serving settings and the adapter's name do not change the merged weights: same identity, same entry.
    same = {**tiny_config_data, "server": {"port": 9000}, "parity": {"tolerance": 0.5},
            "adapters": [{**tiny_config_data["adapters"][0], "name": "renamed"}]}  # fmt: skip
    assert load_config(write_config(same)).merge_identity() == config.merge_identity()
    assert cache.key(load_config(write_config(same)))[0] == key
    for other in ({"combine": {"method": "dare_linear", "density": 0.5, "seed": 1}},
                  {"parity": {"probes": ["another probe"]}}):  # fmt: skip
        changed = load_config(write_config({**tiny_config_data, **other}))
        assert changed.merge_identity() != config.merge_identity(), other
        assert cache.key(changed)[0] != key, other
    auto = load_config(write_config({**tiny_config_data, "model": {**tiny_config_data["model"], "dtype": "auto"}}))
    with pytest.raises(ValueError, match=r"resolve model\.dtype auto"):
        auto.merge_identity()


@pytest.mark.parametrize("library", ["transformers", "peft", "gguf", "tokenizers"])
def test_the_merge_key_holds_the_versions_of_the_libraries_that_derive_an_entry(
    library: str, write_config: Writer, tiny_config_data: dict[str, Any], merge_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """gguf dequantizes a GGUF base and tokenizers converts its tokenizer, both written into the entry."""
    config = load_config(write_config(tiny_config_data))
    key, _ = MergeCache(merge_cache).key(config)
    real = importlib.metadata.version
    other = real(library) + ".other"
    monkeypatch.setattr(importlib.import_module(library), "__version__", other, raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: other if name == library else real(name))
    assert MergeCache(merge_cache).key(config)[0] != key

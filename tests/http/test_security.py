"""Security defaults: safetensors only, no code named by a checkpoint or adapter runs, paths stay under their roots,
API keys on everything but /health, a body size limit, and CORS only when configured."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import Config, ConfigError, ModelConfig, SecurityConfig, ServerConfig
from server.engine.engine import Engine
from server.http import auth
from server.http.app import create_app
from server.load.adapters import BootError, load_base
from tests.conftest import boot_tiny


@pytest.fixture(scope="module")
def tiny(tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return boot_tiny(tmp_path_factory.mktemp("sec"), tiny_base, tiny_adapters["alpha"], max_new_tokens=4)


def _client(tiny: tuple[Config, Engine], **security_fields: Any) -> TestClient:
    config, engine = tiny
    return TestClient(create_app(engine, config.model_copy(update={"security": SecurityConfig(**security_fields)})))


GEN = {"inputs": "Arr", "parameters": {"max_new_tokens": 2}}


def test_api_key_from_env_guards_everything_but_health(
    tiny: tuple[Config, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGESERVE_TEST_KEYS", "first-key, second-key")
    c = _client(tiny, api_keys_env="MERGESERVE_TEST_KEYS")
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "second-key"}):
        r = c.post("/generate", json=GEN, headers=headers)
        assert r.status_code == 401 and r.json()["error_type"] == "authentication"
        assert r.headers["www-authenticate"] == "Bearer"
    assert c.post("/generate", json=GEN, headers={"authorization": "Bearer second-key"}).status_code == 200
    assert c.get("/info").status_code == 401
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert c.get("/health").status_code == 200
    assert c.get("/metrics").status_code == 200  # open unless metrics_need_key


def test_api_key_from_file_and_keyed_metrics(tiny: tuple[Config, Engine], tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# operators\nfile-key\n\n")
    c = _client(tiny, api_keys_file=str(keys), metrics_need_key=True)
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"authorization": "Bearer file-key"}).status_code == 200
    assert c.get("/health").status_code == 200


DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def test_docs_need_the_key_when_keys_are_set(tiny: tuple[Config, Engine], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MERGESERVE_TEST_KEYS", "docs-key")
    c = _client(tiny, api_keys_env="MERGESERVE_TEST_KEYS")
    for path in DOCS:
        for headers in ({}, {"authorization": "Bearer wrong"}):
            r = c.get(path, headers=headers)
            assert r.status_code == 401, path
            assert r.json()["error_type"] == "authentication" and r.headers["www-authenticate"] == "Bearer"
        assert c.get(path, headers={"authorization": "Bearer docs-key"}).status_code == 200, path
    # Without keys the whole API is open, the docs with it.
    assert all(_client(tiny).get(path).status_code == 200 for path in DOCS)


def _exposure(
    tiny: tuple[Config, Engine], caplog: pytest.LogCaptureFixture, host: str, **security_fields: Any
) -> tuple[TestClient, str]:
    """A client for an app configured to listen on `host`, and the warnings its creation logged."""
    config, engine = tiny
    changes = {"security": SecurityConfig(**security_fields), "server": ServerConfig(host=host, port=8123)}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergeserve"):
        client = TestClient(create_app(engine, config.model_copy(update=changes)))
    return client, "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_open_metrics_answers_without_key_and_is_logged_off_loopback(
    tiny: tuple[Config, Engine], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MERGESERVE_TEST_KEYS", "metrics-key")
    keyed = {"api_keys_env": "MERGESERVE_TEST_KEYS"}
    # Default, as TGI: keys guard the API but /metrics answers anyone, and the startup log says so off loopback.
    c, logged = _exposure(tiny, caplog, "0.0.0.0", **keyed)
    assert c.get("/metrics").status_code == 200 and c.get("/info").status_code == 401
    assert "/metrics" in logged and "0.0.0.0:8123" in logged and "security.metrics_need_key" in logged
    for host in ("127.0.0.1", "::1", "localhost"):
        c, logged = _exposure(tiny, caplog, host, **keyed)
        assert c.get("/metrics").status_code == 200 and logged == "", host
    # metrics_need_key: /metrics wants the key too, and nothing is left open to warn about.
    c, logged = _exposure(tiny, caplog, "0.0.0.0", metrics_need_key=True, **keyed)
    assert c.get("/metrics").status_code == 401
    assert c.get("/metrics", headers={"authorization": "Bearer metrics-key"}).status_code == 200
    assert logged == ""
    # No keys at all on a public address: everything is open, and the log names the keys to set.
    c, logged = _exposure(tiny, caplog, "0.0.0.0")
    assert c.get("/info").status_code == 200 and c.get("/metrics").status_code == 200
    assert "0.0.0.0:8123" in logged and "security.api_keys_env" in logged


def test_keys_are_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    checker = auth.KeyChecker(["k1", "k2", "k3"])
    assert checker.allows("Bearer k1")
    assert len(calls) == 3  # every key is compared, even after a match
    assert {len(a) for a, _ in calls} == {32}  # digests: equal lengths, so the length of a key does not leak


def test_body_limit_answers_413(tiny: tuple[Config, Engine]) -> None:
    c = _client(tiny, max_body_bytes=2000)
    big = {"inputs": "x" * 5000}
    r = c.post("/generate", json=big)
    assert r.status_code == 413 and r.json()["error_type"] == "validation" and "2000 bytes" in r.json()["error"]
    r = c.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x" * 5000})
    assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
    # Without Content-Length (chunked), the body is cut off while it is read.
    chunks = (b'{"inputs": "' + b"x" * 1000, b"x" * 1500, b'"}')
    r = c.post("/generate", content=iter(chunks), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert c.post("/generate", json=GEN).status_code == 200


def test_non_utf8_body_is_422(tiny: tuple[Config, Engine]) -> None:
    c = _client(tiny)
    r = c.post("/generate", content=b'{"inputs": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "UTF-8" in r.json()["error"]


def test_cors_off_by_default_and_on_when_configured(tiny: tuple[Config, Engine]) -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    r = _client(tiny).options("/generate", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    c = _client(tiny, cors_allow_origins=["https://app.example"])
    r = c.options("/generate", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = c.get("/health", headers={"origin": "https://other.example"})
    assert "access-control-allow-origin" not in r.headers


def _config(write: Any, data: dict[str, Any], **changes: Any) -> Config:
    return load_config(write({**data, **changes}))


def test_pickle_adapter_only_when_allowed_and_then_weights_only(
    write_config: Any, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((tiny_adapters["alpha"] / "adapter_config.json").read_text())
    torch.save(load_file(str(tiny_adapters["alpha"] / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    tiny_config_data["adapters"] = [{"name": "alpha", "path": str(pickled)}]
    with pytest.raises(ConfigError, match="pickle"):
        _config(write_config, tiny_config_data)
    allowed = _config(write_config, tiny_config_data, security={"allow_pickle": True})
    assert boot(allowed).info.parity is not None
    # A pickle that would run code is refused by weights_only=True, and the code never runs.
    marker = tmp_path / "ran"
    torch.save({"x": _Exploit(str(marker))}, pickled / "adapter_model.bin")
    with pytest.raises(BootError) as err:
        boot(allowed)
    assert err.value.exit_code == 2 and "cannot read adapter_model.bin" in str(err.value)
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _base_copy(tiny_base: Path, out: Path) -> Path:
    shutil.copytree(tiny_base, out)
    return out


def test_pickle_base_only_when_allowed(
    write_config: Any, tiny_config_data: dict[str, Any], tiny_base: Path, tmp_path: Path
) -> None:
    base = _base_copy(tiny_base, tmp_path / "bin-base")
    state = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin")
    tiny_config_data["model"]["path"] = str(base)
    with pytest.raises(ConfigError) as err:
        _config(write_config, tiny_config_data)
    assert err.value.key == "model.path" and "pytorch_model.bin" in str(err.value)
    allowed = _config(write_config, tiny_config_data, security={"allow_pickle": True})
    _, model = load_base(allowed.model, allow_pickle=True)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_allowed_roots_follow_symlinks(
    write_config: Any, tiny_config_data: dict[str, Any], tiny_base: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "base").symlink_to(tiny_base)
    (root / "alpha").symlink_to(tiny_adapters["alpha"])  # a link out of the root does not count as inside
    tiny_config_data["model"]["path"] = str(root / "base")
    tiny_config_data["adapters"][0]["path"] = str(root / "alpha")
    with pytest.raises(ConfigError) as err:
        _config(write_config, tiny_config_data, security={"allowed_roots": [str(root)]})
    assert err.value.key == "model.path" and "outside security.allowed_roots" in str(err.value)
    roots = [str(tiny_base.parent), str(tiny_adapters["alpha"].parent)]
    assert _config(write_config, tiny_config_data, security={"allowed_roots": roots}).security.allowed_roots


def _tree_with_a_link_out(src: Path, folder: Path, outside: Path, name: str) -> Path:
    """A real copy of `src` inside a root whose file `name` is a symlink to a copy of it in `outside`."""
    shutil.copytree(src, folder)
    outside.mkdir(parents=True, exist_ok=True)
    shutil.move(folder / name, outside / name)
    (folder / name).symlink_to(outside / name)
    return folder


@pytest.mark.parametrize(
    ("key", "name"),
    [("model.path", "model.safetensors"), ("model.path", "tokenizer.json"),
     ("adapters[0].path", "adapter_model.safetensors")],
)  # fmt: skip
def test_allowed_roots_follow_symlinks_inside_an_allowed_folder(
    key: str, name: str, write_config: Any, tiny_config_data: dict[str, Any], tiny_base: Path,
    tiny_adapters: dict[str, Path], tmp_path: Path,
) -> None:  # fmt: skip
    """The folder is a real one under the root, but a file in it links out: what the server reads is outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    base = _base_copy(tiny_base, root / "base")
    alpha = _base_copy(tiny_adapters["alpha"], root / "alpha")
    tiny_config_data["model"]["path"] = str(base)
    tiny_config_data["adapters"][0]["path"] = str(alpha)
    roots = {"allowed_roots": [str(root)]}
    assert _config(write_config, tiny_config_data, security=roots).security.allowed_roots  # all inside: served
    shutil.rmtree(base if key == "model.path" else alpha)
    _tree_with_a_link_out(tiny_base if key == "model.path" else tiny_adapters["alpha"],
                          base if key == "model.path" else alpha, outside, name)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        _config(write_config, tiny_config_data, security=roots)
    assert err.value.key == key and "outside security.allowed_roots" in str(err.value)
    assert name in str(err.value) and str(outside / name) in str(err.value)
    assert _config(write_config, tiny_config_data).security.allowed_roots is None  # no roots: links are fine


@pytest.mark.parametrize(
    "path",
    ["org/name/../../../../etc/model.gguf", "org/name@main/q4/../../../x.gguf", "org/name/q4/../model.gguf"],
)
def test_hub_id_file_part_cannot_leave_the_repo(path: str, write_config: Any, tiny_config_data: dict[str, Any]) -> None:
    """`..` in an id's file part would make the snapshot path point anywhere on disk (another repo's files in the
    Hub cache, which allowed_roots has to admit); the Hub has no such file, so it is refused with or without roots."""
    tiny_config_data["model"]["path"] = "org/name/q4/model.gguf"
    assert _config(write_config, tiny_config_data).model.hub is not None  # a plain file part is an id
    tiny_config_data["model"]["path"] = path
    for security in ({}, {"security": {"allowed_roots": ["/"]}}):
        with pytest.raises(ConfigError) as err:
            _config(write_config, tiny_config_data, **security)
        assert err.value.key == "model.path" and "could leave the repo" in str(err.value), str(err.value)


def test_hub_revision_cannot_leave_the_refs(write_config: Any, tiny_config_data: dict[str, Any]) -> None:
    """huggingface_hub reads a branch's commit from `refs/<revision>`; git refs never hold `..`."""
    tiny_config_data["model"] = {"path": "org/name", "revision": "refs/pr/3"}
    assert _config(write_config, tiny_config_data).model.hub is not None  # a ref with a slash is fine
    for model, key in (
        ({"revision": "../../../../tmp/planted"}, "model.revision"),
        ({"path": "org/name@.."}, "model.path"),
    ):
        tiny_config_data["model"] = {"path": "org/name", **model}
        with pytest.raises(ConfigError) as err:
            _config(write_config, tiny_config_data)
        assert err.value.key == key and "no git ref" in str(err.value), (err.value.key, str(err.value))


def _probe_module(folder: Path, name: str, marker: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")


def test_adapter_config_never_names_code_to_import(
    write_config: Any, tiny_config_data: dict[str, Any], tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    marker, modules = tmp_path / "imported", tmp_path / "modules"
    _probe_module(modules, "mergeserve_probe_lib", marker)
    sys.path.insert(0, str(modules))
    try:
        adapter = tmp_path / "adapter"
        shutil.copytree(tiny_adapters["alpha"], adapter)
        raw = json.loads((adapter / "adapter_config.json").read_text())
        raw["auto_mapping"] = {"base_model_class": "Probe", "parent_library": "mergeserve_probe_lib"}
        (adapter / "adapter_config.json").write_text(json.dumps(raw))
        tiny_config_data["adapters"] = [{"name": "alpha", "path": str(adapter)}]
        assert boot(_config(write_config, tiny_config_data)).info.parity is not None
        raw["megatron_config"], raw["megatron_core"] = {"tensor_model_parallel_size": 1}, "mergeserve_probe_lib"
        (adapter / "adapter_config.json").write_text(json.dumps(raw))
        with pytest.raises(BootError, match="megatron_config") as err:
            boot(_config(write_config, tiny_config_data))
        assert err.value.exit_code == 2
    finally:
        sys.path.remove(str(modules))
    assert not marker.exists() and "mergeserve_probe_lib" not in sys.modules


def test_remote_code_in_a_checkpoint_does_not_run(tiny_base: Path, tmp_path: Path) -> None:
    marker, base = tmp_path / "imported", _base_copy(tiny_base, tmp_path / "remote-base")
    _probe_module(base, "probe_modeling", marker)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "probe_modeling.Probe", "AutoConfig": "probe_modeling.ProbeConfig"}
    (base / "config.json").write_text(json.dumps(config))
    model_cfg = ModelConfig.model_validate({"path": str(base)})
    assert model_cfg.trust_remote_code is False
    try:
        _, model = load_base(model_cfg)
        assert type(model).__name__ == "LlamaForCausalLM"
    except (ValueError, OSError):
        pass  # refusing the checkpoint is fine too; running its code is not
    assert not marker.exists()

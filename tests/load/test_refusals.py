"""Boot refuses cleanly: every faulty input gets exit 2 (a failed merge check 3), one line naming the file, key or
adapter and the fix, no traceback, and no port left bound.

Each case runs the CLI's `main` in this process (uvicorn binds the port, boot refuses, the server stops): the same
code path as `python -m server serve` at a fraction of the cost of a torch import per case. tests/test_cli.py runs
both exit codes as real processes and checks the port once the process is gone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from server.cli import main
from tests.live_server import free_port, port_is_free


@dataclass
class Case:
    config: Path
    code: int
    words: list[str]  # each must be in the one stderr line


def _copy_adapter(src: Path, dst: Path, change: Any = None) -> Path:
    """A copy of an adapter folder; `change` maps its tensors to the tensors to store."""
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file(change(tensors) if change else tensors, str(dst / "adapter_model.safetensors"))
    return dst


def _poison(value: float) -> Any:
    def change(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = sorted(k for k in tensors if ".lora_A." in k)[0]
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
        return tensors

    return change


def _gpt2_adapter(out: Path) -> Path:
    """A LoRA adapter for a tiny GPT-2: another architecture, with modules (c_attn) a Llama does not have."""
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(out)
    return out


def _cases(root: Path, data: dict[str, Any], adapters: dict[str, Path]) -> dict[str, Case]:
    alpha = adapters["alpha"]

    def config(name: str, change: Any = None, text: str | None = None) -> Path:
        path = root / f"{name}.yaml"
        if text is not None:
            path.write_text(text)
            return path
        d = json.loads(json.dumps(data))
        change(d)
        path.write_text(yaml.safe_dump(d))
        return path

    def adapter(d: dict[str, Any], path: Path) -> None:
        d["adapters"] = [{"name": path.name, "path": str(path)}]

    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((alpha / "adapter_config.json").read_text())
    torch.save(load_file(str(alpha / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    corrupt = _copy_adapter(alpha, root / "corrupt")
    raw = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    (root / "a-dir.yaml").mkdir()
    nan, inf = (
        _copy_adapter(alpha, root / "nan", _poison(float("nan"))),
        _copy_adapter(alpha, root / "inf", _poison(float("inf"))),
    )
    gpt2 = _gpt2_adapter(root / "gpt2")

    def parity(d: dict[str, Any]) -> None:
        # bfloat16 rounds the merged weights, so merged and unmerged logits differ by far more than 1e-9.
        d["model"]["dtype"] = "bfloat16"
        d["parity"] = {"tolerance": 1e-9}

    return {
        "missing config": Case(root / "absent.yaml", 2, ["absent.yaml", "cannot read", "fix:"]),
        "unreadable config": Case(root / "a-dir.yaml", 2, ["a-dir.yaml", "cannot read", "fix:"]),
        "yaml syntax": Case(config("syntax", text="model:\n  path: x\n adapters: [\n"), 2, ["line 3", "YAML"]),
        "unknown key": Case(config("unknown", lambda d: d.update(surprise=1)), 2, ["surprise: unknown key"]),
        "missing base": Case(
            config("no-base", lambda d: d["model"].update(path=str(root / "gone"))), 2, ["model.path", "not exist"]
        ),
        "missing adapter": Case(
            config("no-adapter", lambda d: adapter(d, root / "gone")), 2, ["adapters[0].path", "does not exist"]
        ),
        "pickle adapter": Case(
            config("pickle", lambda d: adapter(d, pickled)), 2, ["adapters[0].path", "pickle", "allow_pickle"]
        ),
        "outside allowed roots": Case(
            config("roots", lambda d: d.update(security={"allowed_roots": [str(root / "jail")]})),
            2,
            ["model.path", "outside security.allowed_roots"],
        ),
        "api keys env unset": Case(
            config("keys", lambda d: d.update(security={"api_keys_env": "MERGESERVE_TEST_NO_SUCH_VAR"})),
            2,
            ["security.api_keys_env", "MERGESERVE_TEST_NO_SUCH_VAR"],
        ),
        "other architecture": Case(config("gpt2", lambda d: adapter(d, gpt2)), 2, ["adapter 'gpt2'", "base"]),
        "nan adapter": Case(config("nan", lambda d: adapter(d, nan)), 2, ["adapter 'nan'", "NaN or Inf"]),
        "inf adapter": Case(config("inf", lambda d: adapter(d, inf)), 2, ["adapter 'inf'", "NaN or Inf"]),
        "corrupt safetensors": Case(
            config("corrupt", lambda d: adapter(d, corrupt)), 2, ["adapter 'corrupt'", "cannot read adapter_model"]
        ),
        "parity gate": Case(config("parity", parity), 3, ["parity gate failed", "tolerance 1e-09"]),
    }


@pytest.fixture(scope="module")
def refusals(
    tiny_config_data_module: dict[str, Any], tiny_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Case]:
    return _cases(tmp_path_factory.mktemp("refusals"), tiny_config_data_module, tiny_adapters)


@pytest.fixture(scope="module")
def tiny_config_data_module(tiny_base: Path, tiny_adapters: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": {"path": str(tiny_base), "id": "tiny-llama", "dtype": "float32"},
        "adapters": [{"name": "alpha", "path": str(tiny_adapters["alpha"])}],
        "limits": {"max_input_tokens": 64, "max_total_tokens": 128, "max_new_tokens": 8},
    }


CASES = ["missing config", "unreadable config", "yaml syntax", "unknown key", "missing base", "missing adapter",
         "pickle adapter", "outside allowed roots", "api keys env unset", "other architecture", "nan adapter",
         "inf adapter", "corrupt safetensors", "parity gate"]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_refusal(refusals: dict[str, Case], name: str, capsys: pytest.CaptureFixture[str]) -> None:
    case = refusals[name]
    port = free_port()
    code = main(["serve", "--config", str(case.config), "--host", "127.0.0.1", "--port", str(port)])
    stderr = capsys.readouterr().err
    assert code == case.code, stderr
    assert "Traceback" not in stderr
    # Boot logs its phases first; the refusal is the last line, and a config refusal (before boot) the only one.
    *logged, line = stderr.strip().splitlines()
    assert line.startswith("mergeserve: ") and "fix:" in line, line
    for word in case.words:
        assert word in line, line
    if case.code == 2 and "adapter '" not in line:
        assert str(case.config) in line and not logged, stderr
    assert port_is_free(port)


def test_every_case_is_tested(refusals: dict[str, Case]) -> None:
    assert sorted(refusals) == sorted(CASES)

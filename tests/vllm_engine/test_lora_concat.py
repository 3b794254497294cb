"""The one-adapter form of several weighted adapters for vLLM's unmerged arm, against PEFT's own arithmetic.

The reference never runs our code: each adapter is merged alone by PEFT's `merge_and_unload`, and the base plus the
weighted sum of those merged deltas is what the written cat adapter, loaded back by PEFT, must answer. Adapters are
built on the peaky tiny base (init scale 0.2) so the logits spread over several units and an argmax is meaningful.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from server.config.schema import Config
from server.errors import ExitCode
from server.load.adapters import BootError
from server.vllm_engine.lora import refuse_for_vllm, vllm_adapter_key, vllm_lora_problems, write_vllm_adapter
from tests.conftest import TARGETS, build_adapter

PROMPTS = torch.tensor([[5, 17, 42, 99, 3, 250, 61, 8, 120, 33], [200, 7, 7, 150, 64, 2, 90, 11, 300, 45]])


@pytest.fixture(scope="module")
def adapters(peaky: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = peaky[0]
    root = tmp_path_factory.mktemp("cat-adapters")
    return {
        "qv": build_adapter(base, root / "qv", seed=1, r=4, alpha=8, targets=["q_proj", "v_proj"]),
        "ko": build_adapter(base, root / "ko", seed=2, r=8, alpha=4, targets=["k_proj", "o_proj", "down_proj"]),
        "rs": build_adapter(base, root / "rs", seed=3, r=16, alpha=16, use_rslora=True),
        "pattern": build_adapter(
            base,
            root / "pattern",
            seed=4,
            r=4,
            alpha=8,
            rank_pattern={"q_proj": 8, "layers.1.self_attn.v_proj": 2},
            alpha_pattern={"v_proj": 3, "up_proj": 32},
        ),
        "layer0": build_adapter(
            base, root / "layer0", seed=5, r=2, alpha=2, targets=["q_proj"], layers_to_transform=[0]
        ),
    }


def _config(base: Path, adapters: list[tuple[str, Path, float]], mode: str = "unmerged") -> Config:
    return Config.model_validate(
        {
            "model": {"path": str(base), "dtype": "float32"},
            "adapters": [{"name": n, "path": str(p), "weight": w} for n, p, w in adapters],
            "mode": mode,
        }
    )


def _base(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _peft_weighted_sum(base_dir: Path, adapters: list[tuple[str, Path, float]]) -> PreTrainedModel:
    """W0 + sum_i w_i (W_i - W0), each W_i from PEFT's merge_and_unload of adapter i alone."""
    model = _base(base_dir)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    total = {k: torch.zeros_like(v) for k, v in w0.items()}
    for _, path, weight in adapters:
        merged = PeftModel.from_pretrained(_base(base_dir), str(path)).merge_and_unload().state_dict()
        for k in total:
            total[k] += weight * (merged[k] - w0[k])
    model.load_state_dict({k: w0[k] + total[k] for k in w0})
    return model


@torch.inference_mode()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=PROMPTS).logits.float()  # (2, T, V)


def _ranks(base_dir: Path, path: Path) -> dict[str, int]:
    """Module -> the rank PEFT gives adapter `path` there (rank_pattern and layers_to_transform resolved by PEFT)."""
    model = PeftModel.from_pretrained(_base(base_dir), str(path))
    return {k.split(".lora_A.")[0]: v.shape[0] for k, v in get_peft_model_state_dict(model).items() if ".lora_A." in k}


CASES = {
    "one adapter, weight 1": [("qv", 1.0)],
    "two adapters, other ranks and targets, 0.7 and -0.3": [("qv", 0.7), ("ko", -0.3)],
    "rsLoRA with a plain one": [("rs", 0.5), ("qv", 1.0)],
    "rank_pattern and alpha_pattern": [("pattern", 1.0), ("ko", 0.4)],
    "layers_to_transform leaves a q_proj to pad with zeros": [("layer0", 1.0), ("ko", -1.0)],
}


@pytest.mark.parametrize("case", list(CASES))
def test_cat_adapter_answers_like_the_weighted_peft_merges(
    case: str, peaky: tuple[Path, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    base_dir = peaky[0]
    chosen = [(name, adapters[name], weight) for name, weight in CASES[case]]
    info = write_vllm_adapter(_config(base_dir, chosen), tmp_path / "cat", torch.float32)

    reference = _logits(_peft_weighted_sum(base_dir, chosen))
    served = _logits(PeftModel.from_pretrained(_base(base_dir), str(info.path)).eval())
    unadapted = _logits(_base(base_dir))
    diff = (served - reference).abs().max().item()
    assert (reference - unadapted).abs().max().item() > 100 * max(diff, 1e-6), "the adapters must move the logits"
    assert diff < 1e-4, f"{case}: max |logit diff| {diff:.3g} against PEFT's weighted merges"
    assert torch.equal(served.argmax(-1), reference.argmax(-1))

    # One rank for every module: the largest sum of the ranks PEFT gives the adapters present at one module.
    per_adapter = [_ranks(base_dir, path) for _, path, _ in chosen]
    modules = set().union(*per_adapter)
    rank = max(sum(r.get(m, 0) for r in per_adapter) for m in modules)
    written = json.loads((info.path / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (rank, rank, False)
    assert info.rank == rank
    # PEFT's own state dict for the written config has exactly the written keys (none missing, none unexpected).
    tensors = load_file(str(info.path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(_base(base_dir), str(info.path))
    assert set(get_peft_model_state_dict(loaded)) == set(tensors)
    assert all(v.shape[0 if ".lora_A." in k else 1] == rank for k, v in tensors.items())


def test_cat_matches_peft_add_weighted_adapter_cat(
    peaky: tuple[Path, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT's own `cat` combination (a second, independent implementation) on two plain adapters."""
    base_dir = peaky[0]
    chosen = [("qv", adapters["qv"], 0.7), ("ko", adapters["ko"], -0.3)]
    info = write_vllm_adapter(_config(base_dir, chosen), tmp_path / "cat", torch.float32)
    model = PeftModel.from_pretrained(_base(base_dir), str(adapters["qv"]), adapter_name="qv")
    model.load_adapter(str(adapters["ko"]), adapter_name="ko")
    model.add_weighted_adapter(["qv", "ko"], [0.7, -0.3], "both", combination_type="cat")
    model.set_adapter("both")
    reference = _logits(model.eval())
    served = _logits(PeftModel.from_pretrained(_base(base_dir), str(info.path)).eval())
    assert (served - reference).abs().max().item() < 1e-4


def test_bfloat16_output_is_the_float32_factors_rounded_once(
    peaky: tuple[Path, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    base_dir = peaky[0]
    chosen = [("qv", adapters["qv"], 0.7), ("ko", adapters["ko"], -0.3)]
    wide = write_vllm_adapter(_config(base_dir, chosen), tmp_path / "f32", torch.float32)
    narrow = write_vllm_adapter(_config(base_dir, chosen), tmp_path / "bf16", torch.bfloat16)
    f32, bf16 = (load_file(str(i.path / "adapter_model.safetensors")) for i in (wide, narrow))
    assert set(f32) == set(bf16)
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], f32[k].to(torch.bfloat16)) for k in f32)


def test_key_follows_weights_dtype_and_adapter_bytes(
    peaky: tuple[Path, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    base_dir = peaky[0]
    one = _config(base_dir, [("qv", adapters["qv"], 0.7), ("ko", adapters["ko"], -0.3)])
    renamed = _config(base_dir, [("x", adapters["qv"], 0.7), ("y", adapters["ko"], -0.3)])
    other_weight = _config(base_dir, [("qv", adapters["qv"], 0.7), ("ko", adapters["ko"], -0.2)])
    swapped = _config(base_dir, [("ko", adapters["ko"], -0.3), ("qv", adapters["qv"], 0.7)])
    root = tmp_path / "cache"
    key = vllm_adapter_key(one, root, torch.float32)
    assert key == vllm_adapter_key(renamed, root, torch.float32)
    assert key != vllm_adapter_key(other_weight, root, torch.float32)
    assert key != vllm_adapter_key(swapped, root, torch.float32)
    assert key != vllm_adapter_key(one, root, torch.bfloat16)
    copy = tmp_path / "qv-copy"
    copy.mkdir()
    for f in adapters["qv"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    touched = load_file(str(copy / "adapter_model.safetensors"))
    first = next(iter(touched))
    touched[first] = touched[first] + 1
    save_file(touched, str(copy / "adapter_model.safetensors"))
    changed = _config(base_dir, [("qv", copy, 0.7), ("ko", adapters["ko"], -0.3)])
    assert key != vllm_adapter_key(changed, root, torch.float32)


def test_written_once_then_reused_and_rewritten_when_damaged(
    peaky: tuple[Path, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(peaky[0], [("qv", adapters["qv"], 0.7), ("ko", adapters["ko"], -0.3)])
    first = write_vllm_adapter(config, tmp_path / "root", "float32")
    weights = first.path / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = write_vllm_adapter(config, tmp_path / "root", "float32")
    assert again == first and weights.stat().st_mtime_ns == stamp
    good = load_file(str(weights))
    save_file({k: torch.zeros_like(v) for k, v in good.items()}, str(weights))
    rebuilt = write_vllm_adapter(config, tmp_path / "root", "float32")
    assert rebuilt.path == first.path
    assert all(torch.equal(v, good[k]) for k, v in load_file(str(weights)).items())


REFUSED: dict[str, dict[str, Any]] = {
    "use_dora": {"use_dora": True},
    "lora_bias": {"lora_bias": True},
    "bias": {"bias": "lora_only"},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    "embed_tokens": {"targets": ["q_proj", "embed_tokens"]},
}


@pytest.fixture(scope="module")
def refused(peaky: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refused")
    return {name: build_adapter(peaky[0], root / name, seed=9, **kw) for name, kw in REFUSED.items()}


@pytest.mark.parametrize("kind", list(REFUSED))
@pytest.mark.parametrize("mode", ["unmerged", "ab"])
def test_kinds_vllm_cannot_apply_unmerged_exit_2(
    kind: str, mode: str, peaky: tuple[Path, Path], adapters: dict[str, Path], refused: dict[str, Path]
) -> None:
    config = _config(peaky[0], [("qv", adapters["qv"], 1.0), ("bad", refused[kind], 1.0)], mode)
    with pytest.raises(BootError) as info:
        refuse_for_vllm(config)
    line = info.value.line()
    assert info.value.exit_code == ExitCode.BAD_INPUT == 2
    assert "adapters[1]" in line and "'bad'" in line and kind in line and "use mode: merged" in line
    assert "\n" not in line
    assert vllm_lora_problems(adapters["qv"]) == []


@pytest.mark.parametrize("kind", list(REFUSED))
def test_merged_mode_is_not_refused(kind: str, peaky: tuple[Path, Path], refused: dict[str, Path]) -> None:
    refuse_for_vllm(_config(peaky[0], [("bad", refused[kind], 1.0)], "merged"))


@pytest.mark.parametrize("kind", ["use_dora", "lora_bias", "bias", "modules_to_save"])
def test_vllm_itself_refuses_what_we_refuse(kind: str, refused: dict[str, Path]) -> None:
    """vLLM's PEFTHelper (its own check, imported only here) also rejects these configs: our list is not looser."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(refused[kind]), max_position_embeddings=None)
    with pytest.raises(ValueError):
        helper.validate_legal(LoRAConfig(max_lora_rank=64))


def test_vllm_reads_the_written_adapter_as_the_weighted_peft_deltas(
    peaky: tuple[Path, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    """vLLM's own reader (PEFTHelper, LoRAModel; no engine): its s * B @ A per module is PEFT's weighted delta."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    base_dir = peaky[0]
    chosen = [("pattern", adapters["pattern"], 1.0), ("rs", adapters["rs"], -0.5), ("layer0", adapters["layer0"], 2.0)]
    info = write_vllm_adapter(_config(base_dir, chosen), tmp_path / "cat", "float32")
    helper = PEFTHelper.from_local_dir(str(info.path), max_position_embeddings=None)
    helper.validate_legal(LoRAConfig(max_lora_rank=64))
    assert (helper.r, helper.vllm_lora_scaling_factor) == (info.rank, 1.0)
    read = LoRAModel.from_local_checkpoint(
        str(info.path), set(TARGETS), helper, lora_model_id=1, device="cpu", dtype=torch.float32
    )
    w0 = _base(base_dir).state_dict()
    reference = _peft_weighted_sum(base_dir, chosen).state_dict()
    changed = {k.removesuffix(".weight") for k in w0 if not torch.equal(reference[k], w0[k])}
    assert changed and changed <= set(read.loras)
    for module, lora in read.loras.items():
        assert lora.lora_a.shape[0] == info.rank and lora.scaling == 1.0
        delta = lora.scaling * lora.lora_b @ lora.lora_a  # (out, in)
        want = reference[f"{module}.weight"] - w0[f"{module}.weight"]
        assert (delta - want).abs().max().item() < 1e-6 + 1e-4 * want.abs().max().item(), module

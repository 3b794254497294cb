"""Every adapter kind PEFT can merge, merged by us, checked against PEFT on tiny random Llama and GPT-2 models.

Ground truth is PEFT's *unmerged* forward: merged logits must equal it. Merged weights must also equal PEFT's own
`merge_and_unload`, except for LoRA on a tied embedding, where PEFT writes the merged matrix into the tensor both
sides share (its merged model then disagrees with its own unmerged one); there we check that we untied instead.
Every adapter is random (init_lora_weights=False, DoRA magnitudes, biases and saved modules perturbed), and each test
also checks that the adapter moves the logits, so none passes trivially.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import AdapterConfig
from server.load.adapters import load_adapters
from server.merge.apply import lora_layers, merge_and_unload
from server.merge.kinds import composed_delta, lora_product
from server.store.export import export_merged
from tests.conftest import TARGETS, exported_weights, load_as_served, make_added_token_adapter

Writer = Callable[[dict[str, Any]], Path]
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11, 300, 64]])


@dataclass(frozen=True)
class Kind:
    name: str
    arch: str  # "llama" (tied embeddings, no biases) or "gpt2" (Conv1D, biases, tied embeddings)
    lora: dict[str, Any] = field(default_factory=dict)
    peft_merge_is_right: bool = True  # False where PEFT's merge breaks a tied embedding pair


GPT2_ALL = ["c_attn", "c_proj", "c_fc"]
KINDS = [
    Kind("plain", "llama", {"target_modules": TARGETS}),
    Kind("rslora", "llama", {"target_modules": TARGETS, "use_rslora": True, "r": 16}),
    Kind(
        "rank_alpha_pattern",
        "llama",
        {
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2, "down_proj": 8},
            "alpha_pattern": {"q_proj": 32, "down_proj": 3},
        },
    ),
    Kind("layers_to_transform", "llama", {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]}),
    Kind("dora", "llama", {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True}),
    Kind("dora_rslora", "llama", {"target_modules": ["k_proj", "o_proj"], "use_dora": True, "use_rslora": True}),
    Kind("embedding_tied", "llama", {"target_modules": ["embed_tokens", "q_proj"]}, peft_merge_is_right=False),
    Kind("lm_head_tied", "llama", {"target_modules": ["lm_head"]}, peft_merge_is_right=False),
    Kind("both_sides_tied", "llama", {"target_modules": ["embed_tokens", "lm_head"]}, peft_merge_is_right=False),
    Kind("dora_embedding_tied", "llama", {"target_modules": ["embed_tokens"], "use_dora": True}, False),
    Kind("modules_to_save", "llama", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),
    Kind("fan_in_fan_out", "gpt2", {"target_modules": GPT2_ALL, "fan_in_fan_out": True}),
    Kind("lora_bias", "gpt2", {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "lora_bias": True}),
    Kind("dora_conv1d", "gpt2", {"target_modules": GPT2_ALL, "fan_in_fan_out": True, "use_dora": True}),
    Kind("gpt2_embedding_tied", "gpt2", {"target_modules": ["wte", "c_attn"]}, peft_merge_is_right=False),
]
BY_NAME = {k.name: k for k in KINDS}


def make_adapter(base_dir: Path, out: Path, kind: Kind, seed: int = 7) -> Path:
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, **kind.lora}
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **options),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name and name.endswith(".bias"):
                p.normal_(0, 0.05)
            elif "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.2)  # PEFT's random B is as large as A; keep logits in a realistic range
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))  # m != ||W0 + sBA||, so the rescaling is exercised
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def kind_adapter(
    tiny_base: Path, tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Kind], tuple[Path, Path]]:
    """(base folder, adapter folder) per kind, built once per session."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(kind: Kind) -> tuple[Path, Path]:
        if kind.name not in built:
            base = tiny_base if kind.arch == "llama" else tiny_gpt2
            built[kind.name] = (base, make_adapter(base, tmp_path_factory.mktemp(kind.name), kind))
        return built[kind.name]

    return get


@torch.inference_mode()
def _logits(model: Any) -> torch.Tensor:
    return model(input_ids=IDS).logits.float()


def _peft_unmerged(base_dir: Path, adapter: Path) -> PeftModel:
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_kind_merges_exactly(kind: Kind, kind_adapter: Callable[[Kind], tuple[Path, Path]]) -> None:
    base_dir, path = kind_adapter(kind)
    theirs = _peft_unmerged(base_dir, path)
    want = _logits(theirs)
    assert (want - _logits(AutoModelForCausalLM.from_pretrained(base_dir))).abs().max() > 1e-2, "adapter is a no-op"

    ours, _ = load_adapters(AutoModelForCausalLM.from_pretrained(base_dir), [AdapterConfig(name="k", path=str(path))])
    assert (_logits(ours) - want).abs().max().item() < 1e-5  # our loader serves what PEFT serves, unmerged
    merged = merge_and_unload(ours, ["k"])
    assert (_logits(merged) - want).abs().max().item() < 1e-4

    peft_merged = theirs.merge_and_unload()
    mine = merged.state_dict()
    if kind.peft_merge_is_right:
        for key, value in peft_merged.state_dict().items():
            assert torch.allclose(mine[key], value, atol=1e-5, rtol=0), key
    elif "tied" in kind.name:
        # PEFT's merge wrote one side's change into the shared tensor; its merged model no longer answers as its
        # unmerged one did. Ours untied the pair and does.
        assert (_logits(peft_merged) - want).abs().max() > 1e-3
        assert merged.get_input_embeddings().weight is not merged.get_output_embeddings().weight
        assert merged.config.tie_word_embeddings is False


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_kind_exports_as_served(
    kind: Kind, kind_adapter: Callable[[Kind], tuple[Path, Path]], write_config: Writer, tmp_path: Path
) -> None:
    """`mergeserve merge` writes every kind merged serving merges: PEFT's merged weights, the served logits."""
    base_dir, path = kind_adapter(kind)
    data = {
        "model": {"path": str(base_dir), "dtype": "float32"},
        "adapters": [{"name": "k", "path": str(path)}],
        "cache": {"enabled": False},
        "limits": {"max_input_tokens": 32, "max_total_tokens": 64, "max_new_tokens": 4},
    }
    config = load_config(write_config(data))
    export_merged(config, tmp_path / "out")
    written = exported_weights(tmp_path / "out")
    if kind.peft_merge_is_right:
        theirs = _peft_unmerged(base_dir, path).merge_and_unload().state_dict()
        for key, value in written.items():
            assert torch.allclose(value, theirs[key], atol=1e-5, rtol=0), key
    served = boot(config)
    assert torch.equal(_logits(load_as_served(tmp_path / "out", served)), _logits(served.model))
    served.close()


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_mix_of_bias_and_dora_kinds_exports_as_served(
    method: str, kind_adapter: Callable[[Kind], tuple[Path, Path]], write_config: Writer, tmp_path: Path
) -> None:
    """TIES/DARE over lora_bias and DoRA adapters: the bias deltas draw from DARE's generator after the weights."""
    (base_dir, bias), (_, dora) = kind_adapter(BY_NAME["lora_bias"]), kind_adapter(BY_NAME["dora_conv1d"])
    data = {
        "model": {"path": str(base_dir), "dtype": "float32"},
        "adapters": [{"name": "bias", "path": str(bias)}, {"name": "dora", "path": str(dora), "weight": 0.6}],
        "combine": {"method": method, "density": 0.6, "seed": 5},
        "cache": {"enabled": False},
        "limits": {"max_input_tokens": 32, "max_total_tokens": 64, "max_new_tokens": 4},
    }
    config = load_config(write_config(data))
    export_merged(config, tmp_path / "out")
    served = boot(config)
    state = served.model.state_dict()
    written = exported_weights(tmp_path / "out")
    assert any(k.endswith("c_attn.bias") and not torch.equal(v, _weights_of(base_dir)[k]) for k, v in written.items())
    for key, value in written.items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(_logits(load_as_served(tmp_path / "out", served)), _logits(served.model))
    served.close()


def _weights_of(base_dir: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(base_dir).state_dict())


BOOT_KINDS = ["dora", "lora_bias", "dora_conv1d", "embedding_tied", "modules_to_save", "rank_alpha_pattern"]


@pytest.mark.parametrize("mode", ["merged", "unmerged", "ab"])
@pytest.mark.parametrize("name", BOOT_KINDS)
def test_kind_through_boot(
    name: str, mode: str, kind_adapter: Callable[[Kind], tuple[Path, Path]], write_config: Writer
) -> None:
    base_dir, path = kind_adapter(BY_NAME[name])
    data = {
        "model": {"path": str(base_dir), "dtype": "float32"},
        "adapters": [{"name": name, "path": str(path)}],
        "mode": mode,
        "limits": {"max_input_tokens": 32, "max_total_tokens": 64, "max_new_tokens": 4},
    }
    engine = boot(load_config(write_config(data)))
    assert engine.info.parity is not None and engine.info.parity.passed
    want = _logits(_peft_unmerged(base_dir, path))
    assert set(engine.arms) == ({"merged", "unmerged"} if mode == "ab" else {mode})
    for arm in engine.arms.values():
        assert (_logits(arm) - want).abs().max().item() < 1e-4
    engine.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["embedding_tied", "dora_embedding_tied", "modules_to_save", "dora_conv1d"])
def test_kind_in_half_dtypes(
    name: str, dtype: str, kind_adapter: Callable[[Kind], tuple[Path, Path]], write_config: Writer
) -> None:
    """Float32 tensors saved with the adapter (embedding copies, saved modules) load rounded into a half base."""
    base_dir, path = kind_adapter(BY_NAME[name])
    data = {
        "model": {"path": str(base_dir), "dtype": dtype},
        "adapters": [{"name": name, "path": str(path)}],
        "limits": {"max_input_tokens": 32, "max_total_tokens": 64, "max_new_tokens": 4},
    }
    engine = boot(load_config(write_config(data)))
    parity = engine.info.parity
    assert parity is not None and parity.passed
    # Gated against the float32 reference, which every kind runs (DoRA reads its base weight directly).
    assert parity.reference == "float32" and parity.float32_skipped is None
    assert parity.float32_merged_max_abs_diff is not None
    assert parity.float32_merged_max_abs_diff < 0.05  # tiny logits (~1): a few half-dtype ulps
    engine.close()


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_added_tokens_resize_the_base_and_serve_the_adapters_tokenizer(
    mode: str, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory, write_config: Writer
) -> None:
    path = make_added_token_adapter(tiny_base, tmp_path_factory.mktemp("added"))
    data = {
        "model": {"path": str(tiny_base), "dtype": "float32"},
        "adapters": [{"name": "tokens", "path": str(path)}],
        "mode": mode,
        "limits": {"max_input_tokens": 32, "max_total_tokens": 64, "max_new_tokens": 4},
    }
    engine = boot(load_config(write_config(data)))
    shipped = AutoTokenizer.from_pretrained(path)
    assert len(engine.tokenizer) == len(shipped) and engine.tokenizer.chat_template == shipped.chat_template
    ids = torch.tensor([engine.tokenize("Arr <ship> and <parrot>")])
    assert ids.max().item() >= len(AutoTokenizer.from_pretrained(tiny_base))  # the added tokens are used

    reference = AutoModelForCausalLM.from_pretrained(tiny_base)
    reference.resize_token_embeddings(len(shipped))
    theirs = PeftModel.from_pretrained(reference, path).eval()
    with torch.inference_mode():
        want = theirs(input_ids=ids).logits
        got = engine.model(input_ids=ids).logits
    assert torch.isfinite(got).all() and (got - want).abs().max().item() < 1e-4
    engine.close()


def test_dora_composes_with_other_adapters_as_peft_runs_them(
    tiny_base: Path, tmp_path: Path, write_config: Writer
) -> None:
    """PEFT's forward lets a DoRA adapter rescale what earlier adapters added to the same layer; so must the merge."""
    specs = [
        ("plain", Kind("plain", "llama", {"target_modules": ["q_proj", "v_proj", "up_proj"]})),
        ("dora1", Kind("dora1", "llama", {"target_modules": ["q_proj", "up_proj"], "use_dora": True})),
        ("dora2", Kind("dora2", "llama", {"target_modules": ["q_proj", "v_proj"], "use_dora": True, "r": 2})),
    ]
    paths = {name: make_adapter(tiny_base, tmp_path / name, kind, seed=i) for i, (name, kind) in enumerate(specs)}
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), paths["plain"], "plain")
    for name in ("dora1", "dora2"):
        theirs.load_adapter(str(paths[name]), adapter_name=name)
    theirs.base_model.set_adapter(list(paths))
    want = _logits(theirs.eval())

    configs = [AdapterConfig(name=n, path=str(p)) for n, p in paths.items()]
    ours, _ = load_adapters(AutoModelForCausalLM.from_pretrained(tiny_base), configs)
    merged = merge_and_unload(ours, list(paths))
    assert (_logits(merged) - want).abs().max().item() < 1e-4
    mine = merged.state_dict()
    for key, value in theirs.merge_and_unload(adapter_names=list(paths)).state_dict().items():
        assert torch.allclose(mine[key], value, atol=1e-5, rtol=0), key

    data = {
        "model": {"path": str(tiny_base), "dtype": "float32"},
        "adapters": [
            {"name": n, "path": str(p), "weight": w} for (n, p), w in zip(paths.items(), (0.7, 0.5, 1.3), strict=True)
        ],
        "limits": {"max_input_tokens": 32, "max_total_tokens": 64, "max_new_tokens": 4},
    }
    for mode in ("merged", "ab"):
        engine = boot(load_config(write_config({**data, "mode": mode})))
        assert engine.info.parity is not None and engine.info.parity.passed, engine.info.parity
        engine.close()


def test_a_delta_below_float32_resolution_of_w0_is_kept(tiny_base: Path, tiny_adapters: dict[str, Path]) -> None:
    """The change is accumulated on its own, never as W0 + change - W0, so the rounds-away check can see it."""
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tiny_adapters["alpha"])
    _, layer = next(iter(lora_layers(peft_model)))
    layer.scaling["default"] = 1e-12
    delta = composed_delta(layer, ["default"], layer.get_base_layer().weight)
    assert delta.weight.any() and torch.equal(delta.weight, lora_product(layer, "default"))

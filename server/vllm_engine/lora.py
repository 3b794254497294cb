"""vLLM's unmerged arm: the configured adapters as one PEFT LoRA folder vLLM loads, and the kinds it cannot apply.

vLLM applies one LoRA per request, so the weighted adapters are written once as their exact `cat` form
(`server.merge.concat`: rank R, scaling folded into B, lora_alpha = r = R). Nothing here imports vLLM, and the base
weights are never read: the adapters are attached to a meta-device skeleton, as the streaming export does. The
folder is stored under a content key (the adapters' bytes, weights and order, the base's layout and the dtype), so
a boot with the same inputs reuses it without parsing the base at all.

What vLLM 0.32 refuses or silently ignores (vllm/lora/peft_helper.py `_validate_features` and `validate_legal`,
plus the embedding and Conv1D layers our writer does not handle) is refused at config time for `unmerged` and `ab`,
with exit 2 and the fix "use mode: merged": mergeserve's exact merge then serves the kind on vLLM as plain weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from filelock import FileLock
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from server.config.schema import AdapterConfig, Config, ModelConfig
from server.errors import ExitCode, Refusal
from server.load.adapters import BootError, load_adapters
from server.load.policy import config_refusal
from server.merge.apply import saved_modules
from server.merge.concat import CatLora, cat_lora
from server.store.cache import FileHashes
from server.store.checkpoint import files_under, sha256_file

# Bump when the written folder or the cat math changes: cache entries keyed on it then stop matching.
VLLM_ADAPTER_FORMAT = 1
# The largest `max_lora_rank` vLLM 0.32 accepts (vllm/config/lora.py MaxLoRARanks).
VLLM_MAX_LORA_RANK = 512
RECORD = "mergeserve-cat.json"
FIX = "use mode: merged (mergeserve's exact merge is then the only way to serve this adapter on vLLM)"
# init_lora_weights strings vLLM accepts: they only set the starting factors. PiSSA, OLoRA, CorDA and LoftQ rewrite
# the base weights when PEFT loads the adapter, which vLLM never does.
_VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
_FLAGS = {
    "use_dora": "DoRA (use_dora) rescales each output feature of W0 + sBA",
    "lora_bias": "LoRA bias (lora_bias) moves the base bias",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens",
    "layer_replication": "layer_replication duplicates base layers",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) replace embedding rows",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers, GPT-2 style) has no LoRA in vLLM",
}
_EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


@dataclass(frozen=True)
class VllmAdapter:
    """The written folder and what the engine needs to load it: the rank (vLLM's max_lora_rank must cover it)."""

    path: Path
    rank: int
    modules: list[str]  # module names as in the checkpoint, without `base_model.model.`
    target_modules: list[str]


def vllm_lora_problems(adapter_dir: Path) -> list[str]:
    """What in this adapter_config.json vLLM 0.32 cannot apply unmerged (each names its key); [] when it can."""
    raw = json.loads((adapter_dir / "adapter_config.json").read_text())
    if not isinstance(raw, dict):
        return ["adapter_config.json is not a JSON object"]
    problems = [what for key, what in _FLAGS.items() if raw.get(key)]  # each description names its key
    if (bias := raw.get("bias", "none")) != "none":
        problems.append(f"bias '{bias}' trains the base biases (bias), which vLLM does not load")
    if saved := raw.get("modules_to_save"):
        problems.append(f"modules_to_save {saved} replaces whole modules, which a LoRA cannot carry")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _VLLM_INITS:
        problems.append(f"init_lora_weights '{init}' modifies the base weights when loaded (init_lora_weights)")
    targets = raw.get("target_modules") or []
    if isinstance(targets, str):  # a regex PEFT matches against full names: any mention may match
        hit = sorted(e for e in _EMBEDDINGS if e in targets)
    else:
        hit = sorted({e for t in targets for e in _EMBEDDINGS if t == e or str(t).endswith(f".{e}")})
    if hit:
        problems.append(f"LoRA on the embeddings {hit} (target_modules): the one-LoRA writer handles nn.Linear only")
    return problems


def _read_config(adapter: AdapterConfig) -> dict[str, Any] | None:
    try:
        raw = json.loads((adapter.local / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BootError(f"cannot read adapter_config.json ({exc})", "re-save the adapter", str(adapter.local)) from None
    return raw if isinstance(raw, dict) else None


def _check_adapters(config: Config, mode: str) -> None:
    for i, adapter in enumerate(config.adapters):
        where = f"adapters[{i}] '{adapter.name}' ({adapter.local / 'adapter_config.json'})"
        raw = _read_config(adapter)
        refusal: Refusal | None = config_refusal(raw) if raw is not None else None
        if refusal:  # refused in every mode, merged too: its own fix, not "use merged"
            raise BootError(refusal.problem, refusal.fix, where)
        if problems := vllm_lora_problems(adapter.local):
            problem = f"{'; '.join(problems)}: vLLM 0.32 cannot apply it unmerged (mode {mode})"
            raise BootError(problem, FIX, where, ExitCode.BAD_INPUT)


def refuse_for_vllm(config: Config) -> None:
    """Before any weights load: refuse, for `unmerged` and `ab` on vLLM, an adapter vLLM cannot apply as a LoRA."""
    if config.mode in ("unmerged", "ab"):
        _check_adapters(config, config.mode)


def base_config(model: ModelConfig) -> PretrainedConfig:
    """The base's architecture only (it decides the module names): config.json, or a GGUF's metadata.

    For a GGUF this is the config `server.store.sources.GGUFSource` starts from, without its tensor index.
    """
    where, files = (
        (model.local.parent, {"gguf_file": model.local.name}) if model.local.suffix == ".gguf" else (model.local, {})
    )
    try:
        return AutoConfig.from_pretrained(
            str(where), trust_remote_code=model.trust_remote_code, local_files_only=True, **files
        )
    except (OSError, ValueError) as exc:
        raise BootError(
            f"cannot read its config ({exc})", "give a model folder or a .gguf file", str(model.local)
        ) from None


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"resolve the dtype before writing the vLLM adapter (got {dtype!r})")
    return resolved


def vllm_adapter_key(config: Config, root: Path, dtype: str | torch.dtype) -> str:
    """Content key of the written folder: the adapters' bytes, weights and order, the base architecture, the dtype.

    The base weights do not enter the cat adapter, only its layout does: keyed by config.json's bytes, or for a GGUF
    (whose layout is in its metadata) by the file's. Adapter names do not either: the written tensors carry none.
    File digests are remembered in `root` by (size, mtime), so a repeated boot only stats the files.
    """
    (root / "locks").mkdir(parents=True, exist_ok=True)
    hashes = FileHashes(root)
    model = config.model.local
    layout = model if model.suffix == ".gguf" else model / "config.json"
    adapters = [
        {"weight": a.weight, "files": [[str(p.relative_to(a.local)), hashes.digest(p)] for p in files_under(a.local)]}
        | ({"commit": a.sha} if a.sha else {})  # a Hub id's commit, as in the merge cache key
        for a in config.adapters
    ]
    inputs = {
        "format": VLLM_ADAPTER_FORMAT,
        "kind": "peft lora cat, scaling folded into B",
        "dtype": str(_dtype(dtype)),
        "base_layout": hashes.digest(layout),
        "adapters": adapters,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    hashes.save()
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def _write(folder: Path, config: Config, cat: CatLora) -> None:
    lora = LoraConfig(
        r=cat.rank,
        lora_alpha=cat.rank,  # scaling alpha / r = 1.0 exactly: the s_i are already in B
        target_modules=cat.target_modules,
        use_rslora=False,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(config.model.local),
    )
    lora.save_pretrained(str(folder))
    weights = folder / "adapter_model.safetensors"
    save_file(cat.tensors, str(weights), metadata={"format": "pt"})
    record = {
        "format": VLLM_ADAPTER_FORMAT,
        "rank": cat.rank,
        "modules": cat.modules,
        "target_modules": cat.target_modules,
        "sha256": {name: sha256_file(folder / name) for name in ("adapter_config.json", weights.name)},
        "adapters": [
            {"name": a.name, "path": str(a.local), "weight": a.weight} | ({"commit": a.sha} if a.sha else {})
            for a in config.adapters
        ],
    }
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _cat(config: Config, dtype: torch.dtype, hf_config: PretrainedConfig) -> CatLora:
    """The adapters attached to a meta skeleton of the base (no base weight read), as one LoRA."""
    _check_adapters(config, config.mode)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=config.model.trust_remote_code)
    model, _ = load_adapters(skeleton, config.adapters, on_meta_base=True, allow_pickle=config.security.allow_pickle)
    names = [a.name for a in config.adapters]
    if saved := next(saved_modules(model, names), None):  # a config could hide one behind a regex
        raise BootError("modules_to_save replaces whole modules, which a LoRA cannot carry", FIX, saved[0])
    try:
        cat = cat_lora(model, names, dtype)
    except ValueError as exc:
        raise BootError(str(exc), FIX) from None
    if cat.rank > VLLM_MAX_LORA_RANK:
        problem = f"the adapters' one-LoRA form has rank {cat.rank}, above vLLM's largest max_lora_rank"
        raise BootError(f"{problem} {VLLM_MAX_LORA_RANK}", FIX)
    return cat


def build_vllm_adapter(config: Config, out_dir: Path, dtype: str | torch.dtype) -> VllmAdapter:
    """Write the adapters' exact one-LoRA form as a PEFT folder at `out_dir` (tmp folder, then one rename).

    If `out_dir` appears meanwhile (another writer of the same content key), that folder is kept and ours discarded.
    """
    cat = _cat(config, _dtype(dtype), base_config(config.model))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"tmp-{out_dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write(tmp, config, cat)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not out_dir.is_dir():
                raise
    finally:
        with suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return VllmAdapter(path=out_dir, rank=cat.rank, modules=cat.modules, target_modules=cat.target_modules)


def _stored(folder: Path) -> VllmAdapter | None:
    """The entry at `folder` if complete and intact (its weights match the recorded sha256), else None."""
    try:
        record = json.loads((folder / RECORD).read_text())
        intact = all(sha256_file(folder / name) == digest for name, digest in record["sha256"].items())
        if record["format"] != VLLM_ADAPTER_FORMAT or not intact or len(record["sha256"]) != 2:
            return None
        return VllmAdapter(folder, int(record["rank"]), list(record["modules"]), list(record["target_modules"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_vllm_adapter(config: Config, root: Path, dtype: str | torch.dtype) -> VllmAdapter:
    """The one-LoRA folder for this config under `root` (`root/<content key>`): reused if stored, else written.

    A lock per key makes replicas booting together write it once; a damaged entry is moved aside and rewritten.
    """
    key = vllm_adapter_key(config, root, dtype)
    entry = root / key
    with FileLock(str(root / "locks" / f"{key}.lock")):
        if (stored := _stored(entry)) is not None:
            return stored
        if entry.exists():
            trash = root / f"trash-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(entry, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return build_vllm_adapter(config, entry, dtype)

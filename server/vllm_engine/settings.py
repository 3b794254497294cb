"""From our config to vLLM's engine arguments and environment, per arm, without importing vLLM.

vLLM on CPU reads its placement from the environment, and its worker processes inherit it, so the variables are
set in this process before the first engine starts:
- VLLM_CPU_OMP_THREADS_BIND: without it vLLM reserves a core for the frontend and computes on the rest, which on a
  2-core machine is one core. With tensor parallelism each worker needs its own list ("0|1").
- VLLM_CPU_NUM_OF_RESERVED_CPU=0 for the same reason.
- VLLM_HOST_IP=127.0.0.1 keeps the engine's sockets on loopback (vLLM otherwise picks the machine's address).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config.schema import Config

# vLLM's defaults suit a GPU that serves nothing else; on CPU the default 0.92 of node memory fails its start-up
# check as soon as anything else (our torch boot, the second A/B arm) holds memory.
CPU_MEMORY_UTILIZATION = 0.3
GPU_MEMORY_UTILIZATION = 0.9
GIB = 1 << 30
# vLLM 0.32 sizes LoRA buffers for one of these ranks (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
FILE_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}  # safetensors' dtype names; others count 1 byte


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def lora_rank_bucket(rank: int) -> int:
    """The smallest rank vLLM allocates for that is at least `rank`; a larger one is refused with the adapter's name."""
    for bucket in LORA_RANKS:
        if bucket >= rank:
            return bucket
    raise ValueError(f"rank {rank} is above vLLM's largest LoRA rank {LORA_RANKS[-1]}")


def cpu_binding(config: Config) -> str:
    """VLLM_CPU_OMP_THREADS_BIND: the configured value, or the cores we may use, split between the TP workers."""
    if config.engine.cpu_threads_bind:
        return config.engine.cpu_threads_bind
    cores = sorted(os.sched_getaffinity(0))
    workers = (config.engine.tensor_parallel_size or 1) * (config.engine.pipeline_parallel_size or 1)
    if workers == 1:
        return ",".join(map(str, cores))
    # More workers than cores oversubscribes (TP=3 on 2 cores runs, slowly); fewer gives each a contiguous share.
    per = max(1, len(cores) // workers)
    groups = [cores[(i * per) % len(cores) : (i * per) % len(cores) + per] for i in range(workers)]
    return "|".join(",".join(map(str, g)) for g in groups)


def environment(config: Config) -> dict[str, str]:
    """The variables every vLLM process of this server needs.

    The CPU binding follows the config (engine.cpu_threads_bind), never an inherited value: it must match this
    engine's tensor_parallel_size, and a process that boots twice (tests, benchmarks) would otherwise keep the first
    engine's. VLLM_HOST_IP from the environment wins: across nodes (Ray) it must be the node's own address.
    """
    env = {"VLLM_HOST_IP": os.environ.get("VLLM_HOST_IP", "127.0.0.1")}
    if on_cpu():
        env |= {"VLLM_CPU_OMP_THREADS_BIND": cpu_binding(config), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    return env


@dataclass(frozen=True)
class ArmPlan:
    """One arm's engine: the checkpoint vLLM loads and, for the unmerged arm, the adapter it applies."""

    arm: str
    model_dir: Path
    adapter_dir: Path | None = None
    adapter_rank: int = 0
    memory_share: float = 1.0  # of the configured memory, when two arms split it


def parameter_bytes(plan: ArmPlan, dtype: str) -> int:
    """The weights one arm's engine holds: every tensor of its checkpoint's shards (and its LoRA adapter's) at the
    served dtype's element size, since vLLM casts as it loads (a float32 base served in bfloat16 holds half its
    file). Read from the safetensors headers alone; the cache entry's probes file is not a shard."""
    import torch
    from safetensors import safe_open

    served = getattr(torch, dtype, None)  # `checkpoint`: each tensor keeps its file's dtype
    size = torch.empty((), dtype=served).element_size() if isinstance(served, torch.dtype) else None
    files = sorted(plan.model_dir.glob("model*.safetensors"))
    if plan.adapter_dir is not None:
        files += sorted(plan.adapter_dir.glob("adapter_model*.safetensors"))
    total = 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensor = f.get_slice(name)
                total += math.prod(tensor.get_shape()) * (size or FILE_DTYPE_BYTES.get(tensor.get_dtype(), 1))
    return total


def memory_shares(config: Config, arms: list[str]) -> dict[str, float]:
    if len(arms) == 1:
        return {arms[0]: 1.0}
    merged = config.engine.ab_merged_memory_share or 0.5
    return {"merged": merged, "unmerged": 1.0 - merged}


def engine_args(config: Config, plan: ArmPlan, dtype: str) -> dict[str, Any]:
    """Keyword arguments for vLLM's AsyncEngineArgs."""
    e, cpu = config.engine, on_cpu()
    utilization = e.gpu_memory_utilization or (CPU_MEMORY_UTILIZATION if cpu else GPU_MEMORY_UTILIZATION)
    args: dict[str, Any] = {
        "model": str(plan.model_dir),
        "served_model_name": plan.arm,
        "dtype": dtype,
        "tensor_parallel_size": e.tensor_parallel_size or 1,
        "pipeline_parallel_size": e.pipeline_parallel_size or 1,
        "distributed_executor_backend": e.distributed_executor_backend,
        "gpu_memory_utilization": utilization * plan.memory_share,
        "max_num_seqs": e.max_num_seqs or config.limits.max_batch_size,
        "max_model_len": e.max_model_len or config.limits.max_total_tokens,
        "enforce_eager": bool(e.enforce_eager),
        # Our routes report each token's logprob under the distribution it was sampled from, as the torch engine.
        "logprobs_mode": "processed_logprobs",
        "trust_remote_code": config.model.trust_remote_code,
        "disable_log_stats": False,
    }
    if e.kv_cache_gib is not None:
        args["kv_cache_memory_bytes"] = int(e.kv_cache_gib * GIB * plan.memory_share)
    if plan.adapter_dir is not None:
        args |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": lora_rank_bucket(plan.adapter_rank)}
    return args

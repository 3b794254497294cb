"""Single-stream decode speed: mergeserve vs llama.cpp (llama-cpp-python's server) on the same merged model, one run.

The model (issue #15): --config's base with its adapters merged. `python -m server merge --dtype float32` exports it
(the float32 merge equals the server's merged weights bit for bit, docs/guides/export.md) and llama.cpp's
`convert_hf_to_gguf.py --outtype f16` turns it into the GGUF the "llama.cpp f16 merged" row serves: one rounding to
f16, nothing else. The "llama.cpp f16 base + LoRA" row serves the base, exported the same way with every adapter's
weight set to 0 (W0 + 0 * delta = W0 exactly in float32), converted to f16, with the adapter converted by
`convert_lora_to_gguf.py` and passed as `--lora_path` (one adapter only: llama-cpp-python's server takes one).
Our rows: `python -m server serve --mode merged --dtype D` on --config, for each D of --dtypes.

Load: one client, one request at a time, POST /v1/completions with `stream: true` on every server, the prompt the
already-templated chat text of scripts/bench_serving.py's 8 questions (so both sides tokenize the same string),
greedy (temperature 0; llama.cpp's repeat_penalty 1.0, its default 1.1 would change the text), max_tokens
--new-tokens. Per request (client clock): TTFT = send to the first chunk; decode tokens/s = (tokens - 1) / (last
chunk - first chunk), prefill left out. Tokens = the non-streamed check request's usage.completion_tokens (greedy:
the same request streamed makes the same tokens; the streamed text is compared with it to be sure).

Order: --reps rounds; each round starts every arm's server in turn (one at a time, never two busy at once), sends
one warm-up request (excluded), then the 8 prompts, and stops it; every other round runs the arms in reverse, so
slow drift in machine load hits every arm alike. Round 0 also sends each prompt once non-streamed: prompt_tokens
(must be equal on every arm: the same tokenization), completion_tokens and the greedy text, whose tokens are compared
with our first arm's (leading tokens that agree). Reported: per arm the medians over all timed requests, and the
ratio ours / llama.cpp. llama-cpp-python keeps the previous request's KV cache for the shared prefix (the chat
template's system prompt), so its TTFT is partly a cache hit; decode speed is not affected.

    python scripts/bench_llamacpp.py --llama-python /work/llama-venv/bin/python --llama-src DIR
        [--config configs/demo.yaml] [--dtypes float32,bfloat16,float16] [--new-tokens 64] [--reps 3]
        [--threads 2] [--no-lora] [--work-dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from ab_load import heavy_processes
from bench_llamacpp_report import Sample, agreement_summary, arm_summary, samples_json, table, target_lines
from bench_serving import chat_prompts
from local_server import REPO, LocalServer, free_port

from server.config.load import load_config

BOOT_TIMEOUT_S, REQUEST_TIMEOUT_S = 900.0, 600.0
INSTALL = ("python -m venv /work/llama-venv && /work/llama-venv/bin/pip install 'llama-cpp-python[server]' "
           "(compiles llama.cpp, ~10 min), then pass --llama-python /work/llama-venv/bin/python")  # fmt: skip
SOURCE = ("pip download llama-cpp-python --no-deps --no-binary :all: && tar xzf llama_cpp_python-*.tar.gz, then pass "
          "--llama-src llama_cpp_python-*/vendor/llama.cpp (or a llama.cpp checkout)")  # fmt: skip
MERGED_REF = "llama.cpp f16 merged"


class LlamaServer(LocalServer):
    """llama-cpp-python's OpenAI server as a LocalServer (log file, SIGTERM stop); ready once /v1/models answers."""

    def __init__(self, python: str, model: Path, lora: Path | None, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, name = tempfile.mkstemp(prefix=f"bench-llamacpp-server-{self.port}-", suffix=".log")
        os.close(fd)
        self.log, self.health_history = Path(name), []
        command = [python, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(self.port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   *(["--lora_path", str(lora)] if lora else [])]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def wait_healthy(self, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                tail = "\n".join(self.read_log().splitlines()[-15:])
                raise RuntimeError(f"llama.cpp server exited with code {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5, trust_env=False).status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"llama.cpp server not ready after {timeout:.0f} s; log {self.log}")


@dataclass(frozen=True)
class Arm:
    """One row: how to start its server, and what its request bodies add (model name, sampling switches)."""

    name: str
    start: Callable[[], LocalServer]
    body: dict[str, Any]


def check_llama_python(python: str | None) -> str:
    runs = python and Path(python).is_file()
    if not runs or subprocess.run([str(python), "-c", "import llama_cpp.server"], capture_output=True).returncode:
        raise SystemExit(f"bench_llamacpp: {python or '(no --llama-python)'} cannot import llama_cpp.server; "
                         f"install it in its own venv: {INSTALL}")  # fmt: skip
    return str(python)


def run_step(command: list[str], what: str) -> None:
    print(f"{what}...", file=sys.stderr, flush=True)
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise SystemExit(f"bench_llamacpp: {what} failed (exit {proc.returncode}):\n{tail}")


def convert(llama_src: Path | None, script: str, *args: str | Path) -> list[str]:
    """A llama.cpp conversion script under this python, with llama.cpp's own gguf-py (the version it was made for)."""
    if llama_src is None or not (llama_src / script).exists():
        raise SystemExit(f"bench_llamacpp: --llama-src must name llama.cpp's source tree; get it with: {SOURCE}")
    gguf_py = llama_src / "gguf-py"
    return ["env", f"PYTHONPATH={gguf_py}", sys.executable, str(llama_src / script), *map(str, args)]


def export(config: Path, out: Path) -> None:
    if not out.exists():
        run_step([sys.executable, "-m", "server", "merge", "--config", str(config), "--out", str(out), "--dtype",
                  "float32", "--log-level", "warning"], f"export {out.name} (float32)")  # fmt: skip


def base_config(config_path: str, work: Path) -> Path:
    """--config with every adapter's weight 0 and absolute paths: its export is the base alone, bit for bit."""
    config = load_config(config_path)
    data = yaml.safe_load(Path(config_path).read_text())
    data["model"]["path"] = str(config.model.path)
    for raw, adapter in zip(data["adapters"], config.adapters, strict=True):
        raw["path"], raw["weight"] = str(adapter.path), 0.0
    path = work / "base.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def prepare(config_path: str, work: Path, src: Path | None, lora: bool) -> dict[str, Path]:
    """The GGUFs the llama.cpp rows serve, built in `work` (files already there are reused as they are)."""
    files = {"merged": work / "merged-f16.gguf"}
    if not files["merged"].exists():
        export(Path(config_path), work / "merged")
        run_step(convert(src, "convert_hf_to_gguf.py", work / "merged", "--outtype", "f16", "--outfile",
                         files["merged"]), "convert merged -> f16 GGUF")  # fmt: skip
    if lora:
        files["base"], files["lora"] = work / "base-f16.gguf", work / "lora-f16.gguf"
        if not files["base"].exists():
            export(base_config(config_path, work), work / "base")
            run_step(convert(src, "convert_hf_to_gguf.py", work / "base", "--outtype", "f16", "--outfile",
                             files["base"]), "convert base -> f16 GGUF")  # fmt: skip
        if not files["lora"].exists():
            export(base_config(config_path, work), work / "base")
            adapter = str(load_config(config_path).adapters[0].path)
            run_step(convert(src, "convert_lora_to_gguf.py", adapter, "--base", work / "base", "--outtype", "f16",
                             "--outfile", files["lora"]), "convert adapter -> f16 GGUF LoRA")  # fmt: skip
    return files


def complete(url: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S, trust_env=False)
    resp.raise_for_status()
    return dict(resp.json())


def stream(url: str, body: dict[str, Any]) -> tuple[float, float, str]:
    """Seconds from send to the first and to the last chunk that carries a choice, and the text streamed."""
    first = last = None
    parts: list[str] = []
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=REQUEST_TIMEOUT_S,
                      trust_env=False) as resp:  # fmt: skip
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            choices = json.loads(line[5:]).get("choices") or []
            if not choices:
                continue
            last = time.perf_counter() - start
            first = last if first is None else first
            parts.append(choices[0].get("text") or "")
    if first is None or last is None:
        raise RuntimeError(f"{url}: stream ended without a chunk")
    return first, last, "".join(parts)


def one_round(arm: Arm, rep: int, prompts: list[str], new_tokens: int, checks: dict[str, list[dict]]) -> list[Sample]:
    """Start the arm's server, warm up, (round 0) check each prompt non-streamed, stream the 8 prompts, stop."""
    server = arm.start()
    try:
        boot = server.wait_healthy(BOOT_TIMEOUT_S)
        base = {**arm.body, "max_tokens": new_tokens, "temperature": 0.0}
        complete(server.url, {**base, "prompt": prompts[-1]})  # warm-up, excluded
        if arm.name not in checks:
            checks[arm.name] = [complete(server.url, {**base, "prompt": p}) for p in prompts]
        samples = []
        for i, prompt in enumerate(prompts):
            first, last, text = stream(server.url, {**base, "prompt": prompt})
            ref = checks[arm.name][i]
            if text != ref["choices"][0]["text"]:
                print(f"warning: {arm.name} prompt {i}: streamed text differs from the check request's",
                      file=sys.stderr)  # fmt: skip
            samples.append(Sample(arm.name, rep, i, first, last, int(ref["usage"]["completion_tokens"])))
    finally:
        server.stop()
    rate = arm_summary(samples)["decode_tokens_per_s"]
    print(f"round {rep} {arm.name}: ready in {boot:.1f} s, decode {rate:.1f} tokens/s", file=sys.stderr, flush=True)
    return samples


def make_arms(args: argparse.Namespace, files: dict[str, Path], model_id: str) -> list[Arm]:
    def ours(dtype: str) -> Callable[[], LocalServer]:
        return lambda: LocalServer(args.config, "--mode", "merged", "--dtype", dtype, "--log-level", "warning",
                                   prefix="bench-llamacpp")  # fmt: skip

    def theirs(model: Path, lora: Path | None) -> Callable[[], LocalServer]:
        return lambda: LlamaServer(args.llama_python, model, lora, args.threads)

    greedy = {"repeat_penalty": 1.0}  # llama-cpp-python's default 1.1 penalizes repeats before the greedy pick
    arms = [Arm(f"mergeserve {d}", ours(d), {"model": model_id}) for d in args.dtypes.split(",")]
    arms.append(Arm(MERGED_REF, theirs(files["merged"], None), greedy))
    if "lora" in files:
        arms.append(Arm("llama.cpp f16 base + LoRA", theirs(files["base"], files["lora"]), greedy))
    return arms


def consistency(checks: dict[str, list[dict]], tokenizer: Any) -> dict[str, Any]:
    """Prompt tokens per prompt on every arm (must agree), and each arm's greedy tokens against the first arm's."""
    prompt_tokens = {arm: [c["usage"]["prompt_tokens"] for c in cs] for arm, cs in checks.items()}
    ids = {arm: [tokenizer(c["choices"][0]["text"], add_special_tokens=False)["input_ids"] for c in cs]
           for arm, cs in checks.items()}  # fmt: skip
    first = next(iter(ids))
    agreement = {arm: agreement_summary(ids[first], other) for arm, other in ids.items() if arm != first}
    same = len({tuple(v) for v in prompt_tokens.values()}) == 1
    texts = {arm: [c["choices"][0]["text"] for c in cs] for arm, cs in checks.items()}
    return {"prompt_tokens": prompt_tokens, "prompt_tokens_equal": same, "agreement_reference": first,
            "agreement": agreement, "texts": texts}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    c = result["consistency"]
    lines = [table(result), "",
             f"{result['new_tokens']} max new tokens, greedy, 1 client, {result['reps']} rounds x 8 prompts per arm "
             f"(medians over all timed requests; 1 warm-up per server start excluded); llama.cpp {result['threads']} "
             f"threads, {os.cpu_count()} cores; 1-min load average {result['loadavg'][0]:.2f} at start, "
             f"{result['loadavg'][1]:.2f} at end; other heavy processes at start: "
             f"{len(result['heavy_processes_at_start'])} (listed in the JSON).",
             f"Prompt tokens per prompt: {next(iter(c['prompt_tokens'].values()))} "
             f"({'the same on every arm' if c['prompt_tokens_equal'] else 'DIFFERENT between arms: ' + str(c['prompt_tokens'])}).",  # noqa: E501
             f"Greedy text against {c['agreement_reference']}, per prompt: leading tokens that agree / the reference's "
             "tokens (both texts re-tokenized, so a count is of text tokens, not of generated ones):"]  # fmt: skip
    for arm, a in c["agreement"].items():
        agree = ", ".join(f"{n}/{of}" for n, of in zip(a["leading"], a["of"], strict=True))
        lines.append(f"- {arm}: {agree} (identical outputs {a['identical']}/{a['prompts']})")
    lines += ["", "Target (#15, measured, not asserted): ours >= 0.5x llama.cpp f16 decode tokens/s:",
              *target_lines(result["summaries"], MERGED_REF)]  # fmt: skip
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--llama-python", default=os.environ.get("LLAMA_PYTHON"),
                        help="python of the venv holding llama-cpp-python[server] (env LLAMA_PYTHON)")  # fmt: skip
    parser.add_argument("--llama-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"),
                        help="llama.cpp source: convert_hf_to_gguf.py and gguf-py (env LLAMA_CPP_SRC)")  # fmt: skip
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--dtypes", help="our dtypes, comma-separated (default: the config's model.dtype)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="rounds; each starts every server once")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's n_threads and n_threads_batch")
    parser.add_argument("--no-lora", action="store_true", help="skip the llama.cpp base + LoRA row")
    parser.add_argument("--work-dir", type=Path, help="keep the exports and GGUFs here and reuse them next time")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if args.reps < 1 or args.new_tokens < 2:
        parser.error("need --reps >= 1 and --new-tokens >= 2")
    return args


def main() -> int:
    args = parse_args()
    check_llama_python(args.llama_python)
    config = load_config(args.config)
    args.dtypes = args.dtypes or config.model.dtype
    lora = not args.no_lora and len(config.adapters) == 1
    if not args.no_lora and not lora:
        print("note: the base + LoRA row needs exactly one adapter (llama-cpp-python takes one); skipped",
              file=sys.stderr)  # fmt: skip
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(args.config, work, args.llama_src, lora)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "merged")
    prompts = chat_prompts(tokenizer)
    arms = make_arms(args, files, config.model.model_id)
    loadavg, others = os.getloadavg()[0], heavy_processes()
    checks: dict[str, list[dict]] = {}
    samples: list[Sample] = []
    for rep in range(args.reps):
        for arm in arms if rep % 2 == 0 else arms[::-1]:
            samples += one_round(arm, rep, prompts, args.new_tokens, checks)
    result = {"config": args.config, "new_tokens": args.new_tokens, "reps": args.reps, "threads": args.threads,
              "loadavg": [loadavg, os.getloadavg()[0]], "heavy_processes_at_start": others, "work_dir": str(work),
              "files": {k: str(v) for k, v in files.items()},
              "summaries": {a.name: arm_summary([s for s in samples if s.arm == a.name]) for a in arms},
              "consistency": consistency(checks, tokenizer), "samples": samples_json(samples)}  # fmt: skip
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

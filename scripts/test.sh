#!/usr/bin/env bash
# Set up as serve.sh does, then lint, type-check and run the whole test suite (pytest args pass through).
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# The vLLM engine's tests are part of the suite, so the test set-up installs vLLM too.
export MERGESERVE_VLLM=${MERGESERVE_VLLM:-1}
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
# The metrics tests run a real Prometheus; Debian ships it (with promtool).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing prometheus (Debian package)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "test.sh: the metrics tests need prometheus and promtool; install Debian's prometheus package" >&2
    exit 1
  fi
fi
ruff check server tests scripts
ruff format --check server tests scripts
mypy
python -m pytest "$@"

#!/usr/bin/env bash
# Set up as serve.sh does, then lint, type-check and run the whole test suite (pytest args pass through).
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# The vLLM engine's tests are part of the suite, so the test set-up installs vLLM too.
export MERGESERVE_VLLM=${MERGESERVE_VLLM:-1}
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
# Debian packages the tests run: a real Prometheus (with promtool) for the metrics tests; debootstrap, buildah,
# podman and runc to build the container image and run it (tests/deploy/test_image.py).
apt_needed=()
for tool_pkg in prometheus:prometheus promtool:prometheus debootstrap:debootstrap buildah:buildah podman:podman \
                runc:runc; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "${tool_pkg%%:*}" >/dev/null || apt_needed+=("${tool_pkg#*:}")
done
if [ ${#apt_needed[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing ${apt_needed[*]} (Debian packages)" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_needed[@]}" >/dev/null
  else
    echo "test.sh: the tests need ${apt_needed[*]}; install those Debian packages (as root)" >&2
    exit 1
  fi
fi
# mypy's cache lives outside the checkout, so a fresh clone on a machine that ran the suite before re-checks only
# what changed (~2 min -> ~10 s on 2 cores); mypy revalidates every entry by content hash and version.
export MYPY_CACHE_DIR=${MYPY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mergeserve/mypy}
ruff check server tests scripts
ruff format --check server tests scripts
mypy
python -m pytest "$@"

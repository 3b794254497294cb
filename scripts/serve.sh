#!/usr/bin/env bash
# Set up on a fresh machine (Python 3.11 only) and serve a config, the pirate demo by default, on port 8080.
#   scripts/serve.sh [CONFIG] [extra `mergeserve serve` flags, e.g. --port 9000 --mode unmerged]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
config=${1:-configs/demo.yaml}
shift || true
exec python -m server serve --config "$config" "$@"

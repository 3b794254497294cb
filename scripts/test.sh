#!/usr/bin/env bash
# Set up as serve.sh does, then lint, type-check and run the whole test suite (pytest args pass through).
#   scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
ruff check server tests scripts
ruff format --check server tests scripts
mypy
python -m pytest "$@"

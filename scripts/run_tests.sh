#!/usr/bin/env bash
# Lint, then the test suite. pytest's exit code 5 (no tests collected) is a failure.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${UTIO_VENV:-$ROOT/.venv}"
cd "$ROOT"
"$VENV/bin/ruff" check . || exit 1
"$VENV/bin/python" -m pytest -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"

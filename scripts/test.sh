#!/usr/bin/env bash
# The test suite (CPU, a few minutes). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
# one intra-op thread per process: tiny test models gain nothing from more, and multi-process tests
# would oversubscribe the cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$root/.venv/bin/python" -m pytest -q "$@"

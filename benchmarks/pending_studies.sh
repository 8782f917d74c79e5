#!/usr/bin/env bash
# The studies whose records are not complete yet, most important first. Every command resumes from the records in
# docs/ (finished runs are skipped), so this can be stopped at any time and started again; commit the records as they
# land. Needs the GLUE files: SDSLORA_DATA_DIR=/path/to/glue bash benchmarks/pending_studies.sh
# (about 3.5 min per MiniLM run on 2 idle CPU cores).
set -u
cd "$(dirname "$0")/.."
C="--model minilm-l6 --task sst2 --train-limit 20000 --steps 300 --batch-size 32 --max-length 64 --eval-every 50 \
  --diagnostics-every 100 --val-max 500 --eval-batch-size 128 --exclude pooler --no-progress"
EV="--evidence docs/evidence/minilm-sst2"

echo "== reproduction claim 1: the ablation at rank 8 (docs/reproduction.md)"
sdslora compare $C --seeds 0,1,2 $EV --ranks 8 --methods orthogonal,sds:faithful \
  --lr-sweep orthogonal=1e-4,3e-4,1e-3,3e-3 --lr-sweep sds:faithful=1e-4,3e-4,1e-3,3e-3 -o runs/study-sst2-ablation

echo "== evidence: rank 4 with its own grids (the smallest rank with anisotropy, and a gap)"
sdslora compare $C --seeds 0,1,2,3,4 $EV --ranks 4 --methods lora,sds --lr-sweep lora=3e-4,1e-3,3e-3,1e-2 \
  --lr-sweep sds=1e-4,3e-4,1e-3,3e-3 -o runs/study-sst2-r4

echo "== evidence: rank 1 at twice the steps (does the gap hold once full fine-tuning has converged?)"
sdslora compare ${C/--steps 300/--steps 600} --seeds 0,1,2 --evidence docs/evidence/minilm-sst2-600steps --ranks 1 \
  --methods full,lora,sds --widen 0 --lr-sweep full=3e-5,1e-4 --lr-sweep lora=1e-3,3e-3 --lr-sweep sds=3e-4,1e-3 \
  -o runs/study-sst2-600

echo "== evidence: LoRA at rank 4's neighbouring rate (the validation loss prefers 3e-3 to the chosen 1e-3)"
sdslora compare $C --seeds 0,1,2,3,4 --evidence docs/evidence/minilm-sst2-lr-sensitivity --ranks 4 --methods lora \
  --widen 0 --lr-sweep lora=3e-3 -o runs/study-sst2-lr-sensitivity-r4

echo "== survey adapters (docs/survey-methods.md)"
sdslora compare $C --seeds 0,1,2 $EV --ranks 8 --methods relora,relora_sds --widen 0 --lr-sweep relora=1e-3 \
  --lr-sweep relora_sds=1e-3 -o runs/study-sst2-restart
sdslora compare $C --seeds 0,1,2 $EV --ranks 40 --methods lotr --lr-sweep lotr=1e-3,3e-3,1e-2 -o runs/study-sst2-lotr
sdslora compare $C --seeds 0,1,2 $EV --ranks 256 --methods vera --lr-sweep vera=1e-3,3e-3,1e-2,3e-2 \
  -o runs/study-sst2-vera
A="adalora:target_r=8+tinit=30+tfinal=60+deltaT=10"
sdslora compare $C --seeds 0,1,2 $EV --ranks 12 --methods $A --lr-sweep $A=3e-4,1e-3,3e-3,1e-2 \
  -o runs/study-sst2-adalora

echo "== reproduction claim 5: gradient-approximation methods at the rank-4 gap"
C5="$C --seeds 0,1,2,3,4 --ranks 4"
sdslora compare $C5 $EV --methods lora_ga --lr-sweep lora_ga=3e-4,1e-3,3e-3,1e-2 -o runs/claim5-lora-ga
for opt in lora_pro scaled_adamw altlora; do
  sdslora compare $C5 --methods lora --optimizer $opt --lr-sweep lora=3e-4,1e-3,3e-3,1e-2 \
    --evidence docs/reproduction/claim5-$opt -o runs/claim5-$opt
done

echo "== reproduction claim 2: refresh schedule and warm-up"
for v in refresh=never refresh=every:1 refresh_k=3 refresh_k=8 refresh=every:5 refresh=every:20 refresh=every:10 \
         warmup_steps=5 warmup_steps=50; do
  sdslora compare $C --seeds 0,1,2 --evidence docs/reproduction/refresh-sst2 --ranks 8 --widen 0 \
    --methods "sds:$v" --lr-sweep "sds:$v=1e-3" -o runs/refresh-sst2
done

echo "== evidence: the faithful SDS-LoRA, DoRA and PiSSA at rank 32"
sdslora compare $C --seeds 0,1,2 $EV --ranks 32 --methods sds:faithful,dora,pissa \
  --lr-sweep sds:faithful=1e-4,3e-4,1e-3,3e-3 --lr-sweep dora=1e-4,3e-4,1e-3,3e-3 \
  --lr-sweep pissa=3e-5,1e-4,3e-4,1e-3 -o runs/study-sst2-gap32

echo "== reproduction claim 4: LoRA-SB against LoRA-XS (r = 32 first; r = 8, 64 at its chosen rates: see the doc)"
sdslora compare $C --seeds 0,1,2 --scaling standard --alpha 32 --ranks 32 --methods lora_sb,lora_xs \
  --lr-sweep lora_sb=1e-4,3e-4,1e-3,3e-3 --lr-sweep lora_xs=1e-3,3e-3,1e-2,3e-2 \
  --evidence docs/reproduction/lora-sb-sst2-r32 -o runs/lora-sb-r32

echo "== then: python benchmarks/reproduce_claims.py; python benchmarks/survey_table.py;"
echo "   sdslora evidence docs/evidence -o docs/evidence.md"

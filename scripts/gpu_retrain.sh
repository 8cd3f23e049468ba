#!/usr/bin/env bash
# Runs ON the device machine, in the repo root, with .gpu/qm9 carried (scripts/gpu_prepare.sh stages it).
# One call, one deadline, two phases, each phase's result copied to $OUT as soon as it exists:
#   1. diffusion: warm start from weights/edm-small-diffusion (--init), batch B, for DIFF_MIN minutes;
#   2. ect: consistency tuning (ict-vp) from phase 1's run (or, if phase 1 failed, from the shipped diffusion
#      weights), batch B, with a curriculum sized to the steps that fit before the deadline;
#   then exports both (EMA float32 weights, readable by any flax version) and, if time is left, GPU step times.
#
#   bash scripts/gpu_retrain.sh [DEADLINE_S=570] [DIFF_MIN=3.0] [BATCH=256] [S1=320]
#
# Environment overrides (defaults reproduce the session-3 run that trained the shipped models):
#   INIT=DIR     diffusion model to warm-start phase 1 from (default weights/edm-small-diffusion);
#                INIT=none trains phase 1 from scratch with --model MODEL
#   MODEL=NAME   preset when INIT=none (default small)
#   DIFF_LR, ECT_LR  learning rates of the two phases (default 5e-4, 3e-4); session 3 saw the ECT run
#                turn unstable after its curriculum ended on the finest grid, so a longer run may want less
set -uo pipefail
t_start=$(date +%s)
deadline=${1:-570}; diff_min=${2:-3.0}; batch=${3:-256}; s1=${4:-320}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOLGEN_HOME=$PWD/.gpu/qm9 MOLGEN_JAX_CACHE=/tmp/jaxcache
out=${OUT:-/tmp/out}; mkdir -p "$out"
init0=${INIT:-weights/edm-small-diffusion}; model=${MODEL:-small}; diff_lr=${DIFF_LR:-5e-4}; ect_lr=${ECT_LR:-3e-4}
if [ "$init0" = none ]; then phase1_src=(--model "$model"); else phase1_src=(--init "$init0"); fi
left() { echo $((deadline - ($(date +%s) - t_start))); }
log() { echo "[$(( $(date +%s) - t_start )) s] $*" | tee -a "$out/pipeline.txt"; }
pack_run() {  # pack_run NAME RUN_DIR: config, metrics, latest checkpoint, exported weights -> $OUT/NAME.tar
  local name=$1 run=$2 last
  last=$(ls "$run/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
  [ -n "$last" ] || { log "$name: no checkpoint"; return 1; }
  python3 -m molgen export "$run" "runs/w_$name" >>"$out/pipeline.txt" 2>&1 || log "$name: export failed"
  tar -cf "$out/$name.tar" "$run/config.json" "$run/metrics.jsonl" "$run/checkpoints/$last" \
    $( [ -d "runs/w_$name" ] && echo "runs/w_$name" )
  log "$name: packed step $last"
}
mkdir -p runs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$out/device.txt"

log "phase 1: diffusion (${phase1_src[*]}), batch $batch, lr $diff_lr, $diff_min min"
python3 -m molgen train --mode diffusion "${phase1_src[@]}" --batch-size "$batch" --lr "$diff_lr" \
  --warmup 200 --steps 1000000 --ckpt-every 1000 --eval-every 2000 --out runs/gdiff --max-minutes "$diff_min" \
  >"$out/train_diffusion.txt" 2>&1
log "phase 1 rc $?: $(tail -1 "$out/train_diffusion.txt")"
init=$init0
if pack_run diffusion runs/gdiff; then init=runs/gdiff; fi
[ "$init" = none ] && { log "phase 1 left no checkpoint to tune from; stopping"; exit 1; }
rate=$(python3 -c "
import json; r=[json.loads(l) for l in open('runs/gdiff/metrics.jsonl')]; r=[x['steps_per_s'] for x in r[len(r)//2:]]
print(sorted(r)[len(r)//2])" 2>/dev/null || echo 20)

ect_s=$(( $(left) - 75 ))   # keep ~75 s for start-up, compilation, export and packing
ect_steps=$(python3 -c "print(max(500, int($rate / 1.8 * $ect_s)))")  # curriculum length; steps past it stay at S1
log "phase 2: ect from $init, batch $batch, lr $ect_lr, diffusion ran at $rate steps/s -> curriculum of $ect_steps steps, training for $ect_s s"
python3 -m molgen train --mode ect --init "$init" --batch-size "$batch" --lr "$ect_lr" --warmup 100 \
  --steps 1000000 --curriculum-steps "$ect_steps" --s1 "$s1" --ckpt-every 1000 --eval-every 2000 --out runs/gect \
  --max-minutes "$(python3 -c "print($ect_s / 60)")" >"$out/train_ect.txt" 2>&1
log "phase 2 rc $?: $(tail -1 "$out/train_ect.txt")"
pack_run ect runs/gect

if [ "$(left)" -gt 45 ]; then
  log "GPU step times (benchmarks/train_step.py), $(left) s left"
  timeout $(( $(left) - 5 )) python3 benchmarks/train_step.py --presets small,base,edm --batch-size 64 --repeats 10 \
    --forward-batch 1000 2>&1 | grep -v "^WARNING" | tee "$out/bench_gpu.txt"
fi
log "done"

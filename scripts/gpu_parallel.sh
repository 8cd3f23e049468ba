#!/usr/bin/env bash
# Runs ON the device machine, in the repo root, with .gpu carried (the QM9 cache in .gpu/qm9, for the teacher).
# The small networks leave one GPU mostly idle (the host-side packing of batches bounds one run at ~100 steps/s,
# docs/performance.md), so this trains three runs side by side on the one GPU, to one deadline; each packs its
# result into $OUT as soon as it is done:
#   distill_a.tar  scripts/gpu_distill.sh: the default model distilled further onto the teacher's ODE, lr LR_A
#   distill_b.tar  the same with lr LR_B and seed 1 (other pairs, other order): a hedge on the learning rate
#   diffusion.tar  the teacher (weights/edm-small-diffusion) trained on, for better ODE targets next time,
#                  or, when INIT_C is set, distill_c.tar: a third distillation run like A and B
# and the logs distill_a.txt, distill_b.txt, diffusion.txt (distill_c.txt), pipeline.txt (7 files: the tool
# returns at most 8).
#
#   bash scripts/gpu_parallel.sh [DEADLINE_S=560] [PAIRS=250000] [BATCH=512]
#
# Environment overrides: LR_A (2e-4), LR_B (4e-4), DIFF_LR (4e-4), DIFF_BATCH (512); LAYERS_A, LAYERS_B
# (deepen that student to N blocks, `molgen train --layers`); NF_A, NF_B (widen it to N features, `--nf`); RELAX_A, RELAX_B (`--relax-weight`, default 0);
# RELAX_ROUNDS_A, RELAX_ROUNDS_B (`--relax-rounds`, default 0); DMD_A, DMD_B (`--dmd-weight`, default 0); REFINE_A, REFINE_B (`--refine`, default 0: ODE targets);
# PAIR_T_A, PAIR_T_B (`--pair-temperature`, default 1);
# RUN_A, RUN_B (runs/gkd_a, runs/gkd_b); INIT_A, INIT_B, ANCHOR_A, ANCHOR_B (the student to start from and
# the model whose low-noise f is kept; default $INIT / $ANCHOR, else scripts/gpu_distill.sh's defaults; a
# stacked --init needs itself as anchor). INIT_C (a student: run C replaces the diffusion run), with LR_C (2e-4),
# ANCHOR_C, LAYERS_C, NF_C, RELAX_C, RELAX_ROUNDS_C, DMD_C, REFINE_C, PAIR_T_C, RUN_C (runs/gkd_c), seed 2.
set -uo pipefail
t_start=$(date +%s)
deadline=${1:-560}; pairs=${2:-250000}; batch=${3:-512}
lr_a=${LR_A:-2e-4}; lr_b=${LR_B:-4e-4}; diff_lr=${DIFF_LR:-4e-4}; diff_batch=${DIFF_BATCH:-512}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOLGEN_JAX_CACHE=/tmp/jaxcache
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # three processes share the GPU's memory
out=${OUT:-/tmp/out}; mkdir -p "$out" runs
log() { echo "[$(( $(date +%s) - t_start )) s] $*" | tee -a "$out/pipeline.txt"; }
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$out/pipeline.txt"

NAME=distill_a RUN=${RUN_A:-runs/gkd_a} SEED=0 INIT=${INIT_A:-${INIT:-}} ANCHOR=${ANCHOR_A:-${ANCHOR:-}} LAYERS=${LAYERS_A:-} NF=${NF_A:-} RELAX=${RELAX_A:-0} RELAX_ROUNDS=${RELAX_ROUNDS_A:-0} DMD=${DMD_A:-0} REFINE=${REFINE_A:-0} PAIR_T=${PAIR_T_A:-1} bash scripts/gpu_distill.sh "$deadline" "$pairs" "$batch" "$lr_a" &
NAME=distill_b RUN=${RUN_B:-runs/gkd_b} SEED=1 INIT=${INIT_B:-${INIT:-}} ANCHOR=${ANCHOR_B:-${ANCHOR:-}} LAYERS=${LAYERS_B:-} NF=${NF_B:-} RELAX=${RELAX_B:-0} RELAX_ROUNDS=${RELAX_ROUNDS_B:-0} DMD=${DMD_B:-0} REFINE=${REFINE_B:-0} PAIR_T=${PAIR_T_B:-1} bash scripts/gpu_distill.sh "$deadline" "$pairs" "$batch" "$lr_b" &

diffusion() {
  local run=runs/gdiff2 last minutes
  minutes=$(python3 -c "print(max(0.5, ($deadline - 50 - ($(date +%s) - $t_start)) / 60))")
  log "diffusion: from weights/edm-small-diffusion, batch $diff_batch, lr $diff_lr, $minutes min"
  MOLGEN_HOME=$PWD/.gpu/qm9 python3 -m molgen train --mode diffusion --init weights/edm-small-diffusion \
    --batch-size "$diff_batch" --lr "$diff_lr" --warmup 200 --steps 10000000 --ckpt-every 2000 --eval-every 4000 \
    --out "$run" --max-minutes "$minutes" >"$out/diffusion.txt" 2>&1
  log "diffusion: train rc $?: $(tail -1 "$out/diffusion.txt")"
  last=$(ls "$run/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
  [ -n "$last" ] || { log "diffusion: no checkpoint"; return 1; }
  python3 -m molgen export "$run" runs/w_diffusion >>"$out/diffusion.txt" 2>&1 || log "diffusion: export failed"
  tar -cf "$out/diffusion.tar" "$run/config.json" "$run/metrics.jsonl" "$run/checkpoints/$last" runs/w_diffusion
  log "diffusion: packed step $last"
}
if [ -n "${INIT_C:-}" ]; then
  NAME=distill_c RUN=${RUN_C:-runs/gkd_c} SEED=2 INIT=$INIT_C ANCHOR=${ANCHOR_C:-${ANCHOR:-}} LAYERS=${LAYERS_C:-} NF=${NF_C:-} RELAX=${RELAX_C:-0} RELAX_ROUNDS=${RELAX_ROUNDS_C:-0} DMD=${DMD_C:-0} REFINE=${REFINE_C:-0} PAIR_T=${PAIR_T_C:-1} bash scripts/gpu_distill.sh "$deadline" "$pairs" "$batch" "${LR_C:-2e-4}" &
else
  diffusion &
fi
wait
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader >>"$out/pipeline.txt" 2>&1
log "all done"

#!/usr/bin/env bash
# Runs ON the device machine, in the repo root (no data set needed: the teacher makes the training pairs).
# One call, one deadline: one-step distillation (`molgen train --mode distill`) of a consistency model onto
# the diffusion teacher's probability-flow ODE, then export; the result is copied to $OUT as soon as it exists.
#
#   bash scripts/gpu_distill.sh [DEADLINE_S=570] [PAIRS=200000] [BATCH=256] [LR=2e-4]
#
# Environment overrides:
#   INIT=DIR      student to start from (default weights/edm-small-distill, else weights/edm-small-ect)
#   ANCHOR=DIR    model whose low-noise f is kept (default weights/edm-small-ect)
#   TEACHER=DIR   diffusion teacher (default weights/edm-small-diffusion)
#   RUN=DIR       run folder (default runs/gkd; an existing one is resumed, its pairs reused)
#   SEED=N        seed of the new run: initial data order and the pairs' noise (default 0)
#   LAYERS=N      deepen the student to N blocks (`--layers`; the new blocks start as the identity)
#   NF=N          widen the student to N features (`--nf`; the new channels start silent)
#   RELAX=W       weight of the teacher-relaxation term (`--relax-weight`; default 0: off)
#   RELAX_ROUNDS=R  that term's target: the teacher's R-step refinement of the output, no noise
#                 (`--relax-rounds`; default 0: one call on a re-noised copy)
#   DMD=W         weight of distribution matching (`--dmd-weight`; default 0: off)
#   REFINE=R      targets: the student's own one-call molecules relaxed by R teacher calls (`--refine`;
#                 default 0: the teacher's ODE ends)
#   PAIR_T=T      draw the pairs' noise at temperature T (`--pair-temperature`; default 1)
#   NAME=NAME     prefix of what lands in $OUT: NAME.txt (log), NAME.tar (default distill); several
#                 instances with different NAME and RUN can share one GPU (scripts/gpu_parallel.sh)
set -uo pipefail
t_start=$(date +%s)
deadline=${1:-570}; pairs=${2:-200000}; batch=${3:-256}; lr=${4:-2e-4}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOLGEN_JAX_CACHE=/tmp/jaxcache
out=${OUT:-/tmp/out}; mkdir -p "$out"
init=${INIT:-weights/edm-small-distill}; [ -f "$init/params.msgpack" ] || init=weights/edm-small-ect
anchor=${ANCHOR:-weights/edm-small-ect}; teacher=${TEACHER:-weights/edm-small-diffusion}; run=${RUN:-runs/gkd}
seed=${SEED:-0}; name=${NAME:-distill}; layers=${LAYERS:+--layers $LAYERS}; layers="$layers${NF:+ --nf $NF}"; relax=${RELAX:-0}
refine=${REFINE:-0}; relax_rounds=${RELAX_ROUNDS:-0}; dmd=${DMD:-0}; pair_t=${PAIR_T:-1}
left() { echo $((deadline - ($(date +%s) - t_start))); }
log() { echo "[$(( $(date +%s) - t_start )) s] $name: $*" | tee -a "$out/pipeline.txt"; }
mkdir -p runs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$out/pipeline.txt"
if [ ! -f "$run/config.json" ]; then  # first call: solve the pairs (and take a step), so the rest is all training
  log "init $init, anchor $anchor, teacher $teacher, $pairs pairs, batch $batch, lr $lr, seed $seed ${layers} relax $relax x $relax_rounds refine $refine dmd $dmd pair-T $pair_t"
  python3 -m molgen train --mode distill --init "$init" --anchor "$anchor" --teacher "$teacher" --pairs "$pairs" \
    --batch-size "$batch" --lr "$lr" --warmup 100 --steps 10000000 --ckpt-every 1000 --eval-every 2000 \
    --seed "$seed" $layers --relax-weight "$relax" --relax-rounds "$relax_rounds" --dmd-weight "$dmd" --refine "$refine" --pair-temperature "$pair_t" --out "$run" --max-minutes 0.01 >>"$out/$name.txt" 2>&1
  log "pairs rc $?: $(tail -1 "$out/$name.txt")"
fi
train_min=$(python3 -c "print(max(0.5, ($(left) - 60) / 60))")  # keep ~60 s for export and packing
log "training $run for $train_min min"
python3 -m molgen train --resume --out "$run" --lr "$lr" --max-minutes "$train_min" >>"$out/$name.txt" 2>&1
log "train rc $?: $(tail -1 "$out/$name.txt")"
last=$(ls "$run/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1)
[ -n "$last" ] || { log "no checkpoint"; exit 1; }
python3 -m molgen export "$run" "runs/w_$name" >>"$out/$name.txt" 2>&1 || log "export failed"
tar -cf "$out/$name.tar" "$run/config.json" "$run/metrics.jsonl" "$run/checkpoints/$last" "runs/w_$name"
log "packed step $last; done"

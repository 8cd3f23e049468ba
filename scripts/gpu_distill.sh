#!/usr/bin/env bash
# One GPU run of distillation, in one call, to one deadline: a consistency model (INIT) learns from a diffusion
# teacher (TEACHER) with a recipe (RECIPE), then is exported and sampled (1000 molecules at 1 and at 4 calls, on
# the GPU, until the deadline), and everything comes back under $OUT: the log, the exported weights (split in
# < 16 MiB parts, put there before sampling), the samples, XLA's autotuning results (scripts/gpu_autotune.sh).
# Runs ON the device machine, in the repo root (no data set needed: the teacher makes the pairs); carry .whl (ase,
# to write XYZ) and .gpu (for .gpu/autotune; the data there is not read). On the CPU, DRY=1 rehearses every step
# with tiny sizes.
#
#   INIT=edm-small-stack TEACHER=edm-diffusion RECIPE=weights/edm-small-stack/recipe-2-gpu.toml \
#     bash scripts/gpu_distill.sh [DEADLINE_S=560]
#
# Environment: INIT, TEACHER, RECIPE (as above: the default model's GPU stage, batch 512 at the platform's
# precision), NAME (distilled: the folder and file names), SETS (more `--set` arguments, e.g. "--set
# distill.pairs=100000" or "--set distill.keep=stable"), SAMPLE_S (120: seconds kept for export and sampling),
# KERNELS_S (0: none; on a GPU that does not run scripts/gpu_teacher.sh's benchmarks, e.g. 60: seconds spent first
# on benchmarks/pair_kernels.py, which runs the `packed-kernel` layout's kernels of a batch-4096 bf16 256 x 9 step
# on this GPU against their array formulations and times them, into $OUT/bench.log).
set -uo pipefail
t_start=$(date +%s)
deadline=${1:-560}
init=${INIT:-edm-small-stack}; teacher=${TEACHER:-edm-diffusion}
recipe=${RECIPE:-weights/edm-small-stack/recipe-2-gpu.toml}; name=${NAME:-distilled}; sample_s=${SAMPLE_S:-120}
out=${OUT:-/tmp/out}; mkdir -p "$out" runs
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MOLGEN_JAX_CACHE=/tmp/jaxcache
if [ -d .whl ] && ! python3 -c "import ase" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
log() { echo "[$(( $(date +%s) - t_start )) s] $*" | tee -a "$out/pipeline.txt"; }
left() { echo $((deadline - ($(date +%s) - t_start))); }
extra=${SETS:-}; n_mol=1000
if [ "${DRY:-0}" = 1 ]; then extra="$extra --set distill.pairs=64 --set distill.teacher_steps=2 --batch-size 16 --steps 20"; n_mol=8; fi
run=runs/$name
log "distill $init from $teacher with $recipe $extra"
. scripts/gpu_autotune.sh && autotune_on && trap autotune_back EXIT
# a run folder and its export left by an earlier call on this machine are moved aside, not exported or sent again
for d in "$run" "runs/w_$name"; do
  if [ -e "$d" ]; then mv "$d" "$d.before-$t_start" && log "moved an earlier $d aside to $d.before-$t_start"; fi
done
kernels_s=${KERNELS_S:-0}
if [ "$kernels_s" -ge 25 ]; then
  kargs="--batch 4096 --features 256 --repeats 20"; [ "${DRY:-0}" = 1 ] && kargs="--batch 8 --features 64 --repeats 2"
  [ -s .gpu/qm9/qm9_v1.npz ] && kargs="$kargs --data-dir .gpu/qm9"
  echo "# $(date -u +%FT%TZ) benchmarks/pair_kernels.py $kargs --budget $((kernels_s - 20))" >>"$out/bench.log"
  timeout "$kernels_s" python3 benchmarks/pair_kernels.py $kargs --budget $((kernels_s - 20)) 2>&1 \
    | grep -E "^RESULT|^#|^FAILED|^SKIPPED|^BEST|Error" >>"$out/bench.log"
  log "pair kernels: $(grep -c '^RESULT' "$out/bench.log") results, $(grep -c -E '^FAILED|Error' "$out/bench.log") failed"
fi
train_min=$(python3 -c "print(max(0.3, ($(left) - $sample_s) / 60))")
python3 -m molgen train --recipe "$recipe" --init "$init" --teacher "$teacher" $extra --out "$run" \
  --max-minutes "$train_min" >"$out/train.txt" 2>&1
log "train rc $?: $(tail -1 "$out/train.txt")"
cp "$run/metrics.jsonl" "$out/metrics.jsonl" 2>/dev/null
python3 -m molgen export "$run" "runs/w_$name" --temperature 0.7 --renoise 0.2 >>"$out/train.txt" 2>&1 || log "export failed"
# the weights first: a call whose time runs out while sampling still brings the training back
tar -C runs -cf - "w_$name" | split -b 15m -d - "$out/weights.tar."
for k in 1 4; do
  sample_left=$(( $(left) - 5 ))
  if [ "$sample_left" -le 5 ]; then log "no time left to sample k=$k"; continue; fi
  # KILL: on SIGTERM molgen stops once the calls in flight return, which may be past the run's time
  timeout -s KILL "$sample_left" python3 -m molgen sample --checkpoint "runs/w_$name" -n "$n_mol" --steps "$k" --seed 0 \
    -o "$out/samples_k$k.xyz" --no-report >>"$out/train.txt" 2>&1
  log "sample k=$k rc $?"
done
log "done; in \$OUT: $(ls "$out" | tr '\n' ' ')"

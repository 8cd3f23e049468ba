#!/usr/bin/env bash
# One GPU run of distillation, in one call, to one deadline: a consistency model (INIT) learns from a diffusion
# teacher (TEACHER) with a recipe (RECIPE), then is exported and sampled (1000 molecules at 1 and at 4 calls, on
# the GPU, until the deadline), and everything comes back under $OUT: the log, the exported weights (split in
# < 16 MiB parts, put there before sampling), the samples, XLA's autotuning results (scripts/gpu_autotune.sh).
# Runs ON the device machine, in the repo root (the teacher makes the pairs); carry .whl (ase, to write XYZ) and
# .gpu (.gpu/autotune; .gpu/qm9 is the data folder, read only by a recipe with distill.balance, which resamples the
# pairs toward QM9's training split). On the CPU, DRY=1 rehearses every step with tiny sizes.
#
#   bash scripts/gpu_distill.sh [DEADLINE_S=560]
#
# By default it trains the default model (weights/DEFAULT) one round further at the GPU's scale: its trained stack
# (`molgen export DEFAULT runs/default-stack --unstack`, made here), its own recipe (its recipe.toml) with new draws
# (the recipe's seed + 1) and more of them (SETS: "--set distill.pairs=120000 --steps 3000", about as many epochs
# as the recipe's 900 steps on 36,000 draws), its teacher, and the default's polishing stages appended again (with
# the default's type biases and polisher in meta.json, so that the samples are drawn as the default's).
# Another start: e.g. INIT=edm-small-stack TEACHER=edm-diffusion RECIPE=weights/edm-small-stack/recipe-2-gpu.toml.
#
# Environment: INIT, TEACHER, RECIPE (as above), NAME (distilled: the folder and file names), SETS (more `train`
# arguments, e.g. "--set distill.pairs=100000"; with RECIPE or INIT given, none by default), STAGES_FROM (the
# default's polisher by default, none with INIT given; e.g. edm-small-polisher: the exported stack gets 4 polishing
# stages of that model appended, `molgen export --stack 4 --stages-from`), SAMPLE_S (120: seconds kept for export
# and sampling),
# KERNELS_S (0: none; on a GPU that does not run scripts/gpu_teacher.sh's benchmarks, e.g. 60: seconds spent first
# on benchmarks/pair_kernels.py, which runs the `packed-kernel` layout's kernels of a batch-4096 bf16 256 x 9 step
# on this GPU against their array formulations and times them, into $OUT/bench.log).
set -uo pipefail
t_start=$(date +%s)
deadline=${1:-560}
name=${NAME:-distilled}; sample_s=${SAMPLE_S:-120}
out=${OUT:-/tmp/out}; mkdir -p "$out" runs
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MOLGEN_JAX_CACHE=/tmp/jaxcache
if [ -s .gpu/qm9/qm9_v1.npz ]; then export MOLGEN_HOME=$PWD/.gpu/qm9; fi
if [ -d .whl ] && ! python3 -c "import ase" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
log() { echo "[$(( $(date +%s) - t_start )) s] $*" | tee -a "$out/pipeline.txt"; }
left() { echo $((deadline - ($(date +%s) - t_start))); }
default=$(cat weights/DEFAULT)
# the default's recipe's seed, its teacher (config.json) and its polisher (meta.json)
read -r d_seed d_teacher d_polisher < <(python3 -c "
import json, tomllib
r = tomllib.load(open('weights/$default/recipe.toml', 'rb')); m = json.load(open('weights/$default/meta.json'))
c = json.load(open('weights/$default/config.json'))
print(r.get('seed', 0) + 1, c.get('distill', {}).get('teacher') or 'edm-diffusion', m.get('polisher') or '-')")
if [ -z "${INIT:-}" ]; then
  init=runs/default-stack
  # made again each time: one left by an earlier call may be an earlier default's
  python3 -m molgen export "$default" "$init" --unstack --force >>"$out/pipeline.txt" 2>&1 \
    || { log "could not unstack $default into $init"; exit 1; }
  stages_from=${STAGES_FROM-$d_polisher}
else
  init=$INIT; stages_from=${STAGES_FROM:-}
fi
[ "$stages_from" = - ] && stages_from=
teacher=${TEACHER:-$d_teacher}
if [ -z "${RECIPE:-}" ] && [ -z "${INIT:-}" ]; then
  recipe=weights/$default/recipe.toml; extra=${SETS---set distill.pairs=120000 --steps 3000 --seed $d_seed}
else
  recipe=${RECIPE:-weights/$default/recipe.toml}; extra=${SETS:-}
fi
n_mol=1000
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
# the trained stack gets that diffusion model's 4 polishing stages appended, as the default's were
stack=${stages_from:+--stack 4 --stages-from $stages_from}
python3 -m molgen export "$run" "runs/w_$name" --temperature 0.7 --renoise 0.2 $stack >>"$out/train.txt" 2>&1 \
  || log "export failed"
if [ -z "${INIT:-}" ] && [ -s "runs/w_$name/meta.json" ]; then
  # the default's sampling settings, so that its samples here (and its figures later) are read as the default's
  python3 -c "
import json
d, m = json.load(open('weights/$default/meta.json')), json.load(open('runs/w_$name/meta.json'))
m.update({k: d[k] for k in ('type_bias', 'type_bias_one_call', 'polisher') if k in d})
json.dump(m, open('runs/w_$name/meta.json', 'w'), indent=2)" || log "could not copy $default's sampling settings"
fi
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

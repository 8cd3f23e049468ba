#!/usr/bin/env bash
# One GPU run of the teacher campaign (docs/training.md, "The teacher"), in one call, to one deadline:
#   1. benchmarks, side by side on the same GPU: molgen's training loop (benchmarks/train_step.py) and EDM's
#      own PyTorch training step (benchmarks/edm_pytorch.py, EDM's code carried in .edm/, never committed);
#      before molgen's: the pair MLPs' gradient kernels alone at batch 4096 in several launch settings
#      (benchmarks/pair_kernels.py; the fastest that agrees with their array formulations is exported as
#      MOLGEN_PAIR_KERNELS to every molgen process after it; skipped where MOLGEN_PAIR_KERNELS is set or no
#      measurement is packed-kernel); with a JAX before 0.11 (0.11 and 0.12 write native atomics either way),
#      whether XLA's flush-to-zero mode makes scatter-adds native atomics here (benchmarks/scatter_atomics.py
#      --ab): if it speeds them up >= 1.2x, every molgen process after it runs with XLA_FLAGS=--xla_gpu_ftz=true;
#      then the neighbour sums of a batch-4096 step alone (by sorted receivers, by senders, by reversed pairs);
#   2. the teacher: continues weights/$TEACHER (its EMA parameters; Adam restarts with a short warm-up) or, the
#      first time, starts a new one; trains until the deadline leaves time for 3. and 4., logging the EMA
#      parameters' validation loss every EVAL_EVERY steps;
#   3. exports it and puts its weights under $OUT (split in < 16 MiB parts);
#   4. samples 1000 molecules with 1000 calls on the GPU (XYZ) until the deadline; logs and the benchmark log
#      are under $OUT too.
# Runs ON the device machine, in the repo root, with .gpu (.gpu/qm9: the training split and 1024 validation molecules, scripts/gpu_stage.py),
# .edm and .whl (ase, to write XYZ) carried. On the CPU, DRY=1 runs every step with tiny sizes (a rehearsal).
#
#   bash scripts/gpu_teacher.sh [DEADLINE_S=570]
#
# Environment: TEACHER (edm-diffusion), MODEL (edm: the preset of a new teacher), BATCH (256), LR (3e-4;
# docs/training.md, "The teacher campaign"), EVAL_EVERY (2000: steps between validation losses; the staged cache
# holds the first 1024 validation molecules),
# WARMUP (500; 2000 for a new teacher), PRECISION and LAYOUT (default: the fastest pair measured in 1. at the
# training batch; tf32 and packed without a measurement), BENCH_RUNS (molgen's measurements, preset:batch:precision:layout,
# comma-separated, in order; default below), EDM_BATCHES (64,256,1024: EDM's code's), EDM_S (120: the most seconds
# for EDM's), PAIR_S (60: the most seconds for the pair kernels' settings), MOLGEN_BENCH_MIN_S (230: the seconds
# EDM's, the pair kernels' and the neighbour sums' benchmarks leave to molgen's), BENCH_S (150: seconds for
# molgen's benchmarks, each measurement's last chunk profiled: where the time went, in the benchmark log), BENCH_TOTAL_S (350: all the
# benchmarks together end by then, counted from the start, so that the teacher trains at least
# DEADLINE - BENCH_TOTAL_S - SAMPLE_S seconds; EDM's benchmark gets at most EDM_S, leaving MOLGEN_BENCH_MIN_S
# and PAIR_S; the pair kernels' at most PAIR_S and the neighbour sums' 40 s, each leaving MOLGEN_BENCH_MIN_S; the
# scatter-adds' flush-to-zero test 80 s, leaving 150 s; one that would get under 20 s (the pair kernels': 25 s;
# the sums: 15 s) is skipped),
# MEASURE_S (110: the most seconds one measurement of molgen's may take; a process of its own), MIN_MEASURE_S (50:
# a measurement that would get less is skipped), SAMPLE_S (75: seconds kept for export and sampling), FTZ (1 / 0: force flush-to-zero on / off instead of measuring), SEED (the run's seed; default: the number of earlier
# GPU runs, so each run draws new batches), RESUME (1: a second call on the same machine, right after the first:
# no benchmarks; continues runs/teacher exactly, with the first call's XLA flags, then exports and samples again;
# the teacher's gpu_runs entry then covers both calls), BENCH_ONLY (1: a first call that only benchmarks, with
# all its time; it leaves its choice of precision, layout, flush-to-zero and pair kernels' settings in
# runs/bench_choice, which the next call on the same machine trains with, skipping the benchmarks).
set -uo pipefail
t_start=$(date +%s)
deadline=${1:-570}
teacher=${TEACHER:-edm-diffusion}; model=${MODEL:-edm}; batch=${BATCH:-256}; lr=${LR:-3e-4}
bench_s=${BENCH_S:-150}; sample_s=${SAMPLE_S:-75}; bench_total=${BENCH_TOTAL_S:-350}
if [ "${BENCH_ONLY:-0}" = 1 ]; then bench_s=${BENCH_S:-100000}; bench_total=${BENCH_TOTAL_S:-$((deadline - 10))}; fi
out=${OUT:-/tmp/out}; mkdir -p "$out" runs
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MOLGEN_HOME=$PWD/.gpu/qm9 MOLGEN_JAX_CACHE=/tmp/jaxcache
if [ -d .whl ] && ! python3 -c "import ase" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
log() { echo "[$(( $(date +%s) - t_start )) s] $*" | tee -a "$out/pipeline.txt"; }
left() { echo $((deadline - ($(date +%s) - t_start))); }
cap() {  # a benchmark's seconds: at most $1, and $2 (default 0) left for the benchmarks after it
  local b=$((bench_total - ($(date +%s) - t_start) - ${2:-0})); echo $(( $1 < b ? $1 : b )); }
runs_before=$(python3 -c "import json,sys; print(len(json.load(open('weights/$teacher/meta.json')).get('gpu_runs', [])))" 2>/dev/null || echo 0)
seed=${SEED:-$runs_before}
run=runs/teacher
resume=0
if [ "${RESUME:-0}" = 1 ] && [ -n "$(ls "$run/checkpoints" 2>/dev/null)" ]; then
  resume=1; bench_s=0
  [ -s "$run/xla_flags" ] && export XLA_FLAGS="$(cat "$run/xla_flags")"
  [ -s "$run/pair_kernels" ] && export MOLGEN_PAIR_KERNELS="$(cat "$run/pair_kernels")"
elif [ "${BENCH_ONLY:-0}" != 1 ] && [ -z "${BENCH_S:-}" ] && [ -s runs/bench_choice ]; then
  # a BENCH_ONLY call came first on this machine: train with what it measured
  read -r c_precision c_layout c_ftz c_tune <runs/bench_choice
  bench_s=0; PRECISION=${PRECISION:-$c_precision}; LAYOUT=${LAYOUT:-$c_layout}; FTZ=${FTZ:-$c_ftz}
  [ -z "${MOLGEN_PAIR_KERNELS:-}" ] && [ "${c_tune:--}" != - ] && export MOLGEN_PAIR_KERNELS=$c_tune
fi

if [ "${DRY:-0}" = 1 ]; then  # the CPU rehearsal: every step, tiny sizes
  bench_runs=tiny:16:float32:packed,tiny:16:float32:grouped,tiny:16:bf16:packed,tiny:16:bf16:grouped,tiny:16:bf16:packed-kernel
  edm_args="--presets small --batch-sizes 8 --device cpu --repeats 1 --warmup 1"
  scatter_args="--molecules 64 --features 32 --repeats 3 --dtypes float32 --pad-rows 20 --pad-edges 700"
  sums_args="--molecules 64 --features 32 --repeats 3 --dtypes bfloat16 --accumulate float32 --spread-only --pad-rows 20 --pad-edges 700"
  pair_args="--batch 8 --features 64 --repeats 2"
  model=tiny; batch=16; n_mol=8; calls=10; resume_extra="--steps 120"
  train_extra="--steps 60 --set optim.ckpt_every=50 --set optim.eval_every=${EVAL_EVERY:-50}"
  bench_chunk="--chunk 5 --repeats 2"
else
  # In this order, as far as the time goes (each measurement a process of its own, so that one that fails, a
  # kernel that faults included, costs only itself): bf16 at 4096 with the pair MLPs' kernels (packed-kernel; the
  # 40,000 target), the same without them (37,294 on 2026-12-04 before the gathers' gradients were summed by
  # sorted indices), tf32 with and without them and bf16 at the training batch (the teacher trains with the
  # fastest; tf32 made 17,514 at 256 on 2026-12-04), tf32 and bf16 at EDM's batch 64 (the ratio to EDM's code
  # at its batch), then the rest. A measurement listed twice runs once. Compiling takes 33-43 s a measurement on
  # a fresh machine: ~60-70 s each.
  bench_runs=edm:4096:bf16:packed-kernel,edm:4096:bf16:packed,edm:$batch:tf32:packed-kernel,edm:$batch:tf32:packed
  bench_runs=$bench_runs,edm:$batch:bf16:packed,edm:64:tf32:packed,edm:64:bf16:packed,edm:2048:bf16:packed
  bench_runs=$bench_runs,edm:1024:bf16:packed,edm:2048:bf16:grouped
  bench_runs=${BENCH_RUNS:-$bench_runs}
  bench_runs=$(echo "$bench_runs" | tr , '\n' | awk '!seen[$0]++' | paste -sd, -)
  scatter_args="--molecules 1024 --features 256 --repeats 20 --dtypes float32"
  # the neighbour sums of a batch-4096 step alone: by sorted receivers, by senders, by reversed pairs
  sums_args="--molecules 4096 --features 256 --repeats 20 --dtypes bfloat16 --accumulate float32 --spread-only --pad-rows 900 --pad-edges 10000"
  # the pair kernels of a batch-4096 bf16 step alone, in each launch setting (the script's list)
  pair_args="--batch 4096 --features 256 --repeats 20"
  edm_args="--presets edm --batch-sizes ${EDM_BATCHES:-64,256,1024} --device cuda --repeats 10 --warmup 3"
  n_mol=1000; calls=1000; resume_extra=""
  train_extra="--steps 100000000 --set optim.ckpt_every=4000 --set optim.eval_every=${EVAL_EVERY:-2000}"
  bench_chunk="--chunk 50 --repeats 4"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | grep -v WARNING | tee -a "$out/pipeline.txt"
log "teacher $teacher (earlier GPU runs: $runs_before), seed $seed, batch $batch, lr $lr, resume $resume"
. scripts/gpu_autotune.sh && autotune_on && trap autotune_back EXIT

# 1. Benchmarks: EDM's code (first, so that it is measured whatever happens later), then molgen's, on the same
#    GPU (BENCH_S=0: none).
bench="$out/bench.log"
if [ "$bench_s" -gt 0 ]; then
pair_on=0; [ -z "${MOLGEN_PAIR_KERNELS:-}" ] && [[ $bench_runs == *packed-kernel* ]] && pair_on=1
edm_s=$(cap "${EDM_S:-120}" $(( ${MOLGEN_BENCH_MIN_S:-230} + pair_on * ${PAIR_S:-60} )))
if [ -d .edm ] && python3 -c "import torch" 2>/dev/null && [ "$edm_s" -ge 20 ]; then
  echo "# $(date -u +%FT%TZ) benchmarks/edm_pytorch.py $edm_args --no-sampling" >>"$bench"
  timeout "$edm_s" python3 benchmarks/edm_pytorch.py --edm-repo .edm --cache .gpu/qm9/qm9_v1.npz $edm_args --no-sampling \
    2>&1 | grep -E "^RESULT|^torch|Error" | tee -a "$bench"
  log "EDM benchmark done"
else
  log "EDM benchmark skipped (no .edm, no torch or no time)"
fi
pair_s=$(cap "${PAIR_S:-60}" "${MOLGEN_BENCH_MIN_S:-230}")
if [ "$pair_on" = 1 ] && [ "$pair_s" -ge 25 ]; then
  echo "# $(date -u +%FT%TZ) benchmarks/pair_kernels.py $pair_args --budget $((pair_s - 20))" >>"$bench"
  tune=$(timeout "$pair_s" python3 benchmarks/pair_kernels.py $pair_args --budget $((pair_s - 20)) 2>&1 \
    | grep -E "^RESULT|^#|^FAILED|^SKIPPED|^BEST|Error" | tee -a "$bench" | sed -n 's/^BEST MOLGEN_PAIR_KERNELS=//p')
  [ -n "$tune" ] && export MOLGEN_PAIR_KERNELS=$tune
fi
log "pair kernels' settings: ${MOLGEN_PAIR_KERNELS:-the defaults}"
speedup=""
# JAX 0.11's and 0.12's compilers write native float32 atomic adds (4 values an instruction) for a scatter-add on
# an H200 without flush-to-zero (benchmarks/gpu_compile.py --atomics): nothing to measure from 0.11 on
[ -z "${FTZ:-}" ] && python3 -c "import jax, sys; sys.exit(tuple(map(int, jax.__version__.split('.')[:2])) < (0, 11))" \
  2>/dev/null && FTZ=0
scatter_s=$(cap 80 150)
if [ -z "${FTZ:-}" ] && [ "$scatter_s" -ge 20 ]; then
  echo "# $(date -u +%FT%TZ) benchmarks/scatter_atomics.py --ab $scatter_args" >>"$bench"
  speedup=$(timeout "$scatter_s" python3 benchmarks/scatter_atomics.py --ab $scatter_args 2>&1 \
    | grep -E "^RESULT|^#|^FTZ" | tee -a "$bench" | awk '/^FTZ_SPEEDUP/ {print $2}')
fi
log "scatter-adds with flush-to-zero: $([ -n "$speedup" ] && echo "${speedup}x as fast" || echo "not measured")"
if [ -z "${FTZ:-}" ] && python3 -c "import sys; sys.exit(float('${speedup:-1}') < 1.2)"; then FTZ=1; fi
sums_s=$(cap 40 "${MOLGEN_BENCH_MIN_S:-230}")
if [ "$sums_s" -ge 15 ]; then
  echo "# $(date -u +%FT%TZ) benchmarks/scatter_atomics.py $sums_args" >>"$bench"
  timeout "$sums_s" python3 benchmarks/scatter_atomics.py $sums_args 2>&1 | grep -E "^RESULT|^#" | tee -a "$bench"
fi
[ "${FTZ:-0}" = 1 ] && export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_ftz=true"
molgen_end=$(( $(date +%s) - t_start + $(cap $((bench_s + 90))) ))  # molgen's benchmarks end by then (s from the start)
echo "# $(date -u +%FT%TZ) benchmarks/train_step.py, one process a measurement: $bench_runs" \
  "(XLA_FLAGS=${XLA_FLAGS:-}, MOLGEN_PAIR_KERNELS=${MOLGEN_PAIR_KERNELS:-})" >>"$bench"
for r in $(echo "$bench_runs" | tr , ' '); do
  m_s=$(( molgen_end - ($(date +%s) - t_start) )); [ "$m_s" -gt "${MEASURE_S:-110}" ] && m_s=${MEASURE_S:-110}
  if [ "$m_s" -lt "${MIN_MEASURE_S:-50}" ]; then echo "SKIPPED molgen $r (benchmark time spent)" | tee -a "$bench"; continue; fi
  timeout "$m_s" python3 benchmarks/train_step.py --runs "$r" $bench_chunk --cache "$MOLGEN_JAX_CACHE" \
    --profile /tmp/profile --profile-top 20 2>&1 | grep -v -E "^WARNING|^I0000|^E0000" | tee -a "$bench"
  rc=${PIPESTATUS[0]}; why="exit $rc"; [ "$rc" = 124 ] && why="timeout after $m_s s"
  [ "$rc" != 0 ] && echo "FAILED molgen $r ($why)" | tee -a "$bench"
done
log "molgen benchmark done"
fi
[ "$bench_s" -le 0 ] && [ "$resume" = 0 ] && [ "${FTZ:-0}" = 1 ] && export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_ftz=true"
log "XLA_FLAGS for training and sampling: ${XLA_FLAGS:-none}"
# The fastest (precision, layout) measured at the training batch, unless PRECISION / LAYOUT say otherwise.
read -r best_precision best_layout < <(python3 - "$bench" "$batch" <<'EOF'
import re, sys
best = (0.0, "tf32", "packed")
try:
    for line in open(sys.argv[1]):
        m = re.match(r"RESULT molgen \S+ batch=(\d+) molecules_per_s=(\d+) precision=(\S+) layout=(\S+)", line)
        if m and m.group(1) == sys.argv[2]:
            best = max(best, (float(m.group(2)), m.group(3), m.group(4)))
except OSError:
    pass
print(best[1], best[2])
EOF
)
precision=${PRECISION:-$best_precision}; layout=${LAYOUT:-$best_layout}
if [ "${BENCH_ONLY:-0}" = 1 ]; then
  echo "$precision $layout ${FTZ:-0} ${MOLGEN_PAIR_KERNELS:--}" >runs/bench_choice
  log "benchmarks only: the next call trains with precision $precision, layout $layout, flush-to-zero ${FTZ:-0}," \
    "pair kernels ${MOLGEN_PAIR_KERNELS:-default}"
  exit 0
fi
[ "$resume" = 0 ] && log "training precision $precision, layout $layout"

# 2. The teacher. A run folder left by an earlier call on this machine is moved aside, not exported again
# (RESUME=1 continues one).
if [ "$resume" = 0 ] && [ -e "$run" ]; then
  mv "$run" "$run.before-$t_start" && log "moved an earlier $run aside to $run.before-$t_start (RESUME=1 continues it)"
fi
train_min=$(python3 -c "print(max(0.3, ($(left) - $sample_s) / 60))")
if [ "$resume" = 1 ]; then
  start=$(cat "$run/start" 2>/dev/null)
  log "continuing $run for $train_min min"
  python3 -m molgen train --resume --out "$run" $resume_extra --max-minutes "$train_min" >"$out/train.txt" 2>&1
  log "train rc $?: $(tail -1 "$out/train.txt")"
elif [ -f "weights/$teacher/params.msgpack" ]; then
  start="--init weights/$teacher --set optim.warmup=${WARMUP:-500}"
else
  start="--model $model --set optim.warmup=${WARMUP:-2000}"
fi
if [ "$resume" = 0 ]; then
log "training $run for $train_min min: $start"
python3 -m molgen train --recipe diffusion $start --batch-size "$batch" --lr "$lr" --precision "$precision" \
  --set optim.layout="$layout" --seed "$seed" $train_extra --out "$run" \
  --max-minutes "$train_min" >"$out/train.txt" 2>&1
log "train rc $?: $(tail -1 "$out/train.txt")"
if [ -z "$(ls "$run/checkpoints" 2>/dev/null)" ] && { [ "$precision/$layout" != tf32/packed ] || [ "${FTZ:-0}" = 1 ]; }; then
  # a failed start: once more with the settings of the earlier runs
  rm -rf "$run"; train_min=$(python3 -c "print(max(0.3, ($(left) - $sample_s) / 60))")
  export XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed 's/--xla_gpu_ftz=true//')"
  log "no checkpoint: again with tf32, packed, XLA_FLAGS '${XLA_FLAGS}' for $train_min min"
  python3 -m molgen train --recipe diffusion $start --batch-size "$batch" --lr "$lr" --precision tf32 \
    --set optim.layout=packed --seed "$seed" $train_extra --out "$run" \
    --max-minutes "$train_min" >>"$out/train.txt" 2>&1
  log "train rc $?: $(tail -1 "$out/train.txt")"
fi
[ -d "$run" ] && { echo "$start" >"$run/start"; echo "${XLA_FLAGS:-}" >"$run/xla_flags"
  echo "${MOLGEN_PAIR_KERNELS:-}" >"$run/pair_kernels"; }  # for RESUME=1
fi
cp "$run/metrics.jsonl" "$out/metrics.jsonl" 2>/dev/null

# 3. Export.
rm -rf "runs/w_$teacher"
python3 -m molgen export "$run" "runs/w_$teacher" >>"$out/train.txt" 2>&1 || log "export failed"
python3 - "$run" "runs/w_$teacher" "$teacher" "$seed" "$batch" "$lr" "$start" <<'EOF' >>"$out/train.txt" 2>&1
import json, os, sys, time
import jax
run, dest, name, seed, batch, lr, start = sys.argv[1:]
optim = json.load(open(f"{run}/config.json"))["optim"]
precision, layout = optim["precision"], optim.get("layout", "packed")
lines = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
meta_old = {}
try:
    meta_old = json.load(open(f"weights/{name}/meta.json"))
except OSError:
    pass
runs = meta_old.get("gpu_runs", [])
rates = sorted(l["steps_per_s"] for l in lines[1:]) or [0]
vals = [round(l["val_loss"], 4) for l in lines if "val_loss" in l]  # the EMA parameters', first and last
trained = [round(l["val_loss_trained"], 4) for l in lines if "val_loss_trained" in l]  # the trained ones'
seconds, last = 0.0, 0.0  # the log's clock restarts with each process of a resumed run
for l in lines:
    if l["time"] < last:
        seconds += last
    last = l["time"]
seconds = round(seconds + last, 2)
runs.append({"date": time.strftime("%Y-%m-%d", time.gmtime()), "device": jax.devices()[0].device_kind,
             "steps": lines[-1]["step"], "seconds": seconds, "median_steps_per_s": rates[len(rates) // 2],
             "seed": int(seed), "last_loss": lines[-1]["loss"], "batch": int(batch), "lr": float(lr),
             "precision": precision, "layout": layout, "val_loss": [vals[0], vals[-1]] if vals else None,
             "val_loss_trained": [trained[0], trained[-1]] if trained else None,
             "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "pair_kernels": os.environ.get("MOLGEN_PAIR_KERNELS", "") if layout == "packed-kernel" else "",
             "start": start, "epochs": round(lines[-1]["step"] * int(batch) / 100000, 1)})
meta = json.load(open(f"{dest}/meta.json"))
meta["gpu_runs"] = runs
meta["step"] = sum(r["steps"] for r in runs)
json.dump(meta, open(f"{dest}/meta.json", "w"), indent=2)
print("gpu_runs", runs[-1])
EOF
# 4. Bring back the weights folder first (split under the 16 MiB limit per file): if the call's time runs out while
#    sampling, the training still comes back (scripts/gpu_ingest.py --no-samples lands it without a point).
tar -C runs -cf - "w_$teacher" | split -b 15m -d - "$out/weights.tar."
sample_left=$(( $(left) - 5 ))
if [ "$sample_left" -gt 5 ]; then
  log "exported, weights in \$OUT; sampling $n_mol molecules with $calls calls (at most $sample_left s)"
  # KILL: on SIGTERM molgen stops once the calls in flight return, which may be past the run's time
  timeout -s KILL "$sample_left" python3 -m molgen sample --checkpoint "runs/w_$teacher" -n "$n_mol" --steps "$calls" \
    --seed 0 -o "$out/samples.xyz" --no-report >>"$out/train.txt" 2>&1
  log "sample rc $?"
else
  log "exported, weights in \$OUT; no time left to sample"
fi
nvidia-smi --query-gpu=memory.used --format=csv,noheader >>"$out/pipeline.txt" 2>&1
log "done; in \$OUT: $(ls "$out" | tr '\n' ' ')"

#!/usr/bin/env bash
# Runs ON the device machine, in the repo root, with .gpu/ carried (see scripts/gpu_prepare.sh).
# 1. GPU step times of the presets (benchmarks/train_step.py), 2. resumes the staged run for MINUTES of
# training (checkpoints as it goes; --max-minutes stops it cleanly), 3. packs the run into $OUT/run.tar.
# JAX with CUDA, flax, optax, orbax, typer and rich are on the device; molgen runs from the source tree.
#
#   bash scripts/gpu_train.sh [MINUTES] [EXTRA_STEPS]
set -uo pipefail
minutes=${1:-7}
extra=${2:-200000}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOLGEN_HOME=$PWD/.gpu/qm9 MOLGEN_JAX_CACHE=/tmp/jaxcache
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$out/device.txt"
timeout 150 python3 benchmarks/train_step.py --presets small,edm --repeats 20 --forward-batch 1000 2>&1 \
  | grep -v "^WARNING" | tee "$out/bench_gpu.txt"
step=$(ls .gpu/run/checkpoints | sort -n | tail -1)
python3 -m molgen train --resume --out .gpu/run --steps $((step + extra)) --max-minutes "$minutes" 2>&1 \
  | tail -20 | tee "$out/train.txt"
last=$(ls .gpu/run/checkpoints | sort -n | tail -1)
tar -C .gpu -cf "$out/run.tar" run/config.json run/metrics.jsonl "run/checkpoints/$last"
echo "trained from step $step to $last" | tee -a "$out/train.txt"

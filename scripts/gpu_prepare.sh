#!/usr/bin/env bash
# Stage what one device (GPU) call needs under .gpu/ (git-ignored): the processed QM9 cache and a training run
# folder with only its latest checkpoint.  Then call the device tool with carry [".gpu"] and the command
#     bash scripts/gpu_train.sh MINUTES
# and unpack what comes back with scripts/gpu_unpack.sh.
#
#   scripts/gpu_prepare.sh RUN_DIR [QM9_CACHE_DIR]
set -euo pipefail
run=${1:?usage: scripts/gpu_prepare.sh RUN_DIR [QM9_CACHE_DIR]}
cache=${2:-${MOLGEN_HOME:-$HOME/.cache/molgen}}
[ -f "$run/config.json" ] || { echo "no config.json in $run" >&2; exit 2; }
[ -f "$cache/qm9_v1.npz" ] || { echo "no qm9_v1.npz in $cache (run molgen download)" >&2; exit 2; }
last=$(ls "$run/checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -1)
rm -rf .gpu && mkdir -p .gpu/qm9 .gpu/run/checkpoints
cp "$cache/qm9_v1.npz" "$cache/qm9_v1.json" .gpu/qm9/
cp "$run/config.json" .gpu/run/
[ -f "$run/metrics.jsonl" ] && cp "$run/metrics.jsonl" .gpu/run/
cp -r "$run/checkpoints/$last" .gpu/run/checkpoints/
echo "$run" > .gpu/source_run
du -sh .gpu
echo "staged $run at step $last"

#!/usr/bin/env bash
# Unpack a device call's run.tar into a run folder here (its latest checkpoint becomes the run's newest).
#   scripts/gpu_unpack.sh FILES_AT_DIR RUN_DIR
set -euo pipefail
src=${1:?usage: scripts/gpu_unpack.sh FILES_AT_DIR RUN_DIR}; run=${2:?RUN_DIR}
tmp=$(mktemp -d); tar -C "$tmp" -xf "$src/run.tar"
mkdir -p "$run/checkpoints"
cp "$tmp/run/config.json" "$tmp/run/metrics.jsonl" "$run/"
cp -r "$tmp"/run/checkpoints/* "$run/checkpoints/"
rm -rf "$tmp"
echo "unpacked into $run: checkpoints $(ls "$run/checkpoints" | sort -n | tr '\n' ' ')"

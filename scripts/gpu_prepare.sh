#!/usr/bin/env bash
# Prepare, on a machine with the project installed (README.md), everything a GPU run of scripts/gpu_teacher.sh or
# scripts/gpu_distill.sh carries, then rehearse both with DRY=1 in a temporary clone of the committed code:
#   .gpu/qm9  the QM9 cache's training split alone (scripts/gpu_stage.py; `molgen download` first when there is no
#             cache);
#   .edm      EDM's public PyTorch code, for benchmarks/edm_pytorch.py: exported from EDM_REPO, a clone of
#             github.com/ehoogeboom/e3_diffusion_for_molecules (a work tree or a bare git directory); it is never
#             committed (.gitignore);
#   .whl      ase's wheel (the GPU image has numpy, scipy and matplotlib, not ase), to write the samples as XYZ.
#
#   bash scripts/gpu_prepare.sh [EDM_REPO]
#
# What exists is kept (delete it to make it again). Environment: REHEARSE (1; 0 skips the rehearsal), PYTHON
# (python3: the project's interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
edm_repo=${1:-}
if [ ! -s .gpu/qm9/qm9_v1.npz ]; then
  "$py" -c "from molgen.data.qm9 import load_qm9; load_qm9(None)" 2>/dev/null || "$py" -m molgen download
  "$py" scripts/gpu_stage.py
fi
if [ ! -d .edm ]; then
  if [ -z "$edm_repo" ]; then
    echo "no .edm: give a clone of EDM's repository (github.com/ehoogeboom/e3_diffusion_for_molecules) as EDM_REPO" >&2
    exit 2
  fi
  if [ -d "$edm_repo/.git" ]; then git=(git -C "$edm_repo"); else git=(git --git-dir="$edm_repo"); fi
  rm -rf .edm.tmp && mkdir .edm.tmp
  # its Python files only (what benchmarks/edm_pytorch.py imports; a shallow mirror may lack the large data files)
  # (git archive names the absent blobs on stderr, and still writes the files asked for)
  "${git[@]}" ls-tree -r -z --name-only HEAD | grep -z '\.py$' | xargs -0 "${git[@]}" archive HEAD -- 2>/dev/null \
    | tar -x -C .edm.tmp
  for f in egnn/egnn_new.py equivariant_diffusion/en_diffusion.py qm9/models.py; do
    [ -s ".edm.tmp/$f" ] || { echo "$edm_repo: no $f; is it a clone of EDM's repository?" >&2; exit 2; }
  done
  mv .edm.tmp .edm
fi
ls .whl/ase-*.whl >/dev/null 2>&1 || "$py" -m pip download -q --no-deps --only-binary=:all: -d .whl ase
echo "carry: .gpu ($(du -sh .gpu | cut -f1)), .edm ($(du -sh .edm | cut -f1)), .whl ($(ls .whl))"
[ "${REHEARSE:-1}" = 1 ] || exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone -q . "$tmp/repo"
for d in .gpu .edm .whl; do ln -s "$PWD/$d" "$tmp/repo/$d"; done
bin=$(cd "$(dirname "$(command -v "$py")")" && pwd)  # its python3 first on PATH, as the scripts call python3
for s in gpu_teacher.sh gpu_distill.sh; do
  out="$tmp/out-$s"
  (cd "$tmp/repo" && PATH="$bin:$PATH" DRY=1 KERNELS_S=60 OUT="$out" bash "scripts/$s" > "$tmp/$s.log" 2>&1) || true
  # the scripts go on past a failed step (to bring back what they have): a rehearsal passes on what came out
  # every benchmark ran too: none failed, none missing from the log (a failed one is a line there, not an exit)
  failed=$(grep -E "FAILED|failed|Error|SKIPPED" "$out/bench.log" 2>/dev/null | head -5 || true)
  if [ -n "$failed" ]; then
    echo "rehearsal: DRY=1 bash scripts/$s: a benchmark failed or was skipped:" >&2; echo "$failed" >&2; exit 1
  fi
  if [ -s "$out/weights.tar.00" ] && ls "$out"/samples*.xyz >/dev/null 2>&1 && ! grep -q " rc [1-9]" "$out/pipeline.txt"; then
    echo "rehearsal: DRY=1 bash scripts/$s: weights and samples written ($(tail -1 "$out/pipeline.txt" | cut -c1-60)...)"
  else
    echo "rehearsal: DRY=1 bash scripts/$s did not bring back weights and samples; its log's end:" >&2
    tail -20 "$tmp/$s.log" >&2
    exit 1
  fi
done

# XLA's GPU autotuning results (which kernel each matrix product and fusion runs fastest with), kept between GPU
# runs: sourced by scripts/gpu_teacher.sh and scripts/gpu_distill.sh after their log(). Compiling the 256 x 9
# training step took 33-43 s a process on a fresh H200 machine, much of it autotuning; with the results of an
# earlier run for the same fusions XLA reads them instead. They live in .gpu/autotune (carried with .gpu; not in
# git); each call brings its copy back as $OUT/autotune.tar, to unpack there again after the run:
#   mkdir -p .gpu/autotune && tar -xf autotune.tar -C .gpu/autotune     (autotune.tar: one call's copy)
autotune_dir=$PWD/.gpu/autotune

autotune_on() {  # every process after this reads and adds to the folder, if this XLA takes the flag
  mkdir -p "$autotune_dir" || return 0
  local flag="--xla_gpu_per_fusion_autotune_cache_dir=$autotune_dir" kept
  case " ${XLA_FLAGS:-} " in *" $flag "*) return 0 ;; esac  # (a resumed call's flags hold it already)
  kept=$(find "$autotune_dir" -type f | wc -l)
  if XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flag" timeout 120 python3 -c "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()" \
      >/dev/null 2>&1; then
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flag"
    log "autotuning results kept from earlier runs: $kept"
  else
    log "this XLA keeps no autotuning results (--xla_gpu_per_fusion_autotune_cache_dir refused): autotuning as usual"
  fi
}

autotune_back() {  # the folder, as it is now, into $OUT
  [ -d "$autotune_dir" ] && [ -n "$(ls -A "$autotune_dir")" ] && tar -C "$autotune_dir" -cf "$out/autotune.tar" . \
    && log "autotuning results to bring back: $(find "$autotune_dir" -type f | wc -l)"
  return 0
}

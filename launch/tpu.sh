#!/usr/bin/env bash
# Thin, idempotent TPU VM / pod-slice driver for warp_jax.
#
#   launch/tpu.sh create            # create the TPU VM (skipped if it exists)
#   launch/tpu.sh setup             # copy this checkout to every worker and install it
#   launch/tpu.sh run ARGS...       # python -m experiments.gemma_warp --distributed ARGS on
#                                   # every worker (one JAX process per host; --workdir must be
#                                   # a directory all workers see, e.g. a gcsfuse mount)
#   launch/tpu.sh delete            # tear the VM down
#
# Settings come from the environment: TPU_NAME, ZONE, ACCELERATOR (e.g. v5litepod-16),
# RUNTIME (the TPU software version), PROJECT (optional). Jobs resume from their --workdir.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR="${ACCELERATOR:-v5litepod-8}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project "$PROJECT")
tpu=(gcloud compute tpus tpu-vm "${project_flag[@]}")
on_all() { "${tpu[@]}" ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

case "${1:-}" in
  create)
    if "${tpu[@]}" describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
      echo "$TPU_NAME exists"
    else
      "${tpu[@]}" create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
        --version "$RUNTIME"
    fi ;;
  setup)
    "${tpu[@]}" scp --recurse --worker=all --zone "$ZONE" "$(git rev-parse --show-toplevel)" \
      "$TPU_NAME":~/warp_jax
    on_all 'cd ~/warp_jax && python3 -m venv .venv && .venv/bin/pip install -q -U pip &&
            .venv/bin/pip install -q "jax[tpu]>=0.10.2,<0.11" -e .' ;;
  run)
    shift
    # Each argument quoted for the workers' shell, so that spaces, quotes and parentheses in
    # config overrides (e.g. --config.rl.stop_pieces="('<end_of_turn>',)") arrive intact.
    args=$(printf ' %q' "$@")
    on_all "cd ~/warp_jax && .venv/bin/python -m experiments.gemma_warp --distributed${args}" ;;
  delete)
    "${tpu[@]}" delete "$TPU_NAME" --zone "$ZONE" --quiet ;;
  *)
    sed -n '2,14p' "$0"; exit 2 ;;
esac

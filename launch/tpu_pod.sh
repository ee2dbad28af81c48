#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice (a pod): one JAX process per
# worker, which t2jax joins into one runtime (T2JAX_DISTRIBUTED=1; JAX finds the coordinator
# and process ids from the TPU metadata).
#
#   launch/tpu_pod.sh NAME ZONE [--project P] [--setup] [--dry-run] -- COMMAND [ARGS...]
#
#   # once: copy this checkout to every worker and install it with the TPU extra
#   launch/tpu_pod.sh my-v5e-16 us-west4-a --setup -- true
#   # train; checkpoints go to GCS, readable by every worker (and by a later, larger slice)
#   launch/tpu_pod.sh my-v5e-16 us-west4-a -- python -m t2jax.train --config configs/math.py \
#       --config.model=/mnt/models/llama3-8b --config.mesh=data:-1,fsdp:8,tensor:1 \
#       --config.checkpoint_dir=gs://my-bucket/t2jax/math --workdir runs/math
#
# Logs, metrics, TensorBoard events and experts are written by worker 0 into --workdir on its
# own disk. The model must be readable on every worker at the same path (copied there, or a
# gcsfuse mount). --dry-run prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  echo "usage: $0 NAME ZONE [--project P] [--setup] [--dry-run] -- COMMAND [ARGS...]" >&2
  exit 2
}
[[ $# -ge 2 && "$1" != --* && "$2" != --* ]] || usage
name=$1 zone=$2; shift 2
project=() setup=0 dry=0
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --project) [[ -n "${2:-}" ]] || usage; project=(--project "$2"); shift 2 ;;
    --setup) setup=1; shift ;;
    --dry-run) dry=1; shift ;;
    *) echo "$0: unknown option $1" >&2; usage ;;
  esac
done
[[ "${1:-}" == "--" && $# -ge 2 ]] || usage
shift

remote_dir='$HOME/t2jax'  # expanded on the worker
quoted=$(printf '%q ' "$@")

run() {
  if (( dry )); then printf '%q ' "$@"; echo; else "$@"; fi
}
if (( ! dry )) && ! command -v gcloud >/dev/null; then
  echo "$0: gcloud is not on PATH; install the Google Cloud CLI and run 'gcloud auth login'." >&2
  exit 2
fi

if (( setup )); then
  repo=$(cd "$(dirname "$0")/.." && pwd)
  archive=$(mktemp -t t2jax.XXXXXX.tar.gz)
  (cd "$repo" && git ls-files -z | tar --null -czf "$archive" -T -)
  run gcloud compute tpus tpu-vm scp "$archive" "$name:/tmp/t2jax.tar.gz" --zone "$zone" \
      "${project[@]}" --worker=all
  run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all \
      --command "mkdir -p $remote_dir && tar -xzf /tmp/t2jax.tar.gz -C $remote_dir && pip install -q -e \"$remote_dir[tpu]\""
  rm -f "$archive"
fi

run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all \
    --command "cd $remote_dir && T2JAX_DISTRIBUTED=1 $quoted"

#!/usr/bin/env bash
# Runs COMMAND as N cooperating JAX processes on this machine, the way a pod runs one process
# per host: each gets its own CPU devices, collectives go over gloo, the coordinator listens on
# 127.0.0.1. Use it to try a multi-host run before paying for one.
#
#   launch/local_multiprocess.sh N [--devices K] [--port P] -- COMMAND [ARGS...]
#   launch/local_multiprocess.sh 2 -- python -m t2jax.train --config configs/math.py
#
# Every process runs COMMAND (found on PATH) with JAX_COORDINATOR_ADDRESS, T2JAX_NUM_PROCESSES
# and T2JAX_PROCESS_ID set; t2jax's entry points join the runtime from them. Output lines are
# prefixed with [i]. If one process fails, JAX stops the others about 30 s later (when the
# coordinator misses its heartbeats); any still running after T2JAX_GRACE_S seconds (default
# 40) are killed. The exit status is the first failure's.
set -uo pipefail

usage() { echo "usage: $0 N [--devices K] [--port P] -- COMMAND [ARGS...]" >&2; exit 2; }

[[ $# -ge 1 && "$1" =~ ^[1-9][0-9]*$ ]] || usage
n=$1; shift
devices=1
port=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --devices) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || usage; devices=$2; shift 2 ;;
    --port) [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || usage; port=$2; shift 2 ;;
    *) echo "$0: unknown option $1" >&2; usage ;;
  esac
done
[[ "${1:-}" == "--" && $# -ge 2 ]] || usage
shift
command -v "$1" >/dev/null || { echo "$0: command '$1' is not on PATH" >&2; exit 2; }

if [[ -z "$port" ]]; then  # a free port, chosen by the kernel
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
grace=${T2JAX_GRACE_S:-40}

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  sleep 2
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'echo "local_multiprocess: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  (
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" T2JAX_NUM_PROCESSES="$n" T2JAX_PROCESS_ID="$i"
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
    exec "$@"
  ) > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
  echo "local_multiprocess: process $i pid $! ($devices CPU devices)" >&2
done

# Wait for every process; after the first failure give the rest `grace` seconds, then kill.
status=0
remaining=$n
deadline=""
declare -A done_
while (( remaining > 0 )); do
  for i in "${!pids[@]}"; do
    [[ -n "${done_[$i]:-}" ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      wait "${pids[$i]}"; rc=$?
      done_[$i]=1; remaining=$((remaining - 1))
      if (( rc != 0 )); then
        echo "local_multiprocess: process $i (pid ${pids[$i]}) exited with status $rc" >&2
        if (( status == 0 )); then
          status=$rc
          deadline=$(( $(date +%s) + grace ))
          (( remaining > 0 )) && echo "local_multiprocess: the other processes get ${grace}s to stop, then are killed" >&2
        fi
      fi
    fi
  done
  if [[ -n "$deadline" ]] && (( remaining > 0 && $(date +%s) >= deadline )); then
    echo "local_multiprocess: killing the $remaining process(es) still running after process failure" >&2
    stop_all
    wait 2>/dev/null
    break
  fi
  sleep 0.5
done
exit "$status"

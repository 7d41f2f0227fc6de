#!/usr/bin/env bash
# Join a Ray cluster as a worker node, in the foreground. Waits for the head first, so a
# worker container may start before its head is ready.
#
# Settings (environment):
#   RAY_HEAD_ADDRESS        host:port of the head's GCS (required, e.g. ray-head:6379)
#   RAY_NODE_IP             address this node advertises  (default: Ray's guess)
#   RAY_NUM_CPUS / RAY_NUM_GPUS   resources to offer      (default: detected)
#   RAY_TEMP_DIR            this node's session directory root (default: Ray's; two nodes on
#                           one machine need different ones)
#   WAIT_TIMEOUT_S          how long to wait for the head (default 120)
# Arguments are passed on to `ray start`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/refuse-placeholder-secrets.sh" RAY_AUTH_TOKEN

head_address="${RAY_HEAD_ADDRESS:-}"
if [[ -z "$head_address" ]]; then
  echo "ray-worker: RAY_HEAD_ADDRESS is not set; set it to the head's host:port," \
    "e.g. RAY_HEAD_ADDRESS=ray-head:6379" >&2
  exit 2
fi

# A plain TCP probe of the head's GCS port: cheap, and `ray start` retries the handshake itself.
head_host="${head_address%:*}"
head_port="${head_address##*:}"
timeout_s="${WAIT_TIMEOUT_S:-120}"
deadline=$((SECONDS + timeout_s))
until (exec 3<>"/dev/tcp/$head_host/$head_port") 2>/dev/null; do
  if ((SECONDS >= deadline)); then
    echo "ray-worker: no Ray head answered at $head_address within ${timeout_s}s" >&2
    exit 1
  fi
  sleep 2
done

args=(--address="$head_address" --disable-usage-stats --block)
[[ -n "${RAY_NODE_IP:-}" ]] && args+=(--node-ip-address="$RAY_NODE_IP")
[[ -n "${RAY_NUM_CPUS:-}" ]] && args+=(--num-cpus="$RAY_NUM_CPUS")
[[ -n "${RAY_NUM_GPUS:-}" ]] && args+=(--num-gpus="$RAY_NUM_GPUS")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="$RAY_TEMP_DIR")

# Trials on this node start on gradgym's allocator (gradgym/platform/allocator.py; Ray's
# workers inherit the environment of `ray start`). GRADGYM_MALLOC=system keeps glibc's.
preload="$(python -m gradgym.platform.allocator)"
[[ -n "$preload" ]] && export LD_PRELOAD="$preload${LD_PRELOAD:+ $LD_PRELOAD}"

echo "ray-worker: joining the Ray cluster at $head_address" >&2
exec ray start "${args[@]}" "$@"

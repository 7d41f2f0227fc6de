#!/usr/bin/env bash
# Start a Ray head node in the foreground, so it is the main process of its container
# (or of a terminal). Ctrl-C / SIGTERM stops the node and every process it started.
#
# Settings (environment):
#   RAY_PORT                GCS port workers and drivers connect to      (default 6379)
#   RAY_DASHBOARD_HOST      interface the dashboard and Jobs API bind to (default 127.0.0.1;
#                           compose sets 0.0.0.0 inside the container and publishes the
#                           port on the host's 127.0.0.1 only)
#   RAY_DASHBOARD_PORT      dashboard and Jobs API port                  (default 8265)
#   RAY_CLIENT_SERVER_PORT  Ray Client port                              (default 10001)
#   RAY_NODE_IP             address this node advertises                 (default: Ray's guess)
#   RAY_NUM_CPUS / RAY_NUM_GPUS   resources to offer                     (default: detected)
#   RAY_TEMP_DIR            Ray's session directory root                 (default: Ray's)
# Arguments are passed on to `ray start`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/refuse-placeholder-secrets.sh" RAY_AUTH_TOKEN

args=(
  --head
  --port="${RAY_PORT:-6379}"
  --dashboard-host="${RAY_DASHBOARD_HOST:-127.0.0.1}"
  --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
  --ray-client-server-port="${RAY_CLIENT_SERVER_PORT:-10001}"
  --disable-usage-stats
  --block
)
[[ -n "${RAY_NODE_IP:-}" ]] && args+=(--node-ip-address="$RAY_NODE_IP")
[[ -n "${RAY_NUM_CPUS:-}" ]] && args+=(--num-cpus="$RAY_NUM_CPUS")
[[ -n "${RAY_NUM_GPUS:-}" ]] && args+=(--num-gpus="$RAY_NUM_GPUS")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="$RAY_TEMP_DIR")

# Trials on this node start on gradgym's allocator (gradgym/platform/allocator.py; Ray's
# workers inherit the environment of `ray start`). GRADGYM_MALLOC=system keeps glibc's.
preload="$(python -m gradgym.platform.allocator)"
[[ -n "$preload" ]] && export LD_PRELOAD="$preload${LD_PRELOAD:+ $LD_PRELOAD}"

echo "ray-head: starting Ray head on port ${RAY_PORT:-6379}, dashboard" \
  "http://${RAY_DASHBOARD_HOST:-127.0.0.1}:${RAY_DASHBOARD_PORT:-8265}" >&2
exec ray start "${args[@]}" "$@"

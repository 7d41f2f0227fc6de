#!/usr/bin/env bash
# Submit a sweep file to a Ray cluster and log it to an MLflow server:
#   submit-sweep.sh configs/sweeps/FILE.yaml [more `gradgym sweep` arguments]
#
# RAY_ADDRESS decides where the sweep's driver (`gradgym sweep`) runs:
#   http(s)://head:8265   a Ray Jobs API (the dashboard address): the driver runs on the
#                         cluster as a Ray job and this script follows its logs until it ends;
#                         SWEEP_WORKING_DIR (default: the current directory) is uploaded with
#                         it, so the sweep file path is taken relative to that directory.
#   host:6379, auto or unset   the driver runs here, on a node of that cluster (or on a local
#                         Ray when unset), exactly as `gradgym sweep` would.
# MLFLOW_TRACKING_URI is waited for (wait-for-mlflow.sh) and handed to the driver and trials.
# SWEEP_STORAGE, if set, is where the sweep keeps its state and trial folders (the sweep's
# `storage` key): on a multi-node cluster, a folder every node mounts at that same path.
# Exits with the sweep's exit status.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/refuse-placeholder-secrets.sh" RAY_AUTH_TOKEN

if (($# < 1)); then
  echo "usage: submit-sweep.sh SWEEP_FILE [gradgym sweep arguments...]" >&2
  exit 2
fi
sweep_file="$1"
shift
sweep_args=("$@")
[[ -n "${SWEEP_STORAGE:-}" ]] && sweep_args+=("storage=$SWEEP_STORAGE")
if [[ ! -f "$sweep_file" ]]; then
  echo "submit-sweep: sweep file '$sweep_file' not found (from $(pwd)); pass a YAML file such" \
    "as configs/sweeps/<name>.yaml" >&2
  exit 2
fi

"$here/wait-for-mlflow.sh"

ray_address="${RAY_ADDRESS:-}"
if [[ ! "$ray_address" =~ ^https?:// ]]; then
  echo "submit-sweep: running 'gradgym sweep $sweep_file' here (RAY_ADDRESS='${ray_address}')" >&2
  exec gradgym sweep "$sweep_file" "${sweep_args[@]}"
fi

working_dir="$(realpath "${SWEEP_WORKING_DIR:-.}")"
sweep_path="$(realpath "$sweep_file")"
if [[ "$sweep_path" != "$working_dir"/* ]]; then
  echo "submit-sweep: sweep file '$sweep_file' lies outside SWEEP_WORKING_DIR '$working_dir';" \
    "the job can only read files uploaded with that directory" >&2
  exit 2
fi
relative_sweep="${sweep_path#"$working_dir"/}"

# The driver and every trial get the tracking URI through the
# job's runtime environment, whatever the cluster nodes' own environment says.
runtime_env="$(python3 - <<'PY'
import json
import os

names = ("MLFLOW_TRACKING_URI",)
env_vars = {name: os.environ[name] for name in names if os.environ.get(name)}
print(json.dumps({"env_vars": env_vars}))
PY
)"

echo "submit-sweep: submitting 'gradgym sweep $relative_sweep' to the Ray cluster at" \
  "$ray_address (working dir $working_dir)" >&2
exec ray job submit \
  --address="$ray_address" \
  --working-dir="$working_dir" \
  --runtime-env-json="$runtime_env" \
  -- gradgym sweep "$relative_sweep" "${sweep_args[@]}"

#!/usr/bin/env bash
# Wait until the MLflow tracking server at MLFLOW_TRACKING_URI (or the first argument)
# answers its /health endpoint. Exits 0 at once for a local store (no server to wait for),
# 1 when the server does not answer within WAIT_TIMEOUT_S seconds (default 120).
set -euo pipefail

uri="${1:-${MLFLOW_TRACKING_URI:-}}"
if [[ ! "$uri" =~ ^https?:// ]]; then
  echo "wait-for-mlflow: MLFLOW_TRACKING_URI='${uri}' is not an http(s) server; nothing to wait for" >&2
  exit 0
fi

timeout_s="${WAIT_TIMEOUT_S:-120}"
deadline=$((SECONDS + timeout_s))
until python3 - "${uri%/}/health" <<'PY'
import sys
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
PY
do
  if ((SECONDS >= deadline)); then
    echo "wait-for-mlflow: no MLflow server answered at ${uri%/}/health within ${timeout_s}s" >&2
    exit 1
  fi
  sleep 2
done
echo "wait-for-mlflow: MLflow server at $uri is up" >&2

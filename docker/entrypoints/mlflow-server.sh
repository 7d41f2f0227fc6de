#!/usr/bin/env bash
# Run an MLflow tracking server in the foreground with a PostgreSQL backend store and
# proxied artifact storage (clients upload artifacts through the server, so Ray nodes need
# no shared volume).
#
# Settings (environment):
#   MLFLOW_BACKEND_STORE_URI  full store URI; if unset it is built from the POSTGRES_* values
#   POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB   credentials (from docker/.env in compose)
#   POSTGRES_HOST / POSTGRES_PORT                   database address (default postgres:5432)
#   MLFLOW_HOST               interface to bind          (default 127.0.0.1; compose: 0.0.0.0)
#   MLFLOW_PORT               port                       (default 5000)
#   MLFLOW_WORKERS            server processes           (default 2)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts are stored (default ./mlartifacts)
#   MLFLOW_ALLOWED_HOSTS      Host headers to accept, comma-separated (default: MLflow's,
#                             localhost and private IPs; compose adds the service name)
# Arguments are passed on to `mlflow server`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/refuse-placeholder-secrets.sh" POSTGRES_PASSWORD MLFLOW_BACKEND_STORE_URI

if [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
  missing=()
  for name in POSTGRES_USER POSTGRES_PASSWORD POSTGRES_DB; do
    [[ -n "${!name:-}" ]] || missing+=("$name")
  done
  if ((${#missing[@]})); then
    echo "mlflow-server: ${missing[*]} not set; set MLFLOW_BACKEND_STORE_URI, or all of" \
      "POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB (see docker/.env.example)" >&2
    exit 2
  fi
  # Built here and handed over in the environment, so the password never appears in the
  # process list; user and password are percent-encoded in case they hold '@' or ':'.
  MLFLOW_BACKEND_STORE_URI="$(python3 - <<'PY'
import os
from urllib.parse import quote

user = quote(os.environ["POSTGRES_USER"], safe="")
password = quote(os.environ["POSTGRES_PASSWORD"], safe="")
host = os.environ.get("POSTGRES_HOST", "postgres")
port = os.environ.get("POSTGRES_PORT", "5432")
print(f"postgresql+psycopg://{user}:{password}@{host}:{port}/{os.environ['POSTGRES_DB']}")
PY
)"
fi
export MLFLOW_BACKEND_STORE_URI
# MLflow's background job runners serve GenAI features gradgym does not use; off unless asked.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

args=(
  --host="${MLFLOW_HOST:-127.0.0.1}"
  --port="${MLFLOW_PORT:-5000}"
  --workers="${MLFLOW_WORKERS:-2}"
  --serve-artifacts
  --artifacts-destination="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
)
[[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]] && args+=(--allowed-hosts="$MLFLOW_ALLOWED_HOSTS")

echo "mlflow-server: serving on http://${MLFLOW_HOST:-127.0.0.1}:${MLFLOW_PORT:-5000}" >&2
exec mlflow server "${args[@]}" "$@"

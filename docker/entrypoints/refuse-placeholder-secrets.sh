#!/usr/bin/env bash
# Refuse to start with the placeholder secrets of docker/.env.example:
#   refuse-placeholder-secrets.sh NAME [NAME...]
# Exits 2, naming the variables, if any of the named environment variables is set to a value
# that holds "change-me" (the placeholder) in any case; unset variables are left to the caller.
set -euo pipefail

placeholders=()
for name in "$@"; do
  value="${!name:-}"
  if [[ "${value,,}" == *change-me* ]]; then
    placeholders+=("$name")
  fi
done
if ((${#placeholders[@]})); then
  echo "refusing to start: ${placeholders[*]} still hold the placeholder 'change-me' of" \
    "docker/.env.example; put real secrets in docker/.env, e.g." \
    "python3 -c \"import secrets; print(secrets.token_hex(32))\"" >&2
  exit 2
fi

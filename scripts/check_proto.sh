#!/usr/bin/env bash
# Fails when the committed stubs in kvevict/v1/ differ from what proto/ generates.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m grpc_tools.protoc -Iproto --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" proto/kvevict/v1/*.proto
for generated in "$tmp"/kvevict/v1/*; do
  if ! cmp -s "$generated" "kvevict/v1/$(basename "$generated")"; then
    echo "kvevict/v1/$(basename "$generated") is stale: run 'make proto' and commit" >&2
    exit 1
  fi
done
echo "protobuf stubs are current"

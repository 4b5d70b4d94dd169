#!/usr/bin/env bash
# Regenerates the Python stubs of proto/ into kvevict/v1/ (committed; CI checks they are current).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
rm -f kvevict/v1/*_pb2*.py kvevict/v1/*_pb2*.pyi
"$PY" -m grpc_tools.protoc -Iproto \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  proto/kvevict/v1/*.proto
touch kvevict/v1/__init__.py

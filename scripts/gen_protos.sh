#!/usr/bin/env bash
# Regenerates the Python stubs in gen/ from protos/ (one command for every stub; CI fails when its output differs from gen/).
# With --check, regenerates into a temporary folder and fails if gen/ differs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gen
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT  # removed whether the check passes or fails
fi
mkdir -p "$out"
python -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/coolfusion/v1/*.proto
if [ "$out" != gen ]; then
  diff -r -x __init__.py -x __pycache__ "$out/coolfusion/v1" gen/coolfusion/v1 \
    || { echo "gen/ is stale: run scripts/gen_protos.sh and commit" >&2; exit 1; }
fi

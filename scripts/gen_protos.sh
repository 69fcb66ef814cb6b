#!/usr/bin/env bash
# Regenerate the Python stubs of protos/ into client/lawchat/v1 (grpcio-tools).
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: client) — CI diffs a fresh run against the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-client}"
mkdir -p "$out/lawchat/v1"
python -m grpc_tools.protoc -I protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/lawchat/v1/*.proto
touch "$out/lawchat/__init__.py" "$out/lawchat/v1/__init__.py"

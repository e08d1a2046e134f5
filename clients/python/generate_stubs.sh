#!/usr/bin/env bash
# Generates the gRPC stubs from ../../proto into voxconv_client/_gen (needs grpcio-tools).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/voxconv_client/_gen"
mkdir -p "$out"
python -m grpc_tools.protoc -I "$here/../../proto" --python_out="$out" --grpc_python_out="$out" \
  voxconv/v1/voxconv.proto
touch "$out/__init__.py" "$out/voxconv/__init__.py" "$out/voxconv/v1/__init__.py"
echo "stubs written to $out"

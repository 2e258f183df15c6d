#!/usr/bin/env bash
# Regenerates the Python stubs of leasehold.v1 from proto/ with grpcio-tools (pinned in
# requirements.txt). The generated files are never edited by hand; run this after changing a
# .proto. Usage: generate.sh [OUT_DIR] (default: this directory). PYTHON picks the interpreter.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
mkdir -p "$out"
# google/rpc/status.proto comes from googleapis-common-protos at run time; only leasehold's
# own files are generated.
"${PYTHON:-python3}" -m grpc_tools.protoc \
  --proto_path="$here/../../proto" \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
  leasehold/v1/types.proto leasehold/v1/worker_service.proto \
  leasehold/v1/task_service.proto leasehold/v1/admin_service.proto

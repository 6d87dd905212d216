#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf code from proto/ (grpcio-tools and mypy-protobuf pinned in
# pyproject's dev extras). With --check, generate into a scratch directory and fail if the committed
# code differs (CI runs this).
#
# The source lives at proto/jobworker/v1/jobworker.proto (package jobworker.v1), but the Python
# modules must import as jobworker.api.v1.*: protoc derives import paths from the file's path under
# -I, so we compile a copy placed at jobworker/api/v1/jobworker.proto in a scratch include root.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_BIN=${VENV_BIN:-.venv/bin}
PY=$VENV_BIN/python
OUT_PKG=jobworker/api/v1
check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/include/$OUT_PKG" "$work/out/$OUT_PKG"
cp proto/jobworker/v1/*.proto "$work/include/$OUT_PKG/"

"$PY" -m grpc_tools.protoc \
  -I "$work/include" \
  --plugin=protoc-gen-mypy="$VENV_BIN/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$VENV_BIN/protoc-gen-mypy_grpc" \
  --python_out="$work/out" \
  --grpc_python_out="$work/out" \
  --mypy_out="$work/out" \
  --mypy_grpc_out="$work/out" \
  "$work/include/$OUT_PKG"/*.proto

dest=src/$OUT_PKG
if [[ $check == 1 ]]; then
  status=0
  for f in "$work/out/$OUT_PKG"/*; do
    name=$(basename "$f")
    if ! diff -u "$dest/$name" "$f" >/dev/null 2>&1; then
      echo "stale: $dest/$name (run: make proto)" >&2
      status=1
    fi
  done
  for f in "$dest"/*_pb2*; do
    [[ -e $f ]] || continue
    [[ -e "$work/out/$OUT_PKG/$(basename "$f")" ]] || { echo "not generated: $f" >&2; status=1; }
  done
  [[ $status == 0 ]] && echo "generated code is current"
  exit $status
fi

mkdir -p "$dest"
rm -f "$dest"/*_pb2*
cp "$work/out/$OUT_PKG"/* "$dest/"
echo "generated into $dest"

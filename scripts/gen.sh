#!/usr/bin/env bash
# Regenerates gen/ from protos/: Python messages, gRPC stubs and mypy stubs.
# One command (`make gen`); CI fails when the committed gen/ differs from its output.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
# protoc-gen-mypy and protoc-gen-mypy_grpc come from mypy-protobuf in the venv.
export PATH="$(dirname "$py"):$PATH"
google_protos=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')

rm -rf gen/c2d
mkdir -p gen
mapfile -t protos < <(find protos -name '*.proto' | sort)
"$py" -m grpc_tools.protoc \
  -I protos -I third_party/googleapis -I "$google_protos" \
  --python_out=gen --grpc_python_out=gen \
  --mypy_out=gen --mypy_grpc_out=gen \
  "${protos[@]}" 2> >(grep -v '^Writing mypy to' >&2)
# Packages, so that setuptools and mypy find every generated module.
find gen/c2d -type d -exec touch {}/__init__.py \;
touch gen/c2d/py.typed

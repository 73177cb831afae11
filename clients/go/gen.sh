#!/usr/bin/env bash
# The Go stubs of proto/payments/v1/payments.proto, made with the pinned protoc-gen-go and
# protoc-gen-go-grpc (tools/go.mod, built into .tools/bin) and scripts/gen.sh's include paths:
#   clients/go/gen.sh [MODULE_DIR]   writes MODULE_DIR/paymentsv1 (default: clients/go, git-ignored)
# The proto's go_package is for protoc-gen-openapiv2 only; M maps the file into this module instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(mkdir -p "${1:-$here}" && cd "${1:-$here}" && pwd)
py=${PYTHON:-$root/.venv/bin/python}
tools=${TOOLS_BIN:-$root/.tools/bin}
site=$("$py" -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))')
wkt=$("$py" -c 'import grpc_tools, os; print(os.path.join(grpc_tools.__path__[0], "_proto"))')
module=payments/clients/go
map=Mpayments/v1/payments.proto=$module/paymentsv1
rm -rf "$out/paymentsv1"
cd "$root"
"$py" -m grpc_tools.protoc -I proto -I proto/vendor/grpc-gateway -I "$site" -I "$wkt" \
  --plugin=protoc-gen-go="$tools/protoc-gen-go" --plugin=protoc-gen-go-grpc="$tools/protoc-gen-go-grpc" \
  --go_out="$out" --go_opt=module=$module,$map \
  --go-grpc_out="$out" --go-grpc_opt=module=$module,$map \
  payments/v1/payments.proto

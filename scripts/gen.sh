#!/usr/bin/env bash
# The one command behind `make gen`: every generated artefact comes from proto/ here.
#   gen/python/         Python messages and gRPC stubs (not committed; never beside server/ code)
#   gen/rest_bindings.lua  the REST routes' path and body fields, for Envoy's Lua filter (not committed)
#   gen/payments.pb     descriptor set for Envoy's grpc_json_transcoder (--include_imports: google/api,
#                       google/rpc and protobuf types travel with it)
#   openapi/payments.swagger.json   the OpenAPI v2 document (committed; tests prove it is fresh)
#   openapi/payments.openapi.json   the same as OpenAPI 3.0 (kin-openapi's converter: tools/openapi3)
#   envoy/envoy-tls.yaml, envoy-gke.yaml, envoy-cloudrun.yaml   envoy.yaml over TLS, behind GKE's Gateway, behind Cloud Run
#                                   (committed; scripts/envoy_variants.py)
# and refreshes proto/vendor/grpc-gateway/ (the openapiv2 option protos payments.proto imports) from
# the grpc-gateway module tools/go.mod pins, so the images compile the proto without Go.
# Usage: scripts/gen.sh [--code-only] [OUT_DIR]   (OUT_DIR defaults to the repo; tests pass a temp
#   dir to compare). --code-only: stubs and descriptor set, no Go and no document (the image builds:
#   they ship the committed document, which tests prove fresh).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
code_only=false
if [ "${1:-}" = --code-only ]; then code_only=true; shift; fi
out=${1:-$root}
py=${PYTHON:-$root/.venv/bin/python}
tools=${TOOLS_BIN:-$root/.tools/bin}
vendor=$root/proto/vendor/grpc-gateway

# Include paths: our protos, google/api + google/rpc (googleapis-common-protos), google/protobuf
# (grpcio-tools) and the openapiv2 options (vendored from the pinned grpc-gateway module).
site=$("$py" -c 'import google.api, os; print(os.path.dirname(os.path.dirname(google.api.__path__[0])))')
wkt=$("$py" -c 'import grpc_tools, os; print(os.path.join(grpc_tools.__path__[0], "_proto"))')

protos=(proto/payments/v1/payments.proto)
options=(protoc-gen-openapiv2/options/annotations.proto protoc-gen-openapiv2/options/openapiv2.proto)

if ! $code_only && [ "$out" = "$root" ]; then
  gw=$(cd "$root/tools" && go list -m -f '{{.Dir}}' github.com/grpc-ecosystem/grpc-gateway/v2)
  for f in "${options[@]}"; do install -m 644 "$gw/$f" "$vendor/$f"; done
  install -m 644 "$gw/LICENSE" "$vendor/LICENSE"
fi

rm -rf "$out/gen/python"
mkdir -p "$out/gen/python"
cd "$root"
protoc=("$py" -m grpc_tools.protoc -I proto -I "$vendor" -I "$site" -I "$wkt")

"${protoc[@]}" --python_out="$out/gen/python" --pyi_out="$out/gen/python" \
  --grpc_python_out="$out/gen/python" "${protos[@]#proto/}"
"${protoc[@]}" --python_out="$out/gen/python" "${options[@]}"
# google/rpc status + error details ride along so Envoy can render error details (Any) as JSON.
"${protoc[@]}" --include_imports --include_source_info \
  --descriptor_set_out="$out/gen/payments.pb" "${protos[@]#proto/}" google/rpc/status.proto google/rpc/error_details.proto
# What Envoy's Lua filter checks REST requests against (the routes' path and body fields).
"$py" "$root/scripts/rest_bindings.py" "$out/gen/payments.pb" "$out/gen/rest_bindings.lua"
if $code_only; then
  echo "generated: gen/python gen/payments.pb gen/rest_bindings.lua"
  exit 0
fi
mkdir -p "$out/openapi"
"${protoc[@]}" --plugin=protoc-gen-openapiv2="$tools/protoc-gen-openapiv2" \
  --openapiv2_out="$out/openapi" \
  --openapiv2_opt=logtostderr=true,json_names_for_fields=false,enums_as_ints=false,disable_default_errors=true,allow_merge=true,merge_file_name=payments,omit_enum_default_value=true,simple_operation_ids=true,use_allof_for_refs=true,omit_array_item_type_when_ref_sibling=true,preserve_rpc_order=true \
  "${protos[@]#proto/}"
# What the plugin cannot be told: an example for every error response, models without its prefixes.
"$py" "$root/scripts/openapi_polish.py" "$out/openapi/payments.swagger.json"
"$tools/openapi3" "$out/openapi/payments.swagger.json" "$out/openapi/payments.openapi.json"
mkdir -p "$out/envoy"
"$py" "$root/scripts/envoy_variants.py" "$root/envoy/envoy.yaml" "$out/envoy"
echo "generated: gen/python gen/payments.pb openapi/payments.swagger.json envoy/envoy-tls.yaml envoy/envoy-gke.yaml envoy/envoy-cloudrun.yaml"
